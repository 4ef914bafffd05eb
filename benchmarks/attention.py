"""Summary-token sparse attention versus full causal attention, and the small-model train step.

Inputs are real HID token sequences: sample-corpus pieces (``HIDTokenizer().encode``) in a
seeded random order, packed back to back as documents (doc ids 0, 1, ...) until each length is
filled (the last piece is cut), so bars, instruments and onset groups, and therefore the mask
density, are the real ones. Every measurement runs in a fresh subprocess.

Sections (one table each, everything in one JSON):

* matmul peak: ``torch.mm`` on large square matrices, best of several (fp32; bf16 as well).
* masks: ``build_masks`` time and peak memory; density of the update mask (regular queries over
  summaries + regular keys), of the summarize mask, of document-causal attention (packing only)
  and of plain causal attention (~0.5); 128x128 tiles a block-sparse kernel must visit.
* attention: one layer's attention (summarize + update, exactly as ``Block.forward`` calls
  ``attend``, without projections) with the model's dims, forward+backward and forward only:
  ours with the dense backend (SDPA per packed document with the additive masks of
  ``build_masks``; mask build timed
  separately), ours with the flex backend (forward only on CPU: FlexAttention has no CPU
  backward), and full causal attention (SDPA ``is_causal=True``, length T, same heads/dims),
  both with SDPA's fastest kernel (flash on GPU: memory linear in T) and, up to 8k, with the
  math kernel that materializes the T x T scores (the full attention MuseFormer measured memory
  against). Ratios are against the fastest causal kernel in the same run; the 8k goals are
  reported against both.
* model: ``model_config(size)`` train step (forward + backward + AdamW) with and without
  gradient checkpointing; activation memory per layer; achieved FLOP/s against the matmul peak.
* profile (CPU): where one train step's time goes (torch.profiler).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before the run.
On CPU, peak RSS growth of the child process during the run: ``malloc_trim(0)``, then the peak
RSS (VmHWM) is reset through ``/proc/self/clear_refs`` and read back after the run, minus VmRSS
before it (falls back to ``ru_maxrss`` growth of a first run where clear_refs is unavailable).
"Attention memory" is the working memory of the call: inputs (q, k, v, the mask) exist before.
Activation memory of a train step: peak growth over the steady state (parameters and AdamW
state allocated, gradients freed) minus the fp32 gradients; masks are built (and timed) apart
from the step and loaded, so their build peak is not in it. Activation memory *per layer* is
what one more layer adds: the same step at twice the depth (memory only), (deep - base) / extra
layers, so the costs that do not grow with depth (logits and loss, and with checkpointing the
one layer recomputed at a time) cancel; they stay in the whole-step figure reported beside it.
A forward under ``saved_tensors_hooks`` lists what autograd keeps, the additive masks apart; the
same count at both depths gives the bytes kept per layer exactly (no allocator in it), reported
beside the peak-memory figure.

FLOPs of a train step: 6 x parameters x tokens (regular tokens skip wk2/wv2; summaries count
too) + attention over the *visible* entries only (12 x head_dim x heads per entry and layer,
forward + backward), no recomputation; time = step + mask build (the trainer builds the masks
every step). The fraction counting every entry the dense kernel computes (per document: each
document's queries x its keys) is reported as well.

Defaults. CPU: T = 1k-16k for attention (a variant is skipped when its single run is projected,
quadratically from the previous length, above --max-run-s), flex at 2k and 8k only (it compiles
per shape), model at 2k and 8k, profile at 2k, fp32, 3 repeats within 12 s per configuration,
about 9 minutes on 2 cores. CUDA: T = 1k-32k, flex forward+backward everywhere, model (flex
backend, bf16 autocast) at 2k, 8k, 16k. The flex masks read a visibility table of a bit per
token pair, built once per batch (``flex_masks``; its bytes are reported, it exists before the
attention call like the other inputs). --wait-idle-s waits for a shared machine.

Goals (from the issue): at 8k tokens on GPU, flex >= 3x faster and >= 3x less attention memory
than full causal attention; gradient checkpointing cuts activation memory per layer >= 3x at 8k;
on CPU the whole small-model train step reaches >= 25 % of the fp32 matmul peak.

Run: `.venv/bin/python benchmarks/attention.py` (CPU) or `... --device cuda`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import machine, print_table, write_result  # noqa: E402

import meloformer_model.model as mm  # noqa: E402
from meloformer_model.data.midi_io import find_midi_files  # noqa: E402
from meloformer_model.paths import SAMPLE_CORPUS_DIR  # noqa: E402
from meloformer_model.tokenizer.hid import HIDTokenizer  # noqa: E402

GOAL_FLEX_SPEEDUP = 3.0
GOAL_FLEX_MEMORY = 3.0
GOAL_CHECKPOINT_RATIO = 3.0
GOAL_UTILISATION = 0.25
GOAL_LENGTH = 8192
TILE = 128
MB = 1 << 20

DEFAULTS = {
    "cpu": dict(
        lengths=[1024, 2048, 4096, 8192, 16384],
        model_lengths=[2048, 8192],
        flex_lengths=[2048, 8192],
        dtype="float32",
        repeats=3,
        budget_s=12.0,
        max_run_s=45.0,
        matmul_sizes=[2048, 3072, 4096],
        profile_length=2048,
        long_document_max=8192,
        model_backend="dense",
    ),
    "cuda": dict(
        lengths=[1024, 2048, 4096, 8192, 16384, 32768],
        model_lengths=[2048, 8192, 16384],
        flex_lengths=[1024, 2048, 4096, 8192, 16384, 32768],
        dtype="bfloat16",
        repeats=10,
        budget_s=10.0,
        max_run_s=30.0,
        matmul_sizes=[4096, 8192],
        profile_length=0,
        long_document_max=32768,
        model_backend="flex",
    ),
}


# --------------------------------------------------------------------------------- helpers
def threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


class Memory:
    """Peak memory growth of one run: CUDA allocator stats, or this process's peak RSS."""

    def __init__(self, device: str):
        self.device = device
        self.method = "cuda.max_memory_allocated"
        self.first = True
        if not device.startswith("cuda"):
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.method = "peak RSS growth (VmHWM reset via /proc/self/clear_refs)"
                self.resettable = True
            except OSError:
                self.method = "peak RSS growth (ru_maxrss, first run only)"
                self.resettable = False
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self.libc = None

    def current(self) -> int:
        if self.device.startswith("cuda"):
            return torch.cuda.memory_allocated()
        return _status_kb("VmRSS") * 1024

    def begin(self) -> int:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        if self.resettable:
            Path("/proc/self/clear_refs").write_text("5")
            return _status_kb("VmRSS") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def end(self, base: int) -> int | None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        if self.resettable:
            return _status_kb("VmHWM") * 1024 - base
        if not self.first:
            return None
        self.first = False
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def measure(
    run, device: str, memory: Memory | None, repeats: int, budget_s: float, before=None
) -> dict:
    """Best of up to ``repeats`` runs (fewer when they use up ``budget_s``), peak memory."""
    times, peaks = [], []
    while len(times) < repeats:
        if before is not None:
            before()
        base = memory.begin() if memory else 0
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        if memory:
            peak = memory.end(base)
            if peak is not None:
                peaks.append(peak)
        if sum(times) + elapsed > budget_s:
            break
    return {
        "best_s": min(times),
        "times_s": times,
        "peak_bytes": max(peaks) if peaks else None,
    }


