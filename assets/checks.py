"""Blocking checks on the Arrow dataset: a failing one stops training from using it."""

import json

import dagster as dg
import numpy as np
import pyarrow.compute as pc

from assets.corpus import arrow_dataset, latest_dataset_path, latest_vocabulary_path
from meloformer_model.data.dataset import MANIFEST, SPLITS
from meloformer_model.tokenizer.vocab import Vocabulary
from pipelines.resources import CorpusStorage


def _load(storage: CorpusStorage) -> tuple:
    import datasets  # slow to import: only when a check runs

    path = latest_dataset_path(storage)
    if path is None:
        raise dg.Failure("arrow_dataset has not been materialized")
    return datasets.load_from_disk(str(path)), json.loads((path / MANIFEST).read_text())


def _error(passed: bool, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=bool(passed), severity=dg.AssetCheckSeverity.ERROR, metadata=metadata
    )


@dg.asset_check(asset=arrow_dataset, blocking=True, description="Every id is in the vocabulary.")
def vocabulary_covers_dataset(storage: CorpusStorage) -> dg.AssetCheckResult:
    data, _ = _load(storage)
    vocab = Vocabulary.load(latest_vocabulary_path(storage))
    lo, hi = len(vocab), -1
    used = np.zeros(len(vocab), dtype=bool)
    for split in SPLITS:
        for chunk in data[split].data.column("ids").chunks:  # one shard at a time: flat memory
            ids = pc.list_flatten(chunk).to_numpy()
            if not len(ids):
                continue
            lo, hi = min(lo, int(ids.min())), max(hi, int(ids.max()))
            if lo >= 0 and hi < len(vocab):
                used[np.unique(ids)] = True
    unseen = int((used & (vocab.counts == 0)).sum())
    passed = lo >= 0 and hi < len(vocab) and unseen == 0
    return _error(passed, min_id=lo, max_id=hi, vocab_size=len(vocab), ids_without_counts=unseen)


@dg.asset_check(asset=arrow_dataset, blocking=True, description="No piece in two splits.")
def splits_do_not_overlap(storage: CorpusStorage) -> dg.AssetCheckResult:
    data, _ = _load(storage)
    hashes = {split: set(data[split]["content_hash"]) for split in SPLITS}
    overlap = sum(len(hashes[a] & hashes[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :])
    duplicates = sum(data[s].num_rows - len(hashes[s]) for s in SPLITS)
    return _error(overlap == 0 and duplicates == 0, overlapping=overlap, duplicates=duplicates)


@dg.asset_check(asset=arrow_dataset, blocking=True, description="No empty or ragged sequences.")
def sequences_not_empty(storage: CorpusStorage) -> dg.AssetCheckResult:
    data, _ = _load(storage)
    empty = ragged = 0
    for split in SPLITS:
        table = data[split].data
        lengths = table.column("length").to_numpy()
        empty += int((lengths <= 0).sum())
        for column in ("ids", "bar", "instrument", "token_type", "onset_group"):
            actual = pc.list_value_length(table.column(column)).to_numpy()
            ragged += int((actual != lengths).sum())
    return _error(empty == 0 and ragged == 0, empty=empty, ragged=ragged)


@dg.asset_check(asset=arrow_dataset, blocking=True, description="Bucket counts sum to totals.")
def buckets_sum_to_totals(storage: CorpusStorage) -> dg.AssetCheckResult:
    data, manifest = _load(storage)
    mismatches = []
    for split in SPLITS:
        info = manifest["splits"][split]
        lengths = np.asarray(data[split]["length"], dtype=np.int64)
        buckets = info["buckets"].values()
        sums = (sum(b["sequences"] for b in buckets), sum(b["tokens"] for b in buckets))
        actual = (len(lengths), int(lengths.sum()))
        if not sums == actual == (info["sequences"], info["tokens"]):
            mismatches.append(f"{split}: buckets {sums}, manifest "
                              f"{(info['sequences'], info['tokens'])}, data {actual}")  # fmt: skip
    return _error(not mismatches, mismatches="; ".join(mismatches) or "none")


CHECK_NAMES = (
    "vocabulary_covers_dataset",
    "splits_do_not_overlap",
    "sequences_not_empty",
    "buckets_sum_to_totals",
)
