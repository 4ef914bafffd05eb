"""The corpus asset graph materialized on real music in an ephemeral instance: outputs, metadata,
checks, refreshes that touch only new or changed shards, sensor and schedule, crash safety."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import datasets
import polars as pl
import pyarrow as pa
import pytest
from symusic import Score

from assets import checks
from assets.config import TOKEN_VERSION
from assets.corpus import (
    arrow_dataset,
    chord_annotations,
    filtered_midi,
    hid_tokens,
    latest_dataset_path,
    latest_vocabulary_path,
    vocabulary,
)
from assets.partitions import midi_shards
from meloformer_model.data import dataset_checks
from meloformer_model.data.corrupt import CORRUPT_CASES
from meloformer_model.data.dataset import MANIFEST, SCHEMA
from pipelines.jobs import shard_job
from pipelines.refresh import current_dataset, observe_corpus, plan_refresh
from pipelines.resources import CorpusStorage
from pipelines.schedules import corpus_refresh_schedule
from pipelines.sensors import dataset_after_shards_sensor, midi_corpus_sensor

SHARD_ASSETS = [filtered_midi, chord_annotations, hid_tokens]
CHECKS = dg.load_asset_checks_from_modules([checks])
N_GOOD = 40
SHARD_SIZE = 16


def run_shard(storage, instance, shard) -> dg.ExecuteInProcessResult:
    result = dg.materialize(
        SHARD_ASSETS, partition_key=shard, instance=instance, resources={"storage": storage}
    )
    assert result.success
    return result


def run_dataset(storage, instance) -> dg.ExecuteInProcessResult:
    result = dg.materialize(
        [vocabulary, arrow_dataset, *CHECKS], instance=instance, resources={"storage": storage}
    )
    assert result.success
    return result


def refresh_and_run(storage, instance) -> list[str]:
    refresh = plan_refresh(storage, instance)
    instance.add_dynamic_partitions(midi_shards.name, refresh.new_shards)
    for shard in refresh.to_run:
        run_shard(storage, instance, shard)
    return refresh.to_run


def metadata(result, asset) -> dict:
    events = result.asset_materializations_for_node(asset.op.name)
    return {k: v.value for k, v in events[-1].metadata.items()}


def load_rows(storage) -> dict[str, dict[str, list]]:
    data = datasets.load_from_disk(str(latest_dataset_path(storage)))
    return {s: {row["path"]: row["ids"] for row in data[s]} for s in data}


def small_corpus(tmp_path: Path, files: list[Path], **settings) -> CorpusStorage:
    """A corpus folder holding copies of ``files``, and the storage over it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in files:
        shutil.copy(path, corpus / path.name)
    return CorpusStorage(corpus_dir=str(corpus), data_root=str(tmp_path / "data"), **settings)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, sample_files):
    """A corpus of real pieces, an exact duplicate and every corrupt case, fully materialized."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = root / "corpus"
    corpus.mkdir()
    for path in sample_files[:N_GOOD]:
        shutil.copy(path, corpus / path.name)
    shutil.copy(sample_files[0], corpus / "zz_duplicate_of_first.mid")
    for name, (make, _) in CORRUPT_CASES.items():
        (corpus / f"broken_{name}.mid").write_bytes(make())
    storage = CorpusStorage(
        corpus_dir=str(corpus), data_root=str(root / "data"), shard_size=SHARD_SIZE, workers=2
    )
    instance = dg.DagsterInstance.ephemeral()
    shards = refresh_and_run(storage, instance)
    result = run_dataset(storage, instance)
    return storage, instance, shards, result


def test_whole_graph_materializes_with_checks_passing(pipeline):
    storage, instance, shards, result = pipeline
    n_files = N_GOOD + 1 + len(CORRUPT_CASES)
    assert shards == [f"shard-{i:05d}" for i in range(-(-n_files // SHARD_SIZE))]
    assert sorted(instance.get_dynamic_partitions("midi_shards")) == shards
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations == dict.fromkeys(dataset_checks.CHECK_NAMES, True)
    rows = load_rows(storage)
    dataset_paths = {p for split in rows.values() for p in split}
    filtered = pl.concat(
        [pl.read_parquet(p) for p in Path(storage.data_root).glob("filtered_midi/*/*.parquet")]
    )
    accepted = set(filtered.filter(pl.col("accepted"))["path"])
    # The copy sits in another shard than its original: accepted there, dropped from the dataset.
    assert "zz_duplicate_of_first.mid" in accepted
    assert dataset_paths == accepted - {"zz_duplicate_of_first.mid"}
    assert len(dataset_paths) >= N_GOOD - 2
    meta = metadata(result, arrow_dataset)
    assert sum(meta[f"{s}_sequences"] for s in ("train", "valid", "test")) == len(dataset_paths)
    assert meta["bucket_size"] == 512 and "| train |" in meta["length_buckets"]
    manifest = json.loads((latest_dataset_path(storage) / "meloformer_dataset.json").read_text())
    assert manifest["splits"]["train"]["sequences"] == meta["train_sequences"]
    assert sum(b["sequences"] for b in manifest["splits"]["train"]["buckets"].values()) == len(
        rows["train"]
    )


def test_corrupt_files_land_in_the_rejection_table(pipeline):
    storage, _, shards, _ = pipeline
    tables = [pl.read_parquet(p) for p in Path(storage.data_root).glob("filtered_midi/*/*.parquet")]
    frame = pl.concat(tables)
    reasons = dict(zip(frame["path"], frame["reason"]))
    for name, (_, reason) in CORRUPT_CASES.items():
        assert reasons[f"broken_{name}.mid"] == reason.value
    assert frame.filter(pl.col("accepted")).height >= N_GOOD - 2


def test_metadata_reports_reasons_lengths_and_paths(pipeline):
    storage, instance, shards, _ = pipeline
    event = instance.get_latest_materialization_event(dg.AssetKey("filtered_midi"))
    assert event is not None
    records = instance.fetch_materializations(dg.AssetKey("filtered_midi"), limit=100).records
    texts = " ".join(
        str(r.asset_materialization.metadata["rejection_reasons"].value) for r in records
    )
    assert "unreadable" in texts and "smpte_division" in texts
    tokens = instance.get_latest_materialization_event(dg.AssetKey("hid_tokens"))
    meta = tokens.asset_materialization.metadata
    assert meta["tokens"].value > 0 and "| tokens |" in meta["length_histogram"].value
    assert Path(meta["path"].value).exists()
    # a shard stage's data version names its code and config too: the same files through
    # changed tokenizer code are another version, and the UI marks the dataset unsynced
    from assets.config import CHORD_VERSION, FILTER_VERSION

    for asset, version in (("filtered_midi", FILTER_VERSION), ("chord_annotations", CHORD_VERSION),
                           ("hid_tokens", TOKEN_VERSION)):  # fmt: skip
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event.asset_materialization.tags["dagster/data_version"].startswith(f"{version}-")


def _variant(src: Path, dest: Path, semitones: int) -> None:
    score = Score(str(src))
    for track in score.tracks:
        track.shift_pitch(semitones, inplace=True)
    score.dump_midi(str(dest))


def test_refresh_processes_only_the_new_shard_and_keeps_old_rows(pipeline, sample_files):
    storage, instance, shards, _ = pipeline
    before = load_rows(storage)
    new_names = []
    for i, path in enumerate(sample_files[N_GOOD : N_GOOD + 5]):
        name = f"new_{i}.mid"
        _variant(path, Path(storage.corpus_dir) / name, 2)
        new_names.append(name)
    ran = refresh_and_run(storage, instance)
    assert ran == [f"shard-{len(shards):05d}"]
    result = run_dataset(storage, instance)
    meta = metadata(result, arrow_dataset)
    assert (meta["shards_written"], meta["shards_linked"]) == (1, len(shards))
    after = load_rows(storage)
    old = {p: ids for split in before.values() for p, ids in split.items()}
    new = {p: ids for split in after.values() for p, ids in split.items()}
    assert set(new) - set(old) == set(new_names)
    assert all(new[p] == ids for p, ids in old.items())
    for split in before:  # a piece never changes split
        assert set(before[split]) <= set(after[split])


def test_a_shard_without_output_is_run_again(pipeline):
    """A run killed part way (or a new tokenizer version) leaves a shard without hid_tokens
    output: the next refresh runs it again, though no file changed."""
    storage, instance, _, _ = pipeline
    registry = pl.read_parquet(storage.registry_path)
    shard = registry["shard"].unique().sort()[1]
    output = storage.stage_dir("hid_tokens", TOKEN_VERSION) / f"{shard}.parquet"
    output.unlink()
    refresh = plan_refresh(storage, instance)
    assert refresh.to_run == [shard] and refresh.new_shards == []
    run_shard(storage, instance, shard)
    assert output.exists() and plan_refresh(storage, instance).to_run == []


def test_a_change_whose_run_failed_is_requested_again(pipeline):
    """The refresh saves the registry before the runs it requests. If the run never happens
    or fails, the shard's token file still holds the old file: the next refresh requests the
    shard again instead of taking that file for done."""
    storage, instance, _, _ = pipeline
    registry = pl.read_parquet(storage.registry_path)
    target = registry.filter(pl.col("path").str.starts_with("bach")).row(5, named=True)
    path = Path(storage.corpus_dir) / target["path"]
    _variant(path, path, -1)
    assert plan_refresh(storage, instance).to_run == [target["shard"]]  # its run is lost
    assert plan_refresh(storage, instance).to_run == [target["shard"]]
    result = run_shard(storage, instance, target["shard"])
    assert metadata(result, hid_tokens)["tokenized"] == 1
    tokens = pl.read_parquet(
        storage.stage_dir("hid_tokens", TOKEN_VERSION) / f"{target['shard']}.parquet"
    )
    new_hash = pl.read_parquet(storage.registry_path).filter(pl.col("path") == target["path"])
    assert tokens.filter(pl.col("path") == target["path"])["file_hash"].to_list() == (
        new_hash["file_hash"].to_list()
    )
    assert plan_refresh(storage, instance).to_run == []


def test_changed_file_reruns_only_its_shard(pipeline, sample_files):
    storage, instance, _, _ = pipeline
    registry = pl.read_parquet(storage.registry_path)
    target = registry.filter(pl.col("path").str.starts_with("bach")).row(3, named=True)
    _variant(
        Path(storage.corpus_dir) / target["path"], Path(storage.corpus_dir) / target["path"], 1
    )
    refresh = plan_refresh(storage, instance)
    assert refresh.to_run == [target["shard"]] and refresh.new_shards == []
    result = run_shard(storage, instance, target["shard"])
    meta = metadata(result, filtered_midi)
    shard_size = registry.filter(pl.col("shard") == target["shard"]).height
    assert (meta["inspected"], meta["reused"]) == (1, shard_size - 1)
    assert metadata(result, hid_tokens)["tokenized"] == 1


# Corruptions of a copy of the materialized dataset, and the checks each one must fail.
def _edit_stream(dataset: Path, split: str, edit) -> None:
    """Rewrite the split's first shard stream with ``edit(rows, dataset) -> rows``."""
    path = sorted((dataset / split).glob("data-*.arrow"))[0]
    rows = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
    rows = edit(rows, dataset)
    path.unlink()  # a fresh file, not a write through a hard link into other versions
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))


