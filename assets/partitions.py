"""Corpus shards: one dynamic partition per shard, added by the refresh sensor or schedule."""

import dagster as dg

midi_shards = dg.DynamicPartitionsDefinition(name="midi_shards")
