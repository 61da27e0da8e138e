"""A candidate logged as an MLflow model and registered with its evidence (the facts gathered
from the stage outputs, the model card, the validation's Data Docs); the work behind the stage
`register`.

What the stage reads and writes, and how it is run: pipelines/stages/register.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipelines.config.params import Params
from pipelines.errors import DataError, LLMOpsError
from pipelines.registry import tracking
from pipelines.registry.model_registry import CHALLENGER, Registry
from pipelines.registry.tracking import git_state

logger = logging.getLogger(__name__)

MODEL_NAME_HELP = "registry.model_name must not be empty and cannot contain '/' or ':'"


def read_json(path: Path, stage: str) -> dict[str, Any]:
    if not path.exists():
        raise DataError(f"{path} not found; run `llmops {stage}` first")
    return json.loads(path.read_text())


def dvc_hashes(lock_path: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of every stage output recorded in dvc.lock (path -> hash)."""
    if not lock_path.exists():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs", []):
            hashes[out["path"]] = out.get("md5", "")
    return hashes


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def evidence(params: Params, params_file: Path = Path("params.yaml")) -> dict[str, Any]:
    """Everything a reviewer needs to trust a version, gathered from the stage outputs."""
    base_source = read_json(params.base_model.output_dir / "source.json", "base_model")
    train = read_json(params.paths.metrics("train"), "train")
    results = read_json(params.paths.report("evaluation_results"), "evaluate")
    validation = read_json(params.paths.validate_dir / "metrics.json", "validate")
    costs = {stage: read_cost(params.paths.cost(stage)) for stage in ("train", "evaluate")}
    hashes = dvc_hashes()
    git = git_state()
    return {
        "git_commit": git.get("mlflow.source.git.commit", "unknown"),
        "git_dirty": git.get("git_dirty", "unknown"),
        "git_dirty_files": git.get("git_dirty_files", ""),
        "params_sha256": file_sha256(params_file),
        "data.ingested_md5": hashes.get(str(params.paths.ingested), ""),
        "data.prepared_md5": hashes.get(str(params.paths.prepared_dir), ""),
        "validation.pass_rate": validation.get("pass_rate"),
        "validation.evaluated": validation.get("evaluated"),
        "validation.rows": validation.get("rows"),
        "validation.report": "",  # the Data Docs' artifact URI, once register has logged them
        "train.run_id": train.get("mlflow_run_id", ""),
        "train.final_eval_loss": train.get("eval_loss", train.get("final_eval_loss", "")),
        "evaluate.run_id": results.get("mlflow_run_id", ""),
        "evaluate.primary_metric": results["primary_metric"],
        "evaluate.champion_version": results.get("champion_version") or "none",
        "base_model.source": base_source.get("source", ""),
        "base_model.licence": base_source.get("licence", "unknown"),
        "base_model.sha256": base_source.get("content_sha256", ""),
        "data.licence": params.registry.data_licence,
        "intended_use": params.registry.intended_use,
        **cost_tags(costs),
        "_results": results,
        "_costs": costs,
    }


def read_cost(path: Path) -> dict[str, Any] | None:
    """A stage's cost record (pipelines/accounting/cost.py), or None when it ran without one."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cost_tags(costs: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    """The version's training and evaluation cost as tags (searchable in the registry)."""
    tags = {}
    for stage, cost in costs.items():
        if cost is None:
            tags[f"cost.{stage}"] = "not recorded"
            continue
        tags[f"cost.{stage}"] = "unpriced" if cost.get("cost") is None else f"{cost['cost']:.6f} {cost['currency']}"
        tags[f"cost.{stage}.machine"] = cost["machine"]["key"]
        tags[f"cost.{stage}.wall_seconds"] = f"{cost['wall_seconds']:.1f}"
        tags[f"cost.{stage}.tokens"] = str(cost.get("tokens_processed", 0))
    return tags


