"""MeloFormer: causality, document isolation, per-sample masks, mask/backend agreement, RoPE,
KV-cache decoding, parameter counts. Real token sequences from the sample corpus."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meloformer_model.model import (
    MODEL_SIZES,
    MUSEFORMER_RULES,
    UPSTREAM_RULES,
    AttentionRules,
    IncrementalDecoder,
    MeloFormer,
    ModelConfig,
    Rotation,
    apply_rope,
    batch_summary_width,
    build_masks,
    dense_mask,
    expected_parameters,
    model_config,
    regular_stream,
    rotation,
    summary_stream,
    summary_width,
    table_block_mask,
    tile_order,
    visibility_table,
)
from meloformer_model.tokenizer.config import GLOBAL_INSTRUMENT
from meloformer_model.tokenizer.hid import HIDTokenizer

TOK = HIDTokenizer()
V = len(TOK.vocab)


def tensors(seq, length=None):
    cut = slice(0, length)
    return [torch.tensor(np.asarray(a)[cut], dtype=torch.long)[None] for a in
            (seq.ids, seq.bar, seq.instrument, seq.token_type, seq.onset_group)]  # fmt: skip


def forward(model, ids, bar, inst, ttype, group, doc=None):
    masks = build_masks(model.config, regular_stream(bar, inst, ttype, group, doc))
    with torch.no_grad():
        return model(ids, masks)


@pytest.fixture(scope="module")
def pieces(sample_files):
    return [TOK.encode(p) for p in sample_files[:40:8]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MeloFormer(model_config("tiny", V)).eval()


@pytest.fixture(scope="module", params=["upstream", "museformer"])
def rules_model(request):
    """The tiny model under each rule preset."""
    torch.manual_seed(0)
    rules = MUSEFORMER_RULES if request.param == "museformer" else AttentionRules()
    return MeloFormer(model_config("tiny", V, rules=rules)).eval()


def test_causality_on_real_sequences(rules_model, pieces):
    model = rules_model
    rng = np.random.default_rng(0)
    for seq in pieces[:3]:
        length = min(len(seq), 400)
        ids, *side = tensors(seq, length)
        base = forward(model, ids, *side)[0]
        for t in rng.integers(5, length - 5, size=3):
            changed = seq.ids[:length].copy()
            changed[t:] = rng.integers(0, V, size=length - t)
            side2 = tensors(TOK.side_information(changed))
            after = forward(model, *side2)[0]
            torch.testing.assert_close(after[:t], base[:t], rtol=0, atol=1e-5)
            assert (after[t:] - base[t:]).abs().max() > 1e-3  # the change is visible later


def _pack(a, b):
    return [torch.cat([x, y], dim=1) for x, y in zip(a, b)]


def test_packed_documents_are_isolated(model, pieces):
    first, second = tensors(pieces[0], 300), tensors(pieces[1], 250)
    ids, bar, inst, ttype, group = _pack(first, second)
    doc = torch.cat([torch.zeros(1, 300), torch.ones(1, 250)], dim=1).long()
    packed = forward(model, ids, bar, inst, ttype, group, doc)[0]
    alone_first = forward(model, *first)[0]
    alone_second = forward(model, *second)[0]
    torch.testing.assert_close(packed[:300], alone_first, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[300:], alone_second, rtol=0, atol=1e-5)
    other = tensors(pieces[2], 250)
    ids2, bar2, inst2, ttype2, group2 = _pack(first, other)
    changed = forward(model, ids2, bar2, inst2, ttype2, group2, doc)[0]
    torch.testing.assert_close(changed[:300], packed[:300], rtol=0, atol=1e-5)


def test_each_sample_gets_its_own_mask(model, pieces):
    a, b = tensors(pieces[0], 320), tensors(pieces[3], 200)
    padded = []
    for x, y in zip(a, b):
        y = F.pad(y, (0, 120), value=0)
        padded.append(torch.cat([x, y], dim=0))
    doc = torch.zeros(2, 320, dtype=torch.long)
    doc[1, 200:] = -1
    both = forward(model, *padded, doc)
    torch.testing.assert_close(both[0], forward(model, *a)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1, :200], forward(model, *b)[0], rtol=0, atol=1e-5)


def reference_visible(rules, q, k):
    """The rules written out per pair, independently of the vectorised predicate."""
    if (q["summary"], q["pos"], q["doc"]) == (k["summary"], k["pos"], k["doc"]):
        return True  # itself
    if q["doc"] < 0 or q["doc"] != k["doc"]:
        return False
    offset = q["bar"] - k["bar"]
    fine = offset in rules.fine_bar_offsets
    if q["summary"] and k["summary"]:
        return rules.summary_sees_earlier_summaries and offset > 0
    if q["summary"]:
        return offset == 0 and k["instrument"] != GLOBAL_INSTRUMENT
    if k["summary"]:
        return offset > 0 and not (rules.summaries_beyond_fine_bars_only and fine)
    if k["pos"] > q["pos"]:
        return False
    if k["instrument"] == GLOBAL_INSTRUMENT and rules.global_keys_always_visible:
        return True
    if q["onset_group"] >= 0 and q["onset_group"] == k["onset_group"]:
        return True
    bars = fine or (rules.same_instrument_all_bars and q["instrument"] == k["instrument"])
    types = True
    if q["token_type"] > 0 and k["token_type"] > 0:
        allowed = dict(rules.type_rules)
        if q["token_type"] in allowed and k["token_type"] not in allowed[q["token_type"]]:
            types = False
        if rules.duration_sees_own_onset_group and q["token_type"] == 3:
            types = types and k["onset_group"] == q["onset_group"]
    return bars and types


def _rows(stream, b=0):
    names = ("doc", "bar", "instrument", "token_type", "onset_group", "pos", "summary")
    return [dict(zip(names, (int(t[b, i]) for t in stream.fields())))
            for i in range(stream.doc.shape[1])]  # fmt: skip


@pytest.mark.parametrize("rules_name", ["upstream", "museformer"])
def test_dense_mask_matches_the_rules_entry_by_entry(pieces, rules_name):
    rules = MUSEFORMER_RULES if rules_name == "museformer" else ModelConfig(V).rules
    # a long stretch so bar offsets beyond 4 and 32 occur
    ids, bar, inst, ttype, group = tensors(pieces[4], 700)
    regular = regular_stream(bar, inst, ttype, group)
    summaries = summary_stream(regular)
    keys = summaries.cat(regular)
    for queries in (regular, summaries):
        mask = dense_mask(rules, queries, keys)[0, 0]
        q_rows, k_rows = _rows(queries), _rows(keys)
        expected = torch.tensor([[reference_visible(rules, q, k) for k in k_rows] for q in q_rows])
        assert torch.equal(mask, expected)
        assert mask.any(dim=1).all()  # no empty row
    density = dense_mask(rules, regular, keys).float().mean().item()
    assert 0.01 < density < 0.5


def test_sdpa_matches_a_naive_per_token_attention(pieces):
    ids, bar, inst, ttype, group = tensors(pieces[1], 200)
    regular = regular_stream(bar, inst, ttype, group)
    keys = summary_stream(regular).cat(regular)
    mask = dense_mask(ModelConfig(V).rules, regular, keys)
    torch.manual_seed(1)
    q = torch.randn(1, 2, 200, 16)
    k, v = torch.randn(1, 2, keys.doc.shape[1], 16), torch.randn(1, 2, keys.doc.shape[1], 16)
    fast = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    naive = torch.zeros_like(q)
    for h in range(2):
        for i in range(200):
            cols = mask[0, 0, i].nonzero().flatten()
            weights = torch.softmax(q[0, h, i] @ k[0, h, cols].T / math.sqrt(16), dim=0)
            naive[0, h, i] = weights @ v[0, h, cols]
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-5)


def _packed_batch(pieces):
    """Row 0: three documents back to back; row 1: one document, then padding."""
    rows = [[tensors(pieces[0], 150), tensors(pieces[2], 120), tensors(pieces[3], 130)],
            [tensors(pieces[1], 260)]]  # fmt: skip
    side, docs = [], []
    for parts in rows:
        side.append([torch.cat([p[i] for p in parts], 1) for i in range(1, 5)])
        doc = torch.cat([torch.full((1, p[0].shape[1]), d) for d, p in enumerate(parts)], 1)
        docs.append(F.pad(doc, (0, 400 - doc.shape[1]), value=-1))
        side[-1] = [F.pad(t, (0, 400 - t.shape[1])) for t in side[-1]]
    return regular_stream(*(torch.cat(ts, 0) for ts in zip(*side)), torch.cat(docs, 0))


def test_per_document_attention_equals_whole_row_attention(pieces):
    """The dense backend attends document by document; that must equal SDPA over whole rows
    with the whole-row mask (padding included, grouped-query heads), gradients included."""
    regular = _packed_batch(pieces)
    masks = build_masks(ModelConfig(V), regular)
    keys = masks.summary.cat(regular)
    n_sum = masks.summary.doc.shape[1]
    torch.manual_seed(3)
    for queries, doc_masks in ((masks.summary, masks.summarize), (regular, masks.update)):
        whole = dense_mask(ModelConfig(V).rules, queries, keys)
        assert doc_masks.visible_entries() == int(whole.count_nonzero())
        q = torch.randn(2, 4, queries.doc.shape[1], 16, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, 2, keys.doc.shape[1], 16, dtype=torch.float64, requires_grad=True)
        v = torch.randn(2, 2, keys.doc.shape[1], 16, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(2, 4, queries.doc.shape[1], 16, dtype=torch.float64)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=whole, enable_gqa=True)
        split = ((k[:, :, :n_sum], k[:, :, n_sum:]), (v[:, :, :n_sum], v[:, :, n_sum:]))
        got = doc_masks.attend(q, *split)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        for ours, reference in zip(torch.autograd.grad(got, (q, k, v), grad),
                                   torch.autograd.grad(expected, (q, k, v), grad)):  # fmt: skip
            torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_a_document_split_in_two_runs_is_refused(pieces):
    ids, *side = tensors(pieces[0], 90)
    doc = torch.tensor([[0] * 30 + [1] * 30 + [0] * 30])
    with pytest.raises(ValueError, match="document 0 is split"):
        build_masks(ModelConfig(V), regular_stream(*side, doc))


def test_summary_widths_are_powers_of_two(pieces):
    """Each summary width is a compiled flex shape per phase, and dynamo keeps 8 per function:
    widths double, so a run sees a handful however its pieces' bar counts vary."""
    assert [summary_width(n) for n in (1, 64, 65, 128, 129, 700, 1024)] == [
        64, 64, 128, 128, 256, 1024, 1024
    ]  # fmt: skip
    parts = [tensors(piece) for piece in pieces]  # whole pieces packed into one row
    side = [torch.cat([p[i] for p in parts], 1) for i in range(1, 5)]
    doc = torch.cat([torch.full_like(p[0], d) for d, p in enumerate(parts)], 1)
    bars = sum(len(torch.unique(p[1])) for p in parts)
    assert bars > 64
    regular = regular_stream(*side, doc)
    summaries = summary_stream(regular)
    assert summaries.doc.shape[1] == summary_width(bars) == batch_summary_width(doc, side[0])
    assert int((summaries.doc >= 0).sum()) == bars
    given = summary_stream(regular, batch_summary_width(doc, side[0]))  # no read from a device
    assert all(torch.equal(a, b) for a, b in zip(given.fields(), summaries.fields()))