def _empty_split(dataset: Path, split: str) -> None:
    """Every shard stream of the split with no rows (a small corpus can leave valid empty)."""
    for path in sorted((dataset / split).glob("data-*.arrow")):
        path.unlink()
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA):
            pass


def _first_row(dataset: Path, split: str = "train") -> dict:
    for path in sorted((dataset / split).glob("data-*.arrow")):
        rows = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
        if rows:
            return rows[0]
    raise AssertionError(f"no rows in {dataset / split}")


def _nonempty(rows: list[dict]) -> list[dict]:
    assert rows, "the first train shard is empty"
    return rows


def _id_out_of_range(rows, dataset):
    rows = _nonempty(rows)
    rows[0]["ids"][0] = 100_000
    return rows


def _ragged(rows, dataset):
    rows = _nonempty(rows)
    rows[0]["bar"] = rows[0]["bar"][:-1]
    return rows


def _empty(rows, dataset):
    rows = _nonempty(rows)
    rows[0].update(length=0, ids=[], bar=[], instrument=[], token_type=[], onset_group=[])
    return rows


def _duplicate(rows, dataset):
    return _nonempty(rows) + [dict(rows[0], path="copy.mid")]


def _train_row_in_valid(rows, dataset):
    return rows + [dict(_first_row(dataset), path="moved.mid")]


