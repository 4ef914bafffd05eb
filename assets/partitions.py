"""The dynamic partitions: corpus shards (added by the refresh sensor, schedule or ``make run``)
and dataset versions (added by ``arrow_dataset``, one training partition each)."""

import dagster as dg

midi_shards = dg.DynamicPartitionsDefinition(name="midi_shards")
dataset_versions = dg.DynamicPartitionsDefinition(name="dataset_versions")