def test_summaries_are_one_per_document_bar_at_its_last_token():
    """Row 0: document 0 with bars 3 then 1 (out of order), document 1 with bar 2 twice;
    row 1: padding only. Summaries come in (document, bar) order, padding after them."""
    zeros = torch.zeros(2, 4, dtype=torch.long)
    bar = torch.tensor([[3, 1, 2, 2], [0, 0, 0, 0]])
    doc = torch.tensor([[0, 0, 1, 1], [-1, -1, -1, -1]])
    summaries = summary_stream(regular_stream(bar, zeros, zeros, zeros, doc))
    assert summaries.doc.shape == (2, 64)
    assert summaries.doc[0, :4].tolist() == [0, 0, 1, -1]
    assert summaries.bar[0, :4].tolist() == [1, 3, 2, -1]
    assert summaries.pos[0, :4].tolist() == [1, 0, 1, -4]  # positions restart per document
    assert (summaries.doc[1] == -1).all() and (summaries.bar[1] == -1).all()
    assert summaries.pos[1].tolist() == [-1 - i for i in range(64)]  # distinct padding slots


def test_rope_is_a_rotation_and_shift_invariant():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 50, 64)
    rotated = apply_rope(x, rotation(torch.arange(50)[None], 64, 1e4))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rotated[:, :, 1:], x[:, :, 1:])  # position 0 alone stays put
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)

    def score(p, r):
        at = rotation(torch.tensor([[p, r]]), 64, 1e4)
        first, second = (Rotation(at.cos[:, :, i : i + 1], at.sin[:, :, i : i + 1]) for i in (0, 1))
        return (apply_rope(q, first) * apply_rope(k, second)).sum()

    for p, r in ((7, 3), (40, 12)):
        for shift in (1, 100, 1000):
            torch.testing.assert_close(
                score(p + shift, r + shift), score(p, r), rtol=1e-4, atol=1e-4
            )