def _edit_manifest(dataset: Path, edit) -> None:
    manifest = json.loads((dataset / MANIFEST).read_text())
    edit(manifest["splits"]["train"]["buckets"])
    (dataset / MANIFEST).write_text(json.dumps(manifest))


def _bucket_sum(buckets):
    next(iter(buckets.values()))["sequences"] += 1


def _bucket_shift(buckets):  # the sums stay right; the split into buckets does not
    full = [b for b in buckets.values() if b["sequences"]]
    assert len(full) >= 2, "needs two length buckets"
    full[0]["sequences"] -= 1
    full[1]["sequences"] += 1


def _zero_count(dataset: Path, vocab: Path) -> Path:
    data = json.loads(vocab.read_text())
    data["counts"][_first_row(dataset)["ids"][0]] = 0
    edited = dataset.parent / "vocab.json"
    edited.write_text(json.dumps(data))
    return edited


CORRUPTIONS = {
    "id_out_of_range": (lambda d: _edit_stream(d, "train", _id_out_of_range),
                        {"vocabulary_covers_dataset"}),
    "id_without_count": (None, {"vocabulary_covers_dataset"}),
    "train_row_in_valid": (lambda d: _edit_stream(d, "valid", _train_row_in_valid),
                           {"splits_do_not_overlap", "buckets_sum_to_totals"}),
    "duplicate_in_split": (lambda d: _edit_stream(d, "train", _duplicate),
                           {"splits_do_not_overlap", "buckets_sum_to_totals"}),
    "ragged_sequence": (lambda d: _edit_stream(d, "train", _ragged), {"sequences_not_empty"}),
    "empty_sequence": (lambda d: _edit_stream(d, "train", _empty),
                       {"sequences_not_empty", "buckets_sum_to_totals"}),
    "bucket_sum": (lambda d: _edit_manifest(d, _bucket_sum), {"buckets_sum_to_totals"}),
    "bucket_split": (lambda d: _edit_manifest(d, _bucket_shift), {"buckets_sum_to_totals"}),
    "empty_valid": (lambda d: _empty_split(d, "valid"),
                    {"train_and_valid_hold_pieces", "buckets_sum_to_totals"}),
    "missing_file": (lambda d: sorted((d / "test").glob("data-*.arrow"))[0].unlink(),
                     set(dataset_checks.CHECK_NAMES)),
}  # fmt: skip


