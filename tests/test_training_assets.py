"""Training and evaluation assets: gated by the dataset checks, lineage to the dataset version,
metadata, and the torchrun-through-Pipes path with two CPU processes."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pydantic
import pytest
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData as Target,
)

from assets import checks
from assets.corpus import (
    arrow_dataset,
    chord_annotations,
    filtered_midi,
    hid_tokens,
    latest_vocabulary_path,
    vocabulary,
)
from assets.training import (
    dataset_path,
    evaluation_report,
    require_checks_passed,
    require_same_tokenizer,
    trained_model,
    training_run_dir,
)
from meloformer_model.data.dataset import MANIFEST
from meloformer_model.tokenizer.vocab import Vocabulary
from meloformer_model.training import config as training_config
from meloformer_model.training import trainer
from pipelines import refresh
from pipelines.definitions import defs
from pipelines.refresh import current_training, plan_refresh
from pipelines.resources import (
    PROFILE_ENV,
    STEPS_ENV,
    CorpusStorage,
    TrainingSettings,
    training_from_env,
)

CHECKS = dg.load_asset_checks_from_modules([checks])


def _corpus(root: Path, files: list[Path]) -> tuple[CorpusStorage, dg.DagsterInstance]:
    """A corpus folder of ``files`` with every shard's tokens materialized."""
    corpus = root / "corpus"
    corpus.mkdir()
    for path in files:
        shutil.copy(path, corpus / path.name)
    storage = CorpusStorage(corpus_dir=str(corpus), data_root=str(root / "data"), workers=2)
    instance = dg.DagsterInstance.ephemeral()
    refresh = plan_refresh(storage, instance)
    instance.add_dynamic_partitions("midi_shards", refresh.new_shards)
    resources = {"storage": storage}
    for shard in refresh.to_run:
        assert dg.materialize(
            [filtered_midi, chord_annotations, hid_tokens],
            partition_key=shard,
            instance=instance,
            resources=resources,
        ).success
    return storage, instance


@pytest.fixture(scope="module")
def checked(tmp_path_factory, sample_files):
    """A corpus's dataset version with its blocking checks passed: what training needs."""
    storage, instance = _corpus(tmp_path_factory.mktemp("training_assets"), sample_files[:90])
    assert dg.materialize(
        [vocabulary, arrow_dataset, *CHECKS], instance=instance, resources={"storage": storage}
    ).success
    return storage, instance, instance.get_dynamic_partitions("dataset_versions")[-1]


def _train(storage, instance, version, settings, assets=(trained_model,), raise_on_error=True):
    return dg.materialize(
        list(assets),
        partition_key=version,
        instance=instance,
        raise_on_error=raise_on_error,
        resources={"storage": storage, "training": settings, "pipes": dg.PipesSubprocessClient()},
    )


def test_training_refuses_a_dataset_whose_checks_did_not_run(tmp_path, sample_files):
    storage, instance = _corpus(tmp_path, sample_files[:40])
    # the dataset without its checks: the version partition exists, the checks never ran
    assert dg.materialize(
        [vocabulary, arrow_dataset], instance=instance, resources={"storage": storage}
    ).success
    version = instance.get_dynamic_partitions("dataset_versions")[-1]
    result = _train(storage, instance, version, TrainingSettings(max_steps=2), raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error.message
    assert f"dataset version {version}: blocking checks not passed" in failure
    assert "vocabulary_covers_dataset (never evaluated on it)" in failure


def test_each_dataset_version_is_gated_by_its_own_checks(tmp_path, sample_files):
    """Training version v1 depends on v1's check results, whatever a later version's say; a new
    version requests training for itself alone, not again for versions already trained."""

    storage, instance = _corpus(tmp_path, sample_files[:40])
    dataset = [vocabulary, arrow_dataset, *CHECKS]
    resources = {"storage": storage}
    assert dg.materialize(dataset, instance=instance, resources=resources).success
    v1 = instance.get_dynamic_partitions("dataset_versions")[-1]
    instance.report_runless_asset_event(dg.AssetMaterialization("trained_model", partition=v1))
    training = dg.AssetSelection.assets(trained_model)
    tick = dg.evaluate_automation_conditions(defs, instance, asset_selection=training)
    for path in sample_files[40:50]:
        shutil.copy(path, Path(storage.corpus_dir) / path.name)
    refresh = plan_refresh(storage, instance)
    instance.add_dynamic_partitions("midi_shards", refresh.new_shards)
    for shard in refresh.to_run:
        shard_assets = [filtered_midi, chord_annotations, hid_tokens]
        assert dg.materialize(
            shard_assets, partition_key=shard, instance=instance, resources=resources
        ).success
    assert dg.materialize([vocabulary, arrow_dataset], instance=instance, resources=resources)
    v2 = instance.get_dynamic_partitions("dataset_versions")[-1]
    assert v2 != v1
    require_checks_passed(instance, v1)
    with pytest.raises(dg.Failure, match=f"{v2}: blocking checks not passed: .*never evaluated"):
        require_checks_passed(instance, v2)  # v1's passing checks do not vouch for it
    checks_only = dg.AssetSelection.checks_for_assets(arrow_dataset)
    assert dg.materialize(
        [arrow_dataset, *CHECKS], instance=instance, resources=resources, selection=checks_only
    ).success
    require_checks_passed(instance, v2)
    tick = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=training, cursor=tick.cursor
    )
    assert tick.get_requested_partitions(trained_model.key) == {v2}  # not v1 again

    v1_build = instance.fetch_materializations(arrow_dataset.key, limit=2).records[-1]
    assert v1_build.asset_materialization.tags["dagster/data_version"] == v1
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(
            arrow_dataset.key,
            "splits_do_not_overlap",
            passed=False,
            target_materialization_data=Target(
                storage_id=v1_build.storage_id, run_id=v1_build.run_id, timestamp=v1_build.timestamp
            ),
        )
    )
    with pytest.raises(
        dg.Failure, match=f"{v1}: blocking checks not passed: splits_do_not_overlap$"
    ):
        require_checks_passed(instance, v1)
    require_checks_passed(instance, v2)


