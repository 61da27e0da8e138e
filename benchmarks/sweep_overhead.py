"""Benchmark: what a sweep trial costs over a plain `dvc repro train` of the same kind of params.

    python benchmarks/sweep_overhead.py [--steps 6] [--pairs 2] [--metric eval_loss] [--workdir DIR]

In a fresh copy of the project (the demo data, the bundled SmolLM2-135M, `train.max_steps`
--steps), after the data stages and base_model have run once: `--pairs` times, side by side,
(a) params.yaml committed with learning rate x and `dvc repro train` (what a user runs by hand),
(b) one more trial of `llmops sweep` whose params the benchmark enqueues with another learning
rate y (so neither is a run-cache hit; both train for real). The trial adds the sweep's own work:
Optuna's study (SQLite), `llmops experiment start/save/end` (params.yaml from HEAD, `dvc exp
save`), an MLflow child run, the pruning reports and the objective. With --metric eval_loss the
objective is read from training's metrics (no generation), so the ratio is the bookkeeping; with
the gate's metric (rouge_l) the validation generation is timed too and reported apart.
Prints Markdown: seconds per run and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--metric", default="eval_loss")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    import optuna

    from tests.support import commit, make_project

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    project = make_project(workdir / "project")
    project.env = {**project.env, "MLFLOW_TRACKING_URI": ""}  # the project's own SQLite store
    project.set_params(train={"max_steps": args.steps, "eval_steps": max(1, args.steps // 2),
                              "save_steps": args.steps},
                       sweep={"metric": args.metric, "trials": 1, "enqueue_defaults": False, "pruner": "none",
                              "space": {"train.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2,
                                                                "log": True}}})
    commit(project, "benchmark params")
    llmops, dvc = str(Path(sys.executable).parent / "llmops"), str(Path(sys.executable).parent / "dvc")
    start = time.perf_counter()
    project.run(dvc, "repro", "prepare", "base_model", timeout=3600)
    print(f"data stages and base_model: {time.perf_counter() - start:.0f} s (once, not counted)", file=sys.stderr)

    plain, trials, invocations, objective = [], [], [], []
    rates = [2.0e-4 * (1.5 ** i) for i in range(2 * args.pairs)]
    for pair in range(args.pairs):
        # (a) by hand: commit params with learning rate x, dvc repro train
        project.set_params(train={"learning_rate": rates[2 * pair]})
        commit(project, f"lr {rates[2 * pair]}")
        start = time.perf_counter()
        project.run(dvc, "repro", "train", timeout=3600)
        plain.append(time.perf_counter() - start)
        # (b) the sweep's next trial, with learning rate y (enqueued: the same kind of run)
        study = optuna.create_study(study_name="bench", storage=f"sqlite:///{project.root / 'sweeps.db'}",
                                    direction="minimize" if args.metric in ("eval_loss", "perplexity") else "maximize",
                                    load_if_exists=True)
        study.enqueue_trial({"train.learning_rate": rates[2 * pair + 1]})
        start = time.perf_counter()
        project.run(llmops, "sweep", "--study", "bench", "--trials", str(pair + 1), timeout=3600)
        invocations.append(time.perf_counter() - start)
        summary = json.loads((project.root / "reports/sweep/bench/summary.json").read_text())
        trials.append(summary["trials"][-1]["seconds"])  # Optuna's trial duration: ask .. tell
        saved = json.loads((project.root / "reports/sweep/objective.json").read_text())
        objective.append(saved["seconds"])
        assert summary["trials"][-1]["state"] == "COMPLETE", summary["trials"][-1]
        print(f"pair {pair}: dvc repro train {plain[-1]:.1f} s, sweep trial {trials[-1]:.1f} s, whole "
              f"`llmops sweep` {invocations[-1]:.1f} s (objective {objective[-1]:.1f} s)", file=sys.stderr)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"Machine: {os.cpu_count()} cores, {cpu}. SmolLM2-135M, {args.steps} steps, objective {args.metric}, "
          f"{args.pairs} pairs interleaved.\n")
    print("| run | seconds (median) | vs `dvc repro train` |\n|---|---:|---:|")
    base = statistics.median(plain)
    print(f"| `dvc repro train` (params committed by hand) | {base:.1f} | 1.00x |")
    print(f"| `llmops sweep`: one trial (same work + Optuna, experiment start/save/end, MLflow) | "
          f"{statistics.median(trials):.1f} | {statistics.median(trials) / base:.2f}x |")
    print(f"| of which the objective ({args.metric} on validation) | {statistics.median(objective):.1f} | |")
    print(f"| the whole `llmops sweep` invocation for that one trial (+ study, summary, plots, MLflow run) | "
          f"{statistics.median(invocations):.1f} | {statistics.median(invocations) / base:.2f}x |")
    print(f"\nRaw: plain {[round(x, 1) for x in plain]}, trials {trials}, invocations "
          f"{[round(x, 1) for x in invocations]}")


if __name__ == "__main__":
    main()