def _dataset_copy(storage, tmp_path) -> Path:
    copy = tmp_path / "dataset" / latest_dataset_path(storage).name
    shutil.copytree(latest_dataset_path(storage), copy)  # real copies: edits stay in the copy
    return copy


def test_dataset_info_is_what_datasets_writes(pipeline):
    storage = pipeline[0]
    for split in ("train", "valid", "test"):
        info = json.loads((latest_dataset_path(storage) / split / "dataset_info.json").read_text())
        features = datasets.Features.from_arrow_schema(SCHEMA)
        assert datasets.Features.from_dict(info["features"]) == features
        assert info["description"] == "MeloFormer HID tokens"


def test_checks_pass_on_the_dataset(pipeline, tmp_path):
    storage = pipeline[0]
    results = dataset_checks.evaluate(
        _dataset_copy(storage, tmp_path), latest_vocabulary_path(storage)
    )
    assert {name: passed for name, (passed, _) in results.items()} == dict.fromkeys(
        dataset_checks.CHECK_NAMES, True
    )


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_each_check_fails_on_its_corruption(pipeline, tmp_path, case):
    storage = pipeline[0]
    dataset = _dataset_copy(storage, tmp_path)
    vocab = latest_vocabulary_path(storage)
    corrupt, expected = CORRUPTIONS[case]
    if corrupt is None:
        vocab = _zero_count(dataset, vocab)
    else:
        corrupt(dataset)
    results = dataset_checks.evaluate(dataset, vocab)
    failed = {name for name, (passed, _) in results.items() if not passed}
    assert failed == expected, results
    for name in dataset_checks.CHECK_NAMES:  # each check can also run alone (a subset in the UI)
        assert dataset_checks.evaluate(dataset, vocab, (name,))[name][0] == (name not in expected)


