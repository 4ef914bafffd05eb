"""The corpus data path: MIDI folder → filtered manifest → chords → HID tokens → vocabulary →
Arrow dataset. Each asset writes its own versioned files (atomically) and reports a data version,
so nothing large goes through the IO manager and the UI tracks what changed."""

import hashlib
import json
import warnings
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from assets.config import (
    CHORD_VERSION,
    DATASET_CONFIG,
    DATASET_VERSION,
    FILTER_CONFIG,
    FILTER_VERSION,
    TOKEN_VERSION,
    TOKENIZER_CONFIG,
    VOCABULARY_VERSION,
)
from assets.partitions import dataset_versions, midi_shards
from meloformer_model.atomic import write_bytes_atomic
from meloformer_model.data import stages
from meloformer_model.data.corpus import reason_counts
from meloformer_model.data.dataset import bucket_counts, build_arrow_dataset
from meloformer_model.data.shards import (
    fingerprint,
    load_registry,
    plan_shards,
    shard_files,
    shard_fingerprints,
)
from meloformer_model.data.stages import built_from, write_stage_output
from meloformer_model.tokenizer.chords import CHORD_NAMES
from meloformer_model.tokenizer.vocab import Vocabulary
from pipelines.resources import CorpusStorage

LATEST = "LATEST"


def _frame_version(frame: pl.DataFrame, columns: list[str], stage_version: str) -> str:
    """A data version from the columns that identify an output's inputs, and the stage's version
    (its config and code): the same files through changed code make another version, so the UI
    marks what is downstream of it unsynced."""
    digest = hashlib.blake2b(digest_size=16)
    for row in frame.select(columns).sort("path").iter_rows():
        digest.update(repr(row).encode())
    return f"{stage_version}-{digest.hexdigest()}"


def _markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _previous(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.exists() else None


def _shard_output(storage: CorpusStorage, asset: str, version: str, shard: str) -> Path:
    return storage.stage_dir(asset, version) / f"{shard}.parquet"


def _upstream(storage: CorpusStorage, asset: str, version: str, shard: str) -> Path:
    """The shard's output of ``asset``, refused by name when it was not materialized (for the
    current code version)."""
    path = _shard_output(storage, asset, version, shard)
    if not path.exists():
        raise dg.Failure(
            f"{shard}: {asset} has no output for its current code version ({path}): materialize "
            f"{asset} for {shard} first"
        )
    return path


# The decorator is beta in Dagster 1.13: its warning would open the output of every run and test.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)

    @dg.observable_source_asset(
        partitions_def=midi_shards,
        description="The source MIDI folder, per shard: a fingerprint of its files' contents.",
        group_name="corpus",
    )
    def midi_corpus(context, storage: CorpusStorage) -> dg.DataVersionsByPartition:
        """Per registered shard, the fingerprint of its files as they are now: a changed file
        marks its own shard's outputs unsynced in the UI, not every shard's. New files wait for
        the refresh (sensor, schedule or ``make run``), which registers their shards and records
        this asset's version of them before their first run (``refresh.observe_corpus``)."""
        plan = plan_shards(
            storage.corpus_path, load_registry(storage.registry_path), storage.shard_size
        )
        listing = plan.registry
        context.log.info(
            f"{storage.corpus_path}: {listing.height} files, {int(listing['size'].sum() or 0):,} "
            f"bytes, {len(plan.to_process)} shard(s) new or changed"
        )
        registered = set(context.instance.get_dynamic_partitions(midi_shards.name))
        return dg.DataVersionsByPartition(
            {
                shard: dg.DataVersion(digest)
                for shard, digest in shard_fingerprints(listing).items()
                if shard in registered
            }
        )


@dg.asset(
    deps=[midi_corpus],
    partitions_def=midi_shards,
    code_version=FILTER_VERSION,
    group_name="corpus",
    description="Per shard: every file with its quality verdict, reason and statistics.",
)
def filtered_midi(
    context: dg.AssetExecutionContext, storage: CorpusStorage
) -> dg.MaterializeResult:
    shard = context.partition_key
    files = shard_files(load_registry(storage.registry_path), shard)
    if files.is_empty():
        raise dg.Failure(
            f"{shard} has no files in the corpus registry {storage.registry_path}: partitions are "
            "added by the refresh sensor or schedule (or `make run`), not by hand"
        )
    out = _shard_output(storage, "filtered_midi", FILTER_VERSION, shard)
    result = stages.filter_shard(
        storage.corpus_path, files, FILTER_CONFIG, _previous(out), storage.n_workers
    )
    write_stage_output(result.table, out, fingerprint(files))
    table = result.table
    accepted = int(table["accepted"].sum())
    reasons = reason_counts(table)
    context.log.info(
        f"{shard}: {table.height} files, {accepted} accepted, {table.height - accepted} rejected "
        f"({result.reused} reused, {result.computed} inspected)"
    )
    examples = table.filter(~pl.col("accepted")).group_by("reason").agg(pl.col("message").first())
    example = dict(examples.iter_rows())
    return dg.MaterializeResult(
        data_version=dg.DataVersion(
            _frame_version(
                table, ["path", "file_hash", "accepted", "reason", "content_hash"], FILTER_VERSION
            )
        ),
        metadata={
            "files": table.height,
            "accepted": accepted,
            "rejected": table.height - accepted,
            "reused": result.reused,
            "inspected": result.computed,
            "rejection_reasons": dg.MetadataValue.md(
                _markdown_table(
                    ["reason", "files", "example"],
                    [[r, n, example.get(r, "")] for r, n in reasons.items()],
                )
                if reasons
                else "no rejections"
            ),
            "path": dg.MetadataValue.path(str(out)),
        },
    )


@dg.asset(
    deps=[filtered_midi],
    partitions_def=midi_shards,
    code_version=CHORD_VERSION,
    group_name="corpus",
    description="Per shard: one chord per bar for every accepted file (217-chord vocabulary).",
)
def chord_annotations(
    context: dg.AssetExecutionContext, storage: CorpusStorage
) -> dg.MaterializeResult:
    shard = context.partition_key
    source = _upstream(storage, "filtered_midi", FILTER_VERSION, shard)
    filtered = pl.read_parquet(source)
    out = _shard_output(storage, "chord_annotations", CHORD_VERSION, shard)
    result = stages.chord_shard(
        storage.corpus_path,
        filtered.filter(pl.col("accepted")),
        TOKENIZER_CONFIG,
        _previous(out),
        storage.n_workers,
    )
    write_stage_output(result.table, out, built_from(source))
    table = result.table
    chords = table["chords"].explode().drop_nulls().to_numpy()
    counts = np.bincount(chords.astype(np.int64), minlength=len(CHORD_NAMES)) if len(chords) else []
    top = np.argsort(counts)[::-1][:10] if len(chords) else []
    errors = table.filter(pl.col("error").is_not_null())["error"].to_list()
    for error in errors:
        context.log.warning(error)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(
            _frame_version(table, ["path", "file_hash", "error"], CHORD_VERSION)
        ),
        metadata={
            "files": table.height,
            "bars": int(len(chords)),
            "errors": len(errors),
            "reused": result.reused,
            "annotated": result.computed,
            "most_common_chords": dg.MetadataValue.md(
                _markdown_table(
                    ["chord", "bars"], [[CHORD_NAMES[i], int(counts[i])] for i in top if counts[i]]
                )
            ),
            "path": dg.MetadataValue.path(str(out)),
        },
    )


