"""A scheduled corpus refresh for folders that are filled by other tools."""

import os

import dagster as dg
from dagster._utils.schedules import is_valid_cron_string  # Dagster's own check (pinned)

from assets.partitions import midi_shards
from pipelines.jobs import IN_PROGRESS, PARTITION_TAG, shard_job
from pipelines.refresh import observe_corpus, plan_refresh
from pipelines.resources import CorpusStorage

REFRESH_CRON_ENV = "MELOFORMER_REFRESH_CRON"
DEFAULT_REFRESH_CRON = "0 3 * * *"


def refresh_cron() -> str:
    """The refresh schedule the environment sets, refused in one line when it is no cron string
    (Dagster's own refusal is a traceback when the definitions load)."""
    cron = os.environ.get(REFRESH_CRON_ENV) or DEFAULT_REFRESH_CRON
    if not is_valid_cron_string(cron):
        raise ValueError(
            f"{REFRESH_CRON_ENV}={cron!r}: not a cron schedule (minute hour day month weekday, "
            f"e.g. {DEFAULT_REFRESH_CRON!r})"
        )
    return cron


@dg.schedule(
    job=shard_job,
    cron_schedule=refresh_cron(),
    description="Re-scan the corpus folder and run new or changed shards, and any shard whose "
    "output is missing.",
)
def corpus_refresh_schedule(context: dg.ScheduleEvaluationContext, storage: CorpusStorage):
    refresh = plan_refresh(storage, context.instance)
    if refresh.new_shards:
        context.instance.add_dynamic_partitions(midi_shards.name, refresh.new_shards)
    observe_corpus(context.instance, refresh)
    # a schedule's run keys only deduplicate within one tick: a shard still queued or running
    # from an earlier tick (or the sensor) is not requested again
    busy = _shards_in_progress(context.instance)
    to_run = [s for s in refresh.to_run if s not in busy]
    if not to_run:
        reason = "shard runs already in progress" if refresh.to_run else "no new or changed files"
        return dg.SkipReason(f"{reason} among {refresh.files} files")
    return [dg.RunRequest(run_key=refresh.run_keys[s], partition_key=s) for s in to_run]


def _shards_in_progress(instance: dg.DagsterInstance) -> set[str]:
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=shard_job.name, statuses=IN_PROGRESS)
    )
    return {r.dagster_run.tags.get(PARTITION_TAG) for r in records} - {None}
