"""Jobs: the per-shard corpus stages, and the corpus-wide vocabulary + dataset."""

import dagster as dg

from assets.corpus import arrow_dataset, chord_annotations, filtered_midi, hid_tokens, vocabulary
from assets.partitions import dataset_versions, midi_shards
from assets.training import evaluation_report, trained_model

# Run states of a run that has not ended, and the tag naming a run's partition
IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
PARTITION_TAG = "dagster/partition"

shard_job = dg.define_asset_job(
    "shard_job",
    selection=dg.AssetSelection.assets(filtered_midi, chord_annotations, hid_tokens),
    partitions_def=midi_shards,
    description="Filter, annotate chords and tokenize one corpus shard.",
)

dataset_job = dg.define_asset_job(
    "dataset_job",
    selection=dg.AssetSelection.assets(vocabulary, arrow_dataset),
    description="Vocabulary and Arrow dataset over all shards, with the dataset checks.",
)

training_job = dg.define_asset_job(
    "training_job",
    selection=dg.AssetSelection.assets(trained_model, evaluation_report),
    partitions_def=dataset_versions,
    description="Train on one dataset version, then evaluate the best checkpoint.",
)