def test_failing_check_blocks_and_is_recorded(pipeline, tmp_path):
    """A corrupted dataset: the check step fails (blocking), its evaluation is recorded as
    failed (what training reads before it starts), and the dataset is no longer current."""
    storage, instance, _, _ = pipeline
    run_dataset(storage, instance)  # current: the copy's arrow_dataset step reuses its files
    root = tmp_path / "data"
    shutil.copytree(storage.root, root)  # a real copy: the edit stays out of the fixture's data
    copy = CorpusStorage(corpus_dir=storage.corpus_dir, data_root=str(root), shard_size=SHARD_SIZE)
    other = dg.DagsterInstance.ephemeral()
    other.add_dynamic_partitions(midi_shards.name, instance.get_dynamic_partitions("midi_shards"))
    _edit_stream(latest_dataset_path(copy), "train", _ragged)
    result = dg.materialize(
        [arrow_dataset, *CHECKS], instance=other, resources={"storage": copy}, raise_on_error=False
    )
    assert not result.success
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations == {
        **dict.fromkeys(dataset_checks.CHECK_NAMES, True),
        "sequences_not_empty": False,
    }
    record = other.get_latest_asset_check_evaluation_record(
        dg.AssetCheckKey(arrow_dataset.key, "sequences_not_empty")
    )
    assert record.evaluation is not None and not record.evaluation.passed
    assert current_dataset(copy, other) is None


def test_current_dataset_only_when_nothing_changed(pipeline, sample_files):
    storage, instance, _, _ = pipeline
    refresh_and_run(storage, instance)
    run_dataset(storage, instance)
    assert current_dataset(storage, instance) == latest_dataset_path(storage)
    # a dataset rebuilt without its checks is not current: its checks never ran on it
    dg.materialize([vocabulary, arrow_dataset], instance=instance, resources={"storage": storage})
    assert current_dataset(storage, instance) is None
    run_dataset(storage, instance)
    assert current_dataset(storage, instance) == latest_dataset_path(storage)
    # a shard run again: stale; the dataset rebuilt and checked without the vocabulary: still so
    run_shard(storage, instance, instance.get_dynamic_partitions("midi_shards")[0])
    assert current_dataset(storage, instance) is None
    dg.materialize([arrow_dataset, *CHECKS], instance=instance, resources={"storage": storage})
    assert current_dataset(storage, instance) is None
    run_dataset(storage, instance)
    assert current_dataset(storage, instance) == latest_dataset_path(storage)
    # new files: once their shard has run, the dataset is stale until dataset_job runs again
    _variant(sample_files[N_GOOD + 10], Path(storage.corpus_dir) / "newer.mid", 3)
    assert refresh_and_run(storage, instance)
    assert current_dataset(storage, instance) is None
    run_dataset(storage, instance)
    assert current_dataset(storage, instance) == latest_dataset_path(storage)


def test_sensor_requests_new_shards_then_skips(tmp_path, sample_files):
    storage = small_corpus(tmp_path, sample_files[:5], shard_size=3)
    corpus = Path(storage.corpus_dir)
    instance = dg.DagsterInstance.ephemeral()
    from assets.corpus import midi_corpus

    def observed() -> list[str]:
        records = instance.fetch_observations(midi_corpus.key, limit=100).records
        return sorted(r.partition_key for r in records)

    with dg.build_sensor_context(instance=instance, resources={"storage": storage}) as context:
        requests = midi_corpus_sensor(context)
        keys = ["shard-00000", "shard-00001"]
        assert [r.partition_key for r in requests] == keys
        assert sorted(instance.get_dynamic_partitions("midi_shards")) == keys
        # the source observed per new shard before its run, so later changes show as unsynced
        assert observed() == keys
        first = {r.run_key for r in requests}
        # not run yet: requested again under the same run keys, which the daemon skips, and
        # not observed again
        assert {r.run_key for r in midi_corpus_sensor(context)} == first and observed() == keys
        shutil.copy(sample_files[5], corpus / "later.mid")
        requests = midi_corpus_sensor(context)
        fresh = [r.partition_key for r in requests if r.run_key not in first]
        assert fresh == ["shard-00002"] and observed() == [*keys, "shard-00002"]
        for shard in ("shard-00000", "shard-00001", "shard-00002"):
            instance.add_dynamic_partitions("midi_shards", [shard])
            assert dg.materialize(
                SHARD_ASSETS, partition_key=shard, instance=instance, resources={"storage": storage}
            ).success
        assert isinstance(midi_corpus_sensor(context), dg.SkipReason)


