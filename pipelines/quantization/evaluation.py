"""The registered candidate's quantized variants, each put through the same evidence as the model
they came from: the work behind the stage `quantize` (what it reads and writes, and how it is
run: pipelines/stages/quantize.py).

For the version `register` created: its merged weights from the registry (what the engine
serves), each variant of `quantize.variants` that vLLM serves on this machine's device made by
llm-compressor (pipelines/quantization/variants.py), then the full-precision model and each
variant, one engine at a time, answer evaluate's test examples (the same seeded selection, the
same rendered prompts and decoding, control tokens suppressed as the gateway does) at
`quantize.concurrency` requests in flight. The answers are scored against the references and
compared with full precision by a paired bootstrap, overall and per slice; the pass is timed
(generated tokens/s, requests/s), the engine's resident memory read after it, and the tokens/s
priced with cost.prices (cost per 1k generated tokens). Each variant is then logged with the
version (artifacts `variants/<name>/` of its run, tags `variant.<name>.*`, a history event that
puts the table on its model card).

Both engines run on the same engine settings (params.yaml `serve`) as the gateway's, so the
figures are the serving machine's own when `quantize` runs where the model serves; run it where
it will serve, or read them as ratios.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.accounting import cost
from pipelines.config.params import Params, QuantVariant
from pipelines.config.settings import quantize_python
from pipelines.errors import DataError, LLMOpsError
from pipelines.evaluation.harness import add_semantic_scores, select_examples, slice_labels
from pipelines.evaluation.metrics import Scores, corpus_metrics, paired_bootstrap
from pipelines.io import read_parquet
from pipelines.quantization.variants import SERVES_ON, folder_bytes, quantize, servable
from pipelines.quantization.variants import check_python as check_quantizer
from pipelines.registry.model_registry import Registry
from pipelines.serving.engine import EngineConfig, EngineProcess, check_python, fetch_version

logger = logging.getLogger(__name__)

FULL = "full precision"
ARTIFACTS = "variants"  # under the version's run: variants/<name>/ and variants/results.json


def gated_metric(primary: str) -> tuple[str, str | None]:
    """The metric variants are compared by: the gate's primary metric, except perplexity, which needs
    the references' likelihood (not what an OpenAI-compatible engine returns for generated text)."""
    if primary == "perplexity":
        return "rouge_l", "the gate's primary metric is perplexity, which the engine's answers do not give; " \
                          "variants are compared by ROUGE-L"
    return primary, None


def mean_difference(variant: np.ndarray, full: np.ndarray, *, samples: int, confidence: float,
                    seed: int) -> dict[str, float]:
    """Paired bootstrap of mean(variant - full) over examples (scipy's percentile bootstrap).

    metrics.paired_bootstrap recomputes every corpus metric, corpus BLEU included, for each resample,
    which is much more work than one per-example mean over many slices: here it serves BLEU only."""
    from scipy.stats import bootstrap

    diff = np.asarray(variant, dtype=float) - np.asarray(full, dtype=float)
    if len(diff) < 2 or np.all(diff == diff[0]):  # identical answers: the interval is the point
        value = float(diff.mean()) if len(diff) else 0.0
        return {"improvement": value, "low": value, "high": value, "confidence": confidence}
    result = bootstrap((diff,), np.mean, n_resamples=samples, confidence_level=confidence, method="percentile",
                       vectorized=True, random_state=np.random.default_rng(seed))
    return {"improvement": float(diff.mean()), "low": float(result.confidence_interval.low),
            "high": float(result.confidence_interval.high), "confidence": confidence}


def answer_metrics(scores: Scores) -> dict[str, float]:
    """The corpus metrics of generated answers (perplexity needs reference likelihoods: not here)."""
    return {k: v for k, v in corpus_metrics(scores).items() if k != "perplexity"}


