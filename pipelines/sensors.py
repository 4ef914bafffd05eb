"""Notices new or changed MIDI files and requests only the affected shards."""

import dagster as dg

from assets.corpus import arrow_dataset, hid_tokens
from assets.partitions import midi_shards
from pipelines.jobs import IN_PROGRESS, dataset_job, shard_job
from pipelines.refresh import observe_corpus, plan_refresh
from pipelines.resources import CorpusStorage


@dg.sensor(
    job=shard_job,
    minimum_interval_seconds=60,
    description="Registers new shards and runs the shards whose files were added or changed.",
)
def midi_corpus_sensor(context: dg.SensorEvaluationContext, storage: CorpusStorage):
    refresh = plan_refresh(storage, context.instance)
    # registered now, not through the result: the source's observation of a new shard names it,
    # and has to be recorded before the shard's run reads it
    if refresh.new_shards:
        context.instance.add_dynamic_partitions(midi_shards.name, refresh.new_shards)
    observe_corpus(context.instance, refresh)
    if not refresh.to_run:
        return dg.SkipReason(f"no new or changed files among {refresh.files}")
    return [dg.RunRequest(run_key=refresh.run_keys[s], partition_key=s) for s in refresh.to_run]


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[shard_job],
    request_job=dataset_job,
    description="Rebuilds vocabulary and dataset once no shard run is still queued or running, "
    "once per state of the shards' outputs.",
)
def dataset_after_shards_sensor(context: dg.RunStatusSensorContext):
    """One request per newest ``hid_tokens`` output, not per shard run: shard runs that end
    before one tick (or a ``make run`` that builds the dataset itself) ask for one build."""
    active = context.instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=shard_job.name,
            statuses=IN_PROGRESS,
        ),
        limit=1,
    )
    if active:
        return dg.SkipReason("shard runs still in progress")
    instance = context.instance
    tokens = instance.fetch_materializations(hid_tokens.key, limit=1).records
    built = instance.fetch_materializations(arrow_dataset.key, limit=1).records
    if not tokens:
        return dg.SkipReason("no shard has hid_tokens output")
    if built and built[0].storage_id > tokens[0].storage_id:
        return dg.SkipReason("the dataset was built after the newest shard output")
    return dg.RunRequest(run_key=f"dataset-after-tokens-{tokens[0].storage_id}")
