"""The Dagster code location: ``dagster dev -w workspace.yaml`` loads ``defs``."""

import dagster as dg

from assets import checks, corpus, reports, training
from pipelines.jobs import dataset_job, shard_job, training_job
from pipelines.resources import storage_from_env, training_from_env
from pipelines.schedules import corpus_refresh_schedule
from pipelines.sensors import dataset_after_shards_sensor, midi_corpus_sensor

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([corpus, training, reports]),
    asset_checks=dg.load_asset_checks_from_modules([checks]),
    jobs=[shard_job, dataset_job, training_job],
    schedules=[corpus_refresh_schedule],
    sensors=[midi_corpus_sensor, dataset_after_shards_sensor],
    resources={
        "storage": storage_from_env(),
        "training": training_from_env(),
        "pipes": dg.PipesSubprocessClient(),
    },
)