def cost_section(costs: dict[str, dict[str, Any] | None]) -> str:
    """The model card's cost table: what training and evaluating this version used and cost."""
    rows = []
    for stage, cost in costs.items():
        if cost is None:
            rows.append(f"| {stage} | not recorded | | | | |")
            continue
        hours = f"{cost['gpu_hours']:.4f} GPU-h" if cost["machine"]["gpus"] else f"{cost['core_hours']:.4f} core-h"
        money = "unpriced" if cost.get("cost") is None else f"{cost['cost']:.4f} {cost['currency']}"
        per_1k = "" if cost.get("cost_per_1k_tokens") is None else f"{cost['cost_per_1k_tokens']:.6f}"
        rows.append(f"| {stage} | {cost['wall_seconds']:.0f} s on {cost['machine']['key']} | {hours} | "
                    f"{cost.get('tokens_processed', 0):,} | {money} | {per_1k} |")
    train = costs.get("train") or {}
    override = (f"\nTrained over budget (estimate {train['budget_estimate'].get('cost')}); the reason given: "
                f"{train['budget_override_reason']}\n" if train.get("budget_override_reason") else "")
    return ("\n## Cost\n\nBilled as the machine's cores (or GPUs) for the stage's wall time at params.yaml's "
            "`cost.prices` (reports/cost/<stage>.json).\n\n"
            "| stage | time | machine time | tokens | cost | per 1k tokens |\n|---|---|---|---:|---:|---:|\n"
            + "\n".join(rows) + "\n" + override)


def primary_choice(results: dict[str, Any]) -> str:
    """How the primary metric was chosen, when evaluate.primary_metric was `agreement`."""
    choice = results.get("primary_metric_choice") or {}
    return f" The primary metric was chosen by agreement with reviewers: {choice['reason']}." \
        if choice.get("mode") == "agreement" else ""


def forgetting_section(results: dict[str, Any]) -> str:
    """The forgetting check's result (evaluate.forgetting), when it ran."""
    f = results.get("forgetting")
    if not f:
        return ""
    confidence = int(round(f.get("confidence", 0.95) * 100))
    return (f"\n## General capability (forgetting check)\n\nlm-eval-harness task `{f['task']}` ({f['definition']}), "
            f"{f['questions']} questions outside the training domains: accuracy **{f['candidate']:.4f}** vs the base "
            f"model's {f['base']:.4f}; drop {f['drop']:+.4f} ({confidence}% CI [{f['low']:+.4f}, {f['high']:+.4f}]).\n")


def metrics_table(results: dict[str, Any]) -> str:
    systems = [s for s in ("candidate", "base", "champion") if s in results["systems"]]
    metrics = ["rouge_l", "bleu", "exact_match", "normalised_match", "semantic_similarity", "bertscore_f1",
               "perplexity", "tokens_per_second"]
    lines = ["| metric | " + " | ".join(systems) + " | vs base (95% CI) |" +
             (" vs champion (95% CI) |" if "champion" in systems else ""),
             "|---" * (len(systems) + 2 + ("champion" in systems)) + "|"]
    for metric in metrics:
        if metric not in results["systems"]["candidate"]:  # e.g. semantic metrics turned off
            continue
        row = [f"{results['systems'][s][metric]:.4f}" for s in systems]
        cells = []
        for baseline in ("base", "champion"):
            diff = results["comparisons"].get(baseline, {}).get(metric)
            if diff:
                cells.append(f"{diff['improvement']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]")
        lines.append(f"| {metric} | " + " | ".join(row + cells) + " |")
    return "\n".join(lines)


def uncommitted(facts: dict[str, Any]) -> str:
    """`false`, or `true` and which tracked files differed from the commit (pipeline outputs excluded)."""
    if facts["git_dirty"] != "true":
        return str(facts["git_dirty"])
    return f"true: {facts['git_dirty_files']}" if facts.get("git_dirty_files") else "true"


def log_validation_report(params: Params, run_id: str) -> str:
    """The validation's Data Docs (and its result) as artifacts of the model's run; their URI.

    The card then points at the registry's own copy (`mlflow artifacts download -u ...`, or
    the run's Artifacts tab), not at a folder on the machine that ran the pipeline.
    """
    docs = params.paths.validate_dir / "data_docs"
    if not (docs / "index.html").exists():
        logger.warning("register: no Data Docs in %s; the version records none", docs)
        return ""
    tracking.log_artifacts(docs, "validation/data_docs")
    for path in (params.paths.validation_file(), params.paths.validate_dir / "metrics.json"):
        tracking.log_artifacts(path, "validation")
    return f"runs:/{run_id}/validation/data_docs/index.html"


