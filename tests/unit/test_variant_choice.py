"""Which weights serve a version: the quantized variants' comparison with full precision (real paired
bootstraps over scored answers), promote's choice (pipelines/quantization/choice.py), its tags and
the model card's sections (pipelines/registry/model_registry.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config.params import VariantChoiceParams, load_params
from pipelines.evaluation.metrics import Scores
from pipelines.quantization.choice import choose
from pipelines.quantization.evaluation import compare, mean_difference, variant_tags
from pipelines.registry.model_registry import render_state
from pipelines.registry.promotion import serving_tags

REFERENCES = [f"a word meaning thing number {i}" for i in range(40)]
LABELS = {"pos": ["noun" if i % 2 else "verb" for i in range(40)]}


def scores(texts: list[str]) -> Scores:
    return Scores(texts, REFERENCES, np.zeros(40), np.ones(40))


def measured(variant_texts: dict[str, list[str]], tokens_per_second: dict[str, float],
             full_texts: list[str] | None = None) -> dict:
    """quantize's results.json for these answers and throughputs, the comparison computed for real."""
    params = load_params("params.yaml", ["evaluate.min_slice_size=10", "evaluate.bootstrap_samples=500"])
    full = scores(full_texts or REFERENCES)
    results = {"machine": "cpu-2c", "device": "cpu", "dtype": "float32", "currency": "USD", "metric": "rouge_l",
               "concurrency": 8, "price_per_hour": 0.09, "variants": {}, "skipped": {},
               "full": {"serving": {"tokens_per_second": tokens_per_second["full"], "requests_per_second": 1.0,
                                    "rss_bytes": 2**30, "bytes": 2**29, "cost_per_1k_tokens": 0.001},
                        "metrics": {"rouge_l": float(full.per_example()["rouge_l"].mean())}}}
    for name, texts in variant_texts.items():
        overall, slices = compare(scores(texts), full, "rouge_l", LABELS, params)
        results["variants"][name] = {
            "scheme": "w8a8-int8", "serves_on": ["cpu", "cuda"], "comparison": overall, "slices": slices,
            "metrics": {"rouge_l": float(scores(texts).per_example()["rouge_l"].mean())},
            "artifact_uri": f"runs:/r/variants/{name}",
            "serving": {"tokens_per_second": tokens_per_second[name], "requests_per_second": 1.0,
                        "rss_bytes": 2**29, "bytes": 2**27, "cost_per_1k_tokens": 0.0005}}
    return results


def test_identical_answers_have_a_zero_interval_and_a_lossy_variant_a_negative_one():
    same = mean_difference(np.ones(30), np.ones(30), samples=200, confidence=0.95, seed=0)
    assert same == {"improvement": 0.0, "low": 0.0, "high": 0.0, "confidence": 0.95}
    rng = np.random.default_rng(0)
    full = rng.uniform(0.4, 0.6, 200)
    worse = mean_difference(full - 0.1 + rng.normal(0, 0.02, 200), full, samples=500, confidence=0.95, seed=0)
    assert worse["low"] < worse["improvement"] < worse["high"] < 0
    assert worse["improvement"] == pytest.approx(-0.1, abs=0.01)


def test_a_variant_within_tolerance_and_cheaper_is_chosen():
    answers = list(REFERENCES)
    answers[3] = "something else"  # one answer of 40 differs: a small loss, a narrow interval
    results = measured({"w8a8": answers}, {"full": 10.0, "w8a8": 20.0})
    choice = choose(results, VariantChoiceParams(tolerance=0.1, slice_tolerance=0.3))
    assert choice["variant"] == "w8a8", choice["reason"]
    assert choice["candidates"]["w8a8"]["quality_ok"] and choice["candidates"]["w8a8"]["saving"] == 0.5
    assert "the cheapest variant within the tolerances" in choice["reason"]


