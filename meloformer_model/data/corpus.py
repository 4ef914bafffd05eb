"""Filtering a whole corpus: parallel per-file inspection, dedup, and the two result tables."""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path

import polars as pl

from meloformer_model.atomic import write_bytes_atomic, write_parquet_atomic
from meloformer_model.data.filtering import FileReport, FilterConfig, inspect_file, mark_duplicates
from meloformer_model.data.parallel import map_with_progress

ACCEPTED_SCHEMA = {
    "path": pl.String,
    "content_hash": pl.String,
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
REJECTED_SCHEMA = {
    "path": pl.String,
    "reason": pl.String,
    "message": pl.String,
    "duplicate_of": pl.String,
}


def _inspect_path(path: Path, config: FilterConfig) -> FileReport:
    return inspect_file(path, config, path=str(path))


def inspect_files(
    paths: list[Path], config: FilterConfig, workers: int = 1, progress: bool = True
) -> list[FileReport]:
    """Inspect files (in order), then mark duplicates of earlier files."""
    work = partial(_inspect_path, config=config)
    reports = map_with_progress(work, paths, workers, "filter", progress, chunksize=16)
    return mark_duplicates(reports) if config.dedup else reports


def report_tables(reports: list[FileReport]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(accepted, rejected) tables with fixed schemas, so empty results still have columns."""
    accepted = [
        {
            "path": r.path,
            "content_hash": r.content_hash,
            **{k: r.stats.get(k) for k in ACCEPTED_SCHEMA if k not in ("path", "content_hash")},
        }
        for r in reports
        if r.accepted
    ]
    rejected = [
        {
            "path": r.path,
            "reason": r.reason,
            "message": r.message,
            "duplicate_of": r.stats.get("duplicate_of"),
        }
        for r in reports
        if not r.accepted
    ]
    return (
        pl.DataFrame(accepted, schema=ACCEPTED_SCHEMA),
        pl.DataFrame(rejected, schema=REJECTED_SCHEMA),
    )


def write_filter_results(reports: list[FileReport], out_dir: Path, config: FilterConfig) -> dict:
    """Write accepted.parquet, rejected.parquet and summary.json; return the summary."""
    accepted, rejected = report_tables(reports)
    write_parquet_atomic(accepted, out_dir / "accepted.parquet")
    write_parquet_atomic(rejected, out_dir / "rejected.parquet")
    summary = {
        "files": len(reports),
        "accepted": accepted.height,
        "rejected": rejected.height,
        "reasons": dict(Counter(rejected["reason"].to_list()).most_common()),
        "config": config.to_dict(),
    }
    write_bytes_atomic(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary
