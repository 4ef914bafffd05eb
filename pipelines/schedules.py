"""A scheduled corpus refresh for folders that are filled by other tools."""

import os

import dagster as dg

from assets.partitions import midi_shards
from pipelines.jobs import shard_job
from pipelines.refresh import plan_refresh
from pipelines.resources import CorpusStorage

REFRESH_CRON_ENV = "MELOFORMER_REFRESH_CRON"
DEFAULT_REFRESH_CRON = "0 3 * * *"


@dg.schedule(
    job=shard_job,
    cron_schedule=os.environ.get(REFRESH_CRON_ENV, DEFAULT_REFRESH_CRON),
    description="Re-scan the corpus folder and run new or changed shards, and any shard whose "
    "output is missing.",
)
def corpus_refresh_schedule(context: dg.ScheduleEvaluationContext, storage: CorpusStorage):
    refresh = plan_refresh(storage, context.instance)
    if refresh.new_shards:
        context.instance.add_dynamic_partitions(midi_shards.name, refresh.new_shards)
    if not refresh.to_run:
        return dg.SkipReason(f"no new or changed files among {refresh.files}")
    return [dg.RunRequest(run_key=refresh.run_keys[s], partition_key=s) for s in refresh.to_run]
