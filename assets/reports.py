"""The benchmark report: every benchmark's headline figures and goals in one table, with the
machine each ran on, tracked as an asset like everything else."""

import hashlib
import json
from pathlib import Path

import dagster as dg

from meloformer_model.atomic import write_bytes_atomic
from pipelines.resources import PROJECT_DIR, CorpusStorage

RESULTS_DIR = PROJECT_DIR / "benchmarks" / "results"


# Sections that describe how a benchmark ran (its configuration, the machine, the load), not
# what it measured: left out of the figures.
SETTINGS = frozenset({"machine", "settings", "model_config", "versions", "load", "method"})


def _leaves(data: dict, prefix: str = ""):
    """Every numeric and boolean figure at any depth, lists of records indexed (``results.0``),
    settings sections left out."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, (bool, int, float)):
            yield name, value
        elif isinstance(value, dict) and key not in SETTINGS:
            yield from _leaves(value, f"{name}.")
        elif isinstance(value, list) and key not in SETTINGS:
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    yield from _leaves(item, f"{name}.{i}.")


def _goals(data: dict, prefix: str = ""):
    """(goal, target, value, met, note) for every goal a benchmark states: a section with a
    ``met`` entry, or a ``*_met`` flag. ``met`` None: not evaluated on this machine."""
    if "met" in data:
        value = next((data[k] for k in ("value", "value_causal") if data.get(k) is not None), None)
        yield prefix.rstrip(".") or "goal", data.get("goal"), value, data["met"], data.get("note")
    for key, value in data.items():
        if key.endswith("_met"):
            yield f"{prefix}{key}", None, None, value, None
        elif isinstance(value, dict) and key not in SETTINGS:
            yield from _goals(value, f"{prefix}{key}.")


def _machine(data: dict) -> str:
    """The accelerator a GPU benchmark ran on (its ``device_name``), then the host."""
    accelerator = [data["device_name"]] if data.get("device", "cpu") != "cpu" else []
    machine = data.get("machine") or {}
    if isinstance(machine, dict):
        host = [str(machine[k]) for k in ("cpu", "device", "gpu") if machine.get(k)]
        cores = machine.get("cores_available")
        if cores:
            host.append(f"{cores} core{'s' if cores != 1 else ''}")
    else:
        host = [str(machine)]
    return ", ".join(accelerator + host)


def _shown(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_results(results_dir: Path) -> list[tuple[str, dict, str]]:
    """(benchmark, results, machine) per results file; a file that is not a benchmark's JSON
    object is refused by name."""
    results = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            machine = _machine(data)
        except (OSError, ValueError, KeyError) as exc:
            raise dg.Failure(
                f"{path}: not a benchmark result ({type(exc).__name__}: {exc})"
            ) from exc
        results.append((path.stem, data, machine))
    return results


Results = list[tuple[str, dict, str]]  # (benchmark, its JSON, machine), as read_results gives


def benchmark_rows(results: Results) -> list[tuple[str, str, str, str]]:
    return [
        (name, figure, _shown(value), machine)
        for name, data, machine in results
        for figure, value in _leaves(data)
    ]


def goal_rows(results: Results) -> list[tuple[str, ...]]:
    return [
        (
            name,
            goal,
            _shown(target),
            _shown(value),
            "not evaluated" if met is None else _shown(met),
            note or "",
            machine,
        )  # fmt: skip
        for name, data, machine in results
        for goal, target, value, met, note in _goals(data)
    ]


@dg.asset(
    code_version="1",
    group_name="reports",
    description="All benchmark results (benchmarks/results/*.json) as one table with machines.",
)
def benchmark_report(storage: CorpusStorage) -> dg.MaterializeResult:
    results = read_results(RESULTS_DIR)
    rows = benchmark_rows(results)
    if not rows:
        raise dg.Failure(f"no benchmark results in {RESULTS_DIR}: run `make bench` first")
    table = "| benchmark | figure | value | machine |\n|---|---|---|---|\n" + "\n".join(
        f"| {b} | {f} | {v} | {m} |" for b, f, v, m in rows
    )
    goal_table = (
        "| benchmark | goal | target | value | met | note | machine |\n"
        + ("|---|---|---|---|---|---|---|\n")
        + "\n".join("| " + " | ".join(row) + " |" for row in goal_rows(results))
    )
    out = storage.root / "benchmark_report" / "report.md"
    write_bytes_atomic(out, f"# Benchmarks\n\n{goal_table}\n\n{table}\n".encode())
    digest = hashlib.blake2b(
        b"".join(p.read_bytes() for p in sorted(RESULTS_DIR.glob("*.json"))), digest_size=8
    ).hexdigest()
    return dg.MaterializeResult(
        data_version=dg.DataVersion(digest),
        metadata={
            "benchmarks": len({b for b, *_ in rows}),
            "goals": dg.MetadataValue.md(goal_table),
            "report": dg.MetadataValue.path(str(out)),
        },
    )
