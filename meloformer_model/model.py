"""MeloFormer: a decoder-only Transformer with MuseFormer-style summary-token sparse attention.

Two streams flow through every layer: the regular tokens (the HID sequence) and one summary
token per (document, bar). Each layer first *summarizes* (summary queries attend to earlier
summaries, SS, and to their own bar's regular tokens, SR), projects the updated summaries to
second-stage keys/values, then *updates* (regular queries attend to summaries of completed
bars, RS, and sparsely to regular tokens, RR). Which key each query sees is decided by one
predicate over per-token side information (document, bar, instrument, token type, onset group,
position), so the dense backend (SDPA with a boolean mask, CPU training) and the flex backend
(FlexAttention block masks, GPU) cannot disagree. Masks are built once per batch, per sample,
and shared by all layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from meloformer_model.model_sizes import MODEL_SIZES
from meloformer_model.tokenizer.config import GLOBAL_INSTRUMENT
from meloformer_model.tokenizer.vocab import TokenType

POSITION, PITCH, DURATION, VELOCITY = (
    int(TokenType.POSITION),
    int(TokenType.PITCH),
    int(TokenType.DURATION),
    int(TokenType.VELOCITY),
)


@dataclass(frozen=True)
class AttentionRules:
    """Which keys a query sees; the rules are config, not code.

    Regular → regular (RR): same document, causal, and either the key's bar is within
    ``fine_bar_offsets`` of the query's bar, or (``same_instrument_all_bars``) the key has the
    query's instrument; between note tokens, ``type_rules`` (query type → visible key types) and
    ``duration_sees_own_onset_group`` further restrict. Global keys (instrument 129: bar, chord,
    tempo, time signature) are always visible when ``global_keys_always_visible``, else under the
    bar rules like any key; the query's own onset group and the token itself always are.
    Regular → summary (RS): summaries of earlier bars of the document (only those outside the
    fine offsets when ``summaries_beyond_fine_bars_only``). Summary → summary (SS): earlier
    summaries when ``summary_sees_earlier_summaries``, and itself. Summary → regular (SR): its
    own bar's non-global tokens.
    """

    fine_bar_offsets: tuple[int, ...] = (0, 1, 2, 4)
    same_instrument_all_bars: bool = True
    type_rules: tuple[tuple[int, tuple[int, ...]], ...] = (
        (POSITION, (POSITION, PITCH)),
        (PITCH, (POSITION, PITCH)),
        (VELOCITY, (VELOCITY,)),
    )
    duration_sees_own_onset_group: bool = True
    global_keys_always_visible: bool = True
    summaries_beyond_fine_bars_only: bool = False
    summary_sees_earlier_summaries: bool = True

    def __post_init__(self) -> None:
        """Lists become tuples (JSON gives lists): the rules are hashed, as a cache key."""
        object.__setattr__(self, "fine_bar_offsets", tuple(self.fine_bar_offsets))
        rules = tuple((q, tuple(keys)) for q, keys in self.type_rules)
        object.__setattr__(self, "type_rules", rules)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AttentionRules:
        return cls(**data)


UPSTREAM_RULES = AttentionRules()
MUSEFORMER_RULES = AttentionRules(
    fine_bar_offsets=(0, 1, 2, 4, 8, 12, 16, 24, 32),
    same_instrument_all_bars=False,
    type_rules=(),
    duration_sees_own_onset_group=False,
    global_keys_always_visible=False,
    summaries_beyond_fine_bars_only=True,
    summary_sees_earlier_summaries=False,
)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int = 6
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 4
    ffn_hidden: int = 1408
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    backend: str = "dense"
    gradient_checkpointing: bool = False
    rules: AttentionRules = field(default_factory=AttentionRules)

    def __post_init__(self) -> None:
        if not (self.n_head >= 1 and self.n_kv_head >= 1):
            raise ValueError(f"n_head {self.n_head} and n_kv_head {self.n_kv_head} must be >= 1")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must divide into n_head heads, n_head into n_kv_head groups")
        if self.head_dim % 2:
            raise ValueError(
                f"head dim {self.head_dim} (n_embd / n_head) must be even: RoPE rotates pairs"
            )
        if self.backend not in ("dense", "flex"):
            raise ValueError(f"backend must be 'dense' or 'flex', not {self.backend!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["rules"] = AttentionRules.from_dict(data["rules"])
        return cls(**data)


def backend_for(device: str | torch.device) -> str:
    """The attention backend a device runs: flex on CUDA, dense elsewhere (CPU flex has no
    backward). A runtime choice: a checkpoint trained on one runs with the other."""
    return "flex" if torch.device(device).type == "cuda" else "dense"


def model_config(size: str, vocab_size: int, **overrides) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, **{**MODEL_SIZES[size], **overrides})


def expected_parameters(config: ModelConfig) -> int:
    """Parameter count from the architecture's arithmetic (embedding tied with the head)."""
    c, kv = config.n_embd, config.n_kv_head * config.head_dim
    per_layer = 2 * c * c + 4 * c * kv + 3 * c * config.ffn_hidden + 3 * c
    return config.vocab_size * c + 2 * c + config.n_layer * per_layer


