"""Blind A/B review of a candidate by people, in Label Studio: the work behind
`llmops review request` and `llmops review collect` (docs/review.md).

request: N test-split prompts (seeded sample) and N recent production prompts (from the
inference log, PII already redacted there), each answered by the candidate and by its opponent
(the champion it was evaluated against; the base model when there was none), both through the candidate's registered
prompt template and decoding. The two answers go to a Label Studio project, one task per prompt,
as "Answer A" / "Answer B" in a random order (seeded per prompt), which is recorded in the
task's `meta` (not shown in the labeling view) and on the version (`review.*` tags). Sending
the same version again adds only the prompts it lacks.

collect: every reviewer's choice (A, B or Tie) is mapped back to candidate / opponent / tie.
The candidate's win rate counts a tie as half a win; its interval is a two-level percentile
bootstrap (tasks, then each task's judgements), so that several reviewers of one task are not
counted as independent evidence and reviewers who disagree widen it. Agreement between
reviewers is Krippendorff's alpha (nominal), over the tasks two or more people judged. The
summary goes to the version's tags and its model card (pipelines/registry/model_registry.py
renders the "Human review" section from the tags), to an MLflow run, and to
`reports/review/v<version>/summary.json`; the promote gate reads the tags (promote.human_review).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config.params import Params
from pipelines.config.settings import inference_log_url
from pipelines.data.templates import render_prompt
from pipelines.errors import DataError
from pipelines.evaluation.agreement import LEXICAL, ReviewedPair, majority
from pipelines.evaluation.agreement import metric_agreement as score_agreement
from pipelines.io import atomic_write_json, read_parquet
from pipelines.model.lm import CausalLM, Decoding
from pipelines.registry.model_registry import CHALLENGER, CHAMPION, METRIC_AGREEMENT_TAG, STATUS_TAG, Registry, now
from pipelines.registry.promotion import apply
from pipelines.review.labelstudio import (
    CANDIDATE_CONFIG,
    ReviewUnavailable,
    annotation_reviewer,
    annotation_values,
    connect,
)
from pipelines.serving.inference_log import read_records

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

CHOICE_FIELD, BETTER_FIELD = "preference", "better_answer"
CANDIDATE, OPPONENT, TIE = "candidate", "opponent", "tie"
SCORE = {CANDIDATE: 1.0, TIE: 0.5, OPPONENT: 0.0}
TAG_PREFIX = "review."


@dataclass(frozen=True)
class Judgement:
    """One reviewer's verdict on one task, mapped back through the task's recorded A/B order."""

    task_id: int
    item: str
    source: str  # test | production
    reviewer: str
    choice: str  # candidate | opponent | tie
    better_answer: str = ""
    at: str = ""


# --- request ----------------------------------------------------------------------------------

def project_title(params: Params, version: str) -> str:
    return f"{params.review.candidate_project} v{version}"


def candidate_version(params: Params, registry: Registry, version: str | None) -> str:
    if version:
        registry.version(version)  # a clear registry error when it does not exist
        return str(version)
    challenger = registry.alias_version(CHALLENGER)
    if challenger is None:
        raise DataError(f"no version of '{registry.name}' holds the alias {CHALLENGER}; run `llmops register` "
                        "first or pass --version")
    return challenger


def test_prompts(params: Params, n: int, seed: int) -> list[dict[str, str]]:
    if n == 0:
        return []
    frame = read_parquet(params.paths.prepared_dir / "test.parquet", produced_by="prepare")
    frame = frame.sample(n=min(n, len(frame)), random_state=seed).sort_values("id")
    return [{"item": f"test:{row.id}", "source": "test", "prompt": str(row.prompt), "reference": str(row.response)}
            for row in frame.itertuples()]


def production_prompts(records: pd.DataFrame, n: int, seed: int) -> list[dict[str, str]]:
    """Distinct prompts of answered requests, a seeded sample of at most n (most recent first on ties)."""
    if n == 0 or records.empty:
        return []
    answered = records[(records["status"] == 200) & records["prompt"].str.strip().astype(bool)]
    answered = answered.sort_values("created_at", ascending=False).drop_duplicates("prompt")
    rows = list(answered.itertuples())
    random.Random(seed).shuffle(rows)
    return [{"item": f"production:{row.request_id}", "source": "production", "prompt": str(row.prompt),
             "request_id": str(row.request_id)} for row in rows[:n]]


def a_is_candidate(item: str, version: str, seed: int) -> bool:
    """The recorded A/B order of one prompt: a seeded coin per (seed, version, item)."""
    digest = hashlib.sha256(f"{seed}\x1f{version}\x1f{item}".encode()).digest()
    return digest[0] % 2 == 0


class Answerer:
    """A model answering raw prompts the way the candidate is served: its template, system prompt, decoding."""

    def __init__(self, lm: CausalLM, config: dict[str, Any], max_new_tokens: int) -> None:
        self.lm, self.config = lm, config
        self.decoding = Decoding(**{**config["decoding"], "max_new_tokens": max_new_tokens})

    def answer(self, prompts: list[str]) -> list[str]:
        texts = [render_prompt(p, self.config["template"], self.config.get("system_prompt"), self.lm.tokenizer)
                 for p in prompts]
        return self.lm.generate(texts, self.decoding).texts


def opponent_version(registry: Registry, version: str) -> str | None:
    """The champion the candidate was evaluated against (its `evaluate.champion_version` tag), so that
    people compare what the gate compared; a version registered without the tag: the champion now."""
    tags = registry.version(version).tags
    if "evaluate.champion_version" in tags:
        champion = tags["evaluate.champion_version"]
        return None if champion in ("", "none") else champion
    champion = registry.alias_version(CHAMPION)
    return None if champion == version else champion


def load_answerers(params: Params, registry: Registry, version: str) -> tuple[Answerer, Answerer, str]:
    """The candidate and its opponent (the champion it was evaluated against, else the base model),
    and the opponent's name."""
    from pipelines.model.packaging import load_registered  # imports mlflow

    limit = params.review.candidate.max_new_tokens
    candidate = load_registered(registry, version)
    champion = opponent_version(registry, version)
    if champion is not None:
        opponent = load_registered(registry, champion)
        return (Answerer(candidate.lm, candidate.config, limit), Answerer(opponent.lm, opponent.config, limit),
                f"champion v{champion}")
    base = CausalLM.load(params.base_model.output_dir, dtype=candidate.config.get("dtype", "float32"), name="base")
    # the base model answers through the candidate's template: the comparison is of the weights
    return (Answerer(candidate.lm, candidate.config, limit), Answerer(base, candidate.config, limit),
            "base model")


