"""The dataset manifest's name and the one fact training reads from it, without the dataset
builder's dependencies (polars): a GPU machine trains with torch and ``datasets`` alone."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "meloformer_dataset.json"


def built_with(dataset_path: Path) -> str | None:
    """The vocabulary hash (tokenizer config) a dataset version was built under; None without a
    manifest."""
    manifest = Path(dataset_path) / MANIFEST
    return json.loads(manifest.read_text())["settings"]["vocab_hash"] if manifest.exists() else None
