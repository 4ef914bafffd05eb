"""End-to-end materialization of the data graph on a scaled-up corpus, against the library chain.

For each corpus size (transposed and time-stretched copies of the sample, see
``benchmarks/scaled_corpus.py``), on a fresh Dagster home and data root:

1. the library chain alone: ``meloformer prepare CORPUS --workers N --quiet`` (read, filter,
   tokenize, count), timed, as the reference throughput;
2. the main job as ``make run`` runs it: ``python -m pipelines.run`` (refresh, one shard_job run
   per shard, then dataset_job with its checks), timed, the RSS of its process tree (the job and
   its worker pools) sampled every 0.2 s. The job goes on to train a model on the dataset; the
   measurement stops at the end of the data graph (the job's "artifacts under ..." line) and the
   job is then stopped, unless ``--full-job``;
3. a refresh: 1 % new files (the next copies in the same seeded order) added to the folder and
   ``python -m pipelines.run`` again, timed as a fraction of the full run.

Per-step times (filtered_midi, chord_annotations, hid_tokens, vocabulary, arrow_dataset, the
checks) come from the runs' event logs in the Dagster home. Goals (issue): end-to-end files/s
>= 50 % of the chain's; refresh <= 3 % of the full run; peak RSS flat in corpus size (largest /
smallest size <= 1.3x). The refresh fraction is judged at the largest size (100k files by
default, the scale the issue names; Lakh MIDI is 176k): a refresh has a fixed cost of about 2 s
(interpreter start, ``import dagster``, opening the instance, two Dagster runs) that is ~10 % of
a 10k-file run but ~1 % of a 100k-file one; the table shows every size. About 12 minutes on 2
cores. Run: ``.venv/bin/python benchmarks/pipeline.py [--sizes 2560,10240,102400]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_result  # noqa: E402
from scaled_corpus import link, plan, write  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)
MELOFORMER = PYTHON.parent / "meloformer"
GOAL_THROUGHPUT_RATIO = 0.5
GOAL_REFRESH_FRACTION = 0.03
GOAL_RSS_GROWTH = 1.3
SAMPLE_INTERVAL = 0.2


# ---------------------------------------------------------------------------------------------
# Process-tree memory


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry.name))
    return children


def _task_children(pid: int) -> list[int] | None:
    """Children from /proc/PID/task/*/children (cheap); None where the kernel lacks it."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
        except FileNotFoundError:
            return None
        except OSError:
            continue
    return out


def _tree(root: int) -> list[int]:
    """The process and all its descendants."""
    children_map = None
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        children = _task_children(pid)
        if children is None:  # no CONFIG_PROC_CHILDREN: scan every process's parent
            children_map = children_map or _children_map()
            children = children_map.get(pid, [])
        todo.extend(children)
    return out


def _kb_field(path: str, field: str) -> int | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class TreeMemory(threading.Thread):
    """Samples VmRSS and PSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop_event = threading.Event()
        self.peak_rss_sum = self.peak_pss_sum = self.peak_rss_single = self.peak_root_rss = 0
        self.max_processes = 0
        self.seen: set[int] = set()
        self.root_cpu_ticks = 0
        self.samples = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds, summed RSS kB), per second max
        self.started = time.perf_counter()

    def sample(self) -> None:
        rss_sum = pss_sum = single = 0
        pids = _tree(self.pid)
        self.seen.update(pids)
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            self.root_cpu_ticks = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
        for pid in pids:
            rss = _kb_field(f"/proc/{pid}/status", "VmRSS:")
            if rss is None:
                continue
            rss_sum += rss
            single = max(single, rss)
            if pid == self.pid:
                self.peak_root_rss = max(self.peak_root_rss, rss)
            pss_sum += _kb_field(f"/proc/{pid}/smaps_rollup", "Pss:") or 0
        self.samples += 1
        self.max_processes = max(self.max_processes, len(pids))
        self.peak_rss_sum = max(self.peak_rss_sum, rss_sum)
        self.peak_pss_sum = max(self.peak_pss_sum, pss_sum)
        self.peak_rss_single = max(self.peak_rss_single, single)
        second = float(int(time.perf_counter() - self.started))
        if self.timeline and self.timeline[-1][0] == second:
            self.timeline[-1] = (second, max(self.timeline[-1][1], rss_sum))
        else:
            self.timeline.append((second, rss_sum))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def result(self) -> dict:
        mb = 1 / 1024
        return {
            "peak_tree_rss_mb": self.peak_rss_sum * mb,
            "peak_tree_pss_mb": self.peak_pss_sum * mb,
            "peak_single_process_rss_mb": self.peak_rss_single * mb,
            "peak_main_process_rss_mb": self.peak_root_rss * mb,
            "max_processes": self.max_processes,
            "distinct_processes": len(self.seen),
            # the main process's own user + system seconds (last sample, <= 0.2 s before exit)
            "main_process_cpu_s": self.root_cpu_ticks / os.sysconf("SC_CLK_TCK"),
            "samples": self.samples,
            "tree_rss_mb_per_second": [round(kb * mb, 1) for _, kb in self.timeline],
        }


# ---------------------------------------------------------------------------------------------
# Running commands


def _terminate_tree(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the process and its descendants (all started by this benchmark), then SIGKILL."""
    pids = _tree(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in reversed(pids):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids[1:]):
            time.sleep(0.05)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not any(Path(f"/proc/{p}/stat").exists() and _alive(p) for p in pids):
            return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_measured(
    cmd: list[str], env: dict[str, str], log: Path, stop_on: re.Pattern | None = None
) -> dict:
    """Run a command, timestamping its output lines and sampling its tree's memory.

    With ``stop_on``, the measurement ends at the first stdout line matching it and the process
    tree is then terminated (what the command does after that line is not measured)."""
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    memory = TreeMemory(proc.pid)
    memory.start()
    lines: list[tuple[float, str, str]] = []
    reached = threading.Event()
    stop_at: list[float] = []

    def pump(stream, name: str) -> None:
        for line in stream:
            now = time.perf_counter() - started
            lines.append((now, name, line.rstrip("\n")))
            if name == "out" and stop_on is not None and not reached.is_set():
                if stop_on.search(line):
                    stop_at.append(now)
                    reached.set()

    pumps = [threading.Thread(target=pump, args=(s, n), daemon=True)
             for s, n in ((proc.stdout, "out"), (proc.stderr, "err"))]  # fmt: skip
    for p in pumps:
        p.start()
    while proc.poll() is None and not reached.wait(0.05):
        pass
    stopped = reached.is_set() and proc.poll() is None
    if stopped:
        memory.stop_event.set()
        memory.join()
        main_cpu_at_stop = memory.result()["main_process_cpu_s"]
        _terminate_tree(proc.pid)
    rc = proc.wait()
    wall = stop_at[0] if stop_at else time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    memory.stop_event.set()
    memory.join()
    for p in pumps:
        p.join()
    log.write_text("".join(f"{t:9.3f} {n} {line}\n" for t, n, line in lines))
    if rc and not stopped:
        tail = "\n".join(line for _, _, line in lines[-30:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}; see {log}\n{tail}")
    return {
        "wall_s": wall,
        # user + system seconds of the process and every child it waited for (the pool
        # workers): independent of other load on the machine, unlike wall time.
        "cpu_s": cpu,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "memory": memory.result(),
        "stopped_at_line": stopped,
        "main_process_cpu_at_stop_s": main_cpu_at_stop if stopped else None,
        "lines": lines,
    }


def pipeline_env(corpus: Path, data_root: Path, home: Path, workers: int) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_DIR / "pipelines" / "dagster.yaml", home / "dagster.yaml")
    env = dict(os.environ)
    env.update(
        MELOFORMER_CORPUS_DIR=str(corpus),
        MELOFORMER_DATA_ROOT=str(data_root),
        DAGSTER_HOME=str(home),
        PYTHONUNBUFFERED="1",
    )
    return env


# The last line the main job prints about the data graph; what follows (training, evaluation)
# is not part of this benchmark unless --full-job.
DATA_GRAPH_DONE = re.compile(r"^artifacts under .*; dataset: ")
DATA_GRAPH_END = "end of the data graph (the job's 'artifacts under' line; then it is stopped)"
SHARDS_LINE = re.compile(r"corpus .*: (\d+) files, (\d+) shard\(s\) to process")
DONE_LINE = re.compile(r"^\s+(shard-\d+): done")


def parse_pipeline_output(lines: list[tuple[float, str, str]], wall: float) -> dict:
    """Phases from the timestamps of the job's own lines: start-up + refresh plan, shard runs,
    dataset job (vocabulary, dataset, checks) + exit."""
    out = [(t, line) for t, name, line in lines if name == "out"]
    planned = next(((t, m) for t, line in out if (m := SHARDS_LINE.search(line))), None)
    done = [(t, m.group(1)) for t, line in out if (m := DONE_LINE.match(line))]
    if planned is None:
        return {"shards_processed": 0}
    t_plan, match = planned
    t_last = done[-1][0] if done else t_plan
    per_shard = [b - a for a, b in zip([t_plan] + [t for t, _ in done[:-1]], [t for t, _ in done])]
    return {
        "corpus_files": int(match.group(1)),
        "shards_planned": int(match.group(2)),
        "shards_processed": len(done),
        "startup_and_plan_s": t_plan,
        "shard_runs_s": t_last - t_plan,
        "after_shards_s": wall - t_last,  # dataset job (+ exit or the rest of the job)
        "per_shard_s": {
            "min": min(per_shard, default=0),
            "max": max(per_shard, default=0),
            "mean": sum(per_shard) / len(per_shard) if per_shard else 0,
        },  # fmt: skip
    }


STEP_TIMES_SCRIPT = r"""
import json, sys
from collections import defaultdict
import dagster as dg
from dagster import DagsterEventType as E

skip = set(sys.argv[1].split(",")) if sys.argv[1] else set()
steps, runs = defaultdict(float), defaultdict(float)
counts = defaultdict(int)
with dg.DagsterInstance.get() as instance:
    for record in instance.get_run_records():
        run = record.dagster_run
        if run.run_id in skip:
            continue
        start = {}
        times = {}
        for entry in instance.all_logs(run.run_id):
            ev = entry.dagster_event
            if ev is None:
                continue
            kind = ev.event_type
            if kind == E.RUN_START:
                times["start"] = entry.timestamp
            elif kind in (E.RUN_SUCCESS, E.RUN_FAILURE):
                times["end"] = entry.timestamp
            elif kind == E.STEP_START:
                start[ev.step_key] = entry.timestamp
            elif kind in (E.STEP_SUCCESS, E.STEP_FAILURE) and ev.step_key in start:
                steps[ev.step_key] += entry.timestamp - start[ev.step_key]
                counts[ev.step_key] += 1
        if "start" in times and "end" in times:
            runs[run.job_name] += times["end"] - times["start"]
            counts["run:" + run.job_name] += 1
    ids = [r.dagster_run.run_id for r in instance.get_run_records()]
print(json.dumps({"step_s": steps, "run_s": runs, "counts": counts, "run_ids": ids}))
"""


def step_times(env: dict[str, str], skip_runs: list[str]) -> dict:
    """Per-step and per-job seconds from the event log of the runs not in ``skip_runs``."""
    import json

    proc = subprocess.run(
        [str(PYTHON), "-W", "ignore", "-c", STEP_TIMES_SCRIPT, ",".join(skip_runs)],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def filter_summary(data_root: Path) -> dict:
    import polars as pl

    files = sorted(data_root.glob("filtered_midi/*/shard-*.parquet"))
    if not files:
        return {}
    table = pl.concat([pl.read_parquet(f, columns=["accepted", "reason"]) for f in files])
    reasons = table.filter(~pl.col("accepted")).group_by("reason").len()
    return {
        "files": table.height,
        "accepted": int(table["accepted"].sum()),
        "rejected_by_reason": dict(sorted(reasons.iter_rows(), key=lambda r: -r[1])),
    }


