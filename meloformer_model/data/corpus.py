"""Filtering a whole corpus: parallel per-file inspection, dedup, and the two result tables."""

from __future__ import annotations

import itertools
import json
from functools import partial
from pathlib import Path

import polars as pl

from meloformer_model.atomic import write_bytes_atomic, write_parquet_atomic
from meloformer_model.data.filtering import FileReport, FilterConfig, inspect_file
from meloformer_model.data.parallel import imap_with_progress

STAT_SCHEMA = {
    "notes": pl.Int64,
    "pitches": pl.Int64,
    "beats": pl.Float64,
    "seconds": pl.Float64,
    "tracks": pl.Int64,
    "time_signatures": pl.List(pl.String),
    "mean_tempo_bpm": pl.Float64,
    "instruments": pl.List(pl.Int64),
    "has_drums": pl.Boolean,
    "cross_bar_rate": pl.Float64,
}
INSPECTION_SCHEMA = {
    "path": pl.String,
    "accepted": pl.Boolean,
    "reason": pl.String,
    "message": pl.String,
    "content_hash": pl.String,
    "duplicate_of": pl.String,
    **STAT_SCHEMA,
}
REJECTED_COLUMNS = ("path", "reason", "message", "duplicate_of")
# Reports turned into table rows at a time: a report object holds ~3.6 KB, a table row ~0.2 KB
# (measured on the sample corpus), so a million-file corpus holds one chunk of reports, not
# 3.6 GB of them.
INSPECT_CHUNK = 16_384


def _inspect_path(path: Path, config: FilterConfig) -> FileReport:
    return inspect_file(path, config, path=str(path))


def inspection_frame(reports: list[FileReport]) -> pl.DataFrame:
    """One row per file with a fixed schema, so empty results still have columns."""
    rows = [
        {
            "path": r.path,
            "accepted": r.accepted,
            "reason": r.reason,
            "message": r.message,
            "content_hash": r.content_hash,
            "duplicate_of": None,
            **{k: r.stats.get(k) for k in STAT_SCHEMA},
        }
        for r in reports
    ]
    return pl.DataFrame(rows, schema=INSPECTION_SCHEMA)


def mark_duplicates(frame: pl.DataFrame) -> pl.DataFrame:
    """Reject every accepted row whose content hash an earlier accepted row (in frame order)
    already has, naming that row's path as the original."""
    original = (
        pl.when(pl.col("accepted"))
        .then(pl.col("path").first().over(pl.col("content_hash"), pl.col("accepted")))
        .otherwise(None)
    )
    frame = frame.with_columns(original.alias("_original"))
    duplicate = pl.col("accepted") & (pl.col("_original") != pl.col("path"))
    message = pl.format("{}: same note content as {}", pl.col("path"), pl.col("_original"))
    return frame.with_columns(
        pl.when(duplicate).then(False).otherwise(pl.col("accepted")).alias("accepted"),
        pl.when(duplicate).then(pl.lit("duplicate")).otherwise(pl.col("reason")).alias("reason"),
        pl.when(duplicate).then(message).otherwise(pl.col("message")).alias("message"),
        pl.when(duplicate)
        .then(pl.col("_original"))
        .otherwise(pl.col("duplicate_of"))
        .alias("duplicate_of"),
    ).drop("_original")


def inspect_files(
    paths: list[Path], config: FilterConfig, workers: int = 1, progress: bool = True
) -> pl.DataFrame:
    """Inspect files (in order) into an inspection frame, duplicates of earlier files marked."""
    work = partial(_inspect_path, config=config)
    reports = imap_with_progress(work, paths, workers, "filter", progress, 16)
    frames = [inspection_frame(reports_chunk) for reports_chunk in _chunks(reports, INSPECT_CHUNK)]
    frame = pl.concat(frames) if frames else inspection_frame([])
    return mark_duplicates(frame) if config.dedup else frame


def _chunks(items, size: int):
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def reason_counts(frame: pl.DataFrame) -> dict[str, int]:
    counts = frame.filter(~pl.col("accepted")).group_by("reason").len().sort("len", descending=True)
    return dict(counts.iter_rows())


def write_filter_results(frame: pl.DataFrame, out_dir: Path, config: FilterConfig) -> dict:
    """Write accepted.parquet, rejected.parquet and summary.json; return the summary."""
    accepted = frame.filter(pl.col("accepted")).drop("accepted", *REJECTED_COLUMNS[1:])
    rejected = frame.filter(~pl.col("accepted")).select(REJECTED_COLUMNS)
    write_parquet_atomic(accepted, out_dir / "accepted.parquet")
    write_parquet_atomic(rejected, out_dir / "rejected.parquet")
    summary = {
        "files": frame.height,
        "accepted": accepted.height,
        "rejected": rejected.height,
        "reasons": reason_counts(frame),
        "config": config.to_dict(),
    }
    write_bytes_atomic(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary
