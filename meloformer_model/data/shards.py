"""Corpus sharding: which files belong to which shard, and which shards a refresh must redo.

A registry (one parquet file) records every source file with its size, mtime and content hash
and the shard it was assigned to. Size and mtime only decide which files need re-hashing; the
content hash decides whether work is redone. New files always go to new shards, so a refresh
that adds files leaves every existing shard (and all work derived from it) untouched.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from meloformer_model.atomic import write_parquet_atomic
from meloformer_model.data.midi_io import MIDI_SUFFIXES

REGISTRY_SCHEMA = {
    "path": pl.String,
    "size": pl.Int64,
    "mtime_ns": pl.Int64,
    "file_hash": pl.String,
    "shard": pl.String,
}
DEFAULT_SHARD_SIZE = 1024
HASH_BLOCK = 1 << 20


def shard_key(index: int) -> str:
    return f"shard-{index:05d}"


def file_hash(path: Path) -> str:
    """Hash of the raw bytes: identical files share it whatever their name or timestamp."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb", buffering=0) as fh:  # MIDI files are small: usually one read
        for block in iter(lambda: fh.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def scan_folder(corpus_dir: Path) -> pl.DataFrame:
    """Relative path, size and mtime of every MIDI file under the folder (recursively, not
    into symlinked folders; hidden files skipped). Columns, not row dicts: 100k files."""
    paths: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    for root, _, names in os.walk(corpus_dir):
        prefix = os.path.relpath(root, corpus_dir)
        prefix = "" if prefix == "." else prefix.replace(os.sep, "/") + "/"
        for name in names:
            if name.startswith(".") or not name.lower().endswith(MIDI_SUFFIXES):
                continue
            stat = os.stat(os.path.join(root, name))
            paths.append(prefix + name)
            sizes.append(stat.st_size)
            mtimes.append(stat.st_mtime_ns)
    columns = {"path": paths, "size": sizes, "mtime_ns": mtimes}
    return pl.DataFrame(columns, schema={k: REGISTRY_SCHEMA[k] for k in columns}).sort("path")


def fingerprint(frame: pl.DataFrame) -> str:
    """A digest of a (path, file_hash) listing: the corpus's data version."""
    digest = hashlib.blake2b(digest_size=16)
    for path, digest_hex in frame.select("path", "file_hash").sort("path").iter_rows():
        digest.update(f"{path}\0{digest_hex}\n".encode())
    return digest.hexdigest()


def shard_fingerprints(registry: pl.DataFrame) -> dict[str, str]:
    """``fingerprint`` of every shard's files, in one pass over the registry."""
    groups = registry.partition_by("shard", as_dict=True)
    return {shard: fingerprint(rows) for (shard,), rows in groups.items()}


@dataclass
class ShardPlan:
    registry: pl.DataFrame
    new_shards: list[str]
    changed_shards: list[str]
    removed_files: int

    @property
    def shards(self) -> list[str]:
        return sorted(self.registry["shard"].unique().to_list())

    @property
    def to_process(self) -> list[str]:
        return sorted(set(self.new_shards) | set(self.changed_shards))


def load_registry(path: Path) -> pl.DataFrame:
    if path.exists():
        return pl.read_parquet(path)
    return pl.DataFrame(schema=REGISTRY_SCHEMA)


def plan_shards(
    corpus_dir: Path, registry: pl.DataFrame, shard_size: int = DEFAULT_SHARD_SIZE
) -> ShardPlan:
    """Compare folder and registry: re-hash touched files, put new files in new shards."""
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"corpus folder {corpus_dir} does not exist")
    listing = scan_folder(corpus_dir)
    previous = registry.rename({"file_hash": "file_hash_old"})
    joined = listing.join(previous, on="path", how="left", suffix="_old")
    untouched = (pl.col("size") == pl.col("size_old")) & (
        pl.col("mtime_ns") == pl.col("mtime_ns_old")
    )
    joined = joined.with_columns(
        pl.when(untouched).then(pl.col("file_hash_old")).otherwise(None).alias("file_hash")
    )
    needs_hash = joined.filter(pl.col("file_hash").is_null())["path"].to_list()
    hashes = {path: file_hash(corpus_dir / path) for path in needs_hash}
    joined = joined.with_columns(
        pl.col("file_hash").fill_null(pl.col("path").replace_strict(hashes, default=None))
    )
    changed_rows = pl.col("shard").is_not_null() & pl.col("file_hash").ne_missing(
        pl.col("file_hash_old")
    )
    changed = set(joined.filter(changed_rows)["shard"].unique().to_list())
    removed = registry.join(listing.select("path"), on="path", how="anti")
    changed |= set(removed["shard"].unique().to_list())

    existing = joined.filter(pl.col("shard").is_not_null())
    new_files = joined.filter(pl.col("shard").is_null()).sort("path")
    next_index = _next_shard_index(registry)
    new_keys = [shard_key(next_index + i // shard_size) for i in range(new_files.height)]
    new_files = new_files.with_columns(pl.Series("shard", new_keys, dtype=pl.String))
    columns = list(REGISTRY_SCHEMA)
    updated = pl.concat([existing.select(columns), new_files.select(columns)]).sort("shard", "path")
    return ShardPlan(
        registry=updated,
        new_shards=sorted(set(new_keys)),
        changed_shards=sorted(changed & set(updated["shard"].to_list())),
        removed_files=removed.height,
    )


def _next_shard_index(registry: pl.DataFrame) -> int:
    if registry.is_empty():
        return 0
    return max(int(key.split("-")[1]) for key in registry["shard"].unique().to_list()) + 1


def save_registry(registry: pl.DataFrame, path: Path) -> None:
    write_parquet_atomic(registry, path)


def shard_files(registry: pl.DataFrame, shard: str) -> pl.DataFrame:
    """The (path, file_hash) rows of one shard, in path order."""
    return registry.filter(pl.col("shard") == shard).select("path", "file_hash").sort("path")
