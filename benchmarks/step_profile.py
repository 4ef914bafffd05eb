"""Where a GPU training step's device time goes, and the attention kernels against full causal
attention at the same batch shape.

One step runs under torch.profiler; its kernels are grouped by family (FlexAttention, matmuls,
optimizer, the rest) with the top kernels listed. Our attention is then judged by its kernels'
device time per layer at the training batch (several 8k rows), against flash causal attention
(SDPA's fastest kernel) forward + backward at the same (batch, heads, length, head dim), timed
with CUDA events over back-to-back calls. A one-row wall-clock timing at 8k measures Python's
per-call overhead as much as the kernels on an H100-class GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from segment_summarize import compiled_segment_summarize, segment_plan
from split_summarize import split_block_mask, split_summarize
from torch.autograd import DeviceType
from torch.nn.attention.flex_attention import BlockMask
from torch.profiler import ProfilerActivity, profile

from meloformer_model.model import KEYS_PER_BYTE, FlexMask, flex_masks, visibility_table

Shape = tuple[int, int, int, int]  # (batch, heads, length, head dim)
ATTENTION = "attention (flex)"
FAMILIES = (
    # inductor names FlexAttention's kernels triton_tem_*: without --compile the only templates
    # in a step are flex's, and matmuls stay cuBLAS calls with --compile (no max-autotune)
    (ATTENTION, ("flex", "triton_tem")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("optimizer", ("multi_tensor_apply",)),
)
OTHER = "elementwise, reductions, copies"


def family(kernel: str) -> str:
    lowered = kernel.lower()
    for name, needles in FAMILIES:
        if any(needle in lowered for needle in needles):
            return name
    return OTHER


def kernel_profile(step: Callable[[], object], device: torch.device, top: int = 15) -> dict:
    """Device time of one call of ``step`` by kernel family, and its ``top`` kernels."""
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    kernels = [  # annotated ranges (Optimizer.step#AdamW.step) span kernels counted already
        (e.key, e.self_device_time_total / 1e6, e.count)
        for e in prof.key_averages()
        if e.device_type == DeviceType.CUDA
        and e.self_device_time_total > 0
        and not getattr(e, "is_user_annotation", False)
    ]
    families = {name: 0.0 for name, _ in FAMILIES} | {OTHER: 0.0}
    for name, seconds, _ in kernels:
        families[family(name)] += seconds
    total = sum(families.values())
    return {
        "profiled_wall_s": wall,
        "kernel_s": total,
        "families_s": families,
        "top_kernels": [
            {"kernel": name[:120], "s": seconds, "calls": calls, "family": family(name)}
            for name, seconds, calls in sorted(kernels, key=lambda k: -k[1])[:top]
        ],
    }


def _event_s(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean seconds per call over back-to-back calls, by CUDA events, after one warm-up call."""
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 / repeats


def _inputs(shape: Shape, device: torch.device, n: int) -> torch.Tensor:
    batch, heads, _, head_dim = shape
    size = (batch, heads, n, head_dim)
    return torch.randn(size, device=device, dtype=torch.bfloat16, requires_grad=True)


def causal_attention_s(shape: Shape, device: torch.device, repeats: int = 10) -> float:
    """Flash causal attention forward + backward on bf16 (B, H, T, D) inputs."""
    q, k, v = (_inputs(shape, device, shape[2]) for _ in range(3))
    grad = torch.randn_like(q)

    def run():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad)

    return _event_s(run, device, repeats)


def _byte_table(table: torch.Tensor, n_keys: int) -> torch.Tensor:
    """The visibility table unpacked to a bool per token pair, the layout before bit packing."""
    shifts = torch.arange(KEYS_PER_BYTE, dtype=torch.uint8, device=table.device)
    return ((table[..., None] >> shifts) & 1).flatten(-2)[..., :n_keys].bool()


def _tile_bound_variants(mask: FlexMask, table: torch.Tensor, first_query: int) -> dict:
    """The update phase's tiles with other masking, to place its time: the mask_mod reading a
    byte per pair (the table before bit packing; same attention), a mask_mod that reads nothing
    (every entry of a visited tile visible), and every visited tile marked full (no mask_mod at
    all: the time the tile count alone costs). The last two: wrong attention, same tiles."""
    bm = mask.block_mask
    no_partial = torch.zeros_like(bm.kv_num_blocks)
    byte = _byte_table(table, bm.seq_lengths[1])
    return {
        BYTE_TABLE: FlexMask(BlockMask.from_kv_blocks(
            bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
            BLOCK_SIZE=bm.BLOCK_SIZE, seq_lengths=bm.seq_lengths,
            mask_mod=lambda b, h, q_idx, kv_idx: byte[b, first_query + q_idx, kv_idx],
        ), mask.kernel),
        "update_mask_mod_reads_nothing": FlexMask(BlockMask.from_kv_blocks(
            bm.kv_num_blocks, bm.kv_indices, BLOCK_SIZE=bm.BLOCK_SIZE,
            mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= 0, seq_lengths=bm.seq_lengths,
        ), mask.kernel),
        "update_tiles_full": FlexMask(BlockMask.from_kv_blocks(
            no_partial, bm.kv_indices.clone(), bm.kv_num_blocks, bm.kv_indices,
            BLOCK_SIZE=bm.BLOCK_SIZE, seq_lengths=bm.seq_lengths,
        ), mask.kernel),
    }  # fmt: skip