def test_a_variant_that_loses_too_much_is_refused_however_cheap():
    lossy = [r if i % 3 else "no idea" for i, r in enumerate(REFERENCES)]  # a third of the answers lost
    results = measured({"w8a8": lossy}, {"full": 10.0, "w8a8": 40.0})
    choice = choose(results, VariantChoiceParams(tolerance=0.05, slice_tolerance=0.5))
    assert choice["variant"] == "full" and not choice["candidates"]["w8a8"]["quality_ok"]
    assert "no variant within the quality tolerances" in choice["reason"] and "w8a8" in choice["reason"]
    # naming it does not get past the tolerance either
    named = choose(results, VariantChoiceParams(choose="w8a8", tolerance=0.05, slice_tolerance=0.5))
    assert named["variant"] == "full" and "loses too much" in named["reason"]


def test_one_slice_that_loses_too_much_refuses_the_variant():
    # every noun answer lost, every verb answer kept: overall -0.5 ... but a tolerance of 1 lets it past,
    # while the noun slice's interval is far below the slice tolerance
    lossy = [("no idea" if LABELS["pos"][i] == "noun" else r) for i, r in enumerate(REFERENCES)]
    results = measured({"w8a8": lossy}, {"full": 10.0, "w8a8": 40.0})
    noun = results["variants"]["w8a8"]["slices"]["pos"]["noun"]
    assert noun["n"] == 20 and noun["high"] < -0.5
    choice = choose(results, VariantChoiceParams(tolerance=1.0, slice_tolerance=0.1))
    assert choice["variant"] == "full" and "pos=noun" in choice["candidates"]["w8a8"]["detail"]


def test_a_variant_that_is_not_cheaper_enough_keeps_full_precision():
    results = measured({"w8a8": list(REFERENCES)}, {"full": 10.0, "w8a8": 10.5})  # saves 4.8%
    choice = choose(results, VariantChoiceParams(min_saving=0.1))
    assert choice["variant"] == "full" and "at least 10% cheaper" in choice["reason"]
    slower = choose(measured({"w8a8": list(REFERENCES)}, {"full": 10.0, "w8a8": 5.0}), VariantChoiceParams())
    assert slower["variant"] == "full" and slower["candidates"]["w8a8"]["saving"] == -1.0
    # named: chosen within the tolerances even when dearer (the operator's call, e.g. for memory)
    named = choose(measured({"w8a8": list(REFERENCES)}, {"full": 10.0, "w8a8": 5.0}),
                   VariantChoiceParams(choose="w8a8"))
    assert named["variant"] == "w8a8"


def test_the_cheapest_of_two_qualifying_variants_wins_and_full_when_asked_or_none_made():
    results = measured({"a": list(REFERENCES), "b": list(REFERENCES)}, {"full": 10.0, "a": 15.0, "b": 30.0})
    assert choose(results, VariantChoiceParams())["variant"] == "b"
    assert choose(results, VariantChoiceParams(choose="full"))["variant"] == "full"
    none = choose({"variants": {}, "full": None, "note": "quantize.variants is empty"}, VariantChoiceParams())
    assert none["variant"] == "full" and "quantize.variants is empty" in none["reason"]


def test_the_model_card_shows_the_variants_and_the_serving_choice():
    answers = list(REFERENCES)
    answers[0] = "other"
    results = {**measured({"w8a8": answers}, {"full": 10.0, "w8a8": 20.0}), "skipped": {"w4a16": "cuda only"}}
    choice = choose(results, VariantChoiceParams(tolerance=0.2, slice_tolerance=0.5))
    tags = {**variant_tags(results), **serving_tags(choice)}
    assert tags["variant.w8a8.uri"] == "runs:/r/variants/w8a8" and tags["serving.variant"] == "w8a8"
    assert tags["variant.full.tokens_per_second"] == "10.00" and tags["variant.w8a8.tokens_per_second"] == "20.00"
    card = render_state([], tags)
    assert "## Quantized variants" in card and "measured on cpu-2c (cpu, float32) at 8 requests" in card
    rows = [line for line in card.splitlines() if line.startswith("| full precision") or line.startswith("| w8a8")]
    assert len(rows) == 2 and "(reference)" in rows[0] and tags["variant.w8a8.delta"] in rows[1]
    assert "Not made here: w4a16: cuda only." in card
    assert "**Variant w8a8** serves this version" in card and "cheapest variant" in card
    assert "## Quantized variants" not in render_state([], {})  # a version quantize never saw


