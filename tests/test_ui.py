"""End to end through the real Dagster UI server: `dagster dev` (webserver + daemon, run queue)
on a temporary instance and corpus, shard and dataset runs launched and checked over GraphQL,
and the corpus asset graph rendered in headless Chromium (build/test-artifacts/asset_graph.png).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import pytest

from pipelines.refresh import plan_refresh
from pipelines.resources import (
    CORPUS_ENV,
    DATA_ROOT_ENV,
    INSTANCE_CONFIG,
    PROJECT_DIR,
    CorpusStorage,
)

pytestmark = pytest.mark.slow

N_FILES = 30  # one shard of the default size
SHARD = "shard-00000"
ARTIFACTS = PROJECT_DIR / "build" / "test-artifacts"
ASSETS = ["midi_corpus", "filtered_midi", "chord_annotations", "hid_tokens", "vocabulary",
          "arrow_dataset"]  # fmt: skip
CHECKS = {"vocabulary_covers_dataset", "splits_do_not_overlap", "sequences_not_empty",
          "buckets_sum_to_totals", "train_and_valid_hold_pieces"}  # fmt: skip
# Steps exchange nothing through the IO manager (all artifacts are files), so running them in
# the run worker instead of one subprocess per step (each re-importing torch, ~4 s apiece on two
# cores) tests the same code path: queue, daemon, run worker, code server, assets and checks.
RUN_CONFIG = {"execution": {"config": {"in_process": {}}}}
SERVER_START_TIMEOUT = 90
RUN_TIMEOUT = 180
BROWSER_TIMEOUT = 90
BROWSERS = ("chromium", "chromium-browser")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _dagster_executable() -> str:
    beside = Path(sys.executable).with_name("dagster")  # the venv running the tests
    found = str(beside) if beside.exists() else shutil.which("dagster")
    assert found, "no `dagster` executable beside the test interpreter or on PATH"
    return found


def _default_signals() -> list[str]:
    """`env --default-signal`: started from a script in the background, `dagster dev` would
    inherit ignored SIGINT/SIGTERM and never stop (GNU coreutils >= 8.31; else left out)."""
    command = ["env", "--default-signal=INT,TERM"]
    probe = subprocess.run([*command, "true"], capture_output=True, stdin=subprocess.DEVNULL)
    return command if probe.returncode == 0 else []


class DagsterUI:
    """A running `dagster dev` and a minimal GraphQL client for it."""

    def __init__(self, port: int, log: Path, process: subprocess.Popen, env: dict[str, str]):
        self.port, self.log, self.process = port, log, process
        self.home = Path(env["DAGSTER_HOME"])
        self.corpus, self.data = Path(env[CORPUS_ENV]), Path(env[DATA_ROOT_ENV])
        self.url = f"http://127.0.0.1:{port}"
        self.location = self.repository = ""

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            result = json.load(response)
        assert not result.get("errors"), f"GraphQL errors: {result['errors']}\n{self.log_tail()}"
        return result["data"]

    def log_tail(self, lines: int = 60) -> str:
        return f"--- dagster dev log ({self.log}), last {lines} lines ---\n{_tail(self.log, lines)}"

    def alive(self) -> bool:
        return self.process.poll() is None


def _wait_until_ready(ui: DagsterUI) -> None:
    """The webserver answers and the code location has loaded (or fails with its error)."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not ui.alive():
            pytest.fail(f"dagster dev exited with {ui.process.returncode}\n{ui.log_tail()}")
        try:
            with urllib.request.urlopen(f"{ui.url}/server_info", timeout=5) as response:
                json.load(response)
            data = ui.graphql(
                """{ workspaceOrError { __typename ... on Workspace { locationEntries {
                       name loadStatus locationOrLoadError { __typename
                         ... on RepositoryLocation { name repositories { name } }
                         ... on PythonError { message stack } } } }
                     ... on PythonError { message } } }""",
                timeout=10,
            )
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            last = repr(error)
            time.sleep(1)
            continue
        workspace = data["workspaceOrError"]
        assert workspace["__typename"] == "Workspace", workspace
        entries = workspace["locationEntries"]
        assert len(entries) == 1, entries
        entry = entries[0]
        location = entry["locationOrLoadError"]
        if location and location["__typename"] == "PythonError":
            pytest.fail(f"code location failed to load: {location['message']}\n"
                        f"{''.join(location['stack'])}\n{ui.log_tail()}")  # fmt: skip
        if entry["loadStatus"] == "LOADED" and location:
            ui.location = location["name"]
            (repository,) = location["repositories"]
            ui.repository = repository["name"]
            return
        last = f"location {entry['name']} is {entry['loadStatus']}"
        time.sleep(1)
    pytest.fail(f"dagster dev not ready after {SERVER_START_TIMEOUT} s ({last})\n{ui.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the whole process group (webserver, daemon, code servers, runs), then SIGKILL."""
    pgid = process.pid  # start_new_session: the group leader's pid is the group id
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # children that outlive the leader
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.poll() is None:
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, sample_files):
    """`dagster dev` on a temporary DAGSTER_HOME, corpus (one shard) and data root."""
    root = tmp_path_factory.mktemp("ui").resolve()
    home, corpus, data = root / "dagster_home", root / "corpus", root / "data"
    home.mkdir()
    corpus.mkdir()
    shutil.copy(INSTANCE_CONFIG, home / "dagster.yaml")
    for path in sample_files[:N_FILES]:
        shutil.copy(path, corpus / path.name)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        CORPUS_ENV: str(corpus),
        DATA_ROOT_ENV: str(data),
        "MELOFORMER_TRAIN_STEPS": "2",
    }
    port = _free_port()
    log = root / "dagster_dev.log"
    command = [*_default_signals(), _dagster_executable(), "dev", "-w", "workspace.yaml",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = DagsterUI(port, log, process, env)
    try:
        _wait_until_ready(server)
        yield server
    finally:
        _stop(process)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, ARTIFACTS / "dagster_dev.log")