SPLIT_CHUNKS = 8
SPLIT = f"summarize_split_{SPLIT_CHUNKS}"
SEGMENTS = "summarize_segments"
READING_ORDER = "update_reading_order"
BYTE_TABLE = "update_byte_table"
VARIANT_NOTES = {
    BYTE_TABLE: "update with the mask_mod reading a byte per pair, not a bit (same attention)",
    READING_ORDER: "update with the regular tokens in reading order, not tile_order's (same "
    "attention)",
    "update_mask_mod_reads_nothing": "update's tiles, a mask_mod reading nothing (wrong attention)",
    "update_tiles_full": "update's tiles, all marked full: no mask_mod (wrong attention)",
    SPLIT: f"summarize in {SPLIT_CHUNKS} key chunks merged by log-sum-exp (same attention)",
    SEGMENTS: "summarize as each token's score against its own summary, reduced per summary by "
    "scatter, plus dense SS (same attention, compiled)",
}


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().float(), expected.detach().float()
    return float((got - expected).norm() / expected.norm())


def _summarize_candidates(masks, rules) -> dict[str, Callable[[], Callable]]:
    """Builders of the other ways to compute the summarize phase (benchmarks/*_summarize.py)."""

    def split():
        split_mask = split_block_mask(rules, masks, SPLIT_CHUNKS)
        return lambda q, keys, values: split_summarize(q, keys, values, split_mask, SPLIT_CHUNKS)

    def segments():
        plan = segment_plan(rules, masks)
        return lambda q, keys, values: compiled_segment_summarize()(q, keys, values, plan)

    return {SPLIT: split, SEGMENTS: segments}


def _errors(reference: Callable, candidate: Callable, summarize: tuple) -> dict[str, float]:
    """The candidate's relative errors against the model's summarize: output, largest gradient."""
    q, (k_s, k_r), (v_s, v_r) = summarize
    grad = torch.randn_like(q)
    leaves = (q, k_s, k_r, v_s, v_r)
    (model_out, *model_grads), (out, *grads) = (
        (out, *torch.autograd.grad(out, leaves, grad))
        for out in (reference(*summarize), candidate(*summarize))
    )
    return {"output": _relative_error(out, model_out),
            "gradients": max(map(_relative_error, grads, model_grads))}  # fmt: skip


def phase_s(
    masks, rules, shape: Shape, device: torch.device, repeats: int = 10
) -> tuple[dict[str, float], dict[str, dict]]:
    """Each attention phase forward + backward, as ``Block.forward`` calls it, on the batch's
    own masks (random bf16 queries, keys and values of the layer's shapes). With the flex
    backend also the update phase in reading order (when ``tile_order`` lays the row out), its
    tiles under other masking (``_tile_bound_variants``) and the other ways to summarize
    (``_summarize_candidates``), whose outputs and gradients are compared with the model's
    (relative errors, the second dict, per candidate)."""
    n_summary, n_regular = masks.summary.doc.shape[1], shape[2]
    q_s, k_s, v_s, k2, v2 = (_inputs(shape, device, n_summary) for _ in range(5))
    q_r, k_r, v_r = (_inputs(shape, device, n_regular) for _ in range(3))
    summarize = (q_s, (k_s, k_r), (v_s, v_r))
    update = (q_r, (k2, k_r), (v2, v_r))
    phases = {"summarize": (masks.summarize.attend, *summarize),
              "update": (masks.update.attend, *update)}  # fmt: skip
    errors = {}
    if isinstance(masks.update, FlexMask):
        table = visibility_table(rules, masks.summary, masks.regular)
        for name, variant in _tile_bound_variants(masks.update, table, n_summary).items():
            phases[name] = (variant.attend, *update)
        if masks.restore is not None:
            rows = torch.arange(shape[0], device=device)[:, None]
            reading = masks.regular.at(rows, masks.restore)
            phases[READING_ORDER] = (flex_masks(rules, masks.summary, reading)[1].attend, *update)
        for name, build in _summarize_candidates(masks, rules).items():
            try:  # an experiment: its failure is reported, the measurements go on
                candidate = build()
                errors[name] = _errors(masks.summarize.attend, candidate, summarize)
                phases[name] = (candidate, *summarize)
            except Exception as error:  # noqa: BLE001
                errors[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    times = {}
    for name, (attend, q, keys, values) in phases.items():
        grad = torch.randn_like(q)

        def run(attend=attend, q=q, keys=keys, values=values, grad=grad):
            out = attend(q, keys, values)
            torch.autograd.grad(out, (q, *keys, *values), grad)

        times[name] = _event_s(run, device, repeats)
    return times, errors


def attention_comparison(profiled: dict, config, masks, shape: Shape, device: torch.device) -> dict:
    """Our attention per layer against flash causal attention at the same shape: from the
    step's kernels (both phases, forward + backward, plus the forward again when checkpointing
    recomputes it), and each phase timed alone."""
    ours = profiled["families_s"][ATTENTION] / config.n_layer
    causal = causal_attention_s(shape, device)
    phases, summarize_errors = phase_s(masks, config.rules, shape, device)
    return {
        "shape_bhtd": list(shape),
        "ours_per_layer_s": ours,
        "ours_includes_recomputed_forward": config.gradient_checkpointing,
        "phases_alone_s": phases,
        "summarize_candidates_relative_error": summarize_errors,
        "causal_flash_per_layer_s": causal,
        "speedup_vs_causal": causal / ours if ours else None,
        "speedup_vs_causal_phases_alone": causal / (phases["summarize"] + phases["update"]),
    }
