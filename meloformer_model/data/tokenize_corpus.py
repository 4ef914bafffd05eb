"""Chord annotation and tokenization of many files into Arrow tables, and vocabulary counts.

One row per file; a file that fails keeps its row with an ``error`` message and null arrays,
so a corpus run always accounts for every input.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from meloformer_model.data.parallel import map_with_progress
from meloformer_model.tokenizer.config import TokenizerConfig
from meloformer_model.tokenizer.hid import HIDTokenizer
from meloformer_model.tokenizer.vocab import Vocabulary

TOKEN_COLUMNS = {
    "ids": pa.int32(),
    "bar": pa.int32(),
    "instrument": pa.int16(),
    "token_type": pa.int8(),
    "onset_group": pa.int32(),
}
CHORD_COLUMNS = {"chords": pa.int16()}


@dataclass(frozen=True)
class WorkItem:
    """A file to process: where to read it, the name to report, and optional bar chords."""

    source: Path
    name: str
    chords: np.ndarray | None = None


@dataclass
class FileResult:
    name: str
    arrays: dict[str, np.ndarray] | None
    error: str | None


def _guarded(item: WorkItem, work) -> FileResult:
    try:
        return FileResult(item.name, work(item), None)
    except Exception as exc:  # one bad file must not stop the corpus
        return FileResult(item.name, None, f"{item.name}: {type(exc).__name__}: {exc}")


@lru_cache(maxsize=4)
def _tokenizer(config: TokenizerConfig) -> HIDTokenizer:
    return HIDTokenizer(config)


def _chords_one(item: WorkItem, config: TokenizerConfig) -> FileResult:
    return _guarded(item, lambda it: {"chords": _tokenizer(config).bar_chords(it.source)})


def _tokens_one(item: WorkItem, config: TokenizerConfig) -> FileResult:
    return _guarded(item, lambda it: _tokenizer(config).encode(it.source, it.chords).arrays())


def annotate_chords(
    items: list[WorkItem], config: TokenizerConfig, workers: int = 1, progress: bool = True
) -> list[FileResult]:
    """One chord id per bar for each file, over the tokenizer's own bars."""
    return map_with_progress(
        partial(_chords_one, config=config), items, workers, "chords", progress
    )


def tokenize_files(
    items: list[WorkItem], config: TokenizerConfig, workers: int = 1, progress: bool = True
) -> list[FileResult]:
    """HID token ids and side information for each file (chords reused where given)."""
    work = partial(_tokens_one, config=config)
    return map_with_progress(work, items, workers, "tokenize", progress)


def results_table(
    results: list[FileResult], columns: dict[str, pa.DataType], keys: dict[str, list]
) -> pa.Table:
    """Rows in result order: ``keys`` columns, error, length, then one list column per array."""
    data = {name: pa.array(values, pa.string()) for name, values in keys.items()}
    data["error"] = pa.array([r.error for r in results], pa.string())
    first = next(iter(columns))
    data["length"] = pa.array(
        [None if r.arrays is None else len(r.arrays[first]) for r in results], pa.int32()
    )
    for name, kind in columns.items():
        values = [None if r.arrays is None else r.arrays[name] for r in results]
        data[name] = pa.array(values, pa.list_(kind))
    return pa.table(data)


def vocabulary_counts(config: TokenizerConfig, id_lists: list[np.ndarray]) -> Vocabulary:
    vocab = Vocabulary(config)
    for ids in id_lists:
        vocab.add_counts(ids)
    return vocab
