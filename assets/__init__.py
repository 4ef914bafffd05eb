"""Dagster asset and asset-check definitions: thin wrappers over ``meloformer_model``."""