@dg.asset(
    deps=[chord_annotations],
    partitions_def=midi_shards,
    code_version=TOKEN_VERSION,
    group_name="corpus",
    description="Per shard: HID token ids and side information (bar, instrument, type, onset).",
)
def hid_tokens(context: dg.AssetExecutionContext, storage: CorpusStorage) -> dg.MaterializeResult:
    shard = context.partition_key
    source = _upstream(storage, "chord_annotations", CHORD_VERSION, shard)
    chords = pl.read_parquet(source)
    out = _shard_output(storage, "hid_tokens", TOKEN_VERSION, shard)
    result = stages.token_shard(
        storage.corpus_path, chords, TOKENIZER_CONFIG, _previous(out), storage.n_workers
    )
    write_stage_output(result.table, out, built_from(source))
    table = result.table.filter(pl.col("error").is_null())
    vocab = Vocabulary(TOKENIZER_CONFIG)
    ids = table["ids"].explode().to_numpy()
    vocab.add_counts(ids)
    counts_path = out.with_suffix(".counts.json")
    write_bytes_atomic(counts_path, json.dumps(vocab.counts.tolist()).encode())
    lengths = table["length"].to_numpy()
    buckets = bucket_counts(lengths, DATASET_CONFIG.bucket_size)
    errors = result.table.filter(pl.col("error").is_not_null())["error"].to_list()
    for error in errors:
        context.log.warning(error)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(
            _frame_version(result.table, ["path", "file_hash", "error"], TOKEN_VERSION)
        ),
        metadata={
            "files": table.height,
            "tokens": int(lengths.sum()),
            "errors": len(errors),
            "reused": result.reused,
            "tokenized": result.computed,
            "median_length": int(np.median(lengths)) if len(lengths) else 0,
            "length_histogram": dg.MetadataValue.md(
                _markdown_table(
                    ["tokens", "sequences", "total tokens"],
                    [[k, v["sequences"], v["tokens"]] for k, v in buckets.items()],
                )
            ),
            "path": dg.MetadataValue.path(str(out)),
        },
    )