def build_tasks(items: list[dict[str, str]], candidate_answers: list[str], opponent_answers: list[str],
                version: str, opponent: str, seed: int) -> list[dict[str, Any]]:
    tasks = []
    for item, mine, theirs in zip(items, candidate_answers, opponent_answers):
        a_candidate = a_is_candidate(item["item"], version, seed)
        tasks.append({
            "data": {"prompt": item["prompt"], "answer_a": mine if a_candidate else theirs,
                     "answer_b": theirs if a_candidate else mine},
            "meta": {**item, "a": CANDIDATE if a_candidate else OPPONENT, "candidate_version": version,
                     "opponent": opponent},
        })
    return tasks


def request(params: Params, version: str | None = None, when_enabled: bool = False, **_: Any) -> dict[str, Any]:
    """Send the candidate's blind A/B task set. `when_enabled` (the training DAG): nothing when
    promote.human_review is off; with advisory, a review tool that is down is only a warning."""
    settings, mode = params.review.candidate, params.promote.human_review
    if when_enabled and mode == "off":
        logger.info("review request: promote.human_review is off; nothing sent")
        return {"skipped": "promote.human_review is off"}
    registry = Registry(params)
    version = candidate_version(params, registry, version)
    try:
        client = connect(params)  # fail before loading models when the tool is down
        client.check()
    except ReviewUnavailable as error:
        if when_enabled and mode == "advisory":
            logger.warning("review request: %s; v%s goes on without an (advisory) human review", error, version)
            return {"version": version, "skipped": str(error)}
        raise
    project = client.ensure_project(project_title(params, version), CANDIDATE_CONFIG,
                                    description=f"Blind A/B review of {registry.name} v{version}. Pick the better "
                                                "answer to the prompt, or Tie; write a better answer if you can.",
                                    maximum_annotations=settings.reviewers_per_task)
    sent = {(task.get("meta") or {}).get("item") for task in client.tasks(project)}
    end = datetime.now(UTC)
    records = read_records(inference_log_url(params.inference_log).value,
                           start=end - timedelta(days=settings.production_days), end=end)
    items = test_prompts(params, settings.test_prompts, settings.seed)
    items += production_prompts(records, settings.production_prompts, settings.seed)
    new = [item for item in items if item["item"] not in sent]
    if not items:
        raise DataError("no prompts to review: review.candidate.test_prompts and production_prompts are 0, or the "
                        "test split and the inference log are empty")
    opponent = ""
    if new:
        candidate, other, opponent = load_answerers(params, registry, version)
        prompts = [item["prompt"] for item in new]
        tasks = build_tasks(new, candidate.answer(prompts), other.answer(prompts), version, opponent, settings.seed)
        client.import_tasks(project, tasks)
    total = len(sent - {None}) + len(new)
    tags: dict[str, Any] = {"review.project_id": project, "review.tasks": total}
    if "review.requested_at" not in registry.version(version).tags:
        tags["review.requested_at"] = now()  # the first request starts the deadline; a re-send does not move it
    if opponent:
        tags["review.opponent"] = opponent
    registry.tag(version, tags)
    logger.info("review request: v%s: %d new task(s), %d in all, in project %s (%s/projects/%s)", version,
                len(new), total, project, client.url, project)
    print(f"{client.url}/projects/{project}")
    return {"version": version, "project_id": project, "new_tasks": len(new), "tasks": total}


