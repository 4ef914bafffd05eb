"""Atomic output: write beside the target, then rename, so readers never see half a file or a
folder that mixes two writes. The data reaches the disk before the rename (fsync), so a power
loss cannot leave a renamed file or checkpoint with empty contents either."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # polars stays off the import path of the tokenizer, model and trainer
    import polars as pl

_UMASK = os.umask(0)
os.umask(_UMASK)


def _sync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs should be shareable
    try:
        yield Path(tmp)
        _sync(Path(tmp))
        os.replace(tmp, path)
        _sync(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it takes ``path``'s place.
    A folder already there is moved aside first and removed after, so readers see the old
    folder or the whole new one, never a mix (nor files a smaller rewrite left behind); on
    failure the old one stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
    aside = tmp.with_name(f"{tmp.name}.old")
    try:
        yield tmp
        for written in tmp.rglob("*"):
            _sync(written)
        _sync(tmp)
        if path.exists():
            os.replace(path, aside)
        try:
            os.replace(tmp, path)
        except OSError:
            if aside.exists():
                os.replace(aside, path)
            raise
        _sync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_parquet_atomic(
    table: pa.Table | pl.DataFrame, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """``metadata``: key-value pairs added to the file's schema metadata (readable from the
    footer alone, ``pq.read_schema``)."""
    if not isinstance(table, pa.Table):
        table = table.to_arrow()
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)