def chain_summary(lines: list[tuple[float, str, str]]) -> dict:
    text = "\n".join(line for _, _, line in lines)
    out = {}
    if m := re.search(r"(\d+) files: (\d+) accepted, (\d+) rejected", text):
        out.update(files=int(m.group(1)), accepted=int(m.group(2)), rejected=int(m.group(3)))
    if m := re.search(r", (\d+(?:\.\d+)?) s\n", text + "\n"):
        out["internal_s"] = float(m.group(1))
    return out


# ---------------------------------------------------------------------------------------------
# One corpus size


def bench_size(
    size: int,
    pool: Path,
    work: Path,
    entries,
    refresh_fraction: float,
    workers: int,
    stop_on: re.Pattern | None,
) -> dict:
    n_refresh = max(1, math.ceil(size * refresh_fraction))
    corpus = work / f"corpus-{size}"
    link(entries[:size], pool, corpus)
    tag = f"size {size:,}"

    print(f"[{tag}] library chain: meloformer prepare --workers {workers}", flush=True)
    chain_out = work / f"chain-{size}"
    chain = run_measured(
        [str(MELOFORMER), "prepare", str(corpus), "--out", str(chain_out),
         "--workers", str(workers), "--quiet"],
        dict(os.environ), work / f"chain-{size}.log",
    )  # fmt: skip
    shutil.rmtree(chain_out, ignore_errors=True)

    env = pipeline_env(corpus, work / f"data-{size}", work / f"home-{size}", workers)
    print(f"[{tag}] end to end: python -m pipelines.run", flush=True)
    job = [str(PYTHON), "-m", "pipelines.run"]
    full = run_measured(job, env, work / f"full-{size}.log", stop_on)
    full_steps = step_times(env, [])
    filtered = filter_summary(work / f"data-{size}")

    link(entries[size : size + n_refresh], pool, corpus)
    print(f"[{tag}] refresh: {n_refresh} new files, python -m pipelines.run", flush=True)
    refresh = run_measured(job, env, work / f"refresh-{size}.log", stop_on)
    refresh_steps = step_times(env, full_steps["run_ids"])

    chain_rate = size / chain["wall_s"]
    e2e_rate = size / full["wall_s"]
    result = {
        "files": size,
        "refresh_new_files": n_refresh,
        "chain": {
            "wall_s": chain["wall_s"],
            "cpu_s": chain["cpu_s"],
            "load_average_1min": chain["load_average_1min"],
            "files_per_s": chain_rate,
            **chain_summary(chain["lines"]),
            "memory": chain["memory"],
        },
        "end_to_end": {
            "wall_s": full["wall_s"],
            "cpu_s": full["cpu_s"],
            "load_average_1min": full["load_average_1min"],
            "stopped_at_data_graph_end": full["stopped_at_line"],
            "files_per_s": e2e_rate,
            "phases": parse_pipeline_output(full["lines"], full["wall_s"]),
            "dagster_step_s": full_steps["step_s"],
            "dagster_run_s": full_steps["run_s"],
            "dagster_counts": full_steps["counts"],
            "filter": filtered,
            "memory": full["memory"],
        },
        "refresh": {
            "wall_s": refresh["wall_s"],
            "cpu_s": refresh["cpu_s"],
            "load_average_1min": refresh["load_average_1min"],
            "stopped_at_data_graph_end": refresh["stopped_at_line"],
            "fraction_of_full": refresh["wall_s"] / full["wall_s"],
            "cpu_fraction_of_full": refresh["cpu_s"] / full["cpu_s"],
            "phases": parse_pipeline_output(refresh["lines"], refresh["wall_s"]),
            "dagster_step_s": refresh_steps["step_s"],
            "dagster_run_s": refresh_steps["run_s"],
            "memory": refresh["memory"],
        },
        "throughput_ratio": e2e_rate / chain_rate,
        # the same ratio in CPU seconds per file: robust to other processes on the machine
        "cpu_ratio": chain["cpu_s"] / full["cpu_s"],
    }
    print(
        f"[{tag}] chain {chain_rate:.0f} files/s, end to end {e2e_rate:.0f} files/s "
        f"({full['wall_s']:.1f} s, {full['cpu_s']:.0f} CPU s vs chain {chain['cpu_s']:.0f}), "
        f"refresh {refresh['wall_s']:.1f} s, "
        f"peak tree RSS {full['memory']['peak_tree_rss_mb']:.0f} MB",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", default="2560,10240,102400", help="corpus sizes, comma-separated"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refresh-fraction", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=0, help="0: all available cores")
    parser.add_argument("--out", help="work folder (generated corpora, Dagster homes, logs); "
                        "default: a temporary folder, removed afterwards")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument(
        "--full-job",
        action="store_true",
        help="measure python -m pipelines.run to its exit (training included); "
        "default: up to the end of the data graph (its 'artifacts under' line)",
    )
    args = parser.parse_args()

    from meloformer_model.data.parallel import available_cores

    sizes = sorted(int(s) for s in args.sizes.split(","))
    workers = args.workers or available_cores()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="meloformer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        total = max(s + max(1, math.ceil(s * args.refresh_fraction)) for s in sizes)
        entries = plan(total, args.seed)
        written = write(entries, work / "pool")
        generation_s = time.perf_counter() - started
        print(f"scaled corpus: {total:,} files ({written:,} generated) in {generation_s:.1f} s "
              f"under {work / 'pool'}; {workers} worker(s)", flush=True)  # fmt: skip
        results = [
            bench_size(
                s,
                work / "pool",
                work,
                entries,
                args.refresh_fraction,
                workers,
                None if args.full_job else DATA_GRAPH_DONE,
            )
            for s in sizes
        ]
    finally:
        if not args.out and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    small, big = results[0], results[-1]
    rss_growth = (
        big["end_to_end"]["memory"]["peak_tree_rss_mb"]
        / small["end_to_end"]["memory"]["peak_tree_rss_mb"]
    )
    pss_growth = (
        big["end_to_end"]["memory"]["peak_tree_pss_mb"]
        / small["end_to_end"]["memory"]["peak_tree_pss_mb"]
    )
    ratio, fraction = big["throughput_ratio"], big["refresh"]["fraction_of_full"]
    goals = {
        "throughput_ratio": {"goal": f">= {GOAL_THROUGHPUT_RATIO}", "value": ratio,
                             "met": ratio >= GOAL_THROUGHPUT_RATIO},
        "refresh_fraction": {"goal": f"<= {GOAL_REFRESH_FRACTION}", "value": fraction,
                             "met": fraction <= GOAL_REFRESH_FRACTION},
        "rss_growth": {"goal": f"<= {GOAL_RSS_GROWTH} (peak tree RSS, {big['files']} vs "
                       f"{small['files']} files)", "value": rss_growth,
                       "met": rss_growth <= GOAL_RSS_GROWTH},
    }  # fmt: skip

    rows = [
        [
            f"{r['files']:,}",
            r["end_to_end"]["files_per_s"],
            r["chain"]["files_per_s"],
            f"{r['throughput_ratio']:.2f}",
            f"{r['cpu_ratio']:.2f}",
            r["end_to_end"]["memory"]["peak_tree_rss_mb"],
            r["end_to_end"]["memory"]["peak_tree_pss_mb"],
            r["chain"]["memory"]["peak_tree_rss_mb"],
            r["end_to_end"]["wall_s"],
            r["refresh"]["wall_s"],
            f"{100 * r['refresh']['fraction_of_full']:.1f} %",
        ]
        for r in results
    ]
    print(f"\n{workers} worker(s); end to end = python -m pipelines.run on a fresh Dagster home; "
          "chain = meloformer prepare")  # fmt: skip
    print_table(
        ["files", "e2e files/s", "chain files/s", "ratio", "CPU ratio", "peak RSS tree MB",
         "peak PSS tree MB",
         "chain RSS MB", "e2e s", "refresh s", "refresh/full"],
        rows,
    )  # fmt: skip
    for name, goal in goals.items():
        verdict = "met" if goal["met"] else "MISSED"
        print(f"{name}: {goal['value']:.3f} (goal {goal['goal']}): {verdict}")
    print(f"peak tree PSS growth {pss_growth:.2f}x; CPU ratio = chain CPU s / end-to-end CPU s "
          "(user + system of the whole process tree)")  # fmt: skip
    path = write_result(
        "pipeline",
        {
            "benchmark": "pipeline",
            "sizes": sizes,
            "seed": args.seed,
            "workers": workers,
            "refresh_fraction": args.refresh_fraction,
            "measured_until": "process exit" if args.full_job else DATA_GRAPH_END,
            "generation_s": generation_s,
            "machine": machine(),
            "versions": {p: md.version(p) for p in ("dagster", "symusic", "polars", "pyarrow")},
            "results": results,
            "rss_growth": rss_growth,
            "pss_growth": pss_growth,
            "goals": goals,
            "all_goals_met": all(g["met"] for g in goals.values()),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