# --- collect ----------------------------------------------------------------------------------

def judgements_from(tasks: list[dict[str, Any]]) -> list[Judgement]:
    """Tasks as Label Studio's API returns them (with `annotations`) -> one judgement per reviewer and task.

    Skipped annotations (`was_cancelled`), ones without a choice, and tasks without the recorded
    order (not made by `llmops review request`) count for nothing. A reviewer who annotated a task
    twice counts once, with the latest annotation.
    """
    judgements: dict[tuple[int, str], Judgement] = {}
    for task in tasks:
        meta = task.get("meta") or {}
        if meta.get("a") not in (CANDIDATE, OPPONENT):
            continue
        annotations = sorted(task.get("annotations") or [], key=lambda a: str(a.get("updated_at") or
                                                                               a.get("created_at") or ""))
        for annotation in annotations:
            if annotation.get("was_cancelled"):
                continue
            choice = annotation_values(annotation, CHOICE_FIELD, "choices")
            if not choice:
                continue
            picked = choice[0].strip().lower()
            if picked == "tie":
                mapped = TIE
            elif picked in ("a", "b"):
                a_side = meta["a"]
                mapped = a_side if picked == "a" else (OPPONENT if a_side == CANDIDATE else CANDIDATE)
            else:
                continue
            better = " ".join(t.strip() for t in annotation_values(annotation, BETTER_FIELD, "text")).strip()
            reviewer = annotation_reviewer(annotation)
            judgements[(int(task["id"]), reviewer)] = Judgement(
                task_id=int(task["id"]), item=str(meta.get("item", task["id"])), source=str(meta.get("source", "")),
                reviewer=reviewer, choice=mapped, better_answer=better,
                at=str(annotation.get("updated_at") or annotation.get("created_at") or ""))
    return list(judgements.values())


