"""The benchmark report: every benchmark's headline figures and goals in one table, with the
machine each ran on, tracked as an asset like everything else."""

import hashlib
import json
from pathlib import Path

import dagster as dg

from meloformer_model.atomic import write_bytes_atomic
from pipelines.resources import PROJECT_DIR, CorpusStorage

RESULTS_DIR = PROJECT_DIR / "benchmarks" / "results"


def _leaves(data: dict, prefix: str = "", depth: int = 0):
    """Numeric and boolean leaves two levels deep: the figures a benchmark reports."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or isinstance(value, (int, float)):
            yield name, value
        elif isinstance(value, dict) and depth < 2 and key != "machine":
            yield from _leaves(value, f"{name}.", depth + 1)


def _machine(data: dict) -> str:
    """The accelerator a GPU benchmark ran on (its ``device_name``), then the host."""
    accelerator = [data["device_name"]] if data.get("device", "cpu") != "cpu" else []
    machine = data.get("machine") or {}
    if isinstance(machine, dict):
        host = [
            f"{v}" for k, v in machine.items() if k in ("cpu", "device", "gpu", "cores_available")
        ]
    else:
        host = [str(machine)]
    return ", ".join(accelerator + host)


def benchmark_rows(results_dir: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        machine = _machine(data)
        for name, value in _leaves(data):
            shown = f"{value:,.4g}" if isinstance(value, float) else str(value)
            rows.append((path.stem, name, shown, machine))
    return rows


@dg.asset(
    code_version="1",
    group_name="reports",
    description="All benchmark results (benchmarks/results/*.json) as one table with machines.",
)
def benchmark_report(storage: CorpusStorage) -> dg.MaterializeResult:
    rows = benchmark_rows(RESULTS_DIR)
    if not rows:
        raise dg.Failure(f"no benchmark results in {RESULTS_DIR}: run `make bench` first")
    table = "| benchmark | figure | value | machine |\n|---|---|---|---|\n" + "\n".join(
        f"| {b} | {f} | {v} | {m} |" for b, f, v, m in rows
    )
    goals = [(b, f, v) for b, f, v, _ in rows if f.endswith("met") or ".met" in f]
    goal_table = "| benchmark | goal | met |\n|---|---|---|\n" + "\n".join(
        f"| {b} | {f} | {v} |" for b, f, v in goals
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
