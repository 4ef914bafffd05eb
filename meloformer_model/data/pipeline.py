"""The whole data path without an orchestrator: folder → shards → stages → vocabulary → dataset.

The Dagster assets run the same steps one shard per run; this function runs them in a loop, for
scripts, notebooks, tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from meloformer_model.data import stages
from meloformer_model.data.dataset import DatasetBuild, DatasetConfig, build_arrow_dataset
from meloformer_model.data.filtering import FilterConfig
from meloformer_model.data.parallel import release_freed_memory
from meloformer_model.data.shards import (
    DEFAULT_SHARD_SIZE,
    load_registry,
    plan_shards,
    save_registry,
    shard_files,
    shard_fingerprints,
)
from meloformer_model.tokenizer.config import TokenizerConfig
from meloformer_model.tokenizer.vocab import Vocabulary


@dataclass
class PreparedCorpus:
    dataset: DatasetBuild
    vocab: Vocabulary
    vocab_path: Path


def prepare_corpus(
    corpus_dir: Path,
    root: Path,
    filter_config: FilterConfig | None = None,
    tokenizer_config: TokenizerConfig | None = None,
    dataset_config: DatasetConfig | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 1,
) -> PreparedCorpus:
    """Process new or changed shards under ``root`` and assemble the dataset and vocabulary."""
    fc, tc = filter_config or FilterConfig(), tokenizer_config or TokenizerConfig()
    registry_path = root / "registry.parquet"
    plan = plan_shards(Path(corpus_dir), load_registry(registry_path), shard_size)
    save_registry(plan.registry, registry_path)
    token_files = {}
    built = shard_fingerprints(plan.registry)
    for shard in plan.shards:
        out = root / "hid_tokens" / stages.token_version(tc) / f"{shard}.parquet"
        if stages.built_from(out) != built[shard]:  # new, changed, or left by a failed run
            filtered = stages.filter_shard(corpus_dir, shard_files(plan.registry, shard), fc,
                                           workers=workers).table  # fmt: skip
            chords = stages.chord_shard(corpus_dir, filtered.filter(pl.col("accepted")), tc,
                                        workers=workers).table  # fmt: skip
            tokens = stages.token_shard(corpus_dir, chords, tc, _previous(out), workers).table
            stages.write_stage_output(tokens, out, built[shard])
            del filtered, chords, tokens
            release_freed_memory()
        token_files[shard] = out
    vocab = Vocabulary(tc)
    for path in token_files.values():
        ids = pl.read_parquet(path, columns=["ids", "error"]).filter(pl.col("error").is_null())
        vocab.add_counts(ids["ids"].explode().to_numpy())
    vocab_path = vocab.save(root / "vocab.json")
    build = build_arrow_dataset(token_files, root / "arrow_dataset",
                                dataset_config or DatasetConfig(), vocab.config_hash(),
                                stages.token_version(tc))  # fmt: skip
    return PreparedCorpus(build, vocab, vocab_path)


def _previous(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.exists() else None
