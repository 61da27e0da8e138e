"""Benchmark: the monitoring report (`pipelines.monitoring.monitor.monitor`) at 1k, 10k and 100k logged requests.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/drift.py [--sizes 1000,10000,100000] [--drift-share 0.5]
        [--seed 0] [--no-warm] [--set monitor.drift.embedding_sample_size=1000 ...]

For each size, a fresh SQLite inference log in a temporary folder is filled with SQLAlchemy bulk
inserts into the project's own tables (`pipelines.serving.inference_log.requests_table` and
`feedback_table`, engine from `make_engine`, so WAL mode as in production); the `InferenceLog`
writer thread is not used, it is not what is measured (and it would redact every text first).
Prompts are drawn with replacement, seeded, by the project's `simulate_traffic.traffic_prompts`:
a `--drift-share` of FOLDOC prompts (data/sample/foldoc.jsonl), the rest WordNet prompts of the
held-out test split (data/prepared/test.parquet). Each output is the sample's response to its
prompt. Statuses: 98.5% 200, 1% 503 (3 ms), 0.5% 500 (empty output); latencies of the 200s are
log-normal around 1.2 s; 5% of the answered requests carry a feedback score. The requests are
spread over the 24 h window that ends at 2026-11-24T00:00:00Z.

Each measurement runs `pipelines.monitoring.monitor.monitor(params, end)` in a fresh subprocess, with
params.yaml plus overrides: the log, reports, embedding cache (cold: a new file) and an MLflow
store (`tracking.uri`) in the temporary folder, `monitor.reference_outputs=0` (the champion's
answers on the reference are cached per model version, not a per-window cost) and
`monitor.retrain.require_new_data=false`. The heavy imports (evidently, sentence-transformers,
torch, mlflow) and the creation of the fresh MLflow store happen in the subprocess before the
timed call and are reported apart. Phases are timed by wrapping the functions monitor() calls;
peak RSS is the subprocess's own `ru_maxrss`. The largest size is run a second time on the same
window with the embedding cache the first run saved (warm cache).

Before commit 33f5d83 this crashed on any window with an empty answer (Evidently's
NonLetterCharacterPercentage divided by zero) or with more rows than
monitor.drift.embedding_sample_size (NaN vectors reached the embedding classifier).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

END = datetime(2026, 11, 24, tzinfo=UTC)


# --- the inference log ---------------------------------------------------------------------


def build_log(db: Path, rows: int, drift_share: float, seed: int) -> dict[str, Any]:
    """Fill a fresh SQLite inference log with `rows` requests (and feedback) in the window ending at END."""
    import numpy as np

    from pipelines.commands.simulate_traffic import traffic_prompts
    from pipelines.config.params import BundledSource, load_params
    from pipelines.data.sources import read_source
    from pipelines.io import read_parquet
    from pipelines.serving.inference_log import feedback_table, make_engine, metadata, requests_table

    started = time.perf_counter()
    params = load_params(REPO / "params.yaml")
    picks = traffic_prompts(params, rows, drift_share, seed)
    test = read_parquet(params.paths.prepared_dir / "test.parquet", produced_by="prepare")
    _, foldoc = read_source(BundledSource(kind="bundled", name="foldoc"), 0, params.paths.sample_dir)
    answers = dict(zip(test["prompt"], test["response"])) | dict(zip(foldoc["prompt"], foldoc["response"]))

    rng = np.random.default_rng(seed + 1)
    window = timedelta(hours=params.monitor.window_hours)
    start = END - window
    offsets = np.sort(rng.random(rows)) * window.total_seconds()
    statuses = rng.choice([200, 503, 500], size=rows, p=[0.985, 0.01, 0.005])
    latencies = rng.lognormal(np.log(1200.0), 0.5, rows)
    requests, feedback = [], []
    for i, ((prompt, _), status, latency, offset) in enumerate(zip(picks, statuses, latencies, offsets)):
        created = start + timedelta(seconds=float(offset))
        ok = status == 200
        output = answers[prompt] if ok else ""
        requests.append({
            "request_id": f"bench-{seed}-{i}", "created_at": created, "endpoint": "chat.completions",
            "model_name": params.registry.model_name, "model_version": "1", "prompt": prompt, "output": output,
            "status": int(status), "latency_ms": float(latency) if ok else (3.0 if status == 503 else 850.0),
            "prompt_tokens": 30 + len(prompt) // 4, "completion_tokens": len(output) // 4,
            "error": None if ok else ("server busy" if status == 503 else "generation failed"),
            "params": json.dumps({"max_tokens": 48, "temperature": 0.0}, sort_keys=True)})
        if ok and rng.random() < 0.05:
            feedback.append({"feedback_id": f"fb-{seed}-{i}", "request_id": f"bench-{seed}-{i}",
                             "created_at": created + timedelta(seconds=30),
                             "score": 1.0 if rng.random() < 0.8 else 0.0, "comment": None})
    generated = time.perf_counter() - started

    started = time.perf_counter()
    engine = make_engine(f"sqlite:///{db}")
    try:
        metadata.create_all(engine)
        with engine.begin() as connection:
            for first in range(0, len(requests), 10_000):
                connection.execute(requests_table.insert(), requests[first: first + 10_000])
            if feedback:
                connection.execute(feedback_table.insert(), feedback)
    finally:
        engine.dispose()
    return {"rows": rows, "distinct_prompts": len({p for p, _ in picks}),
            "foldoc": sum(1 for _, source in picks if source == "foldoc"), "feedback": len(feedback),
            "generate_s": generated, "insert_s": time.perf_counter() - started,
            "db_mib": db.stat().st_size / 2**20}


# --- the measured subprocess ---------------------------------------------------------------


class Phases:
    """Seconds spent in wrapped functions, by label (nested labels overlap their parents), and the
    process's peak RSS when each last returned (so the phase that raised the peak shows)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_after: dict[str, float] = {}
        self.facts: dict[str, Any] = {}

    def wrap(self, owner: Any, name: str, label: str) -> None:
        raw = inspect.getattr_static(owner, name)
        kind = type(raw) if isinstance(raw, classmethod | staticmethod) else None
        func = raw.__func__ if kind else raw

        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.peak_after[label] = round(peak_mib())

        setattr(owner, name, kind(timed) if kind else timed)


