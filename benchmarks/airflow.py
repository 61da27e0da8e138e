"""Benchmark: DAG parse time inside Airflow, and Airflow's overhead on a training run vs `dvc repro`.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/airflow.py [--repeats 20]

1. Parse time per DAG file: `airflow dags report` (Airflow's own DagBag timing, one parse in a
   fresh process, temporary AIRFLOW_HOME), and the median of `--repeats` parses of each file by
   Airflow's BundleDagBag in one process (the dag-processor's steady state).
2. Overhead: three copies of the project set up as tests/support.tiny_pipeline_project does
   (a tiny Llama, 1,500 WordNet rows, 4 steps; MLflow in a SQLite file per copy), each cold
   (own DVC cache), side by side in this run:
     A. `dvc repro` of all stages;
     B. `airflow dags test llmops_training` (Airflow runs every task in its process);
     C. the real components (`llmops airflow`: scheduler + LocalExecutor + api-server), one run
        triggered through the REST API, timed from the trigger to the run's success.
   Then each again with nothing changed (every stage a cache hit: the orchestration cost
   alone). Ratios are B/A and C/A.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import BIN, build_tiny_tokenizer, free_port, tiny_pipeline_project  # noqa: E402


def airflow_env(home: Path, project_root: Path, base: dict[str, str]) -> dict[str, str]:
    return {**base, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(project_root / "dags"), "AIRFLOW_VAR_LLMOPS_REPO": str(project_root),
            "AIRFLOW_VAR_LLMOPS_BIN": str(BIN), "AIRFLOW_VAR_LLMOPS_TRAINING_SCHEDULE": "none",
            "AIRFLOW_VAR_LLMOPS_MONITORING_SCHEDULE": "none"}


def run(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def parse_times(tmp: Path, repeats: int) -> dict[str, dict[str, float]]:
    home = tmp / "parse-home"
    home.mkdir()
    env = airflow_env(home, REPO, dict(os.environ))
    run([str(BIN / "airflow"), "db", "migrate"], env, REPO)
    out = subprocess.run([str(BIN / "airflow"), "dags", "report", "-o", "json"], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    report = {Path(r["file"]).name: float(str(r["duration"]).rstrip("s").split(":")[-1])
              for r in json.loads(out.strip().splitlines()[-1])}  # after any warning lines
    code = f"""
import json, statistics, time
from pathlib import Path

import yaml
from airflow.dag_processing.dagbag import BundleDagBag
dags = Path({str(REPO / 'dags')!r})
times = {{}}
for name in ("llmops_training.py", "llmops_monitoring.py"):
    BundleDagBag(dag_folder=str(dags / name), bundle_path=dags)  # warm the imports
    samples = []
    for _ in range({repeats}):
        started = time.perf_counter()
        BundleDagBag(dag_folder=str(dags / name), bundle_path=dags)
        samples.append(time.perf_counter() - started)
    times[name] = statistics.median(samples)
print(json.dumps(times))
"""
    steady = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])
    return {name: {"report": report.get(name, float("nan")), "steady": steady[name]} for name in steady}


def live_run(project, home: Path) -> tuple[float, float, float]:
    """(startup s, cold run s, cached run s) with the real components."""
    from pipelines.commands.airflow import LocalAirflow
    from tests.integration.test_airflow import FORM_DEFAULTS, Api

    env = airflow_env(home, project.root, project.env)
    airflow = LocalAirflow(project.root, home, free_port(), base_env=env)
    started = time.perf_counter()
    airflow.start()
    try:
        airflow.wait_healthy(timeout=300)
        api = Api(airflow.url, airflow.token())
        while "llmops_training" not in {d["dag_id"] for d in api.call("GET", "dags")["dags"]}:
            time.sleep(1)
        api.call("PATCH", "dags/llmops_training", {"is_paused": False})
        startup = time.perf_counter() - started
        timings = []
        for reason in ("cold", "cached"):
            started = time.perf_counter()
            run_id = api.trigger("llmops_training", {**FORM_DEFAULTS, "reason": reason})
            result = api.wait("llmops_training", run_id, timeout=1800)
            timings.append(time.perf_counter() - started)
            if result["state"] != "success":
                raise SystemExit(f"live run {reason} ended {result['state']}: {api.states('llmops_training', run_id)}")
        return startup, timings[0], timings[1]
    finally:
        airflow.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; load average at start {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="airflow-bench-") as name:
        tmp = Path(name)
        parse = parse_times(tmp, args.repeats)
        print(f"\n| DAG file | `airflow dags report` (s) | median of {args.repeats} parses in one process (ms) |\n"
              "|---|---:|---:|")
        for file, t in parse.items():
            print(f"| {file} | {t['report']:.3f} | {t['steady'] * 1000:.1f} |", flush=True)

        tokenizer = build_tiny_tokenizer(tmp / "tokenizer")
        projects = {k: tiny_pipeline_project(tmp / k / "project", tokenizer, f"sqlite:///{tmp / k / 'mlflow.db'}")
                    for k in "ABC"}
        a = projects["A"]
        dvc = [str(BIN / "dvc"), "repro"]
        a_cold = run(dvc, a.env, a.root)
        a_cached = run(dvc, a.env, a.root)
        print(f"A dvc repro: cold {a_cold:.1f} s, cached {a_cached:.1f} s", flush=True)
        b = projects["B"]
        home = tmp / "B" / "home"
        home.mkdir()
        env = airflow_env(home, b.root, b.env)
        run([str(BIN / "airflow"), "db", "migrate"], env, b.root)
        test = [str(BIN / "airflow"), "dags", "test", "llmops_training", "-c", json.dumps({"reason": "bench"})]
        b_cold = run(test, env, b.root)
        b_cached = run(test, env, b.root)
        print(f"B airflow dags test: cold {b_cold:.1f} s, cached {b_cached:.1f} s", flush=True)
        startup, c_cold, c_cached = live_run(projects["C"], tmp / "C" / "home")
        print(f"C live (startup {startup:.1f} s): cold {c_cold:.1f} s, cached {c_cached:.1f} s", flush=True)
        load = os.getloadavg()
        print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
        stages = len(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
        print(f"| run | cold: all {stages} stages (s) | vs dvc repro | cached: nothing to do (s) | vs dvc repro |\n"
              "|---|---:|---:|---:|---:|")
        print(f"| A. `dvc repro` | {a_cold:.1f} | 1.00x | {a_cached:.1f} | 1.00x |")
        print(f"| B. `airflow dags test llmops_training` | {b_cold:.1f} | {b_cold / a_cold:.2f}x | {b_cached:.1f} | "
              f"{b_cached / a_cached:.2f}x |")
        print(f"| C. scheduler + LocalExecutor, REST trigger to success | {c_cold:.1f} | {c_cold / a_cold:.2f}x | "
              f"{c_cached:.1f} | {c_cached / a_cached:.2f}x |")
        print(f"\nC's components took {startup:.1f} s from start to healthy with the DAG parsed (not in the runs).")


if __name__ == "__main__":
    main()