# --------------------------------------------------------------------------------- side info
@dataclass
class Stream:
    """Side information of one stream (B, L): what the mask predicate reads."""

    doc: torch.Tensor
    bar: torch.Tensor
    instrument: torch.Tensor
    token_type: torch.Tensor
    onset_group: torch.Tensor
    pos: torch.Tensor
    summary: torch.Tensor

    def cat(self, other: Stream) -> Stream:
        return Stream(*(torch.cat([a, b], dim=1) for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return (
            self.doc,
            self.bar,
            self.instrument,
            self.token_type,
            self.onset_group,
            self.pos,
            self.summary,
        )

    def at(self, b: torch.Tensor, i: torch.Tensor) -> Stream:
        return Stream(*(t[b, i] for t in self.fields()))

    def expand(self, dim: int) -> Stream:
        return Stream(*(t.unsqueeze(dim) for t in self.fields()))

    def slice(self, row: int) -> Stream:
        """Sample ``row`` as a batch of one."""
        return Stream(*(t[row : row + 1] for t in self.fields()))

    def part(self, columns: slice) -> Stream:
        return Stream(*(t[:, columns] for t in self.fields()))


def regular_stream(
    bar: torch.Tensor,
    instrument: torch.Tensor,
    token_type: torch.Tensor,
    onset_group: torch.Tensor,
    doc: torch.Tensor | None = None,
) -> Stream:
    """Side information of the regular tokens. ``doc`` (B, T) marks packed documents (-1 =
    padding); positions restart at 0 in each document, so RoPE is shift-invariant per piece."""
    batch, length = bar.shape
    if doc is None:
        doc = torch.zeros_like(bar)
    index = torch.arange(length, device=bar.device).expand(batch, length)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    pos = torch.where(doc >= 0, index - first, index)
    return Stream(
        doc, bar, instrument, token_type, onset_group, pos, torch.zeros_like(bar, dtype=torch.bool)
    )


MIN_SUMMARY_WIDTH = 64


def summary_width(needed: int) -> int:
    """The summary stream's padded width: the next power of two (at least 64), so a run sees
    a handful of key lengths, each a compiled flex shape (dynamo keeps 8 per function)."""
    return max(MIN_SUMMARY_WIDTH, 1 << (needed - 1).bit_length())


BAR_KEY = 1 << 20  # (document, bar) -> one sortable key: document * BAR_KEY + bar


def _bar_keys(doc: torch.Tensor, bar: torch.Tensor):
    """Each row's (document, bar) keys sorted (padding last, as the largest key), the order
    that sorts them, which are real and which start a new (document, bar)."""
    padding = torch.iinfo(torch.long).max
    key = torch.where(doc >= 0, doc.long() * BAR_KEY + bar, padding)
    key, order = torch.sort(key, dim=1, stable=True)
    real = key != padding
    first = real.clone()
    first[:, 1:] &= key[:, 1:] != key[:, :-1]
    return key, order, real, first


def _width(first: torch.Tensor) -> int:
    """The padded summary width for rows whose new (document, bar) starts are ``first``."""
    return summary_width(max(1, int(first.sum(1).max())))


def batch_summary_width(doc: torch.Tensor, bar: torch.Tensor) -> int:
    """The summary stream's width for these rows (B, T): ``summary_stream``'s own, computed
    wherever the tensors are. The trainer computes it on the host batch, so building a GPU
    batch's masks reads nothing back from the device and the host can queue the next
    micro-batch while the GPU runs this one."""
    return _width(_bar_keys(doc, bar)[3])


def summary_stream(regular: Stream, width: int | None = None) -> Stream:
    """One summary per (document, bar) present, in (document, bar) order; its position is its
    bar's last token. All rows at once; ``width`` (``batch_summary_width``, or read back from
    the device when None) is the padded summary count, at least the rows' bar count."""
    batch = regular.doc.shape[0]
    key, order, real, first = _bar_keys(regular.doc, regular.bar)
    if width is None:
        width = _width(first)
    slot = torch.where(real, torch.cumsum(first, 1) - 1, width)  # padding -> a spare column
    spare = torch.full((batch, width + 1), -1, dtype=torch.long, device=key.device)
    keys = spare.scatter(1, slot, torch.where(real, key, -1))[:, :width]
    last = spare.scatter_reduce(1, slot, regular.pos.gather(1, order), reduce="amax")[:, :width]
    present = keys >= 0
    doc = torch.where(present, keys // BAR_KEY, -1).to(regular.doc.dtype)
    bar = torch.where(present, keys % BAR_KEY, -1).to(regular.doc.dtype)
    pos = torch.where(present, last, -1 - torch.arange(width, device=doc.device))
    return Stream(
        doc,
        bar,
        torch.full_like(doc, GLOBAL_INSTRUMENT),
        torch.zeros_like(doc),
        torch.full_like(doc, -1),
        pos,
        torch.ones_like(doc, dtype=torch.bool),
    )


def _any_equal(values: torch.Tensor, options: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros_like(values, dtype=torch.bool)
    for option in options:
        out = out | (values == option)
    return out


def visible(rules: AttentionRules, q: Stream, k: Stream) -> torch.Tensor:
    """The mask predicate: may query ``q`` read key ``k``? Elementwise on broadcastable
    tensors, so it serves the dense mask (broadcast) and FlexAttention's mask_mod (scalars)."""
    same_doc = (q.doc == k.doc) & (q.doc >= 0)
    offset = q.bar - k.bar
    fine = _any_equal(offset, rules.fine_bar_offsets)
    itself = (q.summary == k.summary) & (q.pos == k.pos) & (q.doc == k.doc)

    # regular → regular
    bar_ok = fine | ((q.instrument == k.instrument) if rules.same_instrument_all_bars else False)
    notes = (q.token_type > 0) & (k.token_type > 0)
    type_ok = torch.ones_like(notes)
    for query_type, key_types in rules.type_rules:
        type_ok = type_ok & ((q.token_type != query_type) | _any_equal(k.token_type, key_types))
    if rules.duration_sees_own_onset_group:
        type_ok = type_ok & ((q.token_type != DURATION) | (k.onset_group == q.onset_group))
    type_ok = type_ok | ~notes
    same_group = (q.onset_group == k.onset_group) & (q.onset_group >= 0)
    key_global = k.instrument == GLOBAL_INSTRUMENT
    always = same_group | key_global if rules.global_keys_always_visible else same_group
    rr = (k.pos <= q.pos) & ((bar_ok & type_ok) | always)

    # regular → summary of an earlier bar
    rs = offset > 0
    if rules.summaries_beyond_fine_bars_only:
        rs = rs & ~fine
    # summary → summary, summary → its own bar
    ss = (offset > 0) if rules.summary_sees_earlier_summaries else torch.zeros_like(rs)
    sr = (offset == 0) & ~key_global

    by_kind = torch.where(q.summary, torch.where(k.summary, ss, sr), torch.where(k.summary, rs, rr))
    return (same_doc & by_kind) | itself


def dense_mask(rules: AttentionRules, queries: Stream, keys: Stream) -> torch.Tensor:
    """(B, 1, Q, K) boolean mask over the whole rows, built per sample from the batch's own
    side info: the reference the per-document masks and the flex block masks must match."""
    return visible(rules, queries.expand(2), keys.expand(1)).unsqueeze(1)


@dataclass
class Span:
    """A run of queries in one row that attends as a unit: one packed document's queries with
    its summary and regular keys and their additive mask (1, 1, Q, S + R; 0 visible, -inf
    not: SDPA on CPU is ~2x faster with it than with a boolean mask, which it converts on
    every call), or padding (bias None), where each query sees only itself."""

    row: int
    queries: slice
    summaries: slice
    regular: slice
    bias: torch.Tensor | None


def _by_run(x: torch.Tensor, cuts: list[slice]) -> dict[tuple[int, int], torch.Tensor]:
    """One row (H, L, D) split at the ends of ``cuts`` (disjoint runs): each run as (1, H, n, D)
    by its (start, stop). The gradients of a split come back in one concatenation; slicing each
    run out of the batch would zero-fill a gradient the size of the batch per run."""
    bounds = sorted({0, x.shape[1], *(end for cut in cuts for end in (cut.start, cut.stop))})
    parts = torch.split(x, [stop - start for start, stop in zip(bounds, bounds[1:])], dim=1)
    return {(start, stop): part[None] for start, stop, part in zip(bounds, bounds[1:], parts)}


@dataclass
class DocumentMasks:
    """The dense backend's masks, cut per packed document. No key of another document is ever
    visible, so attention runs document by document: the cost is the sum of the documents'
    squares, not the square of the row (8 documents in an 8k row: 8x fewer entries)."""

    spans: list[Span]
    summary_queries: bool

    def attend(self, q: torch.Tensor, keys: tuple, values: tuple) -> torch.Tensor:
        """q: (B, H, Q, D); keys, values: (summary part, regular part), each (B, Hkv, ., D)."""
        groups = q.shape[1] // keys[0].shape[1]
        own_values = values[0] if self.summary_queries else values[1]
        tensors = (q, own_values, keys[0], keys[1], values[0], values[1])
        cut_by = ("queries", "queries", "summaries", "regular", "summaries", "regular")
        out = []
        for b, row in enumerate(zip(*(t.unbind(0) for t in tensors))):
            spans = [span for span in self.spans if span.row == b]
            runs = [_by_run(x, [getattr(s, name) for s in spans]) for x, name in zip(row, cut_by)]

            def run(i: int, span: Span, runs=runs) -> torch.Tensor:
                cut = getattr(span, cut_by[i])
                return runs[i][cut.start, cut.stop]

            parts = []
            for span in spans:
                if span.bias is None:
                    own = run(1, span)
                    parts.append(own.repeat_interleave(groups, dim=1) if groups > 1 else own)
                    continue
                k = torch.cat([run(2, span), run(3, span)], 2)
                v = torch.cat([run(4, span), run(5, span)], 2)
                bias = span.bias.to(q.dtype)
                parts.append(F.scaled_dot_product_attention(run(0, span), k, v, attn_mask=bias,
                                                            enable_gqa=groups > 1))  # fmt: skip
            out.append(torch.cat(parts, 2))
        return torch.cat(out, 0)

    def visible_entries(self) -> int:
        """Visible (query, key) pairs, padding's self-entries included: equals the count in
        the whole-row ``dense_mask``."""
        return sum(
            int((s.bias == 0).sum()) if s.bias is not None else s.queries.stop - s.queries.start
            for s in self.spans
        )


def _runs(doc_row: torch.Tensor) -> list[tuple[int, slice]]:
    """(document id, slice) for each run of equal ids; a document must be one run."""
    values, counts = torch.unique_consecutive(doc_row, return_counts=True)
    runs, start, seen = [], 0, set()
    for value, count in zip(values.tolist(), counts.tolist()):
        if value >= 0 and value in seen:
            raise ValueError(f"document {value} is split into several runs: pack it contiguously")
        seen.add(value)
        runs.append((value, slice(start, start + count)))
        start += count
    return runs


def _bias(rules: AttentionRules, queries: Stream, keys: Stream) -> torch.Tensor:
    mask = dense_mask(rules, queries, keys)
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


def document_masks(rules: AttentionRules, summaries: Stream, regular: Stream) -> tuple:
    """(summarize, update) DocumentMasks from the same predicate, per sample and document."""
    summarize, update = [], []
    for b in range(regular.doc.shape[0]):
        s_row, r_row = summaries.slice(b), regular.slice(b)
        summary_runs = dict(_runs(summaries.doc[b]))
        for doc, r_span in _runs(regular.doc[b]):
            if doc < 0:
                update.append(Span(b, r_span, slice(0, 0), r_span, None))
                continue
            s_span = summary_runs[doc]
            keys = s_row.part(s_span).cat(r_row.part(r_span))
            update.append(Span(b, r_span, s_span, r_span, _bias(rules, r_row.part(r_span), keys)))
            summarize.append(
                Span(b, s_span, s_span, r_span, _bias(rules, s_row.part(s_span), keys))
            )
        for doc, s_span in summary_runs.items():
            if doc < 0:
                summarize.append(Span(b, s_span, s_span, slice(0, 0), None))
    summarize.sort(key=lambda s: (s.row, s.queries.start))
    return DocumentMasks(summarize, summary_queries=True), DocumentMasks(
        update, summary_queries=False
    )


# Each attention phase has its own function: dynamo keeps at most ``recompile_limit`` (8)
# compiled shapes per function (per code object, however many torch.compile wrappers share it),
# and the two phases see different shapes for every summary width.
def _summarize_flex(q, k, v, block_mask, enable_gqa: bool) -> torch.Tensor:
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _update_flex(q, k, v, block_mask, enable_gqa: bool) -> torch.Tensor:
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


KEYS_PER_BYTE = 8  # the visibility table holds a bit per token pair


def _visibility(rules: AttentionRules, tokens: Stream, keys: Stream) -> torch.Tensor:
    """Every token against every 8th key, 8 times, each into its own bit: one pointwise kernel
    writing the packed table (packing a bool table after it ran 8x slower on CPU)."""
    queries = tokens.expand(2)
    table = torch.zeros((), dtype=torch.uint8, device=tokens.doc.device)
    for bit in range(KEYS_PER_BYTE):
        column = keys.part(slice(bit, None, KEYS_PER_BYTE)).expand(1)
        table = table | (visible(rules, queries, column).to(torch.uint8) << bit)
    return table


def _unseen(batch: int, n: int, device: torch.device) -> Stream:
    """``n`` key columns no query sees (document -2; padding is -1): a row's last byte's spare
    bits."""
    zeros = torch.zeros(batch, n, dtype=torch.long, device=device)
    return Stream(zeros - 2, zeros, zeros, zeros, zeros, zeros, zeros.bool())


def visibility_table(rules: AttentionRules, summaries: Stream, regular: Stream) -> torch.Tensor:
    """(B, N, ceil(N / 8)) uint8 over the N = S + T (summary, regular) tokens: bit j of byte c
    of row i says whether token i may read token 8c + j. One compiled kernel per batch. A bit
    per pair, not a byte: 33 MiB for a 4 x 8192 batch, not 264 (0.14 GB per 32k row, not 1.1),
    and a partial tile's mask_mod reads 2 KiB instead of 16."""
    tokens = keys = summaries.cat(regular)
    batch, n = tokens.doc.shape
    if n % KEYS_PER_BYTE:
        keys = tokens.cat(_unseen(batch, -n % KEYS_PER_BYTE, tokens.doc.device))
    return _compiled(_visibility)(rules, tokens, keys)


FLEX_BLOCK = 128  # FlexAttention's default sparse block: the tile its kernels skip or visit


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q tiles, KV tiles) bool -> per query tile the count and the indices of its True
    tiles, first and in order: BlockMask's (B, 1, ...) int32 layout."""
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts[:, None], order.to(torch.int32)[:, None]


def table_block_mask(
    table: torch.Tensor, first_query: int, n_queries: int, n_keys: int
) -> BlockMask:
    """The block mask of the visibility table's rows ``first_query`` on, over its first
    ``n_keys`` keys, from one pass over the table: a tile whose bytes are all 255 is full (no
    mask_mod), one with any bit set is partial, as ``create_block_mask`` classifies them. That
    function would evaluate the mask_mod over every entry again and sum the tiles in int64 (on
    CPU, three quarters of the mask building at 4 x 8192 tokens)."""

    def mask_mod(b, h, q_idx, kv_idx):
        byte = table[b, first_query + q_idx, kv_idx // KEYS_PER_BYTE]
        return ((byte >> (kv_idx % KEYS_PER_BYTE)) & 1) != 0

    rows = table[:, first_query : first_query + n_queries]
    tile_bytes = FLEX_BLOCK // KEYS_PER_BYTE
    pad_q, pad_k = -n_queries % FLEX_BLOCK, -rows.shape[2] % tile_bytes
    if pad_q or pad_k:  # edge tiles are never full, as in create_block_mask
        rows = F.pad(rows, (0, pad_k, 0, pad_q))
    q_tiles, k_tiles = rows.shape[1] // FLEX_BLOCK, rows.shape[2] // tile_bytes
    tiles = rows.view(table.shape[0], q_tiles, FLEX_BLOCK, k_tiles, tile_bytes)
    full = tiles.amin((2, 4)) == 255  # every bit set
    partial = (tiles.amax((2, 4)) > 0) & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial),
        *_ordered(full),
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(n_queries, n_keys),
    )


@torch.no_grad()
def flex_masks(rules: AttentionRules, summaries: Stream, regular: Stream) -> tuple:
    """(summarize, update) FlexMasks from the same predicate, per sample. The predicate is
    evaluated once per batch into a table of a bit per token pair (``visibility_table``, one
    fused compiled kernel), which both phases' mask_mods read: a partial tile then costs a bit read
    per entry, not the predicate's ~70 integer operations per entry, every layer, forward and
    backward. Tiles with nothing visible are skipped as before."""
    table = visibility_table(rules, summaries, regular)
    n_summaries, n_regular = summaries.doc.shape[1], regular.doc.shape[1]
    n_keys = n_summaries + n_regular
    return (
        FlexMask(table_block_mask(table, 0, n_summaries, n_keys), _compiled(_summarize_flex)),
        FlexMask(table_block_mask(table, n_summaries, n_regular, n_keys), _compiled(_update_flex)),
    )


@dataclass
class FlexMask:
    """The flex backend's mask for one phase: a block mask over the concatenated (summary,
    regular) keys and the phase's own compiled attention function."""

    block_mask: BlockMask
    kernel: Callable

    def attend(self, q: torch.Tensor, keys: tuple, values: tuple) -> torch.Tensor:
        k, v = torch.cat(keys, 2), torch.cat(values, 2)
        return self.kernel(q, k, v, self.block_mask, q.shape[1] != k.shape[1])


@functools.cache
def _token_classes(rules: AttentionRules, device: torch.device) -> torch.Tensor:
    """Token type -> class: types whose queries read the same key types (``type_rules``) share a
    class; a type without a rule is a class of its own. Kept per device: a copy to the GPU for
    every batch would be one more wait for it."""
    key_types = dict(rules.type_rules)
    distinct: list[tuple[int, ...]] = []
    for token_type in TokenType:
        reads = key_types.get(int(token_type), (int(token_type),))
        if reads not in distinct:
            distinct.append(reads)
    return torch.tensor(
        [distinct.index(key_types.get(int(t), (int(t),))) for t in TokenType],
        dtype=torch.long,
        device=device,
    )


def tile_order(rules: AttentionRules, regular: Stream) -> torch.Tensor | None:
    """(B, T) the order the flex backend lays each row's regular tokens out in: by document
    (padding last), then token class, then position; None (reading order) when the rules do not
    separate token types. Under type rules a note query reads mostly keys of its own class, so
    grouping the classes fills the 128 x 128 tiles the kernels visit: on 4 x 8192 rows of the
    sample corpus the update phase visits 28 % fewer tiles under the upstream rules. The rules
    without type restrictions (MuseFormer's) read whole bars, which reading order keeps
    together (this layout would visit 74 % more tiles there). Attention does not depend on the
    order of its keys, and every other layer works token by token, so the model lays a row out
    once at the embedding and restores reading order before the head."""
    if not (rules.type_rules or rules.duration_sees_own_onset_group):
        return None
    classes = _token_classes(rules, regular.token_type.device)
    length = regular.doc.shape[1]
    doc = torch.where(regular.doc >= 0, regular.doc, length)
    key = doc * len(TokenType) + classes[regular.token_type.long()]
    return torch.argsort(key, dim=1, stable=True)  # stable: positions stay in order


@dataclass
class BatchMasks:
    """Everything the layers need about a batch's structure, built once per batch: per-document
    dense masks (dense backend) or whole-row block masks (flex backend). ``regular`` is in the
    layers' order: reading order, or ``tile_order``'s (then ``order`` takes a row from reading
    order to it and ``restore`` back)."""

    regular: Stream
    summary: Stream
    summarize: DocumentMasks | FlexMask
    update: DocumentMasks | FlexMask
    regular_rotation: Rotation
    summary_rotation: Rotation
    order: torch.Tensor | None = None
    restore: torch.Tensor | None = None


def build_masks(config: ModelConfig, regular: Stream, width: int | None = None) -> BatchMasks:
    """The batch's masks; ``width``: the summary stream's, as ``summary_stream`` takes it."""
    summaries = summary_stream(regular, width)
    order = restore = None
    if config.backend == "dense":
        summarize, update = document_masks(config.rules, summaries, regular)
    else:
        order = tile_order(config.rules, regular)
        if order is not None:
            regular = regular.at(torch.arange(order.shape[0], device=order.device)[:, None], order)
            restore = torch.argsort(order, dim=1)
        summarize, update = flex_masks(config.rules, summaries, regular)
    return BatchMasks(
        regular,
        summaries,
        summarize,
        update,
        rotation(regular.pos, config.head_dim, config.rope_base),
        rotation(summaries.pos, config.head_dim, config.rope_base),
        order,
        restore,
    )


# --------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * norm).type_as(x) * self.weight


@dataclass
class Rotation:
    """cos and sin (B, 1, L, D/2) of a stream's rotary angles: computed once per batch (or
    decoding step) for all layers, not by each layer for its queries and keys."""

    cos: torch.Tensor
    sin: torch.Tensor


def rotation(pos: torch.Tensor, head_dim: int, base: float) -> Rotation:
    """The angles of positions ``pos`` (B, L): channel pair i turns at base^(-i / half)."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    angles = pos.float()[:, None, :, None] * inv_freq
    return Rotation(angles.cos(), angles.sin())


def apply_rope(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """Rotate pairs of channels by angles proportional to position: a true rotation, so norms
    are preserved and q·k depends only on the position difference. x: (B, H, L, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * rot.cos - x2 * rot.sin, x1 * rot.sin + x2 * rot.cos], -1).type_as(x)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Summarize (SS + SR), second-stage summary keys/values, update (RS + RR), SwiGLU."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.config = config
        self.norm_attn = RMSNorm(c, config.norm_eps)
        self.norm_summary = RMSNorm(c, config.norm_eps)
        self.norm_ffn = RMSNorm(c, config.norm_eps)
        self.wq = nn.Linear(c, c, bias=False)
        self.wk = nn.Linear(c, kv, bias=False)
        self.wv = nn.Linear(c, kv, bias=False)
        self.wk2 = nn.Linear(c, kv, bias=False)
        self.wv2 = nn.Linear(c, kv, bias=False)
        self.wo = nn.Linear(c, c, bias=False)
        self.ffn = SwiGLU(c, config.ffn_hidden)
        self.dropout = nn.Dropout(config.dropout)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], n, self.config.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.config.n_embd)

    def qkv(self, x: torch.Tensor, rot: Rotation):
        cfg = self.config
        q = apply_rope(self._heads(self.wq(x), cfg.n_head), rot)
        k = apply_rope(self._heads(self.wk(x), cfg.n_kv_head), rot)
        return q, k, self._heads(self.wv(x), cfg.n_kv_head)

    def second_stage(self, h_s: torch.Tensor, rot: Rotation):
        cfg = self.config
        x = self.norm_summary(h_s)
        k2 = apply_rope(self._heads(self.wk2(x), cfg.n_kv_head), rot)
        return k2, self._heads(self.wv2(x), cfg.n_kv_head)

    def forward(self, h_s, h_r, masks: BatchMasks):
        q_s, k_s, v_s = self.qkv(self.norm_attn(h_s), masks.summary_rotation)
        q_r, k_r, v_r = self.qkv(self.norm_attn(h_r), masks.regular_rotation)
        out_s = masks.summarize.attend(q_s, (k_s, k_r), (v_s, v_r))
        h_s = h_s + self.dropout(self.wo(self._merge(out_s)))
        k2, v2 = self.second_stage(h_s, masks.summary_rotation)
        out_r = masks.update.attend(q_r, (k2, k_r), (v2, v_r))
        h_r = h_r + self.dropout(self.wo(self._merge(out_r)))
        h_s = h_s + self.dropout(self.ffn(self.norm_ffn(h_s)))
        h_r = h_r + self.dropout(self.ffn(self.norm_ffn(h_r)))
        return h_s, h_r