def model_description(params: Params, facts: dict[str, Any]) -> str:
    """The registered model's own description (above its versions in `mlflow ui`)."""
    return (f"LoRA fine-tunes of {facts['base_model.source']} for: {params.registry.intended_use}\n\n"
            "Aliases: `champion` serves, `previous-champion` is where `llmops rollback` goes back to, "
            "`challenger` is the newest registered candidate. Each version's description is its model card "
            "(evidence, evaluation, status and history); `llmops lineage VERSION` prints it with the tags.")


def model_card(name: str, facts: dict[str, Any]) -> str:
    results = facts["_results"]
    return f"""# {name}: LoRA fine-tune of {facts['base_model.source']}

**Intended use.** {facts['intended_use']}

## Evidence
| what | value |
|---|---|
| git commit | `{facts['git_commit']}` (uncommitted changes: {uncommitted(facts)}) |
| params.yaml sha256 | `{facts['params_sha256'][:16]}` |
| prepared data (DVC md5) | `{facts['data.prepared_md5']}` |
| ingested data (DVC md5) | `{facts['data.ingested_md5']}` |
| validation | pass rate {facts['validation.pass_rate']} over {facts['validation.evaluated']} expectations, \
{facts['validation.rows']} rows; Data Docs: {facts['validation.report'] or 'not logged'} |
| training run | `{facts['train.run_id']}` |
| evaluation run | `{facts['evaluate.run_id']}` |
| base model | {facts['base_model.source']}, licence {facts['base_model.licence']}, sha256 \
`{facts['base_model.sha256'][:16]}` |
| data licence | {facts['data.licence']} |

## Evaluation on {results['examples']} held-out examples (primary metric: {results['primary_metric']})
Improvements are candidate minus baseline (baseline minus candidate for perplexity), with
paired-bootstrap confidence intervals; the champion at evaluation time was
{facts['evaluate.champion_version']}.{primary_choice(results)}

{metrics_table(results)}
{forgetting_section(results)}{cost_section(facts.get("_costs", {}))}"""


def register(params: Params) -> dict[str, Any]:
    import mlflow

    from pipelines.model.packaging import model_format, write_merged  # packaging imports mlflow

    name = params.registry.model_name
    adapter_dir = params.train.adapter_dir
    if not (adapter_dir / "adapter_config.json").exists():
        raise DataError(f"no trained adapter in {adapter_dir}; run `llmops train` first")
    facts = evidence(params)
    registry = Registry(params)
    registry.check_reachable()
    config = {"template": params.prepare.template, "system_prompt": params.prepare.system_prompt,
              "dtype": params.evaluate.dtype, "decoding": params.evaluate.decoding.model_dump()}
    tags = {k: str(v) for k, v in facts.items() if not k.startswith("_")}
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "llmops_config.json"
        config_path.write_text(json.dumps(config, indent=2))
        merged_dir = write_merged(params.base_model.output_dir, adapter_dir, Path(tmp) / "merged")
        # The model goes to the training run; reopening it must not stretch its duration.
        run_id = tracking.start_run(params.tracking, "register", run_id=facts["train.run_id"] or None,
                                    keep_end_time=True)
        try:
            facts["validation.report"] = tags["validation.report"] = registry.call(log_validation_report, params,
                                                                                   run_id)
            # models from code: the version holds source and data, no pickle (pipelines/model/packaging.py)
            info = registry.call(mlflow.pyfunc.log_model, name="model",
                                 **model_format(merged_dir, adapter_dir, config_path),
                                 pip_requirements=_requirements())
            version = registry.call(mlflow.register_model, info.model_uri, name, tags=tags)
        except LLMOpsError:
            tracking.end_run("FAILED")
            raise
        tracking.end_run()
    try:
        registry.describe(version.version, model_card(name, facts))
        registry.set_alias(CHALLENGER, version.version)
        registry.record(version.version, "registered", status="candidate",
                        reason=f"evaluated against champion {facts['evaluate.champion_version']}")
        registry.update_model(model_description(params, facts), {
            "base_model.source": facts["base_model.source"], "base_model.licence": facts["base_model.licence"],
            "data.licence": facts["data.licence"], "task": "instruction-following text generation",
            "latest_version": str(version.version)})
    except LLMOpsError:
        # Nothing half-registered: a version without its model card and alias is removed.
        registry.delete_version(version.version)
        raise
    record = {"name": name, "version": str(version.version), "run_id": run_id, "model_uri": info.model_uri}
    logger.info("register: %s version %s (alias %s)", name, version.version, CHALLENGER)
    return record


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "peft", "pandas", "mlflow")]
