"""Experiment: the summarize phase without a sparse-attention kernel, to be measured against
the model's.

On the H200 the summarize phase took 0.86 ms of a layer's 2.75 ms of attention for under 1 % of
its FLOPs: a row's ≤ 256 summary queries are one or two 128-row query tiles, so B x H thread
blocks each walk every key tile of the row. Yet its regular keys are a partition: a summary
reads exactly its own bar's non-global tokens (the predicate's SR rule, which the rules do not
configure), and a regular token is read by one summary at most. So each regular token is scored
against its own summary's query alone (a gather and a dot product, O(T x D)), the scores are
reduced per summary by scatter (max, then sum of exponentials and of weighted values), and the
summary keys (SS, at most a few hundred per row) go through a small dense attention; the two
halves share one softmax. Memory-bound work over every token instead of a kernel whose thread
blocks walk the row one after another. Every summary sees itself, so no softmax is empty.
"""

from __future__ import annotations

import functools

import torch

from meloformer_model.model import BAR_KEY, BatchMasks, visible
from meloformer_model.tokenizer.config import GLOBAL_INSTRUMENT


def segment_plan(rules, masks: BatchMasks) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, ss): per regular token (in the layers' order) the summary slot that reads it, or
    S (the width) for none (global tokens, padding); and the SS mask (B, 1, S, S)."""
    summary, regular = masks.summary, masks.regular
    width = summary.doc.shape[1]
    never = torch.iinfo(torch.long).max
    summary_key = torch.where(summary.doc >= 0, summary.doc * BAR_KEY + summary.bar, never)
    token_key = regular.doc * BAR_KEY + regular.bar
    slot = torch.searchsorted(summary_key, token_key).clamp(max=width - 1)
    read = (
        (regular.doc >= 0)
        & (regular.instrument != GLOBAL_INSTRUMENT)
        & (summary_key.gather(1, slot) == token_key)
    )
    ss = visible(rules, summary.expand(2), summary.expand(1)).unsqueeze(1)
    return torch.where(read, slot, width), ss


def segment_summarize(q, keys, values, plan: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Summarize attention as ``FlexMask.attend`` computes it: q (B, H, S, D); keys, values:
    (summary part (B, Hkv, S, D), regular part (B, Hkv, T, D))."""
    slot, ss = plan
    (k_s, k_r), (v_s, v_r) = keys, values
    batch, heads, width, dim = q.shape
    kv_heads, length = k_r.shape[1], k_r.shape[2]
    shape = (batch, kv_heads, heads // kv_heads)
    qf = q.float().unflatten(1, shape[1:])  # (B, Hkv, G, S, D): grouped heads share keys
    scale = dim**-0.5
    s_ss = torch.einsum("bkgsd,bktd->bkgst", qf, k_s.float()) * scale
    s_ss = s_ss.masked_fill(~ss[:, :, None], float("-inf"))

    index = slot[:, None, None, :].expand(*shape, length)  # S (no reader) -> a spare column
    own_query = qf.gather(3, slot.clamp(max=width - 1)[:, None, None, :, None]
                          .expand(*shape, length, dim))  # fmt: skip
    s_r = (own_query * k_r.float()[:, :, None]).sum(-1) * scale
    s_r = s_r.masked_fill(index == width, float("-inf"))
    spare = torch.full((*shape, width + 1), float("-inf"), device=q.device)
    peak = spare.scatter_reduce(3, index, s_r, reduce="amax")[..., :width]
    peak = torch.maximum(peak, s_ss.amax(-1)).detach()  # finite: every summary sees itself
    w_ss = torch.exp(s_ss - peak[..., None])
    w_r = torch.exp(s_r - torch.cat([peak, peak.new_zeros(*shape, 1)], -1).gather(3, index))
    total = (
        w_ss.sum(-1) + spare.new_zeros(*shape, width + 1).scatter_add(3, index, w_r)[..., :width]
    )
    weighted = spare.new_zeros(*shape, width + 1, dim).scatter_add(
        3, index[..., None].expand(*shape, length, dim), w_r[..., None] * v_r.float()[:, :, None]
    )[..., :width, :]
    out = (torch.einsum("bkgst,bktd->bkgsd", w_ss, v_s.float()) + weighted) / total[..., None]
    return out.flatten(1, 2).to(q.dtype)


@functools.cache
def compiled_segment_summarize():
    return torch.compile(segment_summarize, dynamic=False)
