"""Incremental per-shard stages: filter, chord annotation, tokenization.

Each stage maps a shard's input rows (keyed by ``path`` and ``file_hash``) to an output table.
Rows whose key is unchanged since the previous output of the same stage version are reused, so
re-running a shard's stages (as the assets do) after one file changed costs one file, and a
refresh never redoes work. Each output records which state of the shard it was built from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from meloformer_model.atomic import write_parquet_atomic
from meloformer_model.data.corpus import INSPECTION_SCHEMA, inspection_frame, mark_duplicates
from meloformer_model.data.filtering import FileReport, FilterConfig, inspect_file
from meloformer_model.data.parallel import imap_with_progress, pool_workers
from meloformer_model.data.tokenize_corpus import (
    CHORD_COLUMNS,
    TOKEN_COLUMNS,
    WorkItem,
    annotate_chords,
    results_table,
    tokenize_files,
)
from meloformer_model.tokenizer.config import TokenizerConfig

# Bump when a stage's code changes what it outputs: old outputs then stop being reused.
FILTER_STAGE_VERSION = 2
CHORD_STAGE_VERSION = 2
TOKEN_STAGE_VERSION = 3

KEY = ["path", "file_hash"]
SOURCE = "meloformer.source"  # a stage output's metadata: ``fingerprint`` of the shard's files


def write_stage_output(table: pl.DataFrame, path: Path, source: str | None) -> Path:
    """Write a shard's stage output with the fingerprint of the registry rows it derives from
    (``shards.fingerprint``): a file a failed or killed run left from an earlier state of the
    shard then reads as out of date (``built_from``), not as done."""
    return write_parquet_atomic(table, path, {SOURCE: source} if source else None)


def built_from(path: Path) -> str | None:
    """The fingerprint a stage output was written with; None without the file (or the record)."""
    if not path.exists():
        return None
    value = (pq.read_schema(path).metadata or {}).get(SOURCE.encode())
    return value.decode() if value else None


def stage_version(stage_code_version: int, config: dict) -> str:
    """Names the folder a stage writes to: its code version plus its full config."""
    payload = json.dumps({"code": stage_code_version, "config": config}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def filter_version(config: FilterConfig) -> str:
    return stage_version(FILTER_STAGE_VERSION, config.to_dict())


def chord_version(config: TokenizerConfig) -> str:
    return stage_version(CHORD_STAGE_VERSION, config.to_dict())


def token_version(config: TokenizerConfig) -> str:
    return stage_version(TOKEN_STAGE_VERSION, config.to_dict())


@dataclass
class StageResult:
    table: pl.DataFrame
    reused: int
    computed: int


def _incremental(
    inputs: pl.DataFrame,
    previous: pl.DataFrame | None,
    compute: Callable[[pl.DataFrame], pl.DataFrame],
) -> StageResult:
    keys = inputs.select(KEY)
    if previous is None or previous.is_empty():
        reused = None
        todo = inputs
    else:
        reused = previous.join(keys, on=KEY, how="semi")
        todo = inputs.join(reused.select(KEY), on=KEY, how="anti")
    fresh = compute(todo) if todo.height else None
    parts = [part for part in (reused, fresh) if part is not None]
    table = pl.concat(parts) if parts else compute(todo)
    return StageResult(table.sort("path"), 0 if reused is None else reused.height, todo.height)


def _inspect_item(item: WorkItem, config: FilterConfig) -> FileReport:
    return inspect_file(item.source, config, path=item.name)


def filter_shard(
    corpus_dir: Path,
    files: pl.DataFrame,
    config: FilterConfig,
    previous: pl.DataFrame | None = None,
    workers: int = 1,
    progress: bool = False,
) -> StageResult:
    """Inspect a shard's files (``path`` relative to ``corpus_dir``, ``file_hash``)."""

    def compute(todo: pl.DataFrame) -> pl.DataFrame:
        items = [WorkItem(corpus_dir / p, p) for p in todo["path"].to_list()]
        work = partial(_inspect_item, config=config)
        n = pool_workers(len(items), workers)
        reports = list(imap_with_progress(work, items, n, "filter", progress, 16))
        frame = inspection_frame(reports)
        return frame.with_columns(todo["file_hash"].alias("file_hash")).select(FILTER_COLUMNS)

    result = _incremental(files, previous, compute)
    undo = pl.col("reason") == "duplicate"
    table = result.table.with_columns(
        pl.when(undo).then(True).otherwise(pl.col("accepted")).alias("accepted"),
        *(pl.when(undo).then(None).otherwise(pl.col(c)).alias(c) for c in _DEDUP_COLUMNS),
    )
    if config.dedup:
        table = mark_duplicates(table)
    return StageResult(table, result.reused, result.computed)


FILTER_COLUMNS = ["path", "file_hash", *[c for c in INSPECTION_SCHEMA if c != "path"]]
_DEDUP_COLUMNS = ("reason", "message", "duplicate_of")


def _items(corpus_dir: Path, rows: pl.DataFrame, with_chords: bool) -> list[WorkItem]:
    chords = rows["chords"].to_list() if with_chords else [None] * rows.height
    return [
        WorkItem(corpus_dir / path, path, None if c is None else pl.Series(c).to_numpy())
        for path, c in zip(rows["path"].to_list(), chords)
    ]


def chord_shard(
    corpus_dir: Path,
    accepted: pl.DataFrame,
    config: TokenizerConfig,
    previous: pl.DataFrame | None = None,
    workers: int = 1,
    progress: bool = False,
) -> StageResult:
    """Bar chords for the accepted rows (``path``, ``file_hash``, ``content_hash``)."""

    def compute(todo: pl.DataFrame) -> pl.DataFrame:
        n = pool_workers(todo.height, workers)
        results = annotate_chords(_items(corpus_dir, todo, False), config, n, progress)
        return _with_keys(todo, results_table(results, CHORD_COLUMNS, {}))

    return _incremental(accepted.select(*KEY, "content_hash"), previous, compute)


def token_shard(
    corpus_dir: Path,
    chords: pl.DataFrame,
    config: TokenizerConfig,
    previous: pl.DataFrame | None = None,
    workers: int = 1,
    progress: bool = False,
) -> StageResult:
    """HID tokens for the rows of a chord table that have chords (errors are carried over)."""
    annotated = chords.filter(pl.col("error").is_null())

    def compute(todo: pl.DataFrame) -> pl.DataFrame:
        n = pool_workers(todo.height, workers)
        results = tokenize_files(_items(corpus_dir, todo, True), config, n, progress)
        return _with_keys(todo, results_table(results, TOKEN_COLUMNS, {}))

    return _incremental(annotated.select(*KEY, "content_hash", "chords"), previous, compute)


def _with_keys(todo: pl.DataFrame, table) -> pl.DataFrame:
    return pl.concat([todo.select(*KEY, "content_hash"), pl.from_arrow(table)], how="horizontal")
