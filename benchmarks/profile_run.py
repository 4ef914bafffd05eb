"""A short run of the real trainer under a hardware profile: what a user's first steps give.

``train.py`` times the trainer's inner step alone; this runs ``train()`` itself with a profile
(``h100`` by default on a GPU, ``cpu`` elsewhere), cut to a few optimizer steps with an
evaluation and checkpoints inside, on a prepared dataset. It reports the loss, validation
loss, tokens/s and MFU as the trainer counts them, the peak memory, and torch._dynamo's
counters once evaluation has run too: with compiled blocks, training and evaluation compile
their own graphs, and dynamo keeps ``recompile_limit`` (8) per code object before running further
shapes eagerly. Then the evaluation report's pass over the final checkpoint (validation, one
generated piece) on the same device, its loss against the trainer's.

    python benchmarks/profile_run.py --dataset DIR --vocab FILE [--profile h100] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import dynamo_stats, machine, pct, print_table, write_result  # noqa: E402

from meloformer_model.tokenizer.vocab import Vocabulary  # noqa: E402
from meloformer_model.training.config import PROFILES  # noqa: E402
from meloformer_model.training.trainer import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, help="an Arrow dataset version folder")
    parser.add_argument("--vocab", required=True, help="its vocab.json")
    parser.add_argument("--profile", default=None, help="default: h100 on a GPU, else cpu")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--name", default=None, help="result file name (without .json)")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    name = args.profile or ("h100" if gpu else "cpu")
    half = max(1, args.steps // 2)
    config = replace(PROFILES[name], max_steps=args.steps, warmup_steps=half, eval_every=half,
                     checkpoint_every=half, grad_accum=args.grad_accum)  # fmt: skip
    device = torch.cuda.get_device_name() if gpu else machine()["cpu"]
    print(f"{device}: torch {torch.__version__}; profile {name} cut to {args.steps} steps of "
          f"{config.grad_accum} x {config.batch_size} x {config.seq_len} tokens")  # fmt: skip
    started = time.perf_counter()
    vocab = Vocabulary.load(args.vocab)
    with tempfile.TemporaryDirectory(prefix="profile-run-") as out:
        result = train(Path(args.dataset), vocab, Path(out), config)
        saved = sorted(p.name for p in Path(out).glob("step-*"))
        evaluation = _evaluation(result, Path(args.dataset), vocab, Path(out) / "evaluation")
    counters = dynamo_stats()
    graphs = counters.get("stats", {}).get("unique_graphs", 0)
    history = result.history
    rows = [[h["step"], f"{h['loss']:.4f}", f"{h['val_loss']:.4f}" if "val_loss" in h else "-",
             f"{h['seconds']:.3f}", f"{h['tokens'] / h['seconds']:,.0f}"]
            for h in history]  # fmt: skip
    print_table(["step", "loss", "val loss", "step s", "tokens/s"], rows)
    # the run's figures include the first step's compilation; the median step is steady state
    steady = statistics.median(h["tokens"] / h["seconds"] for h in history[1:] or history)
    steady_mfu = result.mfu and result.mfu * steady / result.tokens_per_second
    memory = result.peak_memory_bytes
    print(f"tokens/s {result.tokens_per_second:,.0f}, MFU {pct(result.mfu)} over the run "
          f"(compilation included); median step {steady:,.0f} tokens/s, MFU {pct(steady_mfu)}; "
          f"peak memory {'-' if memory is None else f'{memory / 2**30:.1f} GiB'}; wall "
          f"{result.wall_seconds:.0f} s; checkpoints {saved}")  # fmt: skip
    limit = torch._dynamo.config.recompile_limit
    print(f"dynamo: {graphs} graphs in all (limit {limit} per code object); recompiles "
          f"{counters.get('recompiles', {})}")  # fmt: skip
    print(f"evaluation report on the final checkpoint: {evaluation}")
    path = write_result(args.name or f"profile-run-{name}", {
        "benchmark": "profile_run",
        "device_name": device,
        "machine": machine(),
        "torch": torch.__version__,
        "profile": name,
        "train_config": config.to_dict(),
        "history": history,
        "tokens_per_second": result.tokens_per_second,
        "mfu": result.mfu,
        "tokens_per_second_median_step": steady,
        "mfu_median_step": steady_mfu,
        "peak_memory_bytes": result.peak_memory_bytes,
        "wall_seconds": result.wall_seconds,
        "checkpoints": saved,
        "dynamo_counters": counters,
        "evaluation": evaluation,
        "total_s": time.perf_counter() - started,
    })  # fmt: skip
    print(f"wrote {path}")


def _evaluation(result, dataset: Path, vocab: Vocabulary, out: Path) -> dict:
    """The evaluation report's pass over the final checkpoint on this device (one generated
    piece of 2 bars): its validation loss against the trainer's, and its time. A failure (say,
    a plotting dependency missing on a bare GPU machine) is reported, not raised."""
    started = time.perf_counter()
    try:
        from meloformer_model.evaluation.report import evaluate_checkpoint

        report = evaluate_checkpoint(result.checkpoint, dataset, vocab, out, pieces=1, bars=2)
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    trained = [h["val_loss"] for h in result.history if "val_loss" in h][-1]
    return {"validation_loss": float(report.summary["validation"]["loss"]),
            "trainer_validation_loss": trained,
            "seconds": time.perf_counter() - started}  # fmt: skip


if __name__ == "__main__":
    main()
