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

from meloformer_model.data.parallel import imap_with_progress
from meloformer_model.tokenizer.config import TokenizerConfig
from meloformer_model.tokenizer.hid import HIDTokenizer

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
    work = partial(_chords_one, config=config)
    return list(imap_with_progress(work, items, workers, "chords", progress))


def tokenize_files(
    items: list[WorkItem], config: TokenizerConfig, workers: int = 1, progress: bool = True
) -> list[FileResult]:
    """HID token ids and side information for each file (chords reused where given)."""
    work = partial(_tokens_one, config=config)
    return list(imap_with_progress(work, items, workers, "tokenize", progress))


def _validity(valid: np.ndarray) -> pa.Buffer | None:
    return None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))


def _offsets(lengths: list[int]) -> pa.Buffer:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:  # what pa.array refuses too (32-bit offsets)
        raise OverflowError(f"{offsets[-1]} values do not fit one 32-bit-offset array")
    return pa.py_buffer(offsets.astype(np.int32))


def _string_array(values: list[str | None]) -> pa.Array:
    encoded = [b"" if v is None else v.encode() for v in values]
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    buffers = [
        _validity(valid),
        _offsets([len(e) for e in encoded]),
        pa.py_buffer(b"".join(encoded)),
    ]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)


def _int32_array(values: list[int | None]) -> pa.Array:
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    data = np.fromiter((v or 0 for v in values), np.int32, len(values))
    return pa.Array.from_buffers(pa.int32(), len(values), [_validity(valid), pa.py_buffer(data)])


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` as ``dtype``; an integer that does not fit raises (as ``pa.array`` would)."""
    if values.dtype == dtype or not values.size:
        return values.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    if values.min() < info.min or values.max() > info.max:
        raise OverflowError(f"values {values.min()}..{values.max()} do not fit {dtype}")
    return values.astype(dtype)


def _list_array(values: list[np.ndarray | None], kind: pa.DataType) -> pa.Array:
    """One list row per array (None: a null row), from one concatenation of the values."""
    dtype = np.dtype(str(kind))
    present = [_cast(np.asarray(v), dtype) for v in values if v is not None]
    flat = np.concatenate(present) if present else np.empty(0, dtype)
    child = pa.Array.from_buffers(kind, len(flat), [None, pa.py_buffer(flat)])
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    offsets = _offsets([0 if v is None else len(v) for v in values])
    return pa.Array.from_buffers(
        pa.list_(kind), len(values), [_validity(valid), offsets], children=[child]
    )


def results_table(
    results: list[FileResult], columns: dict[str, pa.DataType], keys: dict[str, list]
) -> pa.Table:
    """Rows in result order: ``keys`` columns, error, length, then one list column per array.

    Built from buffers, not ``pa.array``: one concatenation per column instead of a conversion
    per row (0.05 s against 0.7-1.0 s for a 1,024-file shard, twice per shard), and no pandas
    import (which ``pa.array`` triggers: a quarter of a second per process)."""
    data = {name: _string_array(values) for name, values in keys.items()}
    data["error"] = _string_array([r.error for r in results])
    first = next(iter(columns))
    data["length"] = _int32_array(
        [None if r.arrays is None else len(r.arrays[first]) for r in results]
    )
    for name, kind in columns.items():
        data[name] = _list_array(
            [None if r.arrays is None else r.arrays[name] for r in results], kind
        )
    return pa.Table.from_arrays(list(data.values()), names=list(data))