def test_the_stage_without_vllm_stops_in_one_line_before_any_work_and_leaves_nothing(tmp_path):
    import json

    from pipelines.serving.engine import EngineError
    from pipelines.stages import quantize as stage

    reports = tmp_path / "reports"
    for name, data in {"register/version.json": {"name": "m", "version": "3", "run_id": "r"},
                       "evaluate/results.json": {"primary_metric": "rouge_l", "examples": 10}}.items():
        (reports / name).parent.mkdir(parents=True, exist_ok=True)
        (reports / name).write_text(json.dumps(data))
    params = load_params("params.yaml", [f"paths.reports_dir={reports}", f"quantize.output_dir={tmp_path / 'variants'}",
                                         f"serve.engine.python={tmp_path / 'nowhere' / 'python'}",
                                         "serve.engine.device=cpu"])
    with pytest.raises(EngineError, match="run `make install`") as error:
        stage.main(params)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "variants").exists() and not (reports / "quantize").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["reports"]  # no temporary folder left beside it


TAGS = {"serving.variant": "w8a8", "variant.w8a8.uri": "runs:/r/variants/w8a8", "variant.w8a8.serves_on": "cpu,cuda",
        "variant.w4a16.uri": "runs:/r/variants/w4a16", "variant.w4a16.serves_on": "cuda"}


def test_the_gateway_serves_promotes_choice_where_its_device_serves_it_else_full_precision_and_says_why():
    from pipelines.serving.engine import choose_weights

    assert choose_weights(TAGS, None, "auto", "cpu") == ("w8a8", "runs:/r/variants/w8a8", None)
    assert choose_weights({}, None, "auto", "cpu") == ("full", None, None)  # promote never chose
    variant, uri, why = choose_weights(TAGS, None, "full", "cpu")
    assert (variant, uri) == ("full", None) and "serve.variant is full here (promote chose w8a8)" in why
    variant, uri, why = choose_weights({**TAGS, "serving.variant": "w4a16"}, None, "auto", "cpu")
    assert (variant, uri) == ("full", None) and "served on cuda, not on this engine's cpu" in why
    assert choose_weights({**TAGS, "serving.variant": "w4a16"}, None, "auto", "cuda")[0] == "w4a16"
    variant, uri, why = choose_weights({"serving.variant": "gone"}, None, "auto", "cpu")
    assert (variant, uri) == ("full", None) and "no variant gone" in why
    assert choose_weights(TAGS, "w8a8", "full", "cpu")[0] == "w8a8"  # asked for by name (quantize's own use)


def test_deploy_fails_only_on_other_weights_served_without_a_reason():
    from pipelines.serving.deploy import variant_failures

    assert variant_failures({"variant": "w8a8", "variant_note": None}, "w8a8", "3") == []
    assert variant_failures({"variant": "full", "variant_note": "served on cuda, not on cpu"}, "w8a8", "3") == []
    assert variant_failures({}, "w8a8", "3") == []  # a gateway that predates variants
    failed = variant_failures({"variant": "full", "variant_note": None}, "w8a8", "3")
    assert failed == ["the service serves v3 as full but promote chose w8a8, and it says no reason why"]


def test_promote_without_quantize_results_for_its_version_keeps_full_precision_and_says_why(tmp_path):
    import json

    from pipelines.stages.promote import quantized

    path = tmp_path / "results.json"
    missing = choose(quantized(path, "3"), VariantChoiceParams())
    assert missing["variant"] == "full" and "has not measured v3" in missing["reason"] and "is missing" in \
        missing["reason"]
    path.write_text(json.dumps(measured({"w8a8": list(REFERENCES)}, {"full": 10.0, "w8a8": 30.0}) | {"version": "2"}))
    stale = choose(quantized(path, "3"), VariantChoiceParams())
    assert stale["variant"] == "full" and "is about v2" in stale["reason"]
    assert choose(quantized(path, "2"), VariantChoiceParams())["variant"] == "w8a8"