def corpus_row(length: int, seed: int) -> dict[str, np.ndarray]:
    """Sample-corpus pieces in a seeded order, tokenized and packed into one row of ``length``."""
    tokenizer = HIDTokenizer()
    paths = find_midi_files([SAMPLE_CORPUS_DIR])
    order = np.random.default_rng(seed).permutation(len(paths))
    parts, filled = [], 0
    for index in order:
        try:
            seq = tokenizer.encode(paths[index])
        except Exception:  # noqa: BLE001 - a piece the tokenizer rejects is just skipped
            continue
        take = min(len(seq), length - filled)
        arrays = {k: np.asarray(v)[:take] for k, v in seq.arrays().items()}
        arrays["doc"] = np.full(take, len(parts))
        parts.append(arrays)
        filled += take
        if filled >= length:
            break
    if filled < length:
        raise SystemExit(f"the sample corpus holds only {filled} tokens (< {length})")
    return {k: np.concatenate([p[k] for p in parts]).astype(np.int64) for k in parts[0]}


def longest_piece() -> tuple[str, dict[str, np.ndarray]]:
    """The sample corpus's longest piece as one document (no packing)."""
    tokenizer = HIDTokenizer()
    best, name = None, ""
    for path in find_midi_files([SAMPLE_CORPUS_DIR]):
        try:
            seq = tokenizer.encode(path)
        except Exception:  # noqa: BLE001
            continue
        if best is None or len(seq) > len(best):
            best, name = seq, path.name
    arrays = {k: np.asarray(v).astype(np.int64) for k, v in best.arrays().items()}
    arrays["doc"] = np.zeros(len(best), dtype=np.int64)
    return name, arrays