def current_shards(instance: dg.DagsterInstance, storage: CorpusStorage) -> list[str]:
    """Shards registered in the instance and still present in the corpus registry."""
    registry = load_registry(storage.registry_path)
    registered = set(instance.get_dynamic_partitions(midi_shards.name))
    return sorted(registered & set(registry["shard"].unique().to_list()))


def token_files(storage: CorpusStorage, shards: list[str]) -> dict[str, Path]:
    """The hid_tokens output of each shard (for the current token version)."""
    return {s: _shard_output(storage, "hid_tokens", TOKEN_VERSION, s) for s in shards}


@dg.asset(
    deps=[hid_tokens],
    code_version=VOCABULARY_VERSION,
    group_name="corpus",
    description="The HID vocabulary (JSON: ids, families, config hash, corpus token counts).",
)
def vocabulary(context: dg.AssetExecutionContext, storage: CorpusStorage) -> dg.MaterializeResult:
    vocab = Vocabulary(TOKENIZER_CONFIG)
    shards = current_shards(context.instance, storage)
    if not shards:
        raise dg.Failure(
            f"no corpus shard is registered for {storage.corpus_path}: run the refresh (the "
            "sensor, the schedule or `make run`) and materialize hid_tokens first"
        )
    for shard in shards:
        counts = _shard_output(storage, "hid_tokens", TOKEN_VERSION, shard).with_suffix(
            ".counts.json"
        )
        if not counts.exists():
            raise dg.Failure(f"hid_tokens has not been materialized for {shard} ({counts} missing)")
        vocab.counts += np.asarray(json.loads(counts.read_text()), dtype=np.int64)
    digest = hashlib.blake2b(vocab.counts.tobytes(), digest_size=8).hexdigest()
    out = storage.stage_dir("vocabulary", VOCABULARY_VERSION) / f"vocab-{digest}.json"
    vocab.save(out)
    write_bytes_atomic(out.parent / LATEST, out.name.encode())
    used = int((vocab.counts > 0).sum())
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{VOCABULARY_VERSION}-{digest}"),
        metadata={
            "size": len(vocab),
            "tokens_used": used,
            "corpus_tokens": int(vocab.counts.sum()),
            "shards": len(shards),
            "config_hash": vocab.config_hash(),
            "path": dg.MetadataValue.path(str(out)),
        },
    )


def latest_vocabulary_path(storage: CorpusStorage) -> Path:
    folder = storage.stage_dir("vocabulary", VOCABULARY_VERSION)
    if not (folder / LATEST).exists():
        raise dg.Failure(f"no vocabulary in {folder}: materialize vocabulary first")
    return folder / (folder / LATEST).read_text().strip()


def latest_dataset_path(storage: CorpusStorage) -> Path | None:
    pointer = storage.stage_dir("arrow_dataset", DATASET_VERSION) / LATEST
    if not pointer.exists():
        return None
    return pointer.parent / pointer.read_text().strip()


@dg.asset(
    deps=[hid_tokens, vocabulary],
    code_version=DATASET_VERSION,
    group_name="corpus",
    description="train/valid/test Arrow dataset (datasets.load_from_disk), length-bucket metadata.",
)
def arrow_dataset(
    context: dg.AssetExecutionContext, storage: CorpusStorage
) -> dg.MaterializeResult:
    shards = current_shards(context.instance, storage)
    tokens = token_files(storage, shards)
    missing = [str(p) for p in tokens.values() if not p.exists()]
    if missing:
        raise dg.Failure(f"hid_tokens missing for {len(missing)} shard(s): {missing[:3]}")
    vocab = Vocabulary.load(latest_vocabulary_path(storage), expected=TOKENIZER_CONFIG)
    root = storage.stage_dir("arrow_dataset", DATASET_VERSION)
    build = build_arrow_dataset(
        tokens,
        root,
        DATASET_CONFIG,
        vocab.config_hash(),
        TOKEN_VERSION,
        latest_dataset_path(storage),
    )
    write_bytes_atomic(root / LATEST, build.version.encode())
    context.instance.add_dynamic_partitions(dataset_versions.name, [build.version])
    context.log.info(
        f"dataset {build.version}: wrote {len(build.written_shards)} shard(s), "
        f"linked {len(build.linked_shards)} unchanged"
    )
    splits = build.manifest["splits"]
    rows = [
        [split, bucket, c["sequences"], c["tokens"]]
        for split, info in splits.items()
        for bucket, c in info["buckets"].items()
    ]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(build.version),
        metadata={
            **{f"{s}_sequences": splits[s]["sequences"] for s in splits},
            **{f"{s}_tokens": splits[s]["tokens"] for s in splits},
            "bucket_size": DATASET_CONFIG.bucket_size,
            "length_buckets": dg.MetadataValue.md(
                _markdown_table(["split", "tokens", "sequences", "total tokens"], rows)
            ),
            "shards_written": len(build.written_shards),
            "shards_linked": len(build.linked_shards),
            "path": dg.MetadataValue.path(str(build.path)),
        },
    )
