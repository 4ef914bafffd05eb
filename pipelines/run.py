"""The main job: refresh the shards, run the new or changed ones, build vocabulary and dataset,
train the profile's model on that dataset version and write its evaluation report.

``make run`` calls this on the project's Dagster instance (``DAGSTER_HOME``), so every run it
makes shows up in the UI with its metadata and lineage.
"""

import argparse
import sys

import dagster as dg

from assets.corpus import latest_dataset_path, latest_vocabulary_path
from assets.partitions import midi_shards
from meloformer_model.data.parallel import release_freed_memory
from pipelines.jobs import dataset_job, shard_job, training_job
from pipelines.refresh import current_dataset, current_training, observe_corpus, plan_refresh
from pipelines.resources import storage_from_env, training_from_env

QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def run_corpus_pipeline(instance: dg.DagsterInstance) -> bool:
    from pipelines.definitions import defs  # its resources read the environment's settings

    storage = storage_from_env()
    refresh = plan_refresh(storage, instance)
    instance.add_dynamic_partitions(midi_shards.name, refresh.new_shards)
    observe_corpus(instance, refresh)
    print(f"corpus {storage.corpus_path}: {refresh.files} files, "
          f"{len(refresh.to_run)} shard(s) to process")  # fmt: skip
    shards = defs.resolve_job_def(shard_job.name)
    for shard in refresh.to_run:
        result = shards.execute_in_process(
            instance=instance, partition_key=shard, run_config=QUIET, raise_on_error=False
        )
        if not result.success:
            _report_failure(result, f"shard {shard}")
            return False
        print(f"  {shard}: done")
        del result
        release_freed_memory()
    dataset = None if refresh.to_run else current_dataset(storage, instance)
    if dataset is not None:  # nothing changed since the dataset was built and checked
        print(f"  dataset {dataset.name} is current and its checks passed: dataset_job skipped")
        built = True
    else:
        result = defs.resolve_job_def(dataset_job.name).execute_in_process(
            instance=instance, run_config=QUIET, raise_on_error=False
        )
        for evaluation in result.get_asset_check_evaluations():
            status = "passed" if evaluation.passed else "FAILED"
            print(f"  check {evaluation.check_name}: {status}")
        dataset, built = latest_dataset_path(storage), result.success
        if not built:
            _report_failure(result, "dataset_job")
    print(f"artifacts under {storage.root}; dataset: {dataset}")
    if not built:
        return False
    if current_training(storage, instance, training_from_env(), dataset):
        print(f"  training on {dataset.name} finished and evaluated: training_job skipped")
    else:
        result = defs.resolve_job_def(training_job.name).execute_in_process(
            instance=instance, partition_key=dataset.name, run_config=QUIET, raise_on_error=False
        )
        if not result.success:
            _report_failure(result, f"training_job on {dataset.name}")
            return False
    print(f"  vocabulary: {latest_vocabulary_path(storage)}")
    for asset in ("trained_model", "evaluation_report"):  # this dataset version's
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[dataset.name]),
            limit=1,
        ).records
        meta = records[0].asset_materialization.metadata
        for key in (
            "checkpoint",
            "best_checkpoint",
            "val_loss",
            "unigram_loss",
            "tokens_per_second",
            "report",
            "sample_folder",
            "validation_perplexity",
        ):
            if key in meta:
                print(f"  {asset}.{key}: {meta[key].value}")
    return True


def _report_failure(result: dg.ExecuteInProcessResult, what: str) -> None:
    """Each failed step's error in a line (its stack trace is in the run's logs in the UI)."""
    for event in result.get_step_failure_events():
        error = event.event_specific_data.error
        while error is not None and error.cause is not None:  # Dagster wraps the step's error
            error = error.cause
        message = " ".join(error.message.split()) if error else "failed"
        print(f"{what}: step {event.step_key} failed: {message}", file=sys.stderr)
    print(f"{what} failed (run {result.run_id}); see it in the Dagster UI", file=sys.stderr)


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    with dg.DagsterInstance.get() as instance:
        try:
            ok = run_corpus_pipeline(instance)
        except (FileNotFoundError, ValueError) as exc:  # settings and folders, named
            print(f"meloformer run: {exc}", file=sys.stderr)
            ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