def test_kv_cache_decoding_equals_full_forward(rules_model, pieces):
    model = rules_model
    seq = pieces[2]
    length = 520
    ids, *side = tensors(seq, length)
    full = forward(model, ids, *side)[0]
    decoder = IncrementalDecoder(model)
    steps = [decoder.step(*([int(a[i])] for a in _fields(seq))) for i in range(length)]
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-4, atol=1e-4)
    assert int(seq.bar[length - 1]) >= 5  # several summaries were computed on the way


def _fields(seq):
    return seq.ids, seq.bar, seq.instrument, seq.token_type, seq.onset_group


def test_batched_kv_cache_decoding_equals_each_full_forward(model, pieces):
    """Two pieces decoded side by side: their bars end at different steps, so each step adds a
    summary to one sequence and a placeholder to the other; each still gets its own logits."""
    seqs, length = pieces[1:3], 360
    decoder = IncrementalDecoder(model, batch=2)
    steps = [
        decoder.step(*([int(a[i]) for a in column] for column in zip(*map(_fields, seqs))))
        for i in range(length)
    ]
    got = torch.stack(steps, 1)
    for b, seq in enumerate(seqs):
        full = forward(model, *tensors(seq, length))[0]
        torch.testing.assert_close(got[b], full, rtol=1e-4, atol=1e-4)
    bar_ends = [set(np.flatnonzero(np.diff(np.asarray(seq.bar[:length])))) for seq in seqs]
    assert bar_ends[0] != bar_ends[1]