def instrument(phases: Phases) -> None:
    from evidently import Dataset, Report
    from evidently.core.report import Snapshot
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import ModelDriftMethod
    from evidently.legacy.metrics.data_drift.embeddings_drift import EmbeddingsDriftMetric

    import pipelines.monitoring.monitor as monitor
    import pipelines.serving.inference_log as inference_log

    for owner, name, label in [
        (monitor, "champion_reference", "champion"), (monitor, "reference_frame", "reference"),
        (inference_log, "read_records", "read_log"), (monitor, "clean_traffic", "clean"),
        (monitor, "descriptor_frames", "frames"), (monitor.EmbeddingCache, "_load_model", "model_load"),
        (monitor, "build_report", "report"), (Dataset, "from_pandas", "datasets"), (Report, "run", "metrics"),
        (EmbeddingsDriftMetric, "calculate", "embedding_metric"), (ModelDriftMethod, "__call__", "classifier"),
        (monitor.EmbeddingCache, "save", "cache_save"), (Snapshot, "save_html", "html"), (Snapshot, "dict", "dict"),
        (monitor, "log_to_mlflow", "mlflow")]:
        phases.wrap(owner, name, label)

    embed = monitor.EmbeddingCache.embed

    @functools.wraps(embed)
    def counted(self: Any, texts: list[str]) -> Any:
        missing = {self.key(t) for t in texts} - self.vectors.keys()
        phases.facts["embedded_rows"] = phases.facts.get("embedded_rows", 0) + len(texts)
        phases.facts["encoded_texts"] = phases.facts.get("encoded_texts", 0) + len(missing)
        started = time.perf_counter()
        try:
            return embed(self, texts)
        finally:
            phases.seconds["embed"] += time.perf_counter() - started

    monitor.EmbeddingCache.embed = counted


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(folder: Path, db: Path, overrides: list[str]) -> None:
    """Runs in the subprocess: one monitor() call, results as JSON on the last stdout line."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    import evidently  # noqa: F401 - imported here so that the timed call does not pay for it
    import mlflow
    import sentence_transformers  # noqa: F401
    import sklearn  # noqa: F401

    import pipelines.monitoring.monitor as monitor
    from pipelines.config.params import load_params

    imports = time.perf_counter() - started
    params = load_params(REPO / "params.yaml", [
        f"inference_log.url=sqlite:///{db}", f"monitor.reports_dir={folder / 'reports'}",
        f"monitor.embedding_cache={folder / 'cache.npz'}", "monitor.retrain.require_new_data=false",
        "monitor.reference_outputs=0", f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", *overrides])
    started = time.perf_counter()
    mlflow.MlflowClient(tracking_uri=params.tracking.uri).search_experiments()  # creates a fresh store
    store = time.perf_counter() - started
    phases = Phases()
    instrument(phases)
    warm = (folder / "cache.npz").exists()
    before_mib, cpu_before, load = peak_mib(), cpu_seconds(), os.getloadavg()[0]
    started = time.perf_counter()
    error, decision = None, {}
    try:
        decision = monitor.monitor(params, END)
    except Exception as exc:  # noqa: BLE001 - the failure is a result
        import traceback

        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        where = traceback.extract_tb(exc.__traceback__)[-1]
        error += f" (at {Path(where.filename).name}:{where.lineno} {where.name})"
        traceback.print_exc(file=sys.stderr)
    total = time.perf_counter() - started
    drift = decision.get("drift", {})
    print(json.dumps({
        "warm": warm, "seconds": total, "cpu_seconds": cpu_seconds() - cpu_before,
        "phases": phases.seconds, "peak_after": phases.peak_after, "facts": phases.facts,
        "imports_s": imports, "store_s": store,
        "peak_mib": peak_mib(), "peak_before_mib": before_mib, "load_at_start": load, "error": error,
        "status": decision.get("status"), "rows_seen": decision.get("rows"), "drifted": drift.get("detected"),
        "drifted_signals": drift.get("drifted_signals"),
        "roc_auc": drift.get("signals", {}).get("prompt_embedding", {}).get("roc_auc")}))


def measure(folder: Path, db: Path, overrides: list[str]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    extra = [arg for override in overrides for arg in ("--set", override)]
    out = subprocess.run([sys.executable, __file__, "--worker", str(folder), "--db", str(db), *extra], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise SystemExit(f"worker failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["stderr"] = [line for line in out.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    result["traceback"] = out.stderr.splitlines()[-12:] if result["error"] else []
    return result


# --- the table -----------------------------------------------------------------------------


def row(build: dict[str, Any], r: dict[str, Any]) -> str:
    p = r["phases"]
    other = r["seconds"] - sum(p.get(k, 0.0) for k in ("champion", "reference", "read_log", "clean", "frames",
                                                       "report", "cache_save", "html", "dict", "mlflow"))
    tsne = p.get("embedding_metric", 0.0) - p.get("classifier", 0.0)
    outcome = r["error"] or (f"{r['status']}, drift {r['drifted']} (AUC {r['roc_auc']:.2f})"
                             if r["roc_auc"] is not None else f"{r['status']}, drift {r['drifted']}")
    label = f"{build['rows']:,}" + (" (warm cache)" if r["warm"] else "")
    embed = f"{p.get('embed', 0.0):.2f} ({r['facts'].get('encoded_texts', 0):,})"
    return (f"| {label} | {build['distinct_prompts']:,} | {r['seconds']:.2f} | "
            f"{r['cpu_seconds']:.1f} | {p.get('read_log', 0.0):.2f} | {embed} | {p.get('datasets', 0.0):.2f} | "
            f"{p.get('metrics', 0.0):.2f} | {p.get('classifier', 0.0):.2f} | {tsne:.2f} | "
            f"{p.get('html', 0.0) + p.get('dict', 0.0):.2f} | {p.get('mlflow', 0.0):.2f} | "
            f"{other + p.get('champion', 0.0) + p.get('reference', 0.0) + p.get('clean', 0.0):.2f} | "
            f"{r['peak_mib']:,.0f} | {build['rows'] / r['seconds']:,.0f} | {outcome} |")


HEADER = ("| rows | distinct prompts | monitor() s | CPU s | read log | embed (texts encoded) | "
          "datasets + descriptors | Report.run | of which classifier | of which t-SNE plot | HTML + dict | "
          "MLflow | rest | peak RSS (MiB) | rows/s | outcome |\n" + "|" + "---:|" * 15 + "---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated numbers of logged requests")
    parser.add_argument("--drift-share", type=float, default=0.5, help="share of FOLDOC (drifted) prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-cache run of the largest size")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override for monitor(), e.g. monitor.drift.embedding_sample_size=1000")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(REPO)  # params.yaml's relative paths
    if args.worker:
        worker(args.worker, args.db, args.overrides)
        return
    sizes = [int(s) for s in args.sizes.split(",") if s]
    load = os.getloadavg()
    print(f"overrides: {args.overrides or 'none'}; machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; "
          f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; load average at start {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}", flush=True)
    lines = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
            db = Path(tmp) / "inference.db"
            build = build_log(db, size, args.drift_share, args.seed)
            print(f"log of {size:,} requests ({build['foldoc']:,} FOLDOC, {build['distinct_prompts']:,} distinct "
                  f"prompts, {build['feedback']:,} feedback): generated in {build['generate_s']:.1f} s, inserted in "
                  f"{build['insert_s']:.1f} s, {build['db_mib']:.1f} MiB", flush=True)
            runs = [measure(Path(tmp) / "run", db, args.overrides)]
            if size == max(sizes) and not args.no_warm and not runs[0]["error"]:
                runs.append(measure(Path(tmp) / "run", db, args.overrides))  # the same window and cache file: warm
            for r in runs:
                print(f"  {'warm' if r['warm'] else 'cold'} cache: {r['seconds']:.2f} s, peak {r['peak_mib']:,.0f} MiB "
                      f"(after imports {r['peak_before_mib']:,.0f}), imports {r['imports_s']:.1f} s, store "
                      f"{r['store_s']:.1f} s, load {r['load_at_start']:.2f}, {r['error'] or r['drifted_signals']}; "
                      f"phases { {k: round(v, 2) for k, v in r['phases'].items()} } {r['facts']}; peak MiB after "
                      f"{r['peak_after']}", flush=True)
                for line in r["stderr"][:3] + r["traceback"]:
                    print(f"    {line[:200]}")
                lines.append(row(build, r))
    print("\n" + HEADER)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
