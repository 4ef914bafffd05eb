"""Blocking checks on the Arrow dataset: a failing one stops training from using it.

The checks run in one step that opens the dataset version once (its per-shard Arrow
streams memory-mapped, the files ``datasets.load_from_disk`` reads) and scans only the columns
each needs (``meloformer_model.data.dataset_checks``). Each is still its own asset check (name,
result, metadata), and each blocks.
"""

from collections.abc import Iterator

import dagster as dg

from assets.corpus import arrow_dataset, latest_dataset_path, latest_vocabulary_path
from meloformer_model.data.dataset_checks import CHECK_DESCRIPTIONS, CHECK_NAMES, evaluate
from pipelines.resources import CorpusStorage


def _result(name: str, passed: bool, metadata: dict) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=arrow_dataset.key,
        check_name=name,
        passed=bool(passed),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=metadata,
    )


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(name, asset=arrow_dataset, blocking=True, description=text)
        for name, text in CHECK_DESCRIPTIONS.items()
    ],
    can_subset=True,
    description="The dataset's blocking checks, over one memory-mapped open of the dataset.",
)
def arrow_dataset_checks(
    context: dg.AssetCheckExecutionContext, storage: CorpusStorage
) -> Iterator[dg.AssetCheckResult]:
    path = latest_dataset_path(storage)
    if path is None:
        raise dg.Failure("arrow_dataset has not been materialized")
    selected = {key.name for key in context.selected_asset_check_keys}
    names = tuple(n for n in CHECK_NAMES if n in selected)
    for name, (passed, metadata) in evaluate(path, latest_vocabulary_path(storage), names).items():
        yield _result(name, passed, {"dataset": dg.MetadataValue.path(str(path)), **metadata})