def win_rate(judgements: list[Judgement], confidence: float, seed: int = 0, resamples: int = 4000) -> dict[str, Any]:
    """The candidate's win rate (ties count half) with a two-level percentile-bootstrap interval.

    Each resample draws tasks with replacement, then each drawn task's judgements with
    replacement: judgements of one task are not independent evidence (a one-level bootstrap over
    judgements would be too narrow), and reviewers who disagree are noise the interval must show
    (a one-level bootstrap over per-task means would collapse a task judged A by one and B by
    another to a certain 0.5). Written out because scipy.stats.bootstrap resamples one level only.
    """
    import numpy as np

    by_task: dict[int, list[float]] = {}
    for j in judgements:
        by_task.setdefault(j.task_id, []).append(SCORE[j.choice])
    counts = {c: sum(j.choice == c for j in judgements) for c in (CANDIDATE, OPPONENT, TIE)}
    summary: dict[str, Any] = {"judgements": len(judgements), "tasks": len(by_task), "wins": counts[CANDIDATE],
                               "losses": counts[OPPONENT], "ties": counts[TIE], "confidence": confidence}
    if not by_task:
        return {**summary, "win_rate": None, "low": None, "high": None}
    rate = float(np.mean([SCORE[j.choice] for j in judgements]))
    if len(by_task) < 2:
        return {**summary, "win_rate": rate, "low": 0.0, "high": 1.0}  # one task says nothing about the spread
    per_task = list(by_task.values())
    width = max(len(scores) for scores in per_task)
    table = np.array([scores + [0.0] * (width - len(scores)) for scores in per_task])  # tasks x judgements
    sizes = np.array([len(scores) for scores in per_task])
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, len(per_task), size=(resamples, len(per_task)))  # tasks, with replacement
    picked_sizes = sizes[picked]
    # then, within each picked task, as many of its judgements as it has, with replacement
    inner = (rng.random((resamples, len(per_task), width)) * picked_sizes[..., None]).astype(int)
    valid = np.arange(width)[None, None, :] < picked_sizes[..., None]
    values = table[picked[..., None], inner] * valid
    estimates = values.sum(axis=(1, 2)) / valid.sum(axis=(1, 2))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return {**summary, "win_rate": rate, "low": float(low), "high": float(high)}


def agreement(judgements: list[Judgement]) -> dict[str, Any]:
    """Krippendorff's alpha (nominal) over tasks two or more reviewers judged; None when it is undefined."""
    import numpy as np

    by_task: dict[int, dict[str, str]] = {}
    for j in judgements:
        by_task.setdefault(j.task_id, {})[j.reviewer] = j.choice
    shared = {task: votes for task, votes in by_task.items() if len(votes) >= 2}
    reviewers = sorted({r for votes in shared.values() for r in votes})
    out: dict[str, Any] = {"alpha": None, "tasks_with_several_reviewers": len(shared), "reviewers": len(reviewers)}
    if not shared:
        return out
    codes = {CANDIDATE: 0, OPPONENT: 1, TIE: 2}
    matrix = np.full((len(reviewers), len(shared)), np.nan)
    for column, votes in enumerate(shared.values()):
        for reviewer, choice in votes.items():
            matrix[reviewers.index(reviewer), column] = codes[choice]
    values = matrix[~np.isnan(matrix)]
    if len(set(values.tolist())) < 2:
        out["note"] = "every reviewer gave the same answer on every shared task: agreement is perfect but alpha " \
                      "is undefined"
        return out
    import krippendorff

    out["alpha"] = float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal"))
    return out


def summarise(judgements: list[Judgement], confidence: float, seed: int = 0) -> dict[str, Any]:
    summary = {"overall": win_rate(judgements, confidence, seed), "agreement": agreement(judgements),
               "reviewers": sorted({j.reviewer for j in judgements}), "by_source": {}}
    for source in sorted({j.source for j in judgements}):
        summary["by_source"][source] = win_rate([j for j in judgements if j.source == source], confidence, seed)
    return summary


