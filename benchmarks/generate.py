"""Generation speed: KV-cache decoding against recomputation at 2048 tokens, and ``generate()``.

Models: ``model_config(size)`` for each size (tiny, small), random initialisation (seed 0),
eval mode, fp32 on CPU: speed does not depend on the weights. Input: a real sample-corpus
sequence, the first train-split piece (dataset row order, ``prepare_corpus`` cached under
``build/bench_data``) with at least ``--length`` tokens, cut to ``--length``, with its side
information from the dataset (bar, instrument, token type, onset group), so the timing does not
depend on sampling.

* KV cache: a fresh ``IncrementalDecoder``; ``step(token, side...)`` for every position in
  order (the summaries of finished bars are computed inside ``step`` as in generation). The
  whole pass is timed; cumulative time is also read every ``--stride`` tokens (per-step cost
  as the cache grows).
* Recomputation (what generating without a cache does): for a new position t, a full
  forward over the prefix [0, t) with its masks (``build_masks(regular_stream(prefix))`` +
  ``model(ids[:, :t])``), keeping the last position's logits. That is O(T^2) over a sequence,
  so the per-step cost c(t) is timed at t in {1, 8, 16, 32} and every ``--stride``-th t from
  ``--stride`` to ``--length`` (best of ``--repeats``), linearly interpolated over every
  t = 1..T and summed: the time to produce T tokens one by one. Tokens/s = T / that sum.
  The marginal ratio at T (c(T) against the cache's mean step over the last ``--stride``
  positions) is reported too.
* Correctness check: the cache's logits at t - 1 against the recomputed prefix's last logits
  at every sampled t (max abs difference).
* ``generate()``: prompt_from_scratch (BOS, bar, 4/4, tempo), grammar + sampling (temperature 1,
  seed 0), ``bars`` large so only ``--gen-tokens`` ends it (EOS as soon as the grammar allows
  it after the budget). Tokens/s = generated + prompt tokens / wall time; one cProfile'd run
  (1 thread, first size) says where a generated token's time goes.
* ``generate_batch()``: the same with ``--batch`` pieces side by side (seeds 0, 1, ...): a
  decoding step reads the weights once for all of them. Tokens/s over all pieces, and the
  ratio to ``generate()``.

Threads: per-token decode steps are latency-bound; with other work on a small machine the
default (one thread per core) can suffer from OpenMP contention, so every measurement is made
with the default thread count and with ``torch.set_num_threads(1)``. Before each configuration
the script waits (``--max-wait``) until other processes use less than ``--quiet-threshold`` of
the CPUs. The load (1-min average
and the share of CPU time used by other processes during each measurement) is recorded.

Goal: KV cache >= 10x faster than recomputation at 2k tokens.
Run: ``.venv/bin/python benchmarks/generate.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, print_table, write_result  # noqa: E402
from train import LoadMeter, wait_for_quiet  # noqa: E402

from meloformer_model.data.pipeline import prepare_corpus  # noqa: E402
from meloformer_model.generation import (  # noqa: E402
    Grammar,
    SamplingConfig,
    _sample,
    generate,
    generate_batch,
    prompt_from_scratch,
)
from meloformer_model.model import (  # noqa: E402
    IncrementalDecoder,
    MeloFormer,
    RMSNorm,
    SwiGLU,
    _decode_attend,
    apply_rope,
    build_masks,
    expected_parameters,
    model_config,
    regular_stream,
    visible,
)
from meloformer_model.paths import SAMPLE_CORPUS_DIR  # noqa: E402
from meloformer_model.tokenizer.hid import HIDTokenizer, IncrementalSideInformation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT = ROOT / "build" / "bench_data"
GOAL_SPEEDUP = 10.0
SIDE = ("bar", "instrument", "token_type", "onset_group")


# --------------------------------------------------------------------------------- input
def pick_sequence(split, length: int) -> dict:
    lengths = np.asarray(split["length"])
    index = int(np.argmax(lengths >= length))
    if lengths[index] < length:
        raise SystemExit(f"no train piece has {length} tokens")
    row = split[index]
    arrays = {name: torch.tensor(row[name][:length], dtype=torch.long)[None]
              for name in ("ids", *SIDE)}  # fmt: skip
    return {"row": index, "path": row["path"], "piece_length": int(lengths[index]),
            "arrays": arrays, "bars": int(arrays["bar"].max()) + 1}  # fmt: skip


# --------------------------------------------------------------------------------- timings
@torch.no_grad()
def kv_cache_pass(model, arrays, stride: int) -> dict:
    ids = arrays["ids"][0].tolist()
    side = [arrays[name][0].tolist() for name in SIDE]
    decoder = IncrementalDecoder(model, capacity=len(ids))  # allocated once, as generation does
    logits, marks = {}, []
    keep = set(range(stride - 1, len(ids), stride)) | {0, 7, 15, 31}
    with LoadMeter() as meter:
        start = time.perf_counter()
        for i, token in enumerate(ids):
            out = decoder.step([token], *([column[i]] for column in side))[0]
            if i in keep:
                logits[i + 1] = out.clone()
            if (i + 1) % stride == 0:
                marks.append(time.perf_counter() - start)
        total = time.perf_counter() - start
    per_block = np.diff([0.0, *marks]) / stride
    return {"total_s": total, "tokens_per_s": len(ids) / total,
            "step_ms_per_block": (per_block * 1e3).tolist(),
            "last_block_step_s": float(per_block[-1]), "logits": logits,
            "load": meter.result}  # fmt: skip


@torch.no_grad()
def recompute_step(model, arrays, t: int) -> tuple[float, float, torch.Tensor]:
    """(mask build s, forward s, last logits) of one full forward over the prefix [0, t)."""
    start = time.perf_counter()
    masks = build_masks(model.config, regular_stream(*(arrays[n][:, :t] for n in SIDE)))
    built = time.perf_counter()
    logits = model(arrays["ids"][:, :t], masks)[0, -1]
    return built - start, time.perf_counter() - built, logits


def recompute_pass(model, arrays, length: int, stride: int, repeats: int, kv_logits) -> dict:
    points = sorted({1, 8, 16, 32, *range(stride, length + 1, stride), length})
    costs, masks_s, diffs = [], [], []
    with LoadMeter() as meter:
        recompute_step(model, arrays, min(64, length))  # warm-up (allocations)
        for t in points:
            best = (float("inf"), 0.0, 0.0)
            for _ in range(repeats):
                mask_s, fwd_s, logits = recompute_step(model, arrays, t)
                if mask_s + fwd_s < best[0]:
                    best = (mask_s + fwd_s, mask_s, fwd_s)
            costs.append(best[0])
            masks_s.append(best[1])
            if t in kv_logits:
                diffs.append(float((kv_logits[t] - logits).abs().max()))
    every = np.arange(1, length + 1)
    per_step = np.interp(every, points, costs)
    mask_share = float(np.interp(every, points, masks_s).sum() / per_step.sum())
    total = float(per_step.sum())
    return {"points": points, "step_s": costs, "mask_build_s": masks_s, "total_s": total,
            "tokens_per_s": length / total, "mask_build_share": mask_share,
            "step_s_at_length": costs[-1], "max_abs_diff_vs_kv_cache": max(diffs),
            "load": meter.result}  # fmt: skip


def generate_pass(model, tokenizer, n_tokens: int, seed: int = 0) -> dict:
    prompt = prompt_from_scratch(tokenizer)
    config = SamplingConfig(max_tokens=n_tokens, bars=100_000, seed=seed)
    with LoadMeter() as meter:
        start = time.perf_counter()
        ids = generate(model, tokenizer, prompt, config)
        wall = time.perf_counter() - start
    bars = int((ids == tokenizer.vocab["Bar"]).sum())
    return {"tokens": len(ids), "prompt_tokens": len(prompt), "bars": bars, "wall_s": wall,
            "tokens_per_s": len(ids) / wall, "load": meter.result}  # fmt: skip


def batch_pass(model, tokenizer, n_tokens: int, batch: int) -> dict:
    """``generate_batch``: ``batch`` pieces from the same prompt side by side (seeds 0..)."""
    prompt = prompt_from_scratch(tokenizer)
    config = SamplingConfig(max_tokens=n_tokens, bars=100_000)
    with LoadMeter() as meter:
        start = time.perf_counter()
        pieces = generate_batch(model, tokenizer, [prompt] * batch, config)
        wall = time.perf_counter() - start
    tokens = sum(len(ids) for ids in pieces)
    return {"pieces": batch, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "load": meter.result}  # fmt: skip


def profile_generate(model, tokenizer, n_tokens: int) -> dict:
    prompt = prompt_from_scratch(tokenizer)
    config = SamplingConfig(max_tokens=n_tokens, bars=100_000, seed=0)
    profiler = cProfile.Profile()
    profiler.enable()
    ids = generate(model, tokenizer, prompt, config)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    decoder, norm = IncrementalDecoder, RMSNorm
    buckets = {
        "IncrementalDecoder.step": decoder.step,
        "  _summarize (summaries of finished bars)": decoder._summarize,
        "  _mask (mask row via visible)": decoder._mask,
        "  visible (mask predicate)": visible,
        "  _decode_attend": _decode_attend,
        "  apply_rope": apply_rope,
        "  RMSNorm.forward": norm.forward,
        "  SwiGLU.forward": SwiGLU.forward,
        "IncrementalSideInformation.append (side info, current bar)": (
            IncrementalSideInformation.append
        ),
        "Grammar.allowed": Grammar.allowed,
        "Grammar.advance": Grammar.advance,
        "_sample": _sample,
    }
    cumulative = {}
    for label, func in buckets.items():
        code = inspect.unwrap(func).__code__
        key = (code.co_filename, code.co_firstlineno, code.co_name)
        cumulative[label] = stats.stats[key][3] if key in stats.stats else 0.0
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    return {"tokens": len(ids), "profiled_total_s": total, "cumulative_s": cumulative,
            "top_tottime": text.getvalue().splitlines()[:40]}  # fmt: skip


# --------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of, per recomputed t")
    parser.add_argument("--gen-tokens", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16, help="pieces for generate_batch")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts (default: torch's default, then 1)")  # fmt: skip
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--quiet-threshold", type=float, default=0.15,
                        help="before each configuration wait until other processes use less "
                             "than this share of the CPUs")  # fmt: skip
    parser.add_argument("--max-wait", type=float, default=180.0, help="longest wait, s")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-root", default=str(DATA_ROOT))
    parser.add_argument("--name", default="generate")
    args = parser.parse_args()

    start_all = time.perf_counter()
    default_threads = torch.get_num_threads()
    thread_list = args.threads or sorted({default_threads, 1}, reverse=True)
    prepared = prepare_corpus(SAMPLE_CORPUS_DIR, Path(args.data_root), workers=args.workers)
    data = datasets.load_from_disk(str(prepared.dataset.path))
    tokenizer = HIDTokenizer(prepared.vocab.config, prepared.vocab)
    vocab_size = len(prepared.vocab)
    seq = pick_sequence(data["train"], args.length)
    arrays = seq["arrays"]
    print(f"sequence: train row {seq['row']} ({Path(seq['path']).name}, {seq['piece_length']} "
          f"tokens) cut to {args.length}, {seq['bars']} bars; torch {torch.__version__}, default "
          f"{default_threads} threads, load average {os.getloadavg()}", flush=True)  # fmt: skip

    results, rows = {}, []
    profile = None
    for size in args.sizes:
        torch.manual_seed(0)
        model = MeloFormer(model_config(size, vocab_size)).eval()
        params = expected_parameters(model.config)
        for n in thread_list:
            torch.set_num_threads(n)
            key = f"{size}/threads={torch.get_num_threads()}"
            quiet = wait_for_quiet(args.quiet_threshold, args.max_wait)
            print(f"{key}: {params / 1e6:.2f} M parameters (other CPU use at start "
                  f"{quiet['other_cpu_share_at_start']:.0%})", flush=True)  # fmt: skip
            kv = kv_cache_pass(model, arrays, args.stride)
            print(f"  kv cache: {kv['total_s']:.1f} s, {kv['tokens_per_s']:,.0f} tok/s", flush=True)
            rec = recompute_pass(
                model, arrays, args.length, args.stride, args.repeats, kv["logits"]
            )
            print(f"  recompute: {rec['total_s']:.1f} s (integrated), "
                  f"{rec['tokens_per_s']:,.1f} tok/s; max |diff| "
                  f"{rec['max_abs_diff_vs_kv_cache']:.2e}", flush=True)  # fmt: skip
            gen = generate_pass(model, tokenizer, args.gen_tokens)
            print(f"  generate(): {gen['tokens']} tokens ({gen['bars']} bars) in "
                  f"{gen['wall_s']:.1f} s, "
                  f"{gen['tokens_per_s']:,.0f} tok/s", flush=True)  # fmt: skip
            batch = batch_pass(model, tokenizer, args.gen_tokens, args.batch)
            batch_gain = batch["tokens_per_s"] / gen["tokens_per_s"]
            print(f"  generate_batch(): {args.batch} pieces, {batch['tokens']} tokens in "
                  f"{batch['wall_s']:.1f} s, {batch['tokens_per_s']:,.0f} tok/s "
                  f"({batch_gain:.1f}x one piece)", flush=True)  # fmt: skip
            del kv["logits"]
            speedup = rec["total_s"] / kv["total_s"]
            marginal = rec["step_s_at_length"] / kv["last_block_step_s"]
            results[key] = {"size": size, "parameters": params, "threads": torch.get_num_threads(),
                            "kv_cache": kv, "recompute": rec, "generate": gen,
                            "generate_batch": batch, "batch_vs_one_piece": batch_gain,
                            "speedup_at_length": speedup, "marginal_speedup_at_length": marginal,
                            "goal_met": speedup >= GOAL_SPEEDUP, "quiet": quiet}  # fmt: skip
            rows.append([key, kv["tokens_per_s"], rec["tokens_per_s"], f"{speedup:.1f}x",
                         f"{marginal:.0f}x", kv["last_block_step_s"] * 1e3,
                         rec["step_s_at_length"] * 1e3, f"{rec['mask_build_share']:.0%}",
                         gen["tokens_per_s"], batch["tokens_per_s"], f"{batch_gain:.1f}x",
                         f"{rec['max_abs_diff_vs_kv_cache']:.1e}",
                         f"{kv['load']['load_1min_before']:.1f}/"
                         f"{kv['load']['other_cpu_share']:.0%}"])  # fmt: skip
        if profile is None and not args.no_profile:
            torch.set_num_threads(1)
            profile = {"size": size, "threads": 1} | profile_generate(model, tokenizer,
                                                                      args.gen_tokens)  # fmt: skip
        torch.set_num_threads(default_threads)

    print()
    print(f"generation at {args.length} tokens (recomputation integrated from every "
          f"{args.stride}th position)")  # fmt: skip
    print_table(["model/threads", "kv tok/s", "recompute tok/s", "speed-up", "marginal @T",
                 "kv ms/step @T", "recompute ms/step @T", "recompute mask share",
                 "generate() tok/s", f"batch of {args.batch} tok/s", "batch gain",
                 "max |diff|", "load/other CPU"], rows)  # fmt: skip
    all_met = all(r["goal_met"] for r in results.values())
    print(
        f"goal: KV cache >= {GOAL_SPEEDUP:.0f}x recomputation at {args.length} tokens -> "
        + ("met" if all_met else "missed")
        + " in every configuration" * all_met
    )
    if profile:
        print(f"\ngenerate() profile ({profile['size']}, 1 thread, cProfile, "
              f"{profile['tokens']} tokens, {profile['profiled_total_s']:.2f} s):")  # fmt: skip
        for label, value in profile["cumulative_s"].items():
            print(f"  {label:55s} {value:7.2f} s  {value / profile['profiled_total_s']:5.1%}")

    path = write_result(args.name, {
        "benchmark": "generate",
        "device": "cpu",
        "machine": machine(),
        "torch": torch.__version__,
        "default_threads": default_threads,
        "settings": {"sizes": args.sizes, "length": args.length, "stride": args.stride,
                     "repeats": args.repeats, "gen_tokens": args.gen_tokens,
                     "batch": args.batch,
                     "threads": thread_list, "init": "random (seed 0), eval, fp32"},
        "sequence": {k: v for k, v in seq.items() if k != "arrays"},
        "method": {
            "kv_cache": "IncrementalDecoder.step per token over the real sequence, whole pass "
                        "timed",
            "recompute": "c(t) = build_masks + forward over prefix [0, t), best of repeats, "
                         "timed at t in {1, 8, 16, 32} and every stride-th t; linear "
                         "interpolation over t = 1..T, summed",
            "speedup": "recompute total / kv-cache total for T tokens",
            "marginal": "c(T) / kv-cache mean step over the last stride positions",
            "generate": "generate() from prompt_from_scratch, sampling (temperature 1), grammar, "
                        "KV cache; tokens = prompt + generated; wall time",
            "generate_batch": "the same, --batch pieces side by side (seeds 0..batch-1); "
                              "tokens of all pieces / wall time",
        },
        "results": results,
        "goal": {"speedup": GOAL_SPEEDUP, "length": args.length, "met": all_met},
        "generate_profile": profile,
        "total_s": time.perf_counter() - start_all,
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