def long_document_stats(spec: dict, length: int, device: str, chunk: int = 1024) -> dict:
    """Density of the update mask and its 128x128 tiles for one long piece (no packing),
    evaluated in query chunks with the model's predicate (not timed)."""
    _, regular = load_inputs(spec | {"inputs": spec["long_inputs"]}, length, device)
    summaries = mm.summary_stream(regular)
    keys = summaries.cat(regular)
    rules = mm.model_config(spec["size"], spec["vocab"]).rules
    n_keys = keys.doc.shape[1]
    visible, tile_rows = 0, []
    for start in range(0, length, chunk):
        rows = mm.Stream(*(t[:, start : start + chunk] for t in regular.fields()))
        mask = mm.visible(rules, rows.expand(2), keys.expand(1))[0]
        visible += int(torch.count_nonzero(mask))
        padded = F.pad(mask, (0, -n_keys % TILE, 0, -mask.shape[0] % TILE))
        view = padded.view(padded.shape[0] // TILE, TILE, padded.shape[1] // TILE, TILE)
        tile_rows.append(view.any(3).any(1))
    n_tiles = math.ceil(length / TILE) * math.ceil(n_keys / TILE)
    return {
        "piece": spec["long_piece"],
        "summaries": int((summaries.doc >= 0).sum()),
        "density_update": visible / (length * (int((summaries.doc >= 0).sum()) + length)),
        "tile_density_update": int(torch.cat(tile_rows).sum()) / n_tiles,
    }


def load_inputs(spec: dict, length: int, device: str):
    data = torch.load(spec["inputs"])
    cut = {k: v[:length][None].to(device) for k, v in data.items()}
    regular = mm.regular_stream(
        cut["bar"], cut["instrument"], cut["token_type"], cut["onset_group"], cut["doc"]
    )
    return cut, regular


def dims(spec: dict) -> tuple[int, int, int]:
    config = mm.model_config(spec["size"], spec["vocab"])
    return config.n_head, config.n_kv_head, config.head_dim


# --------------------------------------------------------------------------------- children
def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def child_matmul(spec: dict) -> dict:
    device = spec["device"]
    out = {}
    native_bf16 = device != "cpu" or bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        rows = []
        sizes = spec["matmul_sizes"]
        if dtype_name == "bfloat16" and not native_bf16:
            sizes = [512]  # emulated: 2048^3 takes over a minute on a 2-core AVX2 machine
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            torch.mm(a, b)
            result = measure(functools.partial(torch.mm, a, b), device, None, 5, spec["budget_s"])
            rows.append(
                {"n": n, "best_s": result["best_s"], "gflops": 2 * n**3 / result["best_s"] / 1e9}
            )
        out[dtype_name] = {"sizes": rows, "peak_gflops": max(r["gflops"] for r in rows)}
    out["bfloat16"]["native"] = native_bf16
    return out


def child_masks(spec: dict) -> dict:
    """Dense masks from build_masks: time, memory, densities; saved for the other children."""
    device, length = spec["device"], spec["length"]
    data, regular = load_inputs(spec, length, device)
    config = mm.model_config(spec["size"], spec["vocab"], backend="dense")
    memory = Memory(device)
    mm.build_masks(
        config,
        mm.regular_stream(
            *(
                t[:, :256]
                for t in (
                    data["bar"],
                    data["instrument"],
                    data["token_type"],
                    data["onset_group"],
                    data["doc"],
                )
            )
        ),
    )
    holder = {}

    def build():
        holder["masks"] = mm.build_masks(config, regular)

    result = measure(
        build,
        device,
        memory,
        spec["repeats"],
        spec["budget_s"],
        before=lambda: holder.pop("masks", None),
    )
    masks = holder["masks"]
    n_summary = int((masks.summary.doc >= 0).sum())  # real summaries (the width is padded)
    width = masks.summary.doc.shape[1]
    n_keys = n_summary + length
    # whole-row masks for the statistics; the model uses the per-document ones timed above
    keys = masks.summary.cat(masks.regular)
    whole_update = mm.dense_mask(config.rules, masks.regular, keys)
    visible_update = int(torch.count_nonzero(whole_update))
    visible_summarize = masks.summarize.visible_entries() - (width - n_summary)
    spans = [s for s in masks.update.spans + masks.summarize.spans if s.bias is not None]
    entries_computed = sum(s.bias.numel() for s in spans)
    doc = data["doc"][0].cpu().numpy()
    doc_lengths = np.bincount(doc[doc >= 0])
    doc_causal = int(sum(n * (n + 1) // 2 for n in doc_lengths.tolist()))
    causal = length * (length + 1) // 2

    def tiles(mask: torch.Tensor) -> int:
        q, k = mask.shape[-2:]
        padded = F.pad(mask[0, 0], (0, -k % TILE, 0, -q % TILE))
        view = padded.view(padded.shape[0] // TILE, TILE, padded.shape[1] // TILE, TILE)
        return int(view.any(3).any(1).sum())

    def doc_causal_tiles() -> int:
        """Tiles of document-causal attention (T x T): what packing alone lets a kernel skip."""
        docs = data["doc"][0]
        count = 0
        keys = torch.arange(length, device=docs.device)
        for start in range(0, length, TILE):
            rows = keys[start : start + TILE]
            visible = (docs[rows, None] == docs[None, :]) & (keys[None, :] <= rows[:, None])
            visible = F.pad(visible.any(0), (0, -length % TILE))
            count += int(visible.view(-1, TILE).any(1).sum())
        return count

    n_tiles_q, n_tiles_k = math.ceil(length / TILE), math.ceil((width + length) / TILE)
    n_tiles_t = math.ceil(length / TILE)
    torch.save(masks, spec["masks_out"])
    long_document = None
    if length <= spec["long_document_max"] and length <= spec["long_length"]:
        long_document = long_document_stats(spec, length, device)
    return {
        "long_document": long_document,
        "length": length,
        "documents": int(len(doc_lengths)),
        "summaries": n_summary,
        "summary_width": width,
        "keys": n_keys,
        "entries_computed": entries_computed,
        "build": result,
        "visible_update": visible_update,
        "visible_summarize": visible_summarize,
        "density_update": visible_update / (length * n_keys),
        "density_summarize": visible_summarize / (n_summary * n_keys),
        "density_doc_causal": doc_causal / (length * length),
        "density_causal": causal / (length * length),
        "visible_per_query_update": visible_update / length,
        "tiles_update": tiles(whole_update),
        "tile_density_update": tiles(whole_update) / (n_tiles_q * n_tiles_k),
        "tile_density_causal": (n_tiles_t * (n_tiles_t + 1) // 2) / (n_tiles_t * n_tiles_t),
        "tile_density_doc_causal": doc_causal_tiles() / (n_tiles_t * n_tiles_t),
        "tiles_note": f"{TILE}x{TILE} tiles with any visible entry, over all tiles of the "
        "matrix (ours: (T) x (summaries + T); causal: T x T)",
        "mask_bytes": sum(s.bias.element_size() * s.bias.numel() for s in spans),
        "whole_row_float_mask_bytes": 4 * (length + width) * (width + length),
    }


def _qkv(spec: dict, n_queries: int, n_keys: int, heads: tuple, requires_grad: bool):
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    n_head, n_kv, head_dim = heads
    gen = torch.Generator(device=device).manual_seed(0)

    def make(h, n):
        x = torch.randn(1, h, n, head_dim, generator=gen, device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    return make(n_head, n_queries), make(n_kv, n_keys), make(n_kv, n_keys)


def _attention_runs(spec: dict, fwd, leaves, outputs_like):
    """Forward+backward (when the leaves need grad) and forward-only measurements."""
    device = spec["device"]
    memory = Memory(device)
    out = {"memory_method": memory.method}
    gen = torch.Generator(device=device).manual_seed(1)
    grads = [
        torch.randn(o.shape, generator=gen, device=device, dtype=o.dtype) for o in outputs_like
    ]
    if spec["backward"]:

        def fwd_bwd():
            torch.autograd.backward(list(fwd()), grads)
            for leaf in leaves:
                leaf.grad = None

        fwd_bwd()  # warm-up (and compilation, where there is any)
        out["fwd_bwd"] = measure(fwd_bwd, device, memory, spec["repeats"], spec["budget_s"])

    def forward_only():
        with torch.no_grad():
            fwd()

    forward_only()
    out["fwd"] = measure(forward_only, device, memory, spec["repeats"], spec["budget_s"])
    return out


def short_error(error: Exception) -> str:
    """The exception's type and its first compiler 'error:' line, or its first 300 chars."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if " error: " in line]
    return f"{type(error).__name__}: {(lines[0] if lines else text)[:300]}"


def child_ours(spec: dict) -> dict:
    """Summarize + update attention of one layer, as Block.forward calls them."""
    device, length, backend = spec["device"], spec["length"], spec["backend"]
    heads = dims(spec)
    info = {}
    if backend == "dense":
        masks = torch.load(spec["masks_in"], weights_only=False, map_location=device)
    else:
        _, regular = load_inputs(spec, length, device)
        config = mm.model_config(spec["size"], spec["vocab"], backend="flex")
        start = time.perf_counter()
        masks = mm.build_masks(config, regular)
        sync(device)
        info["mask_first_build_s"] = time.perf_counter() - start  # GPU: includes compilation
        holder = {}

        def build():
            holder["masks"] = mm.build_masks(config, regular)

        info["mask_build"] = measure(build, device, None, spec["repeats"], spec["budget_s"])
        n_tokens = masks.summary.doc.shape[1] + length
        table_row_bytes = -(-n_tokens // mm.KEYS_PER_BYTE)  # a bit per token pair
        info["visibility_table_bytes"] = masks.summary.doc.shape[0] * n_tokens * table_row_bytes
        info["block_sparsity_update_pct"] = float(masks.update.block_mask.sparsity())
        info["block_size"] = list(masks.update.block_mask.BLOCK_SIZE)
    n_summary = masks.summary.doc.shape[1]
    grad = spec["backward"]
    q_r, k_r, v_r = _qkv(spec, length, length, heads, grad)
    q_s, k_s, v_s = _qkv(spec, n_summary, n_summary, heads, grad)
    _, k2, v2 = _qkv(spec, 1, n_summary, heads, grad)

    def fwd():
        out_s = masks.summarize.attend(q_s, (k_s, k_r), (v_s, v_r))
        out_r = masks.update.attend(q_r, (k2, k_r), (v2, v_r))
        return out_s, out_r

    start = time.perf_counter()
    with torch.no_grad():
        fwd()
    sync(device)
    info["first_call_s"] = time.perf_counter() - start  # flex: compilation
    leaves = [q_r, k_r, v_r, q_s, k_s, v_s, k2, v2]
    outputs = [q_s, q_r]
    return info | _attention_runs(spec, fwd, leaves, outputs)


def child_causal(spec: dict) -> dict:
    """SDPA with ``is_causal``: the fastest kernel available (flash on GPU), or, with
    ``materialized``, the math kernel that holds the T x T scores, as full attention did when
    MuseFormer compared memory against it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    length = spec["length"]
    n_head, n_kv, _ = heads = dims(spec)
    q, k, v = _qkv(spec, length, length, heads, True)
    materialized = spec.get("materialized", False)

    def fwd():
        with sdpa_kernel(SDPBackend.MATH) if materialized else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_head != n_kv)
        return (out,)

    return _attention_runs(spec, fwd, [q, k, v], [q])


def _train_setup(spec: dict, length: int, ckpt: bool):
    device = spec["device"]
    data, regular = load_inputs(spec, length, device)
    depth = {"n_layer": spec["n_layer"]} if spec.get("n_layer") else {}
    config = mm.model_config(
        spec["size"],
        spec["vocab"],
        backend=spec["model_backend"],
        gradient_checkpointing=ckpt,
        **depth,
    )
    ids = data["ids"]
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    return config, regular, ids, targets


def child_model(spec: dict) -> dict:
    """Train step (forward + backward + AdamW) with masks built beforehand (timed apart)."""
    device, length = spec["device"], spec["length"]
    config, regular, ids, targets = _train_setup(spec, length, spec["checkpointing"])
    memory = Memory(device)
    info = {"memory_method": memory.method}
    if spec.get("masks_in"):
        masks = torch.load(spec["masks_in"], weights_only=False, map_location=device)
    else:
        mm.build_masks(config, regular)  # compilation
        start = time.perf_counter()
        masks = mm.build_masks(config, regular)
        sync(device)
        info["mask_build_s"] = time.perf_counter() - start
    bf16 = spec["dtype"] == "bfloat16"
    before_model = memory.current()
    torch.manual_seed(0)
    model = mm.MeloFormer(config).to(device).train()
    n_params = model.num_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(ids_, targets_, masks_):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(ids_, targets_, masks_)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warm = spec["warmup_length"]
    if warm and warm < length:  # a short step warms threads, kernels and the AdamW state
        _, warm_regular, warm_ids, warm_targets = _train_setup(spec, warm, spec["checkpointing"])
        step(warm_ids, warm_targets, mm.build_masks(config, warm_regular))
    else:
        step(ids, targets, masks)
    gc.collect()
    steady = memory.current()
    result = measure(
        lambda: step(ids, targets, masks), device, memory, spec["repeats"], spec["budget_s"]
    )
    try:
        info["saved_tensors"] = saved_tensor_breakdown(model, ids, targets, masks, bf16, device)
    except Exception as error:  # informative only: saved-tensor hooks around compiled code
        info["saved_tensors_error"] = short_error(error)
    grads = 4 * n_params  # fp32 gradients, allocated during backward
    growth = result["peak_bytes"]
    info |= {
        "parameters": n_params,
        "step": result,
        "steady_over_pre_model_bytes": steady - before_model,
        "params_plus_adam_bytes": 12 * n_params,
        "peak_growth_bytes": growth,
        "activation_bytes": None if growth is None else growth - grads,
        "activation_bytes_per_layer": None if growth is None else (growth - grads) / config.n_layer,
        "n_layer": config.n_layer,
    }
    return info


def saved_tensor_breakdown(model, ids, targets, masks, bf16: bool, device: str) -> dict:
    """What autograd keeps for backward in one forward, by shape (each storage counted once).

    A 4-d floating-point tensor shaped like a document's mask (1, 1, queries, keys) is the
    additive mask SDPA saves for its backward (built once per batch, shared by the layers)."""
    seen, groups = set(), {}
    phases = (masks.update, masks.summarize)
    spans = [s for p in phases if isinstance(p, mm.DocumentMasks) for s in p.spans]
    mask_shapes = {tuple(s.bias.shape) for s in spans if s.bias is not None}
    mask_like = 0

    def pack(t):
        nonlocal mask_like
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and storage.nbytes() > 0:
            seen.add(key)
            label = f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
            groups[label] = groups.get(label, 0) + storage.nbytes()
            if t.is_floating_point() and tuple(t.shape) in mask_shapes:
                mask_like += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(ids, targets, masks)
    del loss
    total = sum(groups.values())
    top = sorted(groups.items(), key=lambda kv: -kv[1])[:8]
    return {
        "total_bytes": total,
        "float_mask_bytes": mask_like,
        "top": [{"tensor": k, "bytes": v} for k, v in top],
    }


def child_profile(spec: dict) -> dict:
    """One train step, mask building included, under torch.profiler; labelled regions."""
    from torch.profiler import ProfilerActivity, profile, record_function

    device, length = spec["device"], spec["length"]
    config, regular, ids, targets = _train_setup(spec, length, False)

    def labelled(fn, name):
        def wrapper(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)

        return wrapper

    for name in ("regular_stream", "summary_stream", "dense_mask", "apply_rope"):
        setattr(mm, name, labelled(getattr(mm, name), f"## {name}"))
    mm.DocumentMasks.attend = labelled(mm.DocumentMasks.attend, "## attend")
    mm.RMSNorm.forward = labelled(mm.RMSNorm.forward, "## rmsnorm")
    mm.SwiGLU.forward = labelled(mm.SwiGLU.forward, "## swiglu")
    data, _ = load_inputs(spec, length, device)
    side = (data["bar"], data["instrument"], data["token_type"], data["onset_group"], data["doc"])
    torch.manual_seed(0)
    model = mm.MeloFormer(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def step():
        with record_function("# build_masks"):
            masks = mm.build_masks(config, mm.regular_stream(*side))
        with record_function("# forward+loss"):
            loss = model.loss(ids, targets, masks)
        with record_function("# backward"):
            loss.backward()
        with record_function("# optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    step()
    unprofiled = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        profiled = time.perf_counter() - start
    averages = prof.key_averages()
    labels = {e.key: e.cpu_time_total / 1e6 for e in averages if e.key.startswith("#")}
    ops = sorted(
        (
            (e.key, e.self_cpu_time_total / 1e6, e.count)
            for e in averages
            if not e.key.startswith("#") and not e.key.startswith("autograd::")
        ),
        key=lambda r: -r[1],
    )[:15]
    backward_nodes = sorted(
        (
            (e.key.split(": ", 1)[-1], e.cpu_time_total / 1e6, e.count)
            for e in averages
            if e.key.startswith("autograd::engine::evaluate_function")
        ),
        key=lambda r: -r[1],
    )[:10]
    return {
        "length": length,
        "step_unprofiled_s": unprofiled,
        "step_profiled_s": profiled,
        "regions_s": labels,
        "top_ops_self_s": [{"op": k, "self_s": s, "calls": c} for k, s, c in ops],
        "top_backward_nodes_s": [
            {"node": k, "total_s": s, "calls": c} for k, s, c in backward_nodes
        ],
    }


CHILDREN = {
    "matmul": child_matmul,
    "masks": child_masks,
    "ours": child_ours,
    "causal": child_causal,
    "model": child_model,
    "profile": child_profile,
}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    try:
        result = CHILDREN[spec["kind"]](spec)
    except Exception as error:  # noqa: BLE001 - reported in the results, the run goes on
        import traceback

        traceback.print_exc()
        result = {"error": short_error(error)}
    result["threads"] = torch.get_num_threads()
    Path(spec["out"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------- parent
def _cpu_busy_s() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(limit_s: float, window_s: float = 3.0, threshold: float = 0.1) -> float:
    """Wait (at most ``limit_s``) until other processes use < ``threshold`` of the CPUs."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        busy0 = _cpu_busy_s()
        time.sleep(window_s)
        if (_cpu_busy_s() - busy0) / (window_s * os.cpu_count()) < threshold:
            break
    return time.perf_counter() - start - window_s if limit_s > 0 else 0.0


class Runner:
    def __init__(self, args, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.count = 0
        self.log = []

    def __call__(self, kind: str, **spec) -> dict:
        self.count += 1
        out = self.workdir / f"out-{self.count}.json"
        spec_path = self.workdir / f"spec-{self.count}.json"
        base = dict(
            kind=kind,
            device=self.args.device,
            dtype=self.args.dtype,
            size=self.args.size,
            vocab=self.args.vocab,
            threads=self.args.threads,
            repeats=self.args.repeats,
            budget_s=self.args.budget_s,
            inputs=str(self.workdir / "inputs.pt"),
            out=str(out),
        )
        spec_path.write_text(json.dumps(base | spec))
        label = f"{kind} " + " ".join(
            f"{k}={v}" for k, v in spec.items() if k in ("length", "backend", "checkpointing")
        )
        print(f"  [{time.strftime('%H:%M:%S')}] {label} ...", end="", flush=True)
        waited = wait_for_idle(self.args.wait_idle_s)
        if waited >= 1:
            print(f" (waited {waited:.0f}s for other processes)", end="", flush=True)
        load_before = os.getloadavg()[0]
        busy0, wall0 = _cpu_busy_s(), time.perf_counter()
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wall = time.perf_counter() - wall0
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        child_cpu = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
        other = max(0.0, (_cpu_busy_s() - busy0 - child_cpu) / (wall * os.cpu_count()))
        env = {
            "wall_s": wall,
            "load_1min_before": load_before,
            "load_1min_after": os.getloadavg()[0],
            "other_cpu_share": other,
            "child_peak_rss_mb": (child1.ru_maxrss * 1024) / MB,
        }
        self.log.append({"label": label} | env)
        if proc.returncode == 0 and out.exists() and "error" in json.loads(out.read_text()):
            error = json.loads(out.read_text())["error"]
            print(f" FAILED: {error[:300]}")
            return {"error": error, "env": env}
        if proc.returncode != 0 or not out.exists():
            tail = proc.stdout[-1500:]
            print(f" FAILED (rc {proc.returncode})\n{tail}")
            return {"error": f"rc {proc.returncode}: {tail[-400:]}", "env": env}
        print(f" {wall:.1f}s (other load {other:.0%})")
        return json.loads(out.read_text()) | {"env": env}


def projected(history: dict, variant: str, length: int) -> float | None:
    """Quadratic projection of one run at ``length`` from the last measured length."""
    if variant not in history:
        return None
    last_length, last_s = history[variant]
    return last_s * (length / last_length) ** 2


def long_note(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['density_update']:.4f} / {stats['tile_density_update']:.3f}"


def fmt_mb(x) -> str:
    return "-" if x is None else f"{x / MB:,.1f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt_x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def flops_train_step(
    n_layer,
    n_params_block,
    n_params_other,
    kv_dim,
    n_embd,
    length,
    n_summary,
    visible,
    computed,
    head_dim,
    n_head,
) -> dict:
    """6 x parameters x tokens (per stream: regular tokens skip wk2/wv2), + attention.

    Attention per layer, forward: 4 x head_dim x n_head per (query, key) entry (QK^T and PV);
    backward twice that; recomputation (checkpointing, flash backward) is not counted."""
    second_stage = 2 * n_embd * kv_dim
    dense = 6 * length * (n_params_other + n_layer * (n_params_block - second_stage))
    dense += 6 * n_summary * n_layer * n_params_block
    per_entry = 12 * head_dim * n_head * n_layer
    return {
        "dense": dense,
        "attention_visible": per_entry * visible,
        "attention_computed": per_entry * computed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", default="small", choices=list(mm.MODEL_SIZES))
    parser.add_argument("--lengths", type=int, nargs="*", help="attention lengths (none: skip)")
    parser.add_argument(
        "--model-lengths", type=int, nargs="*", help="train-step lengths (none: skip)"
    )
    parser.add_argument(
        "--flex-lengths",
        type=int,
        nargs="+",
        help="lengths for the flex backend (it compiles once per length)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, help="best of N (fewer when over --budget-s)")
    parser.add_argument("--budget-s", type=float, help="measured seconds per configuration")
    parser.add_argument(
        "--max-run-s",
        type=float,
        help="skip a configuration whose single run is projected (quadratic "
        "from the previous length) above this",
    )
    parser.add_argument("--profile-length", type=int, help="0: no profile")
    parser.add_argument(
        "--long-document-max",
        type=int,
        help="mask density of the longest single piece (no packing) up to this length",
    )
    parser.add_argument("--model-backend", choices=["dense", "flex"])
    parser.add_argument("--threads", type=int, default=threads())
    parser.add_argument(
        "--wait-idle-s",
        type=float,
        default=0.0,
        help="before each measurement, wait up to this long for other processes to go idle",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="result file name without .json (default: by device)")
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    for key, value in DEFAULTS[kind].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    torch.set_num_threads(args.threads)
    tokenizer = HIDTokenizer()
    args.vocab = len(tokenizer.vocab)
    config = mm.model_config(args.size, args.vocab)
    backward_flex = kind == "cuda"
    start_all = time.perf_counter()
    device_name = torch.cuda.get_device_name(args.device) if kind == "cuda" else machine()["cpu"]
    print(
        f"{device_name}: torch {torch.__version__}, {args.threads} threads, {args.dtype}, "
        f"model '{args.size}' ({config.n_head} heads x {config.head_dim}, "
        f"{config.n_layer} layers); load average {os.getloadavg()}"
    )

    with tempfile.TemporaryDirectory(prefix="attention-bench-") as tmp:
        workdir = Path(tmp)
        max_length = max(args.lengths + args.model_lengths + [args.profile_length])
        row = corpus_row(max_length, args.seed)
        torch.save({k: torch.from_numpy(v) for k, v in row.items()}, workdir / "inputs.pt")
        long_name, long_row = longest_piece()
        torch.save({k: torch.from_numpy(v) for k, v in long_row.items()}, workdir / "long.pt")
        run = Runner(args, workdir)

        print("matmul peak")
        matmul = run("matmul", matmul_sizes=args.matmul_sizes)

        history: dict[str, tuple[int, float]] = {}
        masks, attention = {}, {}
        for length in sorted(set(args.lengths) | set(args.model_lengths)):
            print(f"length {length}")
            mask_file = str(workdir / f"masks-{length}.pt")
            skipped = {}
            guess = projected(history, "masks", length)
            if guess is not None and guess > args.max_run_s and length not in args.model_lengths:
                masks[length] = {"skipped": f"projected {guess:.0f}s > --max-run-s"}
            else:
                masks[length] = run(
                    "masks",
                    length=length,
                    masks_out=mask_file,
                    long_inputs=str(workdir / "long.pt"),
                    long_piece=long_name,
                    long_length=len(long_row["ids"]),
                    long_document_max=args.long_document_max,
                )
                if "build" in masks[length]:
                    history["masks"] = (length, masks[length]["build"]["best_s"])
            if length not in args.lengths:
                continue
            entries = {}
            variants = [
                ("ours_dense", "ours", dict(backend="dense", backward=True, masks_in=mask_file)),
                ("ours_flex", "ours", dict(backend="flex", backward=backward_flex)),
                ("causal", "causal", dict(backward=True)),
                ("causal_materialized", "causal", dict(backward=True, materialized=True)),
            ]
            for name, child_kind, extra in variants:
                if name == "ours_flex" and length not in args.flex_lengths:
                    entries[name] = {"skipped": "not in --flex-lengths (compilation per length)"}
                    continue
                if name == "ours_dense" and "build" not in masks[length]:
                    entries[name] = {"skipped": "no mask at this length"}
                    continue
                if name == "causal_materialized" and length > GOAL_LENGTH:
                    entries[name] = {"skipped": f"T x T scores: up to {GOAL_LENGTH} only"}
                    continue
                guess = projected(history, name, length)
                if guess is not None and guess > args.max_run_s:
                    skipped[name] = f"projected {guess:.0f}s per run > --max-run-s {args.max_run_s}"
                    entries[name] = {"skipped": skipped[name]}
                    continue
                result = run(child_kind, length=length, **extra)
                entries[name] = result
                key = "fwd_bwd" if "fwd_bwd" in result else "fwd"
                if key in result:
                    history[name] = (length, result[key]["best_s"])
            attention[length] = entries
            if os.path.exists(mask_file) and length not in args.model_lengths:
                os.remove(mask_file)

        models = {}
        for length in args.model_lengths:
            for ckpt in (False, True):
                name = f"{length}/{'checkpointing' if ckpt else 'plain'}"
                mask_file = workdir / f"masks-{length}.pt"
                use_file = args.model_backend == "dense" and mask_file.exists()
                common = dict(
                    length=length,
                    checkpointing=ckpt,
                    model_backend=args.model_backend,
                    masks_in=str(mask_file) if use_file else None,
                    warmup_length=512 if kind == "cpu" else 0,
                )
                models[name] = run("model", **common)
                # twice as deep, memory only: the difference is what each layer keeps
                layers = 2 * mm.MODEL_SIZES[args.size]["n_layer"]
                models[f"{name}/x2"] = run("model", **common, n_layer=layers, repeats=1)

        profile_result = None
        if args.profile_length and kind == "cpu":
            print("profile")
            profile_result = run(
                "profile", length=args.profile_length, model_backend=args.model_backend
            )

    total_s = time.perf_counter() - start_all
    report(
        args,
        kind,
        device_name,
        config,
        matmul,
        masks,
        attention,
        models,
        profile_result,
        run.log,
        total_s,
    )


# --------------------------------------------------------------------------------- report
def report(
    args, kind, device_name, config, matmul, masks, attention, models, profile_result, log, total_s
) -> None:
    print()
    print(f"== matmul peak ({args.threads} threads)")
    rows = []
    for dtype_name in ("float32", "bfloat16"):
        for r in matmul.get(dtype_name, {}).get("sizes", []):
            rows.append([dtype_name, r["n"], r["best_s"] * 1e3, r["gflops"]])
    print_table(["dtype", "n", "ms", "GFLOP/s"], rows)
    # the step's FLOP/s against the matmul peak of the dtype it trains in (fp32 on CPU)
    peak32 = matmul.get(args.dtype, {}).get("peak_gflops")

    print()
    print("== masks (update = regular queries over summaries + regular keys)")
    rows = []
    for length, m in sorted(masks.items()):
        if "build" not in m:
            rows.append([length] + ["-"] * 11 + [m.get("skipped", m.get("error", ""))[:40]])
            continue
        rows.append(
            [
                length,
                m["documents"],
                f"{m['summaries']}/{m['summary_width']}",
                m["build"]["best_s"] * 1e3,
                fmt_mb(m["build"]["peak_bytes"]),
                f"{m['density_update']:.4f}",
                f"{m['density_summarize']:.4f}",
                f"{m['density_doc_causal']:.4f}",
                f"{m['density_causal']:.4f}",
                f"{m['tile_density_update']:.3f}",
                f"{m['tile_density_doc_causal']:.3f}",
                f"{m['tile_density_causal']:.3f}",
                long_note(m.get("long_document")),
            ]
        )
    print_table(
        [
            "T",
            "docs",
            "summaries/width",
            "build ms",
            "build peak MiB",
            "density upd",
            "density sum",
            "doc-causal",
            "causal",
            "tiles ours",
            "tiles doc-causal",
            "tiles causal",
            "one long piece: density / tiles",
        ],
        rows,
    )
    long_names = {m["long_document"]["piece"] for m in masks.values() if m.get("long_document")}
    print(
        "  density: visible / all entries (ours: T x (summaries + T)); tiles: 128x128 tiles "
        "with any visible entry (what a block-sparse kernel visits); packed rows of several "
        f"pieces, and the first T tokens of one long piece ({', '.join(long_names) or '-'})"
    )

    print()
    print(
        f"== attention, one layer, {config.n_head} heads x {config.head_dim}, {args.dtype} "
        f"(ratios: full causal / variant)"
    )
    rows = []
    summary = {}
    for length, entries in sorted(attention.items()):
        causal = entries.get("causal", {})
        c_fb = causal.get("fwd_bwd", {}).get("best_s")
        c_f = causal.get("fwd", {}).get("best_s")
        c_mem = causal.get("fwd_bwd", {}).get("peak_bytes")
        c_mem_f = causal.get("fwd", {}).get("peak_bytes")
        materialized = entries.get("causal_materialized", {}).get("fwd_bwd", {})
        for name in ("causal", "causal_materialized", "ours_dense", "ours_flex"):
            e = entries.get(name, {})
            if "skipped" in e or "error" in e:
                rows.append([length, name] + ["-"] * 8 + [(e.get("skipped") or e["error"])[:50]])
                continue
            fb = e.get("fwd_bwd", {})
            f = e.get("fwd", {})
            note = ""
            if name == "ours_dense" and "build" in masks.get(length, {}):
                note = f"+ mask build {masks[length]['build']['best_s'] * 1e3:,.0f} ms"
            if name == "ours_flex":
                note = f"compile {e.get('first_call_s', 0):.1f}s"
                if "mask_build" in e:
                    note += f", masks {e['mask_build']['best_s'] * 1e3:,.0f} ms"
                if "visibility_table_bytes" in e:
                    note += f" (table {e['visibility_table_bytes'] / MB:,.0f} MiB)"
                if "block_sparsity_update_pct" in e:
                    note += f", block sparsity {e['block_sparsity_update_pct']:.0f}%"
                if not fb:
                    note += ", fwd only (no CPU backward)"
            speed = ratio(c_fb, fb.get("best_s"))
            speed_f = ratio(c_f, f.get("best_s"))
            mem = ratio(c_mem, fb.get("peak_bytes"))
            mem_f = ratio(c_mem_f, f.get("peak_bytes"))
            summary[(length, name)] = dict(
                time_ratio_fwd_bwd=speed,
                time_ratio_fwd=speed_f,
                memory_ratio_fwd_bwd=mem,
                memory_ratio_fwd=mem_f,
                time_ratio_fwd_bwd_vs_materialized=ratio(
                    materialized.get("best_s"), fb.get("best_s")
                ),
                memory_ratio_fwd_bwd_vs_materialized=ratio(
                    materialized.get("peak_bytes"), fb.get("peak_bytes")
                ),
            )
            rows.append(
                [
                    length,
                    name,
                    "-" if not fb else f"{fb['best_s'] * 1e3:,.1f}",
                    f"{f['best_s'] * 1e3:,.1f}",
                    fmt_mb(fb.get("peak_bytes")),
                    fmt_mb(f.get("peak_bytes")),
                    fmt_x(speed),
                    fmt_x(speed_f),
                    fmt_x(mem),
                    fmt_x(mem_f),
                    note,
                ]
            )
    print_table(
        [
            "T",
            "variant",
            "fwd+bwd ms",
            "fwd ms",
            "f+b MiB",
            "fwd MiB",
            "speed f+b",
            "speed fwd",
            "mem f+b",
            "mem fwd",
            "note",
        ],
        rows,
    )

    print()
    print(
        f"== model '{args.size}' train step (forward + backward + AdamW), "
        f"backend {args.model_backend}"
    )
    with torch.device("meta"):
        block = mm.Block(config)
    n_block = sum(p.numel() for p in block.parameters())
    n_other = args.vocab * config.n_embd + 2 * config.n_embd
    kv_dim = config.n_kv_head * config.head_dim
    rows = []
    model_out = {}
    for name, m in models.items():
        length = int(name.split("/")[0])
        if name.endswith("/x2"):  # memory-only runs at twice the depth, used below
            model_out[name] = m
            continue
        if "step" not in m:
            rows.append([name] + ["-"] * 9 + [m.get("error", "")[:50]])
            continue
        mk = masks.get(length, {})
        mask_s = m.get("mask_build_s", mk.get("build", {}).get("best_s"))
        step_s = m["step"]["best_s"]
        whole_s = step_s + (mask_s or 0.0)
        flops = None
        if "visible_update" in mk:
            flops = flops_train_step(
                config.n_layer,
                n_block,
                n_other,
                kv_dim,
                config.n_embd,
                length,
                mk["summaries"],
                mk["visible_update"] + mk["visible_summarize"],
                mk["entries_computed"],
                config.head_dim,
                config.n_head,
            )
        useful = None if flops is None else flops["dense"] + flops["attention_visible"]
        rate_whole = None if useful is None else useful / whole_s
        rate_model = None if useful is None else useful / step_s
        frac = ratio(rate_whole, peak32 * 1e9 if peak32 else None)
        frac_model = ratio(rate_model, peak32 * 1e9 if peak32 else None)
        frac_computed = None
        if flops and peak32:
            frac_computed = (
                (flops["dense"] + flops["attention_computed"]) / whole_s / (peak32 * 1e9)
            )
        attn = attention.get(length, {}).get("ours_dense", {}).get("fwd_bwd", {}).get("best_s")
        attention_share = None if attn is None else config.n_layer * attn / step_s
        model_out[name] = m | {
            "mask_build_s": mask_s,
            "step_with_mask_build_s": whole_s,
            "flops": flops,
            "useful_flops": useful,
            "achieved_gflops_whole_step": None if rate_whole is None else rate_whole / 1e9,
            "matmul_peak_dtype": args.dtype,
            "fraction_of_matmul_peak_whole_step": frac,
            "fraction_of_matmul_peak_without_mask_build": frac_model,
            "fraction_of_matmul_peak_counting_computed_entries": frac_computed,
            "estimated_attention_share_of_step": attention_share,
            "estimated_mask_build_share_of_whole_step": None
            if mask_s is None
            else mask_s / whole_s,
        }
        rows.append(
            [
                name,
                step_s,
                "-" if mask_s is None else f"{mask_s:.2f}",
                fmt_mb(m["peak_growth_bytes"]),
                fmt_mb(m["activation_bytes_per_layer"]),
                "-" if rate_whole is None else f"{rate_whole / 1e9:.1f}",
                "-" if frac is None else f"{frac:.1%}",
                "-" if frac_model is None else f"{frac_model:.1%}",
                "-" if frac_computed is None else f"{frac_computed:.1%}",
                "-" if attention_share is None else f"{attention_share:.0%}",
                "",
            ]
        )
    print_table(
        [
            "T/variant",
            "step s",
            "mask s",
            "peak MiB",
            "act/L MiB (whole)",
            "GFLOP/s",
            "of peak",
            "w/o masks",
            "computed",
            "attn share",
            "note",
        ],
        rows,
    )
    print(
        "  GFLOP/s and 'of peak': useful FLOPs (6 x params x tokens + attention over visible "
        "entries, no recomputation) / (step + mask build); 'w/o masks': over the step alone; "
        "'computed': counting every entry the per-document dense kernel computes; 'attn share': "
        "n_layer x one layer's attention fwd+bwd (above) / step."
    )

    for name, m in model_out.items():
        saved = m.get("saved_tensors")
        if saved and not name.endswith("/x2"):
            top = ", ".join(f"{t['tensor']} {t['bytes'] / MB:,.0f}" for t in saved["top"][:4])
            print(
                f"  saved for backward at {name}: {saved['total_bytes'] / MB:,.0f} MiB, of which "
                f"additive masks {saved['float_mask_bytes'] / MB:,.0f} MiB "
                f"({saved['float_mask_bytes'] / saved['total_bytes']:.0%}); largest: {top}"
            )

    def per_extra_layer(name: str) -> float | None:
        """Activation memory one more layer adds: (deep - base) / (extra layers)."""
        base, deep = model_out.get(name, {}), model_out.get(f"{name}/x2", {})
        a, b = base.get("activation_bytes"), deep.get("activation_bytes")
        if a is None or b is None:
            return None
        base["activation_bytes_per_extra_layer"] = (b - a) / (deep["n_layer"] - base["n_layer"])
        return base["activation_bytes_per_extra_layer"]

    def kept_per_extra_layer(name: str) -> float | None:
        """What autograd keeps for one more layer (saved tensors, exact: no allocator in it)."""
        base, deep = model_out.get(name, {}), model_out.get(f"{name}/x2", {})
        if "saved_tensors" not in base or "saved_tensors" not in deep:
            return None
        extra = deep["saved_tensors"]["total_bytes"] - base["saved_tensors"]["total_bytes"]
        base["saved_bytes_per_extra_layer"] = extra / (deep["n_layer"] - base["n_layer"])
        return base["saved_bytes_per_extra_layer"]

    checkpoint_ratios, kept_ratios = {}, {}
    for length in args.model_lengths:
        plain_name, ckpt_name = f"{length}/plain", f"{length}/checkpointing"
        plain, ckpt = per_extra_layer(plain_name), per_extra_layer(ckpt_name)
        checkpoint_ratios[length] = ratio(plain, ckpt)
        kept = [kept_per_extra_layer(n) for n in (plain_name, ckpt_name)]
        kept_ratios[length] = ratio(*kept)
        totals = [model_out.get(n, {}).get("activation_bytes") for n in (plain_name, ckpt_name)]
        t_plain = model_out.get(plain_name, {}).get("step", {}).get("best_s")
        t_ckpt = model_out.get(ckpt_name, {}).get("step", {}).get("best_s")
        print(
            f"  checkpointing at {length}: activation memory per layer (one more layer's) "
            f"{fmt_mb(plain)} -> {fmt_mb(ckpt)} MiB ({fmt_x(checkpoint_ratios[length])} less; "
            f"saved for backward per layer {fmt_mb(kept[0])} -> {fmt_mb(kept[1])} MiB, "
            f"{fmt_x(kept_ratios[length])} less); "
            f"whole step {fmt_mb(totals[0])} -> {fmt_mb(totals[1])} MiB "
            f"({fmt_x(ratio(*totals))} less, one layer's recomputation included); "
            f"step time {fmt_x(ratio(t_ckpt, t_plain))}"
        )

    if profile_result and "regions_s" in profile_result:
        print()
        p = profile_result
        print(
            f"== profile: one '{args.size}' train step at {p['length']} tokens, mask build "
            f"included ({p['step_unprofiled_s']:.2f}s unprofiled, "
            f"{p['step_profiled_s']:.2f}s profiled)"
        )
        total = p["step_profiled_s"]
        rows = [
            [k, v * 1e3, f"{v / total:.1%}"]
            for k, v in sorted(p["regions_s"].items(), key=lambda kv: kv[0])
        ]
        print_table(["region (inclusive; '##' nested in forward/build)", "ms", "of step"], rows)
        print()
        print_table(
            ["top ops (self time)", "ms", "calls"],
            [[r["op"], r["self_s"] * 1e3, r["calls"]] for r in p["top_ops_self_s"]],
        )
        print()
        print_table(
            ["top backward nodes (inclusive)", "ms", "calls"],
            [[r["node"], r["total_s"] * 1e3, r["calls"]] for r in p["top_backward_nodes_s"]],
        )

    # goals
    goals = {}
    g = summary.get((GOAL_LENGTH, "ours_flex"), {})
    flex_fb = attention.get(GOAL_LENGTH, {}).get("ours_flex", {}).get("fwd_bwd")
    if kind == "cuda" and flex_fb:
        goals["flex_speedup_at_8k"] = {
            "goal": GOAL_FLEX_SPEEDUP,
            "value": g.get("time_ratio_fwd_bwd"),
            "met": (g.get("time_ratio_fwd_bwd") or 0) >= GOAL_FLEX_SPEEDUP,
        }
        goals["flex_memory_at_8k"] = {
            "goal": GOAL_FLEX_MEMORY,
            "value": g.get("memory_ratio_fwd_bwd"),
            "met": (g.get("memory_ratio_fwd_bwd") or 0) >= GOAL_FLEX_MEMORY,
            "value_vs_materialized": g.get("memory_ratio_fwd_bwd_vs_materialized"),
            "met_vs_materialized": (g.get("memory_ratio_fwd_bwd_vs_materialized") or 0)
            >= GOAL_FLEX_MEMORY,
            "note": "value: against SDPA's fastest causal kernel (flash: memory linear in T); "
            "vs_materialized: against causal attention holding the T x T scores (math kernel)",
        }
    else:
        note = (
            "GPU goal: not evaluated on this device (flex has no CPU backward)"
            if kind == "cpu"
            else f"not evaluated in this run: flex was not timed at {GOAL_LENGTH} tokens "
            "(--lengths, --flex-lengths)"
        )
        goals["flex_speedup_at_8k"] = {
            "goal": GOAL_FLEX_SPEEDUP,
            "value": None,
            "met": None,
            "note": note,
            "cpu_forward_only_ratio": g.get("time_ratio_fwd"),
        }
        goals["flex_memory_at_8k"] = {
            "goal": GOAL_FLEX_MEMORY,
            "value": None,
            "met": None,
            "note": note,
            "cpu_forward_only_ratio": g.get("memory_ratio_fwd"),
        }
    value = checkpoint_ratios.get(GOAL_LENGTH)
    goals["checkpointing_activation_ratio_at_8k"] = {
        "goal": GOAL_CHECKPOINT_RATIO,
        "value": value,
        "met": None if value is None else value >= GOAL_CHECKPOINT_RATIO,
        "saved_for_backward_ratio": kept_ratios.get(GOAL_LENGTH),
        "note": "value: peak memory one more layer adds (allocator included); "
        "saved_for_backward_ratio: the bytes autograd keeps per layer (exact)",
    }
    if kind == "cpu":
        fractions = {
            name: m.get("fraction_of_matmul_peak_whole_step")
            for name, m in model_out.items()
            if name.endswith("/plain")
        }
        known = [f for f in fractions.values() if f is not None]
        goals["cpu_train_step_fraction_of_fp32_peak"] = {
            "goal": GOAL_UTILISATION,
            "value_per_length": fractions,
            "met": None if not known else min(known) >= GOAL_UTILISATION,
            "flops": "useful: 6 x params x tokens (+ summaries) + attention over visible "
            "entries, no recomputation; time: step + mask build; met = at every "
            "model length without checkpointing",
        }
    print()
    print("== goals")
    for name, goal in goals.items():
        shown = goal.get("value", goal.get("value_per_length"))
        if isinstance(shown, dict):
            shown = ", ".join(f"{k}: {'-' if v is None else f'{v:.1%}'}" for k, v in shown.items())
        elif isinstance(shown, float):
            shown = f"{shown:.2f}"
        verdict = {True: "met", False: "MISSED", None: "not evaluated"}[goal["met"]]
        print(
            f"  {name}: {shown} (goal {goal['goal']}) -> {verdict}"
            + (f" [{goal['note']}]" if "note" in goal else "")
        )

    loads = [entry["other_cpu_share"] for entry in log]
    print(
        f"\nother processes used {min(loads):.0%}-{max(loads):.0%} of the CPUs during the "
        f"measurements (mean {sum(loads) / len(loads):.0%}); total {total_s:.0f}s"
    )

    name = args.name or (
        "attention"
        if kind == "cpu"
        else "attention-" + re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    )
    payload = {
        "benchmark": "attention",
        "device": args.device,
        "device_name": device_name,
        "machine": machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "dtype": args.dtype,
        "model_size": args.size,
        "model_config": config.to_dict(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "lengths",
                "model_lengths",
                "flex_lengths",
                "repeats",
                "budget_s",
                "max_run_s",
                "profile_length",
                "model_backend",
                "seed",
                "wait_idle_s",
                "long_document_max",
            )
        },
        "inputs": "sample-corpus pieces in a seeded order, HID-tokenized, packed as documents "
        "(doc ids) until each length is filled; the prefix of one row per length",
        "memory_method": "cuda.max_memory_allocated growth"
        if kind == "cuda"
        else "peak RSS growth of a fresh child process per configuration "
        "(malloc_trim, VmHWM reset via /proc/self/clear_refs)",
        "matmul": matmul,
        "masks": {str(k): v for k, v in masks.items()},
        "attention": {str(k): v for k, v in attention.items()},
        "attention_ratios_vs_causal": {f"{k[0]}/{k[1]}": v for k, v in summary.items()},
        "model": model_out,
        "checkpointing_activation_ratio": {str(k): v for k, v in checkpoint_ratios.items()},
        "profile": profile_result,
        "goals": goals,
        "load": log,
        "total_s": total_s,
    }
    path = write_result(name, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
