"""The code location loads, and holds the graph, checks, jobs, sensors and schedule we expect."""

import os

import dagster as dg
import pytest

from meloformer_model.paths import PROJECT_DIR
from pipelines.definitions import defs
from pipelines.resources import INSTANCE_CONFIG


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)


def test_asset_graph_shape():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"midi_corpus", "filtered_midi", "chord_annotations", "hid_tokens",
                    "vocabulary", "arrow_dataset", "trained_model", "evaluation_report",
                    "benchmark_report"}  # fmt: skip
    parents = {
        k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
        for k in graph.get_all_asset_keys()
    }
    assert parents["filtered_midi"] == {"midi_corpus"}
    assert parents["chord_annotations"] == {"filtered_midi"}
    assert parents["hid_tokens"] == {"chord_annotations"}
    assert parents["vocabulary"] == {"hid_tokens"}
    assert parents["arrow_dataset"] == {"hid_tokens", "vocabulary"}
    assert parents["trained_model"] == {"arrow_dataset"}
    assert parents["evaluation_report"] == {"trained_model"}
    for key in keys - {"midi_corpus"}:
        assert graph.get(dg.AssetKey(key)).code_version, key
    checks = {c.name for c in graph.asset_check_keys}
    assert checks == {"vocabulary_covers_dataset", "splits_do_not_overlap", "sequences_not_empty",
                      "buckets_sum_to_totals", "train_and_valid_hold_pieces"}  # fmt: skip


def test_jobs_sensors_schedule():
    assert {j.name for j in defs.jobs} == {"shard_job", "dataset_job", "training_job"}
    assert {s.name for s in defs.sensors} == {"midi_corpus_sensor", "dataset_after_shards_sensor"}
    schedule = defs.resolve_schedule_def("corpus_refresh_schedule")
    assert schedule.cron_schedule == "0 3 * * *"


def test_training_holds_the_gpu_pool_and_waits_for_checks():
    graph = defs.resolve_asset_graph()
    node = graph.get(dg.AssetKey("trained_model"))
    assert node.pools == graph.get(dg.AssetKey("evaluation_report")).pools == {"gpu"}
    labels = [op.label for op in node.automation_condition.operands]
    assert labels == ["on_missing", "all_deps_blocking_checks_passed"]


def test_config_changes_change_code_versions():
    from meloformer_model.data import stages
    from meloformer_model.data.filtering import FilterConfig
    from meloformer_model.tokenizer.config import TokenizerConfig

    graph = defs.resolve_asset_graph()
    token_version = graph.get(dg.AssetKey("hid_tokens")).code_version
    assert token_version == stages.token_version(TokenizerConfig())
    assert stages.token_version(TokenizerConfig(velocity_bins=16)) != token_version
    assert stages.filter_version(FilterConfig(min_notes=10)) != stages.filter_version(
        FilterConfig()
    )


