"""Checks of a dataset version, column by column over its memory-mapped Arrow streams: every
id in the vocabulary, no piece in two splits, no empty or ragged sequence, bucket metadata equal
to the data, pieces in the train and valid splits. The Dagster asset checks
(``assets/checks.py``) run these."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from meloformer_model.data.dataset import (
    LIST_COLUMNS,
    MANIFEST,
    SPLITS,
    DatasetReadError,
    bucket_counts,
    open_splits,
)
from meloformer_model.tokenizer.vocab import Vocabulary

CHECK_DESCRIPTIONS = {
    "vocabulary_covers_dataset": "Every id is in the vocabulary.",
    "splits_do_not_overlap": "No piece in two splits.",
    "sequences_not_empty": "No empty or ragged sequences.",
    "buckets_sum_to_totals": "Bucket counts sum to totals.",
    "train_and_valid_hold_pieces": "The train and valid splits hold pieces (training needs both).",
}
CHECK_NAMES = tuple(CHECK_DESCRIPTIONS)
_COLUMNS = {
    "vocabulary_covers_dataset": ("ids",),
    "splits_do_not_overlap": ("content_hash",),
    "sequences_not_empty": ("length", *LIST_COLUMNS),
    "buckets_sum_to_totals": ("length",),
    "train_and_valid_hold_pieces": ("length",),
}


def _numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The values of an integer column with nulls as 0, zero-copy where one chunk (not
    ``to_numpy``: pyarrow imports pandas for that, a quarter of a second)."""
    if isinstance(array, pa.ChunkedArray):
        parts = [_numpy(chunk) for chunk in array.chunks]
        if not parts:
            return np.empty(0, np.dtype(str(array.type)))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
    if array.null_count:
        array = pc.fill_null(array, 0)
    dtype = np.dtype(str(array.type))
    values = np.frombuffer(array.buffers()[1], dtype, array.offset + len(array))
    return values[array.offset :]


def vocabulary_covers(tables: dict[str, pa.Table], vocab: Vocabulary) -> tuple[bool, dict]:
    """Every id within ``[0, len(vocab))``, and every id the data uses counted in the vocabulary."""
    size = len(vocab)
    used = np.zeros(size, dtype=np.int64)
    lo, hi, outside, nulls = size, -1, 0, 0
    for table in tables.values():
        for chunk in table.column("ids").chunks:  # one shard at a time: flat memory
            flat = pc.list_flatten(chunk)
            nulls += flat.null_count
            ids = _numpy(flat.drop_null())
            if not len(ids):
                continue
            chunk_lo, chunk_hi = int(ids.min()), int(ids.max())
            lo, hi = min(lo, chunk_lo), max(hi, chunk_hi)
            if chunk_lo < 0 or chunk_hi >= size:  # count what is outside, bin the rest
                inside = (ids >= 0) & (ids < size)
                outside += int((~inside).sum())
                ids = ids[inside]
            used += np.bincount(ids, minlength=size)
    unseen = int(((used > 0) & (vocab.counts == 0)).sum())
    passed = outside == 0 and nulls == 0 and unseen == 0
    return passed, {
        "min_id": lo if hi >= 0 else 0,
        "max_id": hi,
        "vocab_size": size,
        "ids_outside_vocabulary": outside,
        "null_ids": nulls,
        "ids_without_counts": unseen,
        "ids_used": int((used > 0).sum()),
    }


