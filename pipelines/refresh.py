"""Corpus refresh: find new and changed files, register new shards, say which shards to run."""

from dataclasses import dataclass

from dagster import DagsterInstance

from assets.partitions import midi_shards
from meloformer_model.data.shards import load_registry, plan_shards, save_registry
from pipelines.resources import CorpusStorage


@dataclass
class Refresh:
    new_shards: list[str]
    to_run: list[str]
    files: int


def plan_refresh(storage: CorpusStorage, instance: DagsterInstance) -> Refresh:
    """Update the registry; shards to run are new, changed, or not yet partitions.

    The registry is saved before any run is requested, so a crash in between only means the
    next refresh requests the same shards again.
    """
    plan = plan_shards(
        storage.corpus_path, load_registry(storage.registry_path), storage.shard_size
    )
    save_registry(plan.registry, storage.registry_path)
    known = set(instance.get_dynamic_partitions(midi_shards.name))
    new = [s for s in plan.shards if s not in known]
    return Refresh(
        new_shards=new, to_run=sorted(set(plan.to_process) | set(new)), files=plan.registry.height
    )