def test_benchmark_report_tables_every_result(tmp_path):
    from assets.reports import RESULTS_DIR, benchmark_report
    from pipelines.resources import CorpusStorage

    storage = CorpusStorage(corpus_dir=str(tmp_path), data_root=str(tmp_path / "data"))
    result = dg.materialize([benchmark_report], resources={"storage": storage})
    assert result.success
    text = (tmp_path / "data" / "benchmark_report" / "report.md").read_text()
    for path in RESULTS_DIR.glob("*.json"):
        assert f"| {path.stem} |" in text
    assert "chain_vs_miditok" in text
    # figures at any depth, goals with target, value and machine, unevaluated ones said so
    assert "| generate | results.tiny/threads=2.kv_cache.tokens_per_s |" in text
    assert "| train | goal_gpu_mfu | 0.35 |  | not evaluated | GPU goal" in text
    assert "| train-nvidia-h200 | goal_gpu_mfu | 0.35 | 0.3136 | **no** |  | NVIDIA H200" in text
    assert "model_config." not in text  # how a benchmark ran is not a figure
    from assets.reports import read_results

    for name, body, reason in (
        ("truncated", '{"machine": ', "JSONDecodeError"),
        ("a_list", "[1, 2]", "ValueError: a JSON list, not an object"),
        ("no_device_name", '{"device": "cuda"}', "KeyError: 'device_name'"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{name}.json").write_text(body)
        with pytest.raises(dg.Failure, match=f"{name}.json: not a benchmark result .{reason}"):
            read_results(folder)


def test_benchmark_report_names_the_gpu_a_result_ran_on():
    from assets.reports import _machine

    host = {"cpu": "AMD EPYC", "cores_available": 16, "python": "3.12.3"}
    gpu = {"device": "cuda", "device_name": "NVIDIA H200", "machine": host}
    assert _machine(gpu) == "NVIDIA H200, AMD EPYC, 16 cores"
    cpu = {"device": "cpu", "device_name": "AMD EPYC", "machine": host}
    assert _machine(cpu) == "AMD EPYC, 16 cores"


def test_the_main_job_names_bad_settings_in_one_line(tmp_path):
    """``make run`` with a mistyped corpus folder, training setting or refresh schedule: one
    line, exit 1, and no run started (the instance holds none)."""
    import shutil
    import subprocess
    import sys

    import dagster as dg

    cases = (
        ({"MELOFORMER_CORPUS_DIR": str(tmp_path / "typo")}, f"corpus folder {tmp_path / 'typo'}"),
        ({"MELOFORMER_TRAIN_STEPS": "ten"}, "MELOFORMER_TRAIN_STEPS='ten': not a whole number"),
        ({"MELOFORMER_TRAIN_PROCESSES": "0"},
         "MELOFORMER_TRAIN_PROCESSES='0': input should be greater than or equal to 1"),
        ({"MELOFORMER_REFRESH_CRON": "notacron"},
         "MELOFORMER_REFRESH_CRON='notacron': not a cron schedule"),
    )  # fmt: skip
    for env, message in cases:
        home = tmp_path / f"home-{len(env)}-{next(iter(env))}"
        home.mkdir()
        shutil.copy(INSTANCE_CONFIG, home / "dagster.yaml")  # as make run sets it up
        environ = {**os.environ, "DAGSTER_HOME": str(home), **env}
        command = [sys.executable, "-W", "ignore", "-m", "pipelines.run"]
        proc = subprocess.run(command, env=environ, cwd=PROJECT_DIR, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"meloformer run: {message}"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert instance.get_runs() == []


def test_the_main_job_reports_a_failed_check_without_a_traceback(tmp_path, sample_files):
    """A corpus too small for a valid split: the dataset's blocking check fails, and ``make run``
    says which check and which step in a few lines, exit 1, no stack trace."""
    import shutil
    import subprocess
    import sys

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sample_files[:12]:
        shutil.copy(path, corpus / path.name)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(INSTANCE_CONFIG, home / "dagster.yaml")
    environ = {**os.environ, "DAGSTER_HOME": str(home), "MELOFORMER_CORPUS_DIR": str(corpus)}
    command = [sys.executable, "-W", "ignore", "-m", "pipelines.run"]
    proc = subprocess.run(command, env=environ, cwd=PROJECT_DIR, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1
    assert "check train_and_valid_hold_pieces: FAILED" in proc.stdout, proc.stdout
    assert "Traceback (most recent call last)" not in proc.stderr, proc.stderr
    failure = "dataset_job: step arrow_dataset_checks failed: "
    line = next(line for line in proc.stderr.splitlines() if line.startswith(failure))
    assert line.endswith("arrow_dataset: train_and_valid_hold_pieces"), line


def test_the_main_job_reports_its_own_data_roots_run(tmp_path, sample_files):
    """Two data roots on one instance: ``make run`` prints the checkpoint and report of the
    dataset version it built, not the instance's newest; a step count below the finished run's
    is refused with the reason in one line (Dagster wraps it in its own error)."""
    import shutil
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(INSTANCE_CONFIG, home / "dagster.yaml")

    def make_run(root: str, files: int, steps: str) -> subprocess.CompletedProcess:
        corpus = tmp_path / f"corpus-{files}"
        if not corpus.exists():
            corpus.mkdir()
            for path in sample_files[:files]:
                shutil.copy(path, corpus / path.name)
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "MELOFORMER_CORPUS_DIR": str(corpus),
            "MELOFORMER_DATA_ROOT": str(tmp_path / root),
            "MELOFORMER_TRAIN_STEPS": steps,
        }
        return subprocess.run(
            [sys.executable, "-W", "ignore", "-m", "pipelines.run"],
            env=env,
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )

    def printed(proc, key: str) -> str:
        return next(line.split(": ", 1)[1] for line in proc.stdout.splitlines()
                    if line.strip().startswith(key))  # fmt: skip

    for root, files in (("a", 40), ("b", 44)):
        proc = make_run(root, files, "2")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert printed(proc, "trained_model.checkpoint:").startswith(str(tmp_path / root))
    again = make_run("a", 40, "2")
    assert "training_job skipped" in again.stdout
    for key in ("vocabulary:", "trained_model.checkpoint:", "evaluation_report.report:"):
        assert printed(again, key).startswith(str(tmp_path / "a")), again.stdout
    fewer = make_run("a", 40, "1")
    assert fewer.returncode == 1
    failed = next(x for x in fewer.stderr.splitlines() if "step trained_model failed" in x)
    assert failed.endswith("past max_steps 1: ask for at least 2 steps, or train into another "
                           "folder"), failed  # fmt: skip