def reviewed_pairs(tasks: list[dict[str, Any]], judgements: list[Judgement]) -> list[ReviewedPair]:
    """The judged test-split tasks (they have a reference) with both answers and the people's majority."""
    votes: dict[int, list[str]] = {}
    for j in judgements:
        votes.setdefault(j.task_id, []).append(j.choice)
    pairs = []
    for task in tasks:
        meta, data = task.get("meta") or {}, task.get("data") or {}
        if int(task.get("id", -1)) not in votes or not str(meta.get("reference") or "").strip():
            continue
        a_candidate = meta.get("a") == CANDIDATE
        pairs.append(ReviewedPair(item=str(meta.get("item", task["id"])), reference=str(meta["reference"]),
                                  candidate=str(data.get("answer_a" if a_candidate else "answer_b", "")),
                                  opponent=str(data.get("answer_b" if a_candidate else "answer_a", "")),
                                  choice=majority(votes[int(task["id"])])))
    return pairs


def metric_agreement(params: Params, tasks: list[dict[str, Any]], judgements: list[Judgement]) -> dict[str, Any]:
    """How often each automatic metric (evaluate's lexical ones, and its semantic_metrics) prefers the
    answer the reviewers preferred, on the judged test-split tasks (pipelines/evaluation/agreement.py)."""
    pairs = reviewed_pairs(tasks, judgements)
    semantic_names = list(params.evaluate.semantic_metrics)
    semantic = None
    if semantic_names and any(p.choice != TIE for p in pairs):
        from pipelines.evaluation.semantic import SemanticScorer
        from pipelines.model.encoders import encoder_dir

        semantic = SemanticScorer(encoder_dir(params.evaluate.encoder), semantic_names,
                                  bertscore_layer=params.evaluate.bertscore_layer).score
    return score_agreement(pairs, [*LEXICAL, *semantic_names], params.review.candidate.confidence, semantic)


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def review_tags(summary: dict[str, Any], at: str) -> dict[str, str]:
    """The version tags the gate and the model card read."""
    overall, agree = summary["overall"], summary["agreement"]
    tags = {
        "review.judgements": str(overall["judgements"]), "review.judged_tasks": str(overall["tasks"]),
        "review.wins": str(overall["wins"]), "review.losses": str(overall["losses"]),
        "review.ties": str(overall["ties"]), "review.win_rate": _fmt(overall["win_rate"]),
        "review.win_rate_low": _fmt(overall["low"]), "review.win_rate_high": _fmt(overall["high"]),
        "review.confidence": str(overall["confidence"]), "review.reviewers": str(len(summary["reviewers"])),
        "review.agreement_alpha": _fmt(agree["alpha"]),
        "review.agreement_tasks": str(agree["tasks_with_several_reviewers"]), "review.collected_at": at,
    }
    for source, values in summary["by_source"].items():
        tags[f"review.{source}.win_rate"] = _fmt(values["win_rate"])
        tags[f"review.{source}.judgements"] = str(values["judgements"])
    for metric, values in summary.get("metric_agreement", {}).items():
        prefix = f"{METRIC_AGREEMENT_TAG}{metric}"
        tags.update({f"{prefix}.rate": _fmt(values["rate"]), f"{prefix}.low": _fmt(values["low"]),
                     f"{prefix}.high": _fmt(values["high"]), f"{prefix}.tasks": str(values["tasks"])})
    return tags


