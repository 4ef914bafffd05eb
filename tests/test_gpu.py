"""The GPU path: compiled FlexAttention (forward and backward) against the dense backend, bf16
training with gradient checkpointing, KV-cache decoding on the device. Real sample-corpus
pieces. Skipped where no CUDA device is present (CI); run them wherever one is."""

import numpy as np
import pytest
import torch

from meloformer_model.model import (
    IncrementalDecoder,
    MeloFormer,
    build_masks,
    model_config,
    regular_stream,
)
from meloformer_model.tokenizer.hid import HIDTokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"
TOK = HIDTokenizer()
V = len(TOK.vocab)
FIELDS = ("ids", "bar", "instrument", "token_type", "onset_group")


@pytest.fixture(scope="module")
def packed(sample_files):
    """Two rows of 1024 tokens: sample pieces back to back (doc ids), the last row padded."""
    rows, current, doc = [], {name: [] for name in (*FIELDS, "doc")}, 0
    for path in sample_files[::17]:
        seq = TOK.encode(path)
        take = min(len(seq), 1024 - len(current["ids"]), 700)
        for name in FIELDS:
            current[name].extend(np.asarray(getattr(seq, name))[:take].tolist())
        current["doc"].extend([doc] * take)
        doc += 1
        if len(current["ids"]) >= 1024 or (rows and len(current["ids"]) >= 800):
            rows.append(current)
            current, doc = {name: [] for name in (*FIELDS, "doc")}, 0
        if len(rows) == 2:
            break
    for row in rows:
        pad = 1024 - len(row["ids"])
        for name in FIELDS:
            row[name].extend([0] * pad)
        row["doc"].extend([-1] * pad)
    return {name: torch.tensor([r[name] for r in rows], device=DEVICE) for name in rows[0]}


def _side(batch):
    return [batch[name] for name in (*FIELDS[1:], "doc")]


def _loss(model, batch):
    masks = build_masks(model.config, regular_stream(*_side(batch)))
    logits = model(batch["ids"], masks)
    targets = torch.where(batch["doc"][:, 1:] >= 0, batch["ids"][:, 1:], -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100
    ), logits


def test_flex_matches_dense_forward_and_backward(packed):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    dense = MeloFormer(model_config("tiny", V)).to(DEVICE)
    flex = MeloFormer(model_config("tiny", V, backend="flex")).to(DEVICE)
    flex.load_state_dict(dense.state_dict())
    loss_d, logits_d = _loss(dense, packed)
    loss_f, logits_f = _loss(flex, packed)
    real = packed["doc"] >= 0
    torch.testing.assert_close(logits_f[real], logits_d[real], rtol=1e-4, atol=1e-4)
    loss_d.backward()
    loss_f.backward()
    for (name, p_d), p_f in zip(dense.named_parameters(), flex.parameters()):
        torch.testing.assert_close(p_f.grad, p_d.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_blocks_give_the_eager_loss_and_gradients(packed):
    """The GPU profiles train with compiled blocks: it must be the same training step."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(3)
    config = model_config("tiny", V, backend="flex", gradient_checkpointing=True)
    eager = MeloFormer(config).to(DEVICE).train()
    compiled = MeloFormer(config).to(DEVICE).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    loss_e, _ = _loss(eager, packed)
    loss_c, _ = _loss(compiled, packed)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    loss_e.backward()
    loss_c.backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_flex_training_with_checkpointing_learns(packed):
    torch.manual_seed(1)
    config = model_config("tiny", V, backend="flex", gradient_checkpointing=True)
    model = MeloFormer(config).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = _loss(model, packed)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward_on_gpu(packed):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(2)
    model = MeloFormer(model_config("tiny", V, backend="flex")).to(DEVICE).eval()
    n = int((packed["doc"][0] == 0).sum())
    one = {name: t[:1, :n] for name, t in packed.items()}
    _, full = _loss(model, one)
    decoder = IncrementalDecoder(model)
    for i in range(n):
        step = decoder.step(*([int(one[name][0, i])] for name in FIELDS))
        torch.testing.assert_close(step[0], full[0, i], rtol=1e-4, atol=1e-4)


def test_generation_runs_on_the_gpu_and_decodes(tmp_path):
    """The model on the GPU, sampling on the CPU with the pieces' seeds: two pieces side by
    side finish within their bars, and each decodes to a MIDI file the tokenizer reads back."""
    from meloformer_model.generation import SamplingConfig, generate_batch, prompt_from_scratch

    torch.manual_seed(4)
    model = MeloFormer(model_config("tiny", V, backend="flex")).to(DEVICE).eval()
    prompt = prompt_from_scratch(TOK)
    pieces = generate_batch(model, TOK, [prompt, prompt], SamplingConfig(bars=2, max_tokens=300))
    assert pieces[0].tolist() != pieces[1].tolist()  # seeds 0 and 1
    for i, ids in enumerate(pieces):
        assert ids[: len(prompt)].tolist() == prompt and ids[-1] == TOK.vocab["EOS"]
        assert int(TOK.side_information(ids).bar.max()) + 1 <= 3
        path = tmp_path / f"piece{i}.mid"
        TOK.decode_score(ids).dump_midi(str(path))
        assert len(TOK.encode(path)) > 5