def test_the_kv_cache_holds_each_key_once_allocated_once(model, pieces):
    """Regular tokens' keys are cached once for both phases (they were twice): one cache of
    regular and second-stage summary keys, and a first-stage key per finished bar; a decoder
    sized for the sequence never reallocates. Bar ids that skip a bar are refused (the full
    forward would see other summaries)."""
    seq, n = pieces[2], 300
    decoder = IncrementalDecoder(model, capacity=n)
    decoder.step(*([int(a[0])] for a in _fields(seq)))
    first = [decoder.k[layer].data.data_ptr() for layer in range(model.config.n_layer)]
    for i in range(1, n):
        decoder.step(*([int(a[i])] for a in _fields(seq)))
    bars = int(seq.bar[n - 1])
    assert bars >= 3
    for layer in range(model.config.n_layer):
        assert decoder.k[layer].view().shape[2] == n + bars
        assert decoder.summary_k[layer].view().shape[2] == bars
        assert decoder.k[layer].data.data_ptr() == first[layer]
    with pytest.raises(ValueError, match=f"bar {bars + 2} after bar {bars}: bar ids count up"):
        decoder.step([int(seq.ids[n])], [bars + 2], [0], [0], [-1])


def test_gradient_checkpointing_gives_the_same_gradients(pieces):
    ids, *side = tensors(pieces[0], 256)
    grads = []
    for flag in (False, True):
        torch.manual_seed(3)
        model = MeloFormer(model_config("tiny", V, gradient_checkpointing=flag)).train()
        masks = build_masks(model.config, regular_stream(*(s[:, :-1] for s in side)))
        loss = model.loss(ids[:, :-1], ids[:, 1:], masks)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_parameter_counts_per_size():
    for size in MODEL_SIZES:
        config = model_config(size, V)
        with torch.device("meta"):
            count = MeloFormer(config).num_parameters()
        print(f"{size:7s} {count / 1e6:8.2f} M parameters")
        assert count == expected_parameters(config)
    # small: 6 x (q, o, k, v, k2, v2 + SwiGLU + 3 norms) + embedding + 2 norms
    assert (
        expected_parameters(model_config("small", V))
        == 6 * (6 * 256**2 + 3 * 256 * 1408 + 3 * 256) + V * 256 + 2 * 256
    )
    gqa = model_config("base", V, n_kv_head=2)
    assert expected_parameters(gqa) < expected_parameters(model_config("base", V))
    assert ModelConfig.from_dict(gqa.to_dict()) == gqa
    as_json = json.loads(json.dumps(replace(gqa, rules=MUSEFORMER_RULES).to_dict()))
    assert ModelConfig.from_dict(as_json).rules == MUSEFORMER_RULES