def test_a_changed_file_marks_only_its_shard_unsynced(tmp_path, sample_files):
    """The source is observed per shard: a new file (a new shard, not yet registered) leaves the
    existing shards in sync, a changed file marks its own shard's outputs unsynced in the UI
    ("Materialize unsynced" then runs that shard alone)."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.definitions.observe import observe
    from dagster._core.loader import LoadingContextForTest

    from assets.corpus import midi_corpus

    storage = small_corpus(tmp_path, sample_files[:6], shard_size=3)
    corpus = Path(storage.corpus_dir)
    instance = dg.DagsterInstance.ephemeral()
    resources = {"storage": storage}
    graph = dg.Definitions(assets=[midi_corpus, *SHARD_ASSETS], resources=resources)
    refresh = plan_refresh(storage, instance)
    instance.add_dynamic_partitions(midi_shards.name, refresh.new_shards)
    assert observe_corpus(instance, refresh) == 2  # as make run, the sensor and schedule do
    for shard in refresh.to_run:
        run_shard(storage, instance, shard)

    def statuses() -> dict[str, str]:
        resolver = CachingStaleStatusResolver(
            instance, graph.resolve_asset_graph(), LoadingContextForTest(instance)
        )
        return {s: resolver.get_status(filtered_midi.key, s).value for s in refresh.to_run}

    assert statuses() == {"shard-00000": "FRESH", "shard-00001": "FRESH"}
    shutil.copy(sample_files[6], corpus / sample_files[6].name)
    later = plan_refresh(storage, instance)  # a refresh registers and observes the new shard
    instance.add_dynamic_partitions(midi_shards.name, later.new_shards)
    assert observe_corpus(instance, later) == 1 and later.new_shards == ["shard-00002"]
    assert statuses() == {"shard-00000": "FRESH", "shard-00001": "FRESH"}
    (corpus / sample_files[4].name).write_bytes(sample_files[7].read_bytes())
    observe([midi_corpus], instance=instance, resources=resources)
    assert statuses() == {"shard-00000": "FRESH", "shard-00001": "STALE"}


def _success_context(instance, run_id: str) -> dg.RunStatusSensorContext:
    """The context the daemon gives the run-status sensor for a shard run that succeeded."""
    event = next(
        e.dagster_event
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_SUCCESS"
    )
    return dg.build_run_status_sensor_context(
        sensor_name=dataset_after_shards_sensor.name,
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(run_id),
        dagster_event=event,
    )


def test_dataset_sensor_requests_one_build_per_state_of_the_shards(tmp_path, sample_files):
    """Two shard runs that end before one tick ask for one dataset build (the same run key);
    once the dataset is built after the newest shard output, a late event asks for none."""
    storage = small_corpus(tmp_path, sample_files[:6], shard_size=3)
    instance = dg.DagsterInstance.ephemeral()
    refresh = plan_refresh(storage, instance)
    instance.add_dynamic_partitions(midi_shards.name, refresh.new_shards)
    defs = dg.Definitions(assets=SHARD_ASSETS, jobs=[shard_job], resources={"storage": storage})
    job = defs.resolve_job_def(shard_job.name)
    runs = [job.execute_in_process(instance=instance, partition_key=s).run_id
            for s in refresh.to_run]  # fmt: skip
    assert len(runs) == 2
    requests = [dataset_after_shards_sensor(_success_context(instance, r)) for r in runs]
    assert all(isinstance(r, dg.RunRequest) for r in requests)
    assert requests[0].run_key == requests[1].run_key
    assert dg.materialize([vocabulary, arrow_dataset], instance=instance,
                          resources={"storage": storage}).success  # fmt: skip
    late = dataset_after_shards_sensor(_success_context(instance, runs[-1]))
    assert isinstance(late, dg.SkipReason) and "built after" in late.skip_message


def test_schedule_registers_partitions_and_requests_runs(tmp_path, sample_files):
    storage = small_corpus(tmp_path, sample_files[:4], shard_size=2)
    # Not `with instance`: dagster 1.13 leaves its defs-state storage set after __exit__,
    # which breaks later materializations in this process once the instance is collected.
    (tmp_path / "home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "home"))
    try:
        context = dg.build_schedule_context(instance=instance, resources={"storage": storage})
        requests = corpus_refresh_schedule(context)
        keys = ["shard-00000", "shard-00001"]
        assert [r.partition_key for r in requests] == keys
        assert sorted(instance.get_dynamic_partitions("midi_shards")) == keys
        # the next tick asks again for shards that have not run, then skips once they have
        assert [r.partition_key for r in corpus_refresh_schedule(context)] == keys
        # but not for a shard whose run from an earlier tick is still running
        from dagster._core.test_utils import create_run_for_test

        queued = create_run_for_test(instance, job_name="shard_job",
                                     status=dg.DagsterRunStatus.STARTED,
                                     tags={"dagster/partition": keys[0]})  # fmt: skip
        assert [r.partition_key for r in corpus_refresh_schedule(context)] == keys[1:]
        instance.report_run_canceled(queued)
        for shard in keys:
            assert dg.materialize(
                SHARD_ASSETS, partition_key=shard, instance=instance, resources={"storage": storage}
            ).success
        assert isinstance(corpus_refresh_schedule(context), dg.SkipReason)
    finally:
        instance.dispose()


KILL_MID_WRITE = """
import os, signal, sys
import pyarrow.parquet as pq
import dagster as dg
from assets.corpus import filtered_midi
from pipelines.resources import CorpusStorage

