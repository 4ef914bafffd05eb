"""Vocabulary: families, ids, JSON storage with a config hash that is checked on load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meloformer_model.tokenizer.chords import CHORD_NAMES
from meloformer_model.tokenizer.config import TokenizerConfig
from meloformer_model.tokenizer.vocab import FAMILIES, Vocabulary, VocabularyMismatchError


def test_families_are_contiguous_and_sized_from_the_config():
    vocab = Vocabulary(TokenizerConfig())
    spans = [vocab.family_ranges[f] for f in FAMILIES]
    assert spans[0][0] == 0 and spans[-1][1] == len(vocab)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    sizes = {f: e - s for f, (s, e) in vocab.family_ranges.items()}
    assert sizes == {
        "special": 5,
        "bar": 1,
        "time_signature": 19,
        "tempo": 32,
        "chord": 217,
        "position": 96,
        "instrument": 129,
        "pitch": 128,
        "drum": 128,
        "duration": 72,
        "velocity": 32,
    }
    assert len(CHORD_NAMES) == 217
    assert vocab.tokens[vocab["#D"]] == "#D" and vocab["PAD"] == 0
    assert vocab.family_of(
        np.array([0, vocab["Bar"], vocab["Pitch_60"], len(vocab) - 1])
    ).tolist() == [0, 1, FAMILIES.index("pitch"), FAMILIES.index("velocity")]


def test_vocab_changes_with_the_config():
    small = Vocabulary(
        TokenizerConfig(
            positions_per_quarter=4,
            time_signatures=((4, 4), (3, 4)),
            duration_tiers=((4, 1), (8, 2)),
        )
    )
    assert small.family_ranges["duration"][1] - small.family_ranges["duration"][0] == 16 + 8
    assert small.family_ranges["position"][1] - small.family_ranges["position"][0] == 16
    assert small.config_hash() != Vocabulary(TokenizerConfig()).config_hash()


def test_save_load_round_trip_with_counts(tmp_path):
    vocab = Vocabulary(TokenizerConfig())
    vocab.add_counts(np.array([1, 1, 2, vocab["Pitch_60"]]))
    path = vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(path, expected=TokenizerConfig())
    assert loaded.tokens == vocab.tokens
    assert (
        loaded.counts[1] == 2 and loaded.counts[vocab["Pitch_60"]] == 1 and loaded.counts.sum() == 4
    )
    assert json.loads(path.read_text())["config_hash"] == TokenizerConfig().config_hash()


def test_load_rejects_other_configs_and_edited_files(tmp_path):
    path = Vocabulary(TokenizerConfig()).save(tmp_path / "vocab.json")
    with pytest.raises(VocabularyMismatchError, match="built for config"):
        Vocabulary.load(path, expected=TokenizerConfig(velocity_bins=16))
    data = json.loads(path.read_text())
    data["config"]["velocity_bins"] = 16
    path.write_text(json.dumps(data))
    with pytest.raises(VocabularyMismatchError, match="does not match its config"):
        Vocabulary.load(path)
    path.write_text("not json")
    with pytest.raises(VocabularyMismatchError, match="not a valid vocabulary"):
        Vocabulary.load(path)


@pytest.mark.parametrize("counts", [None, "few", "many", "negative", "fractional"])
def test_load_refuses_counts_that_are_not_one_whole_number_per_token(tmp_path, counts):
    """The unigram baseline comes from the counts: short, negative or fractional counts gave a
    baseline of 0.37 or -0.0 nats, null a TypeError."""
    vocab = Vocabulary(TokenizerConfig())
    data = json.loads(vocab.save(tmp_path / "vocab.json").read_text())
    size = len(vocab.tokens)
    data["counts"] = {"few": [1] * 10, "many": [1] * (size + 1), "negative": [-1] * size,
                      "fractional": [0.5] * size}.get(counts)  # fmt: skip
    (tmp_path / "vocab.json").write_text(json.dumps(data))
    with pytest.raises(VocabularyMismatchError, match=f"counts must be {size} whole numbers"):
        Vocabulary.load(tmp_path / "vocab.json")