def test_head_settings_that_cannot_run_are_refused():
    """An odd head dim made RoPE broadcast into a non-rotation; 0 KV heads divided by zero;
    rules built with lists (as JSON gives them) failed to hash where they are cached."""
    for settings, message in (
        ({"n_embd": 6, "n_head": 2, "n_kv_head": 2}, "head dim 3 .* must be even"),
        ({"n_kv_head": 0}, "must be >= 1"),
        ({"n_kv_head": -2}, "must be >= 1"),
        ({"n_head": 4, "n_kv_head": 3}, "n_head into n_kv_head groups"),
    ):
        with pytest.raises(ValueError, match=message):
            ModelConfig(V, **settings)
    listed = AttentionRules(fine_bar_offsets=[0, 1], type_rules=[(1, [1, 2])])
    assert hash(listed) == hash(AttentionRules(fine_bar_offsets=(0, 1), type_rules=((1, (1, 2)),)))


def test_grouped_query_attention_runs_and_is_causal(pieces):
    torch.manual_seed(4)
    model = MeloFormer(model_config("tiny", V, n_head=4, n_kv_head=2)).eval()
    ids, *side = tensors(pieces[0], 200)
    base = forward(model, ids, *side)[0]
    changed = ids.clone()
    changed[0, 150:] = 7
    after = forward(model, changed, *tensors(TOK.side_information(changed[0].numpy()))[1:])[0]
    torch.testing.assert_close(after[:150], base[:150], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_flex_compiles_once_per_shape(pieces):
    """Another batch of the same shapes reuses every compiled kernel (the upstream recompiled
    its masks for every batch): a new mask table is data, not a new graph."""
    from torch._dynamo.utils import counters

    model = MeloFormer(model_config("tiny", V, backend="flex")).eval()
    first, second = (tensors(piece, 384) for piece in pieces[2:4])
    forward(model, *first)
    compiled = dict(counters["stats"])
    forward(model, *second)
    assert counters["stats"]["unique_graphs"] == compiled["unique_graphs"] > 0


def _packed_bits(table: torch.Tensor) -> torch.Tensor:
    """A bool (B, N, K) table packed by hand as ``visibility_table`` packs it: bit j of byte c
    is key 8c + j, spare bits clear."""
    padded = F.pad(table, (0, -table.shape[2] % 8)).to(torch.uint8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (padded.view(*table.shape[:2], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def test_block_masks_are_create_block_masks(pieces):
    """The visibility table holds the predicate bit by bit (a token count that is not a
    multiple of 8 included), and block masks counted from it equal create_block_mask's over the
    predicate, every index tensor: on a packed batch with padding (no length a multiple of the
    tile) and on tables with full, partial and empty tiles."""
    from torch.nn.attention.flex_attention import create_block_mask

    packed = _packed_batch(pieces).part(slice(0, 397))
    summaries = summary_stream(packed)
    tokens = summaries.cat(packed)
    predicate = dense_mask(UPSTREAM_RULES, tokens, tokens)[:, 0]
    assert predicate.shape[2] % 8 != 0
    table = visibility_table(UPSTREAM_RULES, summaries, packed)
    assert torch.equal(table, _packed_bits(predicate))
    generator = torch.Generator().manual_seed(7)
    synthetic = torch.rand(2, 300, 300, generator=generator) < 0.3
    synthetic[0, 128:256, :128] = True  # full
    synthetic[0, :128, 128:256] = True
    synthetic[0, 5, 130] = False  # all but one entry: partial
    synthetic[1, :128, 128:256] = False  # empty
    width = summaries.doc.shape[1]
    cases = [(predicate, 0, width), (predicate, width, packed.doc.shape[1]),
             (synthetic, 0, 300), (synthetic, 44, 256)]  # fmt: skip
    fields = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")  # fmt: skip
    for grid, first, n in cases:
        ours = table_block_mask(_packed_bits(grid), first, n, grid.shape[2])

        def mask_mod(b, h, q_idx, kv_idx, grid=grid, first=first):
            return grid[b, first + q_idx, kv_idx]

        reference = create_block_mask(mask_mod, grid.shape[0], None, n, grid.shape[2], "cpu")
        assert ours.seq_lengths == reference.seq_lengths == (n, grid.shape[2])
        for name in fields:
            assert torch.equal(getattr(ours, name), getattr(reference, name)), name
        q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(grid.shape[2])[None]
        for b in range(grid.shape[0]):
            entries = ours.mask_mod(torch.tensor(b), torch.tensor(0), q_idx, kv_idx)
            assert torch.equal(entries, grid[b, first : first + n])
    full = table_block_mask(_packed_bits(synthetic), 0, 300, 300).full_kv_num_blocks
    assert int(full[0, 0, 1]) == 1


def _update_tiles(regular) -> int:
    summaries = summary_stream(regular)
    table = visibility_table(UPSTREAM_RULES, summaries, regular)
    n_summaries, n_regular = summaries.doc.shape[1], regular.doc.shape[1]
    mask = table_block_mask(table, n_summaries, n_regular, n_summaries + n_regular)
    return int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())


def test_tile_order_groups_classes_within_documents(pieces):
    """Under the upstream rules the flex layout sorts each row by document (padding last), then
    token class (position and pitch read the same key types: one class), keeping reading order
    inside a class; MuseFormer's rules, which read whole bars, keep reading order."""
    packed = _packed_batch(pieces)
    order = tile_order(UPSTREAM_RULES, packed)
    assert tile_order(MUSEFORMER_RULES, packed) is None
    assert torch.equal(order.sort(1).values, torch.arange(400).expand(2, 400))
    laid = packed.at(torch.arange(2)[:, None], order)
    doc = torch.where(laid.doc >= 0, laid.doc, 400)
    kind = torch.tensor([0, 1, 1, 2, 3])[laid.token_type]
    same_doc = doc[:, 1:] == doc[:, :-1]
    assert (doc[:, 1:] >= doc[:, :-1]).all()
    assert (kind[:, 1:] >= kind[:, :-1])[same_doc].all()
    assert (laid.pos[:, 1:] > laid.pos[:, :-1])[same_doc & (kind[:, 1:] == kind[:, :-1])].all()


def test_tile_order_visits_fewer_tiles_on_a_long_piece(prepared):
    """The sample corpus's longest piece, 8192 tokens: in reading order its update phase visits
    every causal tile; laid out by class, under 70 % of them (60 % measured)."""
    import datasets

    split = datasets.load_from_disk(str(prepared.dataset.path))["train"]
    longest = split[int(np.argmax(split["length"]))]
    assert longest["length"] >= 8192
    side = [torch.tensor(longest[name][:8192])[None] for name in
            ("bar", "instrument", "token_type", "onset_group")]  # fmt: skip
    regular = regular_stream(*side)
    laid = regular.at(torch.zeros(1, 1, dtype=torch.long), tile_order(UPSTREAM_RULES, regular))
    natural = _update_tiles(regular)
    summary_tiles = math.ceil(summary_stream(regular).doc.shape[1] / 128)
    assert natural == 64 * 65 // 2 + 64 * summary_tiles  # causal tiles + the summary keys' tiles
    assert _update_tiles(laid) < 0.7 * natural


def test_flex_backend_agrees_with_dense(pieces):
    """Flex's mask_mod vs the dense mask entry by entry, block mask vs dense mask block by
    block (both over the flex layout's token order), then compiled flex forward vs dense
    forward, whose logits come back in reading order."""
    torch.manual_seed(5)
    model = MeloFormer(model_config("tiny", V)).eval()
    ids, *side = tensors(pieces[1], 384)
    regular = regular_stream(*side)
    dense = build_masks(model.config, regular)
    flex_model = MeloFormer(model_config("tiny", V, backend="flex")).eval()
    flex_model.load_state_dict(model.state_dict())
    flex = build_masks(flex_model.config, regular)
    assert flex.order is not None and not torch.equal(flex.order[0], torch.arange(384))
    keys = flex.summary.cat(flex.regular)
    for queries, phase in ((flex.summary, flex.summarize), (flex.regular, flex.update)):
        block_mask = phase.block_mask
        dense_mask_ = dense_mask(model.config.rules, queries, keys)
        q_idx, kv_idx = torch.arange(queries.doc.shape[1])[:, None], torch.arange(keys.doc.shape[1])
        entries = block_mask.mask_mod(torch.tensor(0), torch.tensor(0), q_idx, kv_idx[None])
        assert torch.equal(entries, dense_mask_[0, 0])
        q_blocks, k_blocks = block_mask.to_dense().shape[-2:]
        size = block_mask.BLOCK_SIZE
        pad_k = k_blocks * size[1] - dense_mask_.shape[-1]
        pad_q = q_blocks * size[0] - dense_mask_.shape[-2]
        padded = F.pad(dense_mask_[0, 0], (0, pad_k, 0, pad_q))
        any_visible = padded.view(q_blocks, size[0], k_blocks, size[1]).any(3).any(1)
        assert torch.equal(block_mask.to_dense()[0, 0].bool(), any_visible)
    with torch.no_grad():
        expected = model(ids, dense)
        got = flex_model(ids, flex)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    packed = _packed_batch(pieces)  # two rows: three documents; one document and padding
    ids = torch.randint(0, V, packed.doc.shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(ids, build_masks(model.config, packed))
        got = flex_model(ids, build_masks(flex_model.config, packed))
    real = packed.doc >= 0
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_blocks_equal_eager_and_compile_once_on_cpu(prepared):
    """What the GPU profiles run, forward on the CPU (flex has no CPU backward): compiled blocks
    give the eager logits on real packed batches, and a second and third batch of the same
    shapes compile nothing new (the masks, layout and rotary tables are data)."""
    import datasets
    from torch._dynamo.utils import counters

    from meloformer_model.training.data import PackedLoader

    split = datasets.load_from_disk(str(prepared.dataset.path))["train"]
    loader = PackedLoader(split, batch_size=2, seq_len=512, seed=0)
    config = model_config("tiny", len(prepared.vocab), backend="flex")
    torch.manual_seed(0)
    eager = MeloFormer(config).eval()
    compiled = MeloFormer(config).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    graphs = []
    for rows in loader.plan(0)[:3]:
        batch = loader.make(rows)
        assert batch.summary_width == 64  # one shape for all three
        masks = build_masks(config, regular_stream(*batch.side), batch.summary_width)
        with torch.no_grad():
            torch.testing.assert_close(compiled(batch.ids, masks), eager(batch.ids, masks),
                                       rtol=1e-4, atol=1e-4)  # fmt: skip
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0]