def test_training_settings_pick_profile_size_and_steps():
    """The profile gives the hardware recipe; a size picks another model under it (the upstream
    trained small and large at 8192 tokens), which is another run; bad names are refused."""
    large = TrainingSettings(profile="h100").config()
    small = TrainingSettings(profile="h100", size="small", max_steps=10).config()
    assert (large.size, small.size, small.max_steps) == ("large", "small", 10)
    assert (small.seq_len, small.batch_size, small.lr) == (
        large.seq_len,
        large.batch_size,
        large.lr,
    )
    assert small.run_key() != replace(large, max_steps=10).run_key()
    with pytest.raises(ValueError, match=r"unknown model size 'medium': \['tiny', 'small'"):
        TrainingSettings(size="medium")
    with pytest.raises(ValueError, match="unknown training profile 'a100'"):
        TrainingSettings(profile="a100")


def test_bad_resource_settings_are_refused_by_name(monkeypatch):
    """Numbers no run can use fail the resource's validation (the launchpad's run fails at
    resource init, naming the field); a malformed environment variable is named."""
    for field, value in (("processes", 0), ("eval_bars", 0), ("max_steps", -5)):
        with pytest.raises(pydantic.ValidationError, match=f"{field}\n.*greater than or equal"):
            TrainingSettings(**{field: value})
    with pytest.raises(pydantic.ValidationError, match="shard_size"):
        CorpusStorage(corpus_dir=".", data_root=".", shard_size=0)
    monkeypatch.setenv(STEPS_ENV, "ten")
    with pytest.raises(ValueError, match="MELOFORMER_TRAIN_STEPS='ten': not a whole number"):
        training_from_env()
    monkeypatch.setenv(STEPS_ENV, "12")
    assert training_from_env().max_steps == 12
    monkeypatch.setenv(PROFILE_ENV, "h200")
    named = r"^MELOFORMER_TRAIN_PROFILE='h200': unknown training profile 'h200': \["
    with pytest.raises(ValueError, match=named):
        training_from_env()


def test_training_and_evaluation_on_a_checked_dataset(checked):
    storage, instance, version = checked
    settings = TrainingSettings(max_steps=3, eval_pieces=1, eval_bars=1)
    result = _train(storage, instance, version, settings, (trained_model, evaluation_report))
    assert result.success
    meta = {
        k: v.value
        for k, v in result.asset_materializations_for_node("trained_model")[0].metadata.items()
    }
    assert meta["steps"] == 3 and meta["tokens_per_second"] > 0 and meta["processes"] == 1
    assert 0 < meta["model_flops_utilisation"] < 1 and meta["val_loss"] > 0
    assert "peak_memory_bytes" not in meta  # no GPU memory counter on a CPU: not a 0
    assert Path(meta["checkpoint"]).joinpath("model.safetensors").exists()
    assert Path(meta["loss_curve"]).stat().st_size > 5000
    assert meta["dataset"].endswith(version)
    record = instance.get_latest_materialization_event(dg.AssetKey("trained_model"))
    assert record.asset_materialization.partition == version  # lineage to the dataset version
    report = instance.get_latest_materialization_event(dg.AssetKey("evaluation_report"))
    report_meta = report.asset_materialization.metadata
    assert Path(report_meta["report"].value).exists()
    assert "validation perplexity" in report_meta["summary"].value


def _metadata(result: dg.ExecuteInProcessResult) -> dict:
    return {
        k: v.value
        for k, v in result.asset_materializations_for_node("trained_model")[0].metadata.items()
    }


