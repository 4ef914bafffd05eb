"""The Arrow dataset: train/valid/test splits in the HuggingFace ``datasets`` on-disk format.

Each split holds one Arrow stream file per corpus shard, listed in the split's ``state.json``,
so ``datasets.load_from_disk`` memory-maps them as one table. A rebuild after a refresh writes
only the shards whose rows changed and hard-links the rest from the previous version: cost
grows with the new data, not with the corpus. Splits are decided by the content hash, so a
piece never moves between splits when files are added, and duplicates across shards keep only
their first occurrence (shard order, then path).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from meloformer_model.atomic import atomic_folder, write_bytes_atomic
from meloformer_model.data.manifest import MANIFEST

SPLITS = ("train", "valid", "test")
DATASET_FORMAT_VERSION = 1
SCHEMA = pa.schema(
    [("path", pa.string()), ("content_hash", pa.string()), ("length", pa.int32()),
     ("ids", pa.list_(pa.int32())), ("bar", pa.list_(pa.int32())),
     ("instrument", pa.list_(pa.int16())), ("token_type", pa.list_(pa.int8())),
     ("onset_group", pa.list_(pa.int32()))]
)  # fmt: skip
COLUMNS = tuple(SCHEMA.names)
LIST_COLUMNS = tuple(f.name for f in SCHEMA if pa.types.is_list(f.type))
DESCRIPTION = "MeloFormer HID tokens"


@dataclass(frozen=True)
class DatasetConfig:
    """Split fractions (of content-hash space) and the length-bucket width in tokens."""

    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    bucket_size: int = 512

    def __post_init__(self) -> None:
        if not (0 <= self.valid_fraction and 0 <= self.test_fraction):
            raise ValueError("split fractions must be >= 0")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("valid + test fractions must leave room for train")
        if self.bucket_size < 1:
            raise ValueError("bucket_size must be >= 1")


def split_expr(config: DatasetConfig) -> pl.Expr:
    """Split name from the first 32 bits of the content hash: stable, uniform, order-free."""
    u = pl.col("content_hash").str.slice(0, 8).str.to_integer(base=16) / 2**32
    return (
        pl.when(u < config.valid_fraction)
        .then(pl.lit("valid"))
        .when(u < config.valid_fraction + config.test_fraction)
        .then(pl.lit("test"))
        .otherwise(pl.lit("train"))
    )


def bucket_counts(lengths: np.ndarray, bucket_size: int) -> dict[str, dict[str, int]]:
    """Per bucket ``"lo-hi"`` (inclusive token range): sequences and tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out: dict[str, dict[str, int]] = {}
    if not len(lengths):
        return out
    index = (lengths - 1) // bucket_size
    for b in np.unique(index):
        sel = index == b
        label = f"{b * bucket_size + 1}-{(b + 1) * bucket_size}"
        out[label] = {"sequences": int(sel.sum()), "tokens": int(lengths[sel].sum())}
    return out