def splits_disjoint(tables: dict[str, pa.Table]) -> tuple[bool, dict]:
    """No content hash in two splits, none twice in a split, none missing."""
    frame = pl.concat(
        [
            pl.from_arrow(tables[s].select(["content_hash"])).with_columns(split=pl.lit(s))
            for s in SPLITS
        ]
    )
    missing = frame["content_hash"].null_count()
    distinct = frame.unique(["content_hash", "split"])
    splits = distinct.group_by("content_hash").len()["len"].cast(pl.Int64)
    overlap = int((splits * (splits - 1) // 2).sum())  # pairs of splits sharing a hash
    duplicates = frame.height - distinct.height
    passed = overlap == 0 and duplicates == 0 and missing == 0
    return passed, {"overlapping": overlap, "duplicates": duplicates, "missing_hashes": missing}


def sequences_consistent(tables: dict[str, pa.Table]) -> tuple[bool, dict]:
    """No sequence of length <= 0 (or none), no side-information array of another length."""
    empty = ragged = 0
    for table in tables.values():
        lengths = _numpy(table.column("length"))  # a missing length reads as 0: empty
        empty += int((lengths <= 0).sum())
        for column in LIST_COLUMNS:
            actual = _numpy(pc.list_value_length(table.column(column)))  # a null list: 0
            ragged += int((actual != lengths).sum())
    return empty == 0 and ragged == 0, {"empty": empty, "ragged": ragged}


def splits_trainable(tables: dict[str, pa.Table]) -> tuple[bool, dict]:
    """Pieces per split: training steps through train and picks its best checkpoint on valid (a
    small corpus can leave valid empty at the default 5 %)."""
    pieces = {split: tables[split].num_rows for split in SPLITS}
    return pieces["train"] > 0 and pieces["valid"] > 0, pieces


def buckets_match(tables: dict[str, pa.Table], manifest: dict) -> tuple[bool, dict]:
    """Per split: bucket sums == manifest totals == the data; buckets == the data's lengths."""
    bucket_size = int(manifest["bucket_size"])
    mismatches = []
    for split in SPLITS:
        info = manifest["splits"][split]
        lengths = _numpy(tables[split].column("length")).astype(np.int64)
        buckets = info["buckets"]
        sums = (sum(b["sequences"] for b in buckets.values()),
                sum(b["tokens"] for b in buckets.values()))  # fmt: skip
        actual = (len(lengths), int(lengths.sum()))
        if not sums == actual == (info["sequences"], info["tokens"]):
            mismatches.append(f"{split}: buckets {sums}, manifest "
                              f"{(info['sequences'], info['tokens'])}, data {actual}")  # fmt: skip
            continue
        # an empty sequence fails sequences_not_empty; no bucket holds it
        from_data = bucket_counts(lengths[lengths > 0], bucket_size)
        stated = {k: v for k, v in buckets.items() if v["sequences"]}
        if stated != from_data:
            mismatches.append(f"{split}: bucket counts differ from the data's lengths")
    return not mismatches, {"mismatches": "; ".join(mismatches) or "none"}


def evaluate(path: Path, vocabulary: Path, names: tuple[str, ...] = CHECK_NAMES) -> dict:
    """``name -> (passed, metadata)`` for the named checks on one dataset version."""
    columns = tuple(dict.fromkeys(c for n in names for c in _COLUMNS[n]))
    try:
        tables = open_splits(path, columns)
        manifest = json.loads((path / MANIFEST).read_text())
        vocab = Vocabulary.load(vocabulary) if "vocabulary_covers_dataset" in names else None
    except (DatasetReadError, OSError, ValueError) as exc:  # unreadable: every check fails
        return {n: (False, {"error": str(exc)}) for n in names}
    results = {}
    for name in names:
        if name == "vocabulary_covers_dataset":
            results[name] = vocabulary_covers(tables, vocab)
        elif name == "splits_do_not_overlap":
            results[name] = splits_disjoint(tables)
        elif name == "sequences_not_empty":
            results[name] = sequences_consistent(tables)
        elif name == "train_and_valid_hold_pieces":
            results[name] = splits_trainable(tables)
        else:
            try:
                results[name] = buckets_match(tables, manifest)
            except (KeyError, TypeError, ValueError) as exc:
                results[name] = (False, {"error": f"manifest: {type(exc).__name__}: {exc}"})
    return results