def test_a_finished_training_is_reused_and_make_run_skips_it(checked):
    storage, instance, version = checked
    dataset = dataset_path(storage, version)
    settings = TrainingSettings(max_steps=3, eval_pieces=1, eval_bars=1)
    run_dir = training_run_dir(storage, settings, version)
    shutil.rmtree(run_dir, ignore_errors=True)
    first = _metadata(_train(storage, instance, version, settings))
    assert not first["reused_completed_run"] and first["tokens_per_second"] > 0
    assert not current_training(storage, instance, settings, dataset)  # not evaluated yet
    assert _train(storage, instance, version, settings, (evaluation_report,)).success
    assert current_training(storage, instance, settings, dataset)  # make run: nothing to do
    with pytest.MonkeyPatch.context() as patch:  # new training/evaluation code: evaluate again
        patch.setattr(refresh, "TRAINING_CODE_VERSION", "next")
        assert not current_training(storage, instance, settings, dataset)
    files = {p: p.stat().st_mtime_ns for p in run_dir.glob("step-*/*")}
    again = _metadata(_train(storage, instance, version, settings))
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("step-*/*")} == files
    assert again.pop("reused_completed_run") and not first.pop("reused_completed_run")
    assert again == first  # steps, losses, tokens/s, MFU, wall time, checkpoints: the first run's
    longer = TrainingSettings(max_steps=4, eval_pieces=1, eval_bars=1)
    assert not current_training(storage, instance, longer, dataset)
    trained = _metadata(_train(storage, instance, version, longer))
    assert not trained["reused_completed_run"] and trained["steps"] == 4
    assert trained["tokens_per_second"] > 0 and trained["checkpoint"] != first["checkpoint"]


def test_a_reused_run_reports_the_config_it_trained_with(checked, monkeypatch):
    storage, instance, version = checked
    settings = TrainingSettings(max_steps=2)
    shutil.rmtree(storage.root / "trained_model", ignore_errors=True)
    first = _metadata(_train(storage, instance, version, settings))
    cpu = training_config.PROFILES["cpu"]
    monkeypatch.setitem(
        training_config.PROFILES, "cpu", replace(cpu, eval_every=cpu.eval_every + 1)
    )
    again = _metadata(_train(storage, instance, version, settings))
    assert again["reused_completed_run"] and again["checkpoint"] == first["checkpoint"]
    assert again["config"] == first["config"] and again["config"]["eval_every"] == cpu.eval_every


def test_a_changed_config_is_a_new_run_beside_the_old_one(checked, monkeypatch):
    storage, instance, version = checked
    settings = TrainingSettings(max_steps=2)
    shutil.rmtree(storage.root / "trained_model", ignore_errors=True)
    assert _train(storage, instance, version, settings).success
    old_dir = training_run_dir(storage, settings, version)
    files = {p: p.stat().st_mtime_ns for p in old_dir.rglob("*") if p.name != trainer.LOCK}
    monkeypatch.setitem(
        training_config.PROFILES, "cpu", replace(training_config.PROFILES["cpu"], lr=1e-3)
    )
    new_dir = training_run_dir(storage, settings, version)
    assert new_dir.parent == old_dir.parent and new_dir != old_dir
    meta = _metadata(_train(storage, instance, version, settings))
    assert not meta["reused_completed_run"] and meta["config"]["lr"] == 1e-3
    assert Path(meta["checkpoint"]).parent == new_dir
    state = json.loads(Path(meta["checkpoint"], "state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2]  # trained from scratch
    assert {p: p.stat().st_mtime_ns for p in old_dir.rglob("*") if p.name != trainer.LOCK} == files


@pytest.mark.slow
def test_torchrun_through_pipes_reports_back(checked):
    storage, instance, version = checked
    settings = TrainingSettings(profile="cpu", processes=2, max_steps=2)
    shutil.rmtree(storage.root / "trained_model", ignore_errors=True)
    result = _train(storage, instance, version, settings)
    assert result.success
    meta = {
        k: v.value
        for k, v in result.asset_materializations_for_node("trained_model")[0].metadata.items()
    }
    assert meta["processes"] == 2 and meta["steps"] == 2
    assert Path(meta["checkpoint"]).joinpath("config.json").exists()


def test_training_refuses_a_dataset_of_another_tokenizer(checked, tmp_path):
    """An old dataset version outlives a tokenizer change in its folder; backfilling it with the
    current vocabulary would train on ids that mean other tokens."""

    storage, _, version = checked
    vocab = Vocabulary.load(latest_vocabulary_path(storage))
    data = dataset_path(storage, version)
    require_same_tokenizer(data, vocab)
    manifest = json.loads((data / MANIFEST).read_text())
    manifest["settings"]["vocab_hash"] = "0123456789abcdef"
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(dg.Failure, match="built with tokenizer 0123456789abcdef, the current"):
        require_same_tokenizer(tmp_path, vocab)
