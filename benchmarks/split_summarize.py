"""Experiment: the summarize phase split over key chunks, to be measured against the model's.

On the H200 the summarize phase took 0.86 ms of a layer's 2.75 ms of attention for under 1 % of
its FLOPs: a row's ≤ 256 summary queries are one or two 128-row query tiles, so B x H thread
blocks each walk every key tile of the row (the summaries cover every bar). Here each row's
keys are cut into ``chunks`` equal runs of regular keys; every chunk becomes its own batch row
holding all the row's summary queries, the summary keys (visible in chunk 0 only, so each is
counted once) and that run of regular keys. FlexAttention returns each chunk's output and
log-sum-exp, and the chunks are merged as flash-decoding merges its splits. Every summary sees
itself in chunk 0, so each merged row has a finite log-sum-exp. Same attention, ``chunks``
times the thread blocks, each walking about 1/``chunks`` of the keys.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import flex_attention

from meloformer_model.model import KEYS_PER_BYTE, BatchMasks, table_block_mask, visibility_table


@functools.cache
def _kernel():
    """Compiled flex attention returning the log-sum-exp too. ``AuxRequest`` is imported here
    (torch 2.9 on), so an older torch fails this experiment alone, where it is reported."""
    from torch.nn.attention.flex_attention import AuxRequest

    def split_flex(q, k, v, block_mask):
        out, aux = flex_attention(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True))
        return out, aux.lse

    return torch.compile(split_flex, dynamic=False)


def split_block_mask(rules, masks: BatchMasks, chunks: int):
    """The summarize phase's block mask over (batch x chunks) rows of (summaries + one run of
    regular keys), from the same visibility table as the model's (a bit per key: the runs are
    cut at whole bytes)."""
    table = visibility_table(rules, masks.summary, masks.regular)
    batch, n_summary = table.shape[0], masks.summary.doc.shape[1]
    n_regular = masks.regular.doc.shape[1]
    if n_summary % KEYS_PER_BYTE or n_regular % (chunks * KEYS_PER_BYTE):
        raise ValueError(f"{n_regular} keys do not cut into {chunks} runs of whole table bytes")
    run = n_regular // chunks
    summary_bytes, run_bytes = n_summary // KEYS_PER_BYTE, run // KEYS_PER_BYTE
    rows = table[:, :n_summary]
    own = torch.zeros(
        batch, chunks, n_summary, summary_bytes, dtype=table.dtype, device=table.device
    )
    own[:, 0] = rows[:, :, :summary_bytes]
    regular = rows[:, :, summary_bytes : summary_bytes + chunks * run_bytes]
    regular = regular.reshape(batch, n_summary, chunks, run_bytes).transpose(1, 2)
    split = torch.cat([own, regular], -1).reshape(batch * chunks, n_summary, -1)
    return table_block_mask(split.contiguous(), 0, n_summary, n_summary + run)


def _chunked(summary: torch.Tensor, regular: torch.Tensor, chunks: int) -> torch.Tensor:
    """(B, H, S, D) and (B, H, T, D) -> (B x chunks, H, S + T / chunks, D)."""
    batch, heads, n_summary, dim = summary.shape
    runs = regular.unflatten(2, (chunks, -1)).transpose(1, 2)
    own = summary[:, None].expand(batch, chunks, heads, n_summary, dim)
    return torch.cat([own, runs], 3).flatten(0, 1)


def split_summarize(q, keys, values, block_mask, chunks: int) -> torch.Tensor:
    """Summarize attention as ``FlexMask.attend`` computes it, in ``chunks`` key runs merged
    by their log-sum-exp."""
    batch, heads, n_summary, dim = q.shape
    k, v = (_chunked(*parts, chunks) for parts in (keys, values))
    q_rows = q[:, None].expand(batch, chunks, heads, n_summary, dim).flatten(0, 1)
    out, lse = _kernel()(q_rows, k, v, block_mask)
    out = out.unflatten(0, (batch, chunks)).float()
    lse = lse.unflatten(0, (batch, chunks))
    weight = torch.exp(lse - lse.amax(1, keepdim=True))
    merged = (weight[..., None] * out).sum(1) / weight.sum(1)[..., None]
    return merged.to(q.dtype)