def compare(variant: Scores, full: Scores, metric: str, labels: dict[str, list[str]], params: Params
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(overall, per slice) difference of the variant from full precision on `metric`, with CIs."""
    settings = params.evaluate
    kwargs = {"samples": settings.bootstrap_samples, "confidence": settings.confidence, "seed": settings.seed}

    def difference(idx: np.ndarray) -> dict[str, float]:
        if metric == "bleu":  # a corpus metric: resample examples and recompute it
            def part(s: Scores) -> Scores:
                return Scores([s.predictions[i] for i in idx], [s.references[i] for i in idx],
                              s.nll_sums[idx], s.token_counts[idx], {k: v[idx] for k, v in s.extra.items()})
            d = paired_bootstrap(part(variant), part(full), **kwargs)["bleu"]
            return {"improvement": d.improvement, "low": d.low, "high": d.high, "confidence": d.confidence}
        return mean_difference(variant.per_example()[metric][idx], full.per_example()[metric][idx], **kwargs)

    everything = np.arange(len(full.references))
    overall = {"metric": metric, **difference(everything)}
    slices: dict[str, Any] = {}
    for name, values in labels.items():
        for value in sorted(set(values)):
            idx = np.array([i for i, v in enumerate(values) if v == value])
            if len(idx) >= settings.min_slice_size:
                slices.setdefault(name, {})[value] = {"n": int(len(idx)), **difference(idx)}
    return overall, slices


def answer(engine: EngineProcess, served_name: str, prompts: list[str], fields: dict[str, Any],
           concurrency: int) -> dict[str, Any]:
    """Every prompt answered by the engine at `concurrency` requests in flight, timed."""
    import requests

    local = threading.local()  # a Session per client thread: Sessions are not thread-safe

    def one(prompt: str) -> tuple[str, int]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.headers.update(engine.headers())
        response = local.session.post(f"{engine.url}/v1/completions", timeout=900,
                                      json={"model": served_name, "prompt": prompt, **fields})
        if response.status_code != 200:
            raise LLMOpsError(f"quantize: the engine refused a test prompt ({response.status_code}): "
                              f"{response.text[:300]}")
        body = response.json()
        return body["choices"][0]["text"].strip(), int(body["usage"]["completion_tokens"])

    one(prompts[0])  # warm-up: the first request pays one-off costs, not the model
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, prompts))
    seconds = time.perf_counter() - started
    tokens = sum(n for _, n in done)
    return {"texts": [text for text, _ in done], "generated_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_second": tokens / seconds, "requests_per_second": len(prompts) / seconds}


def decoding_fields(params: Params, tokenizer: Any) -> dict[str, Any]:
    """evaluate.decoding as the engine's request fields, with the gateway's suppression of control
    tokens (what evaluation's generate does)."""
    from pipelines.model.lm import suppressed_tokens

    decoding = params.evaluate.decoding
    fields: dict[str, Any] = {"max_tokens": decoding.max_new_tokens,
                              "temperature": decoding.temperature if decoding.do_sample else 0.0,
                              "repetition_penalty": decoding.repetition_penalty}
    if decoding.do_sample:
        fields.update(top_p=decoding.top_p, seed=decoding.seed)
    suppressed = suppressed_tokens(tokenizer)
    if suppressed:
        fields["logit_bias"] = {str(token): -100.0 for token in suppressed}
    return fields


def measure(version: str, config: EngineConfig, model_dir: Path, name: str, prompts: list[str],
            fields: dict[str, Any], concurrency: int, log_dir: Path, price: float | None) -> dict[str, Any]:
    """One engine on `model_dir`: start-up, answers, throughput, resident memory, cost per 1k tokens."""
    engine = EngineProcess(config, model_dir, "model", f"{version} {name}", log_dir / f"{name.replace(' ', '-')}.log")
    engine.start()
    try:
        ready = engine.wait_ready()
        run = answer(engine, "model", prompts, fields, concurrency)
        rss = engine.rss_bytes()
    finally:
        engine.stop()
    per_1k = cost.per_1k_tokens(price, run["tokens_per_second"])
    serving = {"ready_seconds": round(ready, 1), "rss_bytes": rss, "bytes": folder_bytes(model_dir),
               "tokens_per_second": round(run["tokens_per_second"], 3),
               "requests_per_second": round(run["requests_per_second"], 4),
               "generated_tokens": run["generated_tokens"], "seconds": run["seconds"],
               "cost_per_1k_tokens": None if per_1k is None else round(per_1k, 8)}
    logger.info("quantize: %s on vLLM (%s): ready in %.0f s, %.1f tokens/s at %d in flight, RSS %.0f MiB", name,
                config.device, ready, run["tokens_per_second"], concurrency, rss / 2**20)
    return {"texts": run["texts"], "serving": serving}


def run(params: Params, out_dir: Path) -> dict[str, Any]:
    """Make, measure and compare the variants of the registered version; write them under `out_dir`
    (a fresh folder); return the results (the caller writes them once the registry has them)."""
    from transformers import AutoTokenizer

    version_path, results_path = params.paths.report("registered_version"), params.paths.report("evaluation_results")
    for path, stage in ((version_path, "register"), (results_path, "evaluate")):
        if not path.exists():
            raise DataError(f"{path} not found; run `llmops {stage}` first")
    registered = json.loads(version_path.read_text())
    evaluated = json.loads(results_path.read_text())
    version = str(registered["version"])
    config = EngineConfig.from_params(params.serve)
    machine = cost.detect(params.cost)
    price = cost.price_per_hour(machine, params.cost)
    metric, note = gated_metric(evaluated["primary_metric"])
    concurrency = params.quantize.concurrency or params.serve.engine.max_num_seqs
    results: dict[str, Any] = {
        "model": registered["name"], "version": version, "device": config.device, "dtype": config.dtype,
        "machine": machine.key, "price_per_hour": price, "currency": params.cost.currency, "metric": metric,
        "concurrency": concurrency, "variants": {}, "skipped": {}, **({"metric_note": note} if note else {})}
    out_dir.mkdir(parents=True)
    wanted: list[QuantVariant] = []
    for variant in params.quantize.variants:
        if servable(variant, config.device):
            wanted.append(variant)
        else:
            results["skipped"][variant.name] = (f"vLLM does not serve {variant.scheme} on {config.device} (it does on "
                                                f"{', '.join(SERVES_ON[variant.scheme])}: run quantize there)")
    if not wanted:
        results["note"] = "quantize.variants is empty" if not params.quantize.variants else \
            f"no variant in quantize.variants is served on {config.device}"
        results["full"] = None
        return results

    # the registered version's merged weights (not serve.model_uri's, which a gateway may pin)
    registry_params = params.model_copy(update={"serve": params.serve.model_copy(update={"model_uri": None})})
    python = str(quantize_python(params.quantize).value)
    check_python(config.python)  # both virtualenvs: a one-line "run make install" before any download
    check_quantizer(python)
    served = fetch_version(registry_params, version, variant="full")
    frame = read_parquet(params.paths.prepared_dir / "test.parquet", produced_by="prepare")
    frame = select_examples(frame, params.evaluate.max_examples, params.evaluate.seed, params.evaluate.top_up_slices,
                            params.evaluate.min_slice_size)
    if len(frame) != evaluated["examples"]:
        raise DataError(f"the test selection has {len(frame)} examples but the evaluation had "
                        f"{evaluated['examples']}: the test split or evaluate's params changed since; run "
                        "`dvc repro` (evaluate and register again)")
    prompts, references = list(frame["prompt_text"]), list(frame["response"])
    fields = decoding_fields(params, AutoTokenizer.from_pretrained(served.model_dir))
    log_dir = params.serve.engine.cache_dir / "logs" / "quantize"  # beside the gateway's; not an output
    log_dir.mkdir(parents=True, exist_ok=True)

    runs = {FULL: measure(version, config, served.model_dir, FULL, prompts, fields, concurrency, log_dir, price)}
    for variant in wanted:
        record = quantize(python, served.model_dir, out_dir / variant.name, variant)
        runs[variant.name] = measure(version, config, out_dir / variant.name, variant.name, prompts, fields,
                                     concurrency, log_dir, price)
        runs[variant.name]["record"] = record

    zeros, ones = np.zeros(len(references)), np.ones(len(references))  # no reference likelihoods via the engine
    scores = {name: Scores(r["texts"], references, zeros, ones) for name, r in runs.items()}
    if metric in params.evaluate.semantic_metrics:
        scores = add_semantic_scores(scores, params.evaluate.model_copy(update={"semantic_metrics": [metric]}))
    labels = slice_labels(frame, params.evaluate)
    full_metrics = answer_metrics(scores[FULL])
    results["examples"] = len(frame)
    results["full"] = {"serving": runs[FULL]["serving"], "metrics": full_metrics}
    for variant in wanted:
        overall, slices = compare(scores[variant.name], scores[FULL], metric, labels, params)
        same = sum(a == b for a, b in zip(runs[variant.name]["texts"], runs[FULL]["texts"]))
        record = runs[variant.name]["record"]
        results["variants"][variant.name] = {
            "scheme": variant.scheme, "group_size": variant.group_size, "serves_on": list(SERVES_ON[variant.scheme]),
            "made": {k: record[k] for k in ("seconds", "llmcompressor", "compressed_tensors", "bytes")},
            "serving": runs[variant.name]["serving"],
            "metrics": answer_metrics(scores[variant.name]),
            "comparison": overall, "slices": slices, "identical_answers": same,
            "artifact_uri": f"runs:/{registered['run_id']}/{ARTIFACTS}/{variant.name}"}
    shown = min(params.evaluate.sample_size, len(references))
    results["samples"] = [{"prompt": frame["prompt"].iloc[i], "reference": references[i],
                           **{name: runs[name]["texts"][i] for name in runs}} for i in range(shown)]
    return results


def variant_tags(results: dict[str, Any]) -> dict[str, str]:
    """The evidence as version tags (searchable in the registry; the card's table is drawn from them)."""
    tags = {"variants.measured_on": f"{results['machine']} ({results['device']}, {results['dtype']})",
            "variants.metric": results["metric"], "variants.concurrency": str(results["concurrency"]),
            "variants.made": ",".join(results["variants"]) or "none"}
    if results.get("note"):
        tags["variants.note"] = results["note"]
    if results.get("skipped"):
        tags["variants.skipped"] = "; ".join(f"{n}: {why}" for n, why in results["skipped"].items())[:4900]
    entries = {"full": results["full"], **results["variants"]} if results.get("full") else {}
    for name, entry in entries.items():
        serving = entry["serving"]
        tags[f"variant.{name}.tokens_per_second"] = f"{serving['tokens_per_second']:.2f}"
        tags[f"variant.{name}.requests_per_second"] = f"{serving['requests_per_second']:.3f}"
        tags[f"variant.{name}.rss_mib"] = f"{serving['rss_bytes'] / 2**20:.0f}"
        tags[f"variant.{name}.disk_mib"] = f"{serving['bytes'] / 2**20:.0f}"
        tags[f"variant.{name}.cost_per_1k_tokens"] = ("unpriced" if serving["cost_per_1k_tokens"] is None else
                                                      f"{serving['cost_per_1k_tokens']:.8f} {results['currency']}")
        tags[f"variant.{name}.{results['metric']}"] = f"{entry['metrics'][results['metric']]:.4f}"
        if name == "full":
            continue
        c = entry["comparison"]
        tags[f"variant.{name}.scheme"] = entry["scheme"]
        tags[f"variant.{name}.serves_on"] = ",".join(entry["serves_on"])
        tags[f"variant.{name}.uri"] = entry["artifact_uri"]
        tags[f"variant.{name}.delta"] = f"{c['improvement']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
        worst = min((s for values in entry["slices"].values() for s in values.values()), default=None,
                    key=lambda s: s["low"])
        if worst is not None:
            where = next(f"{n}={v}" for n, values in entry["slices"].items() for v, s in values.items() if s is worst)
            tags[f"variant.{name}.worst_slice"] = (f"{where}: {worst['improvement']:+.4f} [{worst['low']:+.4f}, "
                                                   f"{worst['high']:+.4f}], n={worst['n']}")
    return tags


def register_variants(params: Params, results: dict[str, Any], out_dir: Path) -> None:
    """Each variant's weights and the results as artifacts of the version's run; the evidence as
    its tags and a history event (which re-renders its model card)."""
    registry = Registry(params)
    version = results["version"]
    model = registry.version(version)
    if results["variants"]:
        for name in results["variants"]:
            registry.call(registry.client.log_artifacts, model.run_id, str(out_dir / name), f"{ARTIFACTS}/{name}")
        results_file = out_dir / "results.json"
        results_file.write_text(json.dumps(results, indent=2, default=float) + "\n")
        registry.call(registry.client.log_artifact, model.run_id, str(results_file), ARTIFACTS)
        results_file.unlink()
    stale = [k for k in model.tags if (k.startswith("variant.") or k.startswith("variants."))]
    tags = variant_tags(results)
    registry.untag(version, [k for k in stale if k not in tags])
    made = ", ".join(f"{n} ({e['comparison']['metric']} {e['comparison']['improvement']:+.4f}, "
                     f"{e['serving']['tokens_per_second']:.1f} tokens/s)" for n, e in results["variants"].items())
    registry.record(version, "quantized", tags=tags,
                    reason=(f"variants measured on {results['machine']}: {made}; full precision "
                            f"{results['full']['serving']['tokens_per_second']:.1f} tokens/s") if made
                    else f"no variant made: {results.get('note', '')}")


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """What `dvc metrics show` lists for the stage."""
    metrics: dict[str, Any] = {"variants": len(results["variants"])}
    if results.get("full"):
        metrics["full"] = {"tokens_per_second": results["full"]["serving"]["tokens_per_second"],
                           "rss_mib": round(results["full"]["serving"]["rss_bytes"] / 2**20),
                           results["metric"]: round(results["full"]["metrics"][results["metric"]], 4)}
    for name, entry in results["variants"].items():
        c = entry["comparison"]
        metrics[name] = {"tokens_per_second": entry["serving"]["tokens_per_second"],
                         "rss_mib": round(entry["serving"]["rss_bytes"] / 2**20),
                         results["metric"]: round(entry["metrics"][results["metric"]], 4),
                         "delta": round(c["improvement"], 4), "ci_low": round(c["low"], 4),
                         "ci_high": round(c["high"], 4)}
    return metrics