def _merge_buckets(parts: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for part in parts:
        for label, counts in part.items():
            slot = total.setdefault(label, {"sequences": 0, "tokens": 0})
            slot["sequences"] += counts["sequences"]
            slot["tokens"] += counts["tokens"]
    return dict(sorted(total.items(), key=lambda item: int(item[0].split("-")[0])))


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def dataset_code_version(config: DatasetConfig) -> str:
    """Changes when the dataset's layout or split/bucket settings change."""
    return _digest(DATASET_FORMAT_VERSION, asdict(config))


@dataclass
class DatasetBuild:
    path: Path
    version: str
    manifest: dict
    written_shards: list[str]
    linked_shards: list[str]


def _keep_first(shard_keys: dict[str, pl.DataFrame]) -> dict[str, list[str]]:
    """Paths kept per shard after dropping content duplicates of earlier rows."""
    frames = [f.select("path", "content_hash").with_columns(pl.lit(s).alias("shard"))
              for s, f in sorted(shard_keys.items())]  # fmt: skip
    if not frames:
        return {}
    rows = pl.concat(frames).sort("shard", "path")
    kept = rows.filter(pl.col("content_hash").is_first_distinct())
    return {s: kept.filter(pl.col("shard") == s)["path"].to_list() for s in shard_keys}


def _write_stream(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _empty_table() -> pa.Table:
    return pa.Table.from_batches([], schema=SCHEMA)  # (Schema.empty_table imports pandas)


class DatasetReadError(ValueError):
    """A dataset version's files are missing, unreadable or not in the expected schema."""


def open_splits(path: Path, columns: tuple[str, ...] = COLUMNS) -> dict[str, pa.Table]:
    """Each split of a dataset version as one Arrow table, ``columns`` only, straight from the
    per-shard stream files its ``state.json`` lists (what ``datasets.load_from_disk`` maps):
    memory-mapped, so a scan reads only the pages of the columns it touches."""
    tables = {}
    for split in SPLITS:
        folder = path / split
        parts = [_empty_table().select(list(columns))]
        try:
            state = json.loads((folder / "state.json").read_text())
            for name in [entry["filename"] for entry in state["_data_files"]]:
                table = pa.ipc.open_stream(pa.memory_map(str(folder / name))).read_all()
                if not table.schema.equals(SCHEMA):
                    raise DatasetReadError(f"{folder / name}: schema {table.schema}, not {SCHEMA}")
                parts.append(table.select(list(columns)))
        except (OSError, KeyError, TypeError, pa.ArrowException, json.JSONDecodeError) as exc:
            raise DatasetReadError(f"{folder}: {type(exc).__name__}: {exc}") from exc
        tables[split] = pa.concat_tables(parts)
    return tables


@dataclass
class DatasetPlan:
    """What a build of these token shards produces: its version, and per shard the rows kept
    (after cross-shard dedup) and the fingerprint that decides whether its files are reused."""

    version: str
    settings: dict
    kept: dict[str, list[str]]
    fingerprints: dict[str, str]


def plan_dataset(
    token_shards: dict[str, Path], config: DatasetConfig, vocab_hash: str, token_version: str
) -> DatasetPlan:
    """The dataset version for these token shards (``shard -> parquet``), from their key columns
    only (path, file hash, content hash) and the versions of the tokenizer config
    (``vocab_hash``) and of the token stage's code (``token_version``): cheap enough to ask
    whether a version is current, and a tokenizer code change that re-tokenizes the same files
    is a new version."""
    if not token_shards:
        raise ValueError("no tokenized shards: materialize hid_tokens for at least one shard")
    keys = {
        shard: pl.read_parquet(path, columns=["path", "file_hash", "content_hash", "error"])
        .filter(pl.col("error").is_null())
        .drop("error")
        for shard, path in token_shards.items()
    }
    kept = _keep_first(keys)
    settings = {**asdict(config), "vocab_hash": vocab_hash, "token_version": token_version,
                "format": DATASET_FORMAT_VERSION}  # fmt: skip
    fingerprints = {
        shard: _digest(settings, keys[shard].select("path", "file_hash").rows(), kept[shard])
        for shard in sorted(keys)
    }
    return DatasetPlan(_digest(settings, fingerprints), settings, kept, fingerprints)


def build_arrow_dataset(
    token_shards: dict[str, Path],
    out_root: Path,
    config: DatasetConfig,
    vocab_hash: str,
    token_version: str,
    previous: Path | None = None,
) -> DatasetBuild:
    """Assemble the dataset version for these token shards (``shard -> parquet``)."""
    plan = plan_dataset(token_shards, config, vocab_hash, token_version)
    version, fingerprints = plan.version, plan.fingerprints
    shards = sorted(fingerprints)
    target = out_root / version
    if (target / MANIFEST).exists():
        manifest = json.loads((target / MANIFEST).read_text())
        return DatasetBuild(target, version, manifest, [], [])

    old = _previous_manifest(previous)
    shard_stats: dict[str, dict] = {}
    written, linked = [], []
    with atomic_folder(target) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
        for shard in shards:
            name = f"data-{shard}.arrow"
            reusable = (
                old.get("shards", {}).get(shard, {}).get("fingerprint") == fingerprints[shard]
            )
            if reusable:
                for split in SPLITS:
                    os.link(previous / split / name, tmp / split / name)
                shard_stats[shard] = old["shards"][shard]
                linked.append(shard)
                continue
            shard_stats[shard] = _write_shard(
                token_shards[shard], plan.kept[shard], config, tmp, name, fingerprints[shard]
            )
            written.append(shard)
        manifest = _finish(tmp, shards, shard_stats, plan.settings, version, config, out_root)
    return DatasetBuild(target, version, manifest, written, linked)


def _previous_manifest(previous: Path | None) -> dict:
    if previous is None or not (previous / MANIFEST).exists():
        return {}
    return json.loads((previous / MANIFEST).read_text())


def _write_shard(
    parquet: Path, kept: list[str], config: DatasetConfig, tmp: Path, name: str, fingerprint: str
) -> dict:
    frame = (
        pl.read_parquet(parquet)
        .filter(pl.col("error").is_null() & pl.col("path").is_in(kept))
        .with_columns(split_expr(config).alias("split"))
        .sort("path")
    )
    stats = {"fingerprint": fingerprint, "splits": {}}
    for split in SPLITS:
        part = frame.filter(pl.col("split") == split).select(COLUMNS)
        table = part.to_arrow().cast(_empty_table().schema) if part.height else _empty_table()
        _write_stream(table, tmp / split / name)
        lengths = part["length"].to_numpy()
        stats["splits"][split] = {
            "sequences": part.height,
            "tokens": int(lengths.sum()),
            "buckets": bucket_counts(lengths, config.bucket_size),
        }
    return stats


def _dataset_info(out_root: Path, tmp: Path) -> bytes:
    """A split's ``dataset_info.json`` (the features of ``SCHEMA``): written by ``datasets``
    once per schema and ``datasets`` version, then read from a cache file in ``out_root``, so a
    rebuild does not import ``datasets`` (about half a second)."""
    from importlib.metadata import version as package_version

    key = _digest(SCHEMA.to_string(show_schema_metadata=False), package_version("datasets"))
    cache = out_root / f".dataset_info-{key}.json"
    if cache.exists():
        return cache.read_bytes()
    import datasets  # slow to import: only for the first dataset of this schema

    features = datasets.Features.from_arrow_schema(SCHEMA)
    datasets.DatasetInfo(features=features, description=DESCRIPTION).write_to_directory(str(tmp))
    data = (tmp / "dataset_info.json").read_bytes()
    (tmp / "dataset_info.json").unlink()
    write_bytes_atomic(cache, data)
    return data


def _finish(
    tmp: Path,
    shards: list[str],
    shard_stats: dict,
    settings: dict,
    version: str,
    config,
    out_root: Path,
) -> dict:
    info = _dataset_info(out_root, tmp)
    splits = {}
    for split in SPLITS:
        per_shard = [shard_stats[s]["splits"][split] for s in shards]
        splits[split] = {
            "sequences": sum(p["sequences"] for p in per_shard),
            "tokens": sum(p["tokens"] for p in per_shard),
            "buckets": _merge_buckets([p["buckets"] for p in per_shard]),
        }
        state = {
            "_data_files": [{"filename": f"data-{s}.arrow"} for s in shards],
            "_fingerprint": _digest(version, split),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": split,
        }
        write_bytes_atomic(tmp / split / "state.json", json.dumps(state, indent=2).encode())
        write_bytes_atomic(tmp / split / "dataset_info.json", info)
    write_bytes_atomic(tmp / "dataset_dict.json", json.dumps({"splits": list(SPLITS)}).encode())
    manifest = {
        "version": version,
        "settings": settings,
        "bucket_size": config.bucket_size,
        "splits": splits,
        "shards": shard_stats,
    }
    write_bytes_atomic(tmp / MANIFEST, json.dumps(manifest).encode())
    return manifest
