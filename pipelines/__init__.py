"""Dagster definitions, jobs, schedules, sensors and resources for MeloFormer Pipelines."""