# --------------------------------------------------------------------------------- model
class MeloFormer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.summary_embed = nn.Parameter(torch.zeros(config.n_embd))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.apply(self._init)
        for block in self.blocks:  # scaled residual projections (GPT-2)
            for proj in (block.wo, block.ffn.w2):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compile_blocks(self) -> MeloFormer:
        """torch.compile each block in place (weights and state-dict keys unchanged): the
        elementwise work around the matmuls (norms, RoPE, SwiGLU, casts) fuses, which made the
        large model's GPU step 1.6x faster (benchmarks/results). The blocks share one code
        object, so each batch shape compiles once for all of them. Flex backend only: the dense
        backend's per-document loop has a new shape in every batch."""
        if self.config.backend != "flex":
            raise ValueError(
                f"compiled blocks need the flex backend (a CUDA device), not "
                f"'{self.config.backend}': its per-document loop would recompile for every batch"
            )
        for block in self.blocks:
            block.compile(dynamic=False)
        return self

    def forward(self, ids: torch.Tensor, masks: BatchMasks) -> torch.Tensor:
        """Logits (B, T, V) for the regular tokens, in reading order."""
        if masks.order is not None:
            ids = ids.gather(1, masks.order)
        h_r = self.embed(ids)
        batch, n_summary = masks.summary.doc.shape
        h_s = self.summary_embed.expand(batch, n_summary, -1).to(h_r.dtype)
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training:
                h_s, h_r = checkpoint(block, h_s, h_r, masks, use_reentrant=False)
            else:
                h_s, h_r = block(h_s, h_r, masks)
        if masks.restore is not None:
            h_r = h_r.gather(1, masks.restore.unsqueeze(-1).expand_as(h_r))
        return F.linear(self.norm(h_r), self.embed.weight)

    def loss(self, ids, targets, masks, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy per target token (not per batch)."""
        logits = self(ids, masks)
        return F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index
        )


# --------------------------------------------------------------------------------- decoding
class _Growing:
    """A tensor that grows along one dimension, for caches whose length is known only roughly:
    it starts at ``capacity`` (the expected length) and doubles past it."""

    def __init__(self, dim: int, capacity: int = 256):
        self.dim, self.capacity = dim, capacity
        self.data: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[self.dim]
        if self.data is None:
            shape = list(x.shape)
            shape[self.dim] = max(self.capacity, n)
            self.data = x.new_empty(shape)
        if self.length + n > self.data.shape[self.dim]:
            self.data = torch.cat([self.data, torch.empty_like(self.data)], self.dim)
        self.data.narrow(self.dim, self.length, n).copy_(x)
        self.length += n
        return self.view()

    def view(self) -> torch.Tensor:
        return self.data.narrow(self.dim, 0, self.length)


def _decode_attend(q: torch.Tensor, keys: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """One query position against key sets ``(k, v, mask)`` sharing one softmax (a summary
    reads two caches; a regular token one, the hot path, without the concatenation). Plain math
    beats SDPA's overhead at this size."""
    batch, heads, _, dim = q.shape
    kv_heads = keys[0][0].shape[1]
    q = q.view(batch, kv_heads, heads // kv_heads, dim)
    scores = [
        torch.einsum("bhgd,bhkd->bhgk", q, k).masked_fill(
            ~mask.view(batch, 1, 1, -1), float("-inf")
        )
        for k, _, mask in keys
    ]
    probs = torch.softmax(
        (scores[0] if len(keys) == 1 else torch.cat(scores, -1)) / math.sqrt(dim), -1
    )
    parts = probs.split([k.shape[2] for k, _, _ in keys], dim=-1)
    out = torch.einsum("bhgk,bhkd->bhgd", parts[0], keys[0][1])
    for p, (_, v, _) in zip(parts[1:], keys[1:]):
        out = out + torch.einsum("bhgk,bhkd->bhgd", p, v)
    return out.reshape(batch, heads, 1, dim)


class IncrementalDecoder:
    """KV-cache decoding of ``batch`` sequences side by side: the same logits as a full forward
    pass of each (decoding is bound by reading the weights, which a batch reads once per step).

    Per layer, one cache holds the keys regular tokens read, in arrival order: the regular
    tokens' keys and the summaries' second-stage keys (attention does not care about key order
    as long as the mask follows it). Summaries read the regular keys from it (their own
    second-stage keys masked out) and the summaries' first-stage keys from a small cache of a
    key per bar, so no key is stored twice. When the first token of bar b arrives, the summary
    of bar b - 1 is computed through all layers and appended; a sequence with no bar to
    summarize in that step gets a placeholder key (document -1) that none of its tokens can
    see, so the caches stay one length across the batch. ``capacity``: the tokens expected per
    sequence, so the caches are allocated once (they double past it).
    """

    def __init__(self, model: MeloFormer, batch: int = 1, capacity: int = 256):
        self.model = model
        n = model.config.n_layer
        bars = max(16, capacity // 16)  # summaries: one per bar, bars of tens of tokens

        def caches(length: int) -> list[_Growing]:
            return [_Growing(2, length) for _ in range(n)]

        self.k, self.v = caches(capacity + bars), caches(capacity + bars)
        self.summary_k, self.summary_v = caches(bars), caches(bars)  # first stage
        self.attrs, self.summary_attrs = _Growing(2, capacity + bars), _Growing(2, bars)
        self.last_bar = [-1] * batch
        self.pos = [0] * batch

    def _rows(self, rows: list[tuple[int, ...]]) -> torch.Tensor:
        return torch.tensor(rows, device=self.model.embed.weight.device).unsqueeze(2)

    def _mask(self, query: Stream, keys: torch.Tensor) -> torch.Tensor:
        """The query's mask row (B, 1, L) over the keys' side information (B, 7, L)."""
        return visible(self.model.config.rules, query.expand(2), _stream(keys).expand(1))

    def _rotation(self, query: Stream) -> Rotation:
        config = self.model.config
        return rotation(query.pos, config.head_dim, config.rope_base)

    def _summarize(self, bars: list[int | None]) -> None:
        """Summaries of ``bars`` (one per sequence; None: a placeholder) through all layers."""
        model = self.model
        new = self._rows([
            (0, bar, GLOBAL_INSTRUMENT, 0, -1, pos - 1, 1)
            if bar is not None
            else (-1, -1, GLOBAL_INSTRUMENT, 0, -1, -1, 1)
            for bar, pos in zip(bars, self.pos)
        ])  # fmt: skip
        query = _stream(new)
        shared = self.attrs.view()  # a summary follows its bar's tokens: never empty here
        to_regular = self._mask(query, shared) & ~_stream(shared).summary[:, None]
        to_summaries = self._mask(query, self.summary_attrs.append(new))
        rot = self._rotation(query)
        h = model.summary_embed.expand(len(bars), 1, -1)
        for i, block in enumerate(model.blocks):
            q, k, v = block.qkv(block.norm_attn(h), rot)
            keys = [
                (self.summary_k[i].append(k), self.summary_v[i].append(v), to_summaries),
                (self.k[i].view(), self.v[i].view(), to_regular),
            ]
            h = h + block.wo(block._merge(_decode_attend(q, keys)))
            k2, v2 = block.second_stage(h, rot)
            self.k[i].append(k2)
            self.v[i].append(v2)
            h = h + block.ffn(block.norm_ffn(h))
        self.attrs.append(new)

    def _summaries_due(self, bars: list[int]) -> None:
        """Summarize the bar each sequence's new token leaves (bar ids count up by one, as
        the tokenizer numbers them)."""
        due = []
        for b, bar in enumerate(bars):
            if bar > self.last_bar[b] + 1 and self.last_bar[b] >= 0:
                raise ValueError(
                    f"sequence {b}: bar {bar} after bar {self.last_bar[b]}: bar ids count up by "
                    "one (an empty bar is a bar of its own)"
                )
            due.append(self.last_bar[b] if bar > self.last_bar[b] >= 0 else None)
            self.last_bar[b] = max(self.last_bar[b], bar)
        if any(bar is not None for bar in due):
            self._summarize(due)

    @torch.no_grad()
    def step(self, tokens, bars, instruments, token_types, onset_groups) -> torch.Tensor:
        """Feed one token per sequence with its side information (each argument: B ints);
        return the next-token logits (B, V)."""
        model = self.model
        bars = [int(bar) for bar in bars]
        self._summaries_due(bars)
        rows = zip(bars, instruments, token_types, onset_groups, self.pos)
        new = self._rows([(0, *row, 0) for row in rows])  # document 0, not a summary
        query = _stream(new)
        mask = self._mask(query, self.attrs.append(new))
        self.pos = [pos + 1 for pos in self.pos]
        ids = torch.tensor(list(tokens), device=model.embed.weight.device).view(-1, 1)
        rot = self._rotation(query)
        h = model.embed(ids)
        for i, block in enumerate(model.blocks):
            q, k, v = block.qkv(block.norm_attn(h), rot)
            keys = [(self.k[i].append(k), self.v[i].append(v), mask)]
            h = h + block.wo(block._merge(_decode_attend(q, keys)))
            h = h + block.ffn(block.norm_ffn(h))
        return F.linear(model.norm(h), model.embed.weight)[:, 0]


def _stream(t: torch.Tensor) -> Stream:
    """Side information rows (B, 7, L) as a stream."""
    return Stream(t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 4], t[:, 5], t[:, 6].bool())
