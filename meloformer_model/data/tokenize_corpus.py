"""Tokenizing a filtered corpus into one Arrow-friendly table, and the vocabulary with counts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa

from meloformer_model.data.parallel import map_with_progress
from meloformer_model.tokenizer.config import TokenizerConfig
from meloformer_model.tokenizer.hid import HIDTokenizer
from meloformer_model.tokenizer.vocab import Vocabulary

SIDE_COLUMNS = ("bar", "instrument", "token_type", "onset_group")


@dataclass
class TokenizedFile:
    path: str
    arrays: dict[str, np.ndarray] | None
    error: str | None


def _tokenize_one(path: str, config: TokenizerConfig) -> TokenizedFile:
    try:
        seq = HIDTokenizer(config).encode(path)
    except Exception as exc:  # one bad file must not stop the corpus
        return TokenizedFile(path, None, f"{path}: {type(exc).__name__}: {exc}")
    return TokenizedFile(path, seq.arrays(), None)


def tokenize_files(
    paths: list[str], config: TokenizerConfig, workers: int = 1, progress: bool = True
) -> list[TokenizedFile]:
    """Tokenize in order; failures come back as errors, not exceptions."""
    work = partial(_tokenize_one, config=config)
    return map_with_progress(work, paths, workers, "tokenize", progress)


def tokens_table(results: list[TokenizedFile], content_hashes: dict[str, str]) -> pa.Table:
    """One row per tokenized file: path, content hash, length, ids and side-information lists."""
    ok = [r for r in results if r.arrays is not None]
    columns = {
        "path": pa.array([r.path for r in ok], pa.string()),
        "content_hash": pa.array([content_hashes.get(r.path) for r in ok], pa.string()),
        "length": pa.array([len(r.arrays["ids"]) for r in ok], pa.int32()),
        "ids": pa.array([r.arrays["ids"] for r in ok], pa.list_(pa.int32())),
    }
    for name, kind in zip(SIDE_COLUMNS, (pa.int32(), pa.int16(), pa.int8(), pa.int32())):
        columns[name] = pa.array([r.arrays[name] for r in ok], pa.list_(kind))
    return pa.table(columns)


def vocabulary_with_counts(config: TokenizerConfig, results: list[TokenizedFile]) -> Vocabulary:
    vocab = Vocabulary(config)
    for result in results:
        if result.arrays is not None:
            vocab.add_counts(result.arrays["ids"])
    return vocab