def collect(params: Params, version: str | None = None, **_: Any) -> dict[str, Any]:
    settings = params.review.candidate
    registry = Registry(params)
    version = candidate_version(params, registry, version)
    tags = registry.version(version).tags
    if "review.project_id" not in tags:
        raise DataError(f"v{version} was never sent for review; run `llmops review request --version {version}` "
                        "first")
    client = connect(params)
    client.check()
    project = int(tags["review.project_id"])
    tasks = client.tasks(project)
    judgements = judgements_from(tasks)
    summary = summarise(judgements, settings.confidence, settings.seed)
    summary.update({"version": version, "project_id": project, "opponent": tags.get("review.opponent", ""),
                    "tasks_sent": int(tags.get("review.tasks") or 0)})
    at = now()
    overall = summary["overall"]
    unchanged = all(tags.get(k) == v for k, v in review_tags(summary, at).items() if k != "review.collected_at")
    if unchanged and "review.collected_at" in tags and any(k.startswith(METRIC_AGREEMENT_TAG) for k in tags):
        # the review DAG collects every hour: the history gets an event only when the judgements changed
        logger.info("review collect: v%s: no new judgements since %s", version, tags["review.collected_at"])
        return summary
    # the metrics' agreement (an encoder load, ~10 s) only when the judgements changed
    summary["metric_agreement"] = metric_agreement(params, tasks, judgements)
    new_tags = review_tags(summary, at)
    reason = (f"{overall['judgements']} judgement(s) by {len(summary['reviewers'])} reviewer(s): win rate "
              f"{_fmt(overall['win_rate'])} [{_fmt(overall['low'])}, {_fmt(overall['high'])}] vs "
              f"{summary['opponent'] or 'the opponent'}") if overall["judgements"] else "no judgements yet"
    registry.record(version, "reviewed", tags=new_tags, reason=reason)
    out_dir = params.paths.reports_dir / "review" / f"v{version}"
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_json(out_dir / "judgements.json", [asdict(j) for j in judgements])
    _log_to_mlflow(params, version, summary, out_dir)
    logger.info("review collect: v%s: %s", version, json.dumps(overall))
    return summary


def _log_to_mlflow(params: Params, version: str, summary: dict[str, Any], folder: Path) -> None:
    """One run per collection in the training experiment, tagged with the version; its id goes on
    the version (`review.run_id`). The registry tags are the record; the run holds the files."""
    import mlflow

    from pipelines.registry.tracking import end_run, start_run

    overall = summary["overall"]
    metrics = {k: float(overall[k]) for k in ("win_rate", "low", "high", "judgements", "tasks")
               if overall.get(k) is not None}
    if summary["agreement"]["alpha"] is not None:
        metrics["agreement_alpha"] = float(summary["agreement"]["alpha"])
    for metric, values in summary.get("metric_agreement", {}).items():
        if values["rate"] is not None:
            metrics[f"metric_agreement.{metric}"] = float(values["rate"])
            metrics[f"metric_agreement.{metric}.low"] = float(values["low"])
    run_id = start_run(params.tracking, f"review-v{version}", tags={
        "llmops.stage": "review", "model_name": params.registry.model_name, "model_version": str(version)})
    try:
        mlflow.log_metrics({f"review.{k}": v for k, v in metrics.items()})
        mlflow.log_artifacts(str(folder), artifact_path="review")
        end_run()
    except Exception:
        end_run("FAILED")
        raise
    Registry(params).tag(version, {"review.run_id": run_id})


# --- decide (the review DAG) --------------------------------------------------------------------

def registered_results(registry: Registry, version: str, tags: dict[str, str]) -> dict[str, Any]:
    """The evaluation a version was registered with: `evaluation/results.json` of its evaluate run
    (`tags`: the version's)."""
    import mlflow

    run_id = tags.get("evaluate.run_id")
    if not run_id:
        raise DataError(f"v{version} has no evaluate.run_id tag: it was not registered by `llmops register`")
    return registry.call(mlflow.artifacts.load_dict, f"runs:/{run_id}/evaluation/results.json")


def decide(params: Params, version: str | None = None, **_: Any) -> dict[str, Any]:
    """For a version awaiting review: collect the judgements, then run the promotion gate again
    with the evaluation it was registered with. Before the deadline with too few judgements it
    stays awaiting review; after it, the gate rejects it. Any other status: nothing to do."""
    registry = Registry(params)
    version = candidate_version(params, registry, version)
    tags = registry.version(version).tags
    status = tags.get(STATUS_TAG)
    if status != "awaiting-review":
        logger.info("review decide: v%s is %s, not awaiting review; nothing to do", version, status)
        return {"version": version, "status": status, "promoted": False, "changed": False}
    if "review.project_id" in tags:
        collect(params, version)
    decision = apply(params, registered_results(registry, version, tags), version)
    logger.info("review decide: %s", decision.summary())
    status = registry.version(version).tags.get(STATUS_TAG)
    return {"version": version, "status": status, "promoted": decision.promoted, "changed": decision.changed,
            "reasons": decision.reasons}