RUN_EVENTS = """query($runId: ID!) { runOrError(runId: $runId) { __typename
  ... on Run { status eventConnection(limit: 1000) { events { __typename
    ... on MessageEvent { message level stepKey }
    ... on ErrorEvent { error { message stack } } } } } } }"""


def _run_report(ui: DagsterUI, run_id: str) -> str:
    try:
        run = ui.graphql(RUN_EVENTS, {"runId": run_id})["runOrError"]
        events = run.get("eventConnection", {}).get("events", [])
    except Exception as error:  # the report must not hide the original failure
        return f"(could not read the event log: {error!r})\n{ui.log_tail()}"
    lines = []
    for event in events[-80:]:
        line = f"{event.get('level', '')} {event.get('stepKey') or ''} {event['__typename']}: "
        line += (event.get("message") or "").strip()
        if event.get("error"):
            line += "\n" + event["error"]["message"] + "".join(event["error"]["stack"] or [])
        lines.append(line)
    return f"--- run {run_id} events ---\n" + "\n".join(lines) + "\n" + ui.log_tail()


def _launch(
    ui: DagsterUI, job: str, tags: dict[str, str] | None = None, assets: list[str] | None = None
) -> str:
    selector = {
        "repositoryLocationName": ui.location,
        "repositoryName": ui.repository,
        "jobName": job,
    }
    if assets:
        selector["assetSelection"] = [{"path": [asset]} for asset in assets]
    params = {
        "selector": selector,
        "runConfigData": RUN_CONFIG,
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
    }
    result = ui.graphql(
        """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
             __typename
             ... on LaunchRunSuccess { run { runId status } }
             ... on PythonError { message stack }
             ... on RunConfigValidationInvalid { errors { message } }
             ... on InvalidSubsetError { message }
             ... on PipelineNotFoundError { message } } }""",
        {"params": params},
    )["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", f"{result}\n{ui.log_tail()}"
    return result["run"]["runId"]


def _wait_for_success(ui: DagsterUI, run_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT
    status = None
    while time.monotonic() < deadline:
        run = ui.graphql(
            """query($runId: ID!) { runOrError(runId: $runId) { __typename
                 ... on Run { runId jobName status tags { key value } }
                 ... on RunNotFoundError { message } } }""",
            {"runId": run_id},
        )["runOrError"]
        assert run["__typename"] == "Run", run
        status = run["status"]
        if status == "SUCCESS":
            return run
        if status in ("FAILURE", "CANCELED", "CANCELING"):
            pytest.fail(f"run {run_id} ({run['jobName']}) ended {status}\n"
                        f"{_run_report(ui, run_id)}")  # fmt: skip
        if not ui.alive():
            pytest.fail(f"dagster dev exited during run {run_id}\n{ui.log_tail()}")
        time.sleep(1)
    pytest.fail(f"run {run_id} still {status} after {RUN_TIMEOUT} s\n{_run_report(ui, run_id)}")


def _latest_materialization(ui: DagsterUI, asset: str, partition: str | None = None) -> dict:
    data = ui.graphql(
        """query($path: [String!]!, $partitions: [String!]) {
             assetOrError(assetKey: {path: $path}) { __typename
               ... on Asset { assetMaterializations(partitions: $partitions, limit: 1) {
                 runId partition metadataEntries { __typename label
                   ... on IntMetadataEntry { intValue }
                   ... on PathMetadataEntry { path } } } } } }""",
        {"path": [asset], "partitions": [partition] if partition else None},
    )["assetOrError"]
    assert data["__typename"] == "Asset", f"{asset}: {data}"
    events = data["assetMaterializations"]
    assert events, f"{asset} {partition or ''} has no materialization"
    return events[0]


def test_shard_and_dataset_runs_through_graphql(ui):
    # The corpus registry is written by the refresh (as the sensor, schedule and `make run` do);
    # the shard is then registered and both jobs launched through the UI's GraphQL API.
    storage = CorpusStorage(corpus_dir=str(ui.corpus), data_root=str(ui.data))
    instance = dg.DagsterInstance.from_config(str(ui.home))  # not `with`: see test_pipeline_assets
    try:
        refresh = plan_refresh(storage, instance)
    finally:
        instance.dispose()
    assert refresh.files == N_FILES
    assert refresh.new_shards == refresh.to_run == [SHARD]
    added = ui.graphql(
        """mutation($key: String!, $repo: RepositorySelector!) {
             addDynamicPartition(partitionsDefName: "midi_shards", partitionKey: $key,
                                 repositorySelector: $repo) {
               __typename ... on AddDynamicPartitionSuccess { partitionKey }
               ... on PythonError { message } } }""",
        {"key": SHARD,
         "repo": {"repositoryLocationName": ui.location, "repositoryName": ui.repository}},
    )["addDynamicPartition"]  # fmt: skip
    assert added == {"__typename": "AddDynamicPartitionSuccess", "partitionKey": SHARD}

    shard_run = _wait_for_success(ui, _launch(ui, "shard_job", {"dagster/partition": SHARD}))
    assert {"key": "dagster/partition", "value": SHARD} in shard_run["tags"]
    for asset in ("filtered_midi", "chord_annotations", "hid_tokens"):
        event = _latest_materialization(ui, asset, SHARD)
        assert (event["runId"], event["partition"]) == (shard_run["runId"], SHARD), asset

    dataset_run = _wait_for_success(ui, _launch(ui, "dataset_job"))
    event = _latest_materialization(ui, "arrow_dataset")
    assert event["runId"] == dataset_run["runId"]
    metadata = {e["label"]: e for e in event["metadataEntries"]}
    train = metadata["train_sequences"]
    assert train["__typename"] == "IntMetadataEntry"
    assert isinstance(train["intValue"], int) and train["intValue"] > 0, train
    total = sum(metadata[f"{s}_sequences"]["intValue"] for s in ("train", "valid", "test"))
    assert 0 < total <= N_FILES
    assert Path(metadata["path"]["path"]).is_relative_to(ui.data)

    node = ui.graphql(
        """{ assetNodeOrError(assetKey: {path: ["arrow_dataset"]}) { __typename
             ... on AssetNode { assetChecksOrError { __typename
               ... on AssetChecks { checks { name blocking
                 executionForLatestMaterialization { status runId evaluation { success } }
               } } } } } }"""
    )["assetNodeOrError"]
    assert node["__typename"] == "AssetNode", node
    checks = node["assetChecksOrError"]
    assert checks["__typename"] == "AssetChecks", checks
    results = {c["name"]: c for c in checks["checks"]}
    assert set(results) == CHECKS
    for name, check in results.items():
        execution = check["executionForLatestMaterialization"]
        assert check["blocking"], name
        assert execution is not None, f"{name} has not run"
        assert execution["status"] == "SUCCEEDED", f"{name}: {execution}"
        assert execution["runId"] == dataset_run["runId"], name
        assert execution["evaluation"]["success"], name


def test_training_run_is_listed_with_lineage_to_the_dataset_partition(ui):
    dataset = _latest_materialization(ui, "arrow_dataset")
    version = Path({e["label"]: e for e in dataset["metadataEntries"]}["path"]["path"]).name
    run_id = _launch(ui, "training_job", {"dagster/partition": version}, ["trained_model"])
    run = _wait_for_success(ui, run_id)
    event = _latest_materialization(ui, "trained_model", version)
    assert (event["runId"], event["partition"]) == (run["runId"], version)
    node = ui.graphql(
        """{ assetNodeOrError(assetKey: {path: ["trained_model"]}) { __typename
             ... on AssetNode { dependencyKeys { path } partitionKeys pools } } }"""
    )["assetNodeOrError"]
    assert node["__typename"] == "AssetNode", node
    assert node["dependencyKeys"] == [{"path": ["arrow_dataset"]}]
    assert version in node["partitionKeys"] and node["pools"] == ["gpu"]
    runs = ui.graphql(
        """{ runsOrError(filter: {pipelineName: "training_job"}) { __typename
             ... on Runs { results { runId status tags { key value } } } } }"""
    )["runsOrError"]["results"]
    listed = [r for r in runs if r["runId"] == run_id]
    assert listed and {"key": "dagster/partition", "value": version} in listed[0]["tags"]


def _chromium() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _browse(browser: str, profile: Path, url: str, *output: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", "--window-size=1600,1000",
               "--virtual-time-budget=15000", *output, url]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, timeout=BROWSER_TIMEOUT, stdin=subprocess.DEVNULL
    )


def test_asset_graph_renders_in_browser(ui, tmp_path):
    browser = _chromium()
    if browser is None:
        reason = f"no Chromium ({' or '.join(BROWSERS)}) on PATH: `make test` installs it as root"
        if _in_ci():
            pytest.fail(f"{reason}; CI is set, so the UI screenshot test must run")
        pytest.skip(reason)
    # A fresh instance shows a one-time "Join the Dagster community" dialog over every page on
    # localhost; dismiss it the way its Skip button does.
    assert ui.graphql("mutation { setNuxSeen }")["setNuxSeen"] is True

    url = f"{ui.url}/locations/{quote(ui.location)}/asset-groups/corpus"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "asset_graph.png"
    screenshot.unlink(missing_ok=True)
    shot = _browse(browser, tmp_path / "profile-shot", url, f"--screenshot={screenshot}")
    assert shot.returncode == 0, shot.stderr.decode(errors="replace")[-3000:]
    assert screenshot.exists(), f"no screenshot of {url}: {shot.stderr[-3000:]!r}"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    size = screenshot.stat().st_size
    assert size > 20_000, f"{screenshot} is only {size} bytes: a blank page or a spinner?"

    dom = _browse(browser, tmp_path / "profile-dom", url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-3000:]
    html = dom.stdout.decode(errors="replace")
    (ARTIFACTS / "asset_graph.html").write_text(html)
    missing = [name for name in ASSETS if name not in html]
    assert not missing, f"{url} does not show {missing} (DOM in {ARTIFACTS / 'asset_graph.html'})"
    assert "Join the Dagster community" not in html