def dying_write(table, where, **kwargs):
    with open(where, "wb") as fh:
        fh.write(b"PAR1 half a parquet file")
        fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

pq.write_table = dying_write
storage = CorpusStorage(corpus_dir=sys.argv[1], data_root=sys.argv[2], shard_size=100, workers=1)
instance = dg.DagsterInstance.ephemeral()
instance.add_dynamic_partitions("midi_shards", ["shard-00000"])
dg.materialize([filtered_midi], partition_key="shard-00000", instance=instance,
               resources={"storage": storage})
"""


def test_kill_mid_write_leaves_no_artifact_and_rerun_completes(tmp_path, sample_files):
    storage = small_corpus(tmp_path, sample_files[:6], shard_size=100, workers=1)
    corpus = Path(storage.corpus_dir)
    instance = dg.DagsterInstance.ephemeral()
    plan_refresh(storage, instance)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE, str(corpus), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    outputs = list(Path(storage.data_root).glob("filtered_midi/*/*.parquet"))
    assert outputs == []  # only a hidden temp file may remain, never a half-written artifact
    instance.add_dynamic_partitions("midi_shards", ["shard-00000"])
    result = run_shard(storage, instance, "shard-00000")
    assert metadata(result, filtered_midi)["files"] == 6
    assert pl.read_parquet(metadata(result, filtered_midi)["path"]).height == 6


def test_assets_run_out_of_order_name_what_to_materialize_first(tmp_path, sample_files):
    """A shard's chords before its filter output, the vocabulary before any shard, the dataset
    before the vocabulary: each fails naming the asset to materialize first."""
    storage = small_corpus(tmp_path, sample_files[:1])
    instance = dg.DagsterInstance.ephemeral()
    resources = {"storage": storage}

    def failure(assets, **kwargs) -> str:
        result = dg.materialize(
            assets, instance=instance, resources=resources, raise_on_error=False, **kwargs
        )
        assert not result.success
        return result.get_step_failure_events()[0].event_specific_data.error.message

    assert "no corpus shard is registered" in failure([vocabulary])
    instance.add_dynamic_partitions(midi_shards.name, ["shard-00000"])
    message = failure([chord_annotations], partition_key="shard-00000")
    assert "shard-00000: filtered_midi has no output" in message
    assert "materialize filtered_midi for shard-00000 first" in message
    assert "materialize vocabulary first" in failure([arrow_dataset])


def test_a_token_code_change_is_a_new_dataset_version(pipeline):
    """The same files re-tokenized by changed token code (a new TOKEN_VERSION) make another
    dataset version: the version is not the files' keys alone, or the old dataset would be
    taken for current and keep the old tokens."""
    from assets.config import DATASET_CONFIG, VOCABULARY_VERSION
    from assets.corpus import current_shards, token_files
    from meloformer_model.data.dataset import plan_dataset

    storage, instance, _, _ = pipeline
    tokens = token_files(storage, current_shards(instance, storage))
    current = plan_dataset(tokens, DATASET_CONFIG, VOCABULARY_VERSION, TOKEN_VERSION)
    assert current.version == latest_dataset_path(storage).name
    changed = plan_dataset(tokens, DATASET_CONFIG, VOCABULARY_VERSION, "other-token-code")
    assert changed.version != current.version
    assert set(changed.fingerprints.values()).isdisjoint(current.fingerprints.values())
