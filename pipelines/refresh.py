"""Corpus refresh: find new and changed files, register new shards, say which shards to run,
whether the dataset built last is still the one the shards make, and whether its training run
and evaluation report are still current."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster import DagsterEventType, DagsterInstance
from dagster._core.definitions.data_version import DATA_VERSION_TAG  # Dagster's (pinned)

from assets.config import (
    CHORD_VERSION,
    DATASET_CONFIG,
    FILTER_VERSION,
    TOKEN_VERSION,
    VOCABULARY_VERSION,
)
from assets.corpus import (
    LATEST,
    arrow_dataset,
    current_shards,
    hid_tokens,
    latest_dataset_path,
    midi_corpus,
    token_files,
    vocabulary,
)
from assets.partitions import midi_shards
from assets.training import (
    TRAINING_CODE_VERSION,
    evaluation_report,
    trained_model,
    training_run_dir,
)
from meloformer_model.data.dataset import plan_dataset
from meloformer_model.data.dataset_checks import CHECK_NAMES
from meloformer_model.data.shards import (
    load_registry,
    plan_shards,
    save_registry,
    shard_fingerprints,
)
from meloformer_model.data.stages import built_from
from pipelines.resources import CorpusStorage, TrainingSettings


@dataclass
class Refresh:
    new_shards: list[str]
    to_run: list[str]
    files: int
    run_keys: dict[str, str]
    fingerprints: dict[str, str]  # shard -> the fingerprint of its files, as registered now


def plan_refresh(storage: CorpusStorage, instance: DagsterInstance) -> Refresh:
    """Update the registry; shards to run are new, changed, not yet partitions, or without
    ``hid_tokens`` output built from the shard's files as the registry now has them (none for
    the current code versions, or one a failed, cancelled or killed run left from before a
    change: ``built_from``), so re-running always completes the corpus.

    The registry is saved before any run is requested; a run that never happens or fails leaves
    its shard's token file out of date, so the next refresh requests the shard again.
    ``run_keys`` name a shard's contents and the code versions: a sensor requests each such
    state once.
    """
    plan = plan_shards(
        storage.corpus_path, load_registry(storage.registry_path), storage.shard_size
    )
    save_registry(plan.registry, storage.registry_path)
    known = set(instance.get_dynamic_partitions(midi_shards.name))
    new = [s for s in plan.shards if s not in known]
    built = shard_fingerprints(plan.registry)
    tokens = token_files(storage, plan.shards)
    unfinished = [s for s, path in tokens.items() if built_from(path) != built[s]]
    to_run = sorted(set(plan.to_process) | set(new) | set(unfinished))
    versions = (FILTER_VERSION, CHORD_VERSION, TOKEN_VERSION)
    keys = {shard: f"{shard}-{_digest((built[shard], versions))}" for shard in to_run}
    return Refresh(new, to_run, plan.registry.height, keys, built)


def _digest(value) -> str:
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


def observe_corpus(instance: DagsterInstance, refresh: Refresh) -> int:
    """Record ``midi_corpus``'s data version of each shard to run whose files changed since its
    last observation, before its run: Dagster compares a shard's outputs with the source's
    version they were built from, so a later change marks exactly that shard unsynced in the UI
    (without an observation before the first run there is nothing to compare). Once per shard
    state, however many ticks request it; shards must be registered. Returns how many."""
    if not refresh.to_run:
        return 0
    latest = instance.event_log_storage.get_latest_tags_by_partition(  # one query for all
        midi_corpus.key, DagsterEventType.ASSET_OBSERVATION, [DATA_VERSION_TAG], refresh.to_run
    )
    recorded = 0
    for shard in refresh.to_run:
        if latest.get(shard, {}).get(DATA_VERSION_TAG) != refresh.fingerprints[shard]:
            instance.report_runless_asset_event(
                dg.AssetObservation(
                    midi_corpus.key,
                    partition=shard,
                    tags={DATA_VERSION_TAG: refresh.fingerprints[shard]},
                )
            )
            recorded += 1
    return recorded


def current_dataset(storage: CorpusStorage, instance: DagsterInstance) -> Path | None:
    """The latest dataset version if rebuilding would give the same one and its blocking checks
    passed on it; None when ``dataset_job`` has to run.

    Current means: it is the latest ``arrow_dataset`` materialization; no ``hid_tokens``
    materialization came after it or after the latest ``vocabulary``, and no ``vocabulary`` after
    it; every check's latest evaluation passed and targeted that materialization; and the version
    ``build_arrow_dataset`` would compute now from the current shards' token files (content
    hashes and the vocabulary config) is its version.
    """
    path = latest_dataset_path(storage)
    latest = instance.fetch_materializations(arrow_dataset.key, limit=1).records
    vocab = instance.fetch_materializations(vocabulary.key, limit=1).records
    if path is None or not latest or not vocab:
        return None
    record = latest[0]
    recorded_path = record.asset_materialization.metadata.get("path")
    if recorded_path is None or recorded_path.value != str(path):
        return None
    since = {
        hid_tokens.key: min(record.storage_id, vocab[0].storage_id),
        vocabulary.key: record.storage_id,
    }
    for upstream, storage_id in since.items():
        after = dg.AssetRecordsFilter(asset_key=upstream, after_storage_id=storage_id)
        if instance.fetch_materializations(after, limit=1).records:
            return None
    for name in CHECK_NAMES:
        check = instance.get_latest_asset_check_evaluation_record(
            dg.AssetCheckKey(arrow_dataset.key, name)
        )
        evaluation = check.evaluation if check is not None else None
        target = evaluation.target_materialization_data if evaluation is not None else None
        if not (evaluation and evaluation.passed and target):
            return None
        if target.storage_id != record.storage_id:
            return None
    tokens = token_files(storage, current_shards(instance, storage))
    if not tokens or not all(p.exists() for p in tokens.values()):
        return None
    vocabulary_pointer = storage.stage_dir("vocabulary", VOCABULARY_VERSION) / LATEST
    if not vocabulary_pointer.exists():
        return None
    if plan_dataset(tokens, DATASET_CONFIG, VOCABULARY_VERSION, TOKEN_VERSION).version != path.name:
        return None
    return path


def current_training(
    storage: CorpusStorage, instance: DagsterInstance, training: TrainingSettings, dataset: Path
) -> bool:
    """Whether ``training_job`` would change nothing on this dataset version: its training run
    finished with the current config (``trained_model`` would only reuse it), the partition's
    latest ``trained_model`` materialization reports that run's checkpoint, and an
    ``evaluation_report`` came after that materialization, both from the current code."""
    from meloformer_model.training.trainer import completed_run  # torch: not with the definitions

    version = dataset.name
    run_dir = training_run_dir(storage, training, version)
    done = completed_run(run_dir, training.config(), dataset)
    model, report = (
        _latest(instance, key, version) for key in (trained_model.key, evaluation_report.key)
    )
    if done is None or model is None or report is None:
        return False
    checkpoint = model.asset_materialization.metadata.get("checkpoint")
    return (
        checkpoint is not None
        and checkpoint.value == done["checkpoint"]
        and report.storage_id > model.storage_id
        and all(_code_version(r) == TRAINING_CODE_VERSION for r in (model, report))
    )


def _code_version(record: dg.EventLogRecord) -> str | None:
    return record.asset_materialization.tags.get("dagster/code_version")


def _latest(
    instance: DagsterInstance, key: dg.AssetKey, partition: str
) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None
