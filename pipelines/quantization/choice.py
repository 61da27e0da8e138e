"""Which weights serve a version: full precision or one of its quantized variants, from the
evidence the stage `quantize` measured (reports/quantize/results.json) and params
`promote.variant`. Pure: the stage `promote` records the choice on the version
(tags `serving.variant*`), the gateway serves it (pipelines/serving/engine.py `fetch_version`).

A variant qualifies when the lower bound of the paired-bootstrap CI of (variant - full
precision) on the gate's primary metric is at least -tolerance, and at least -slice_tolerance
on every reported slice. `cheapest` then takes the qualifying variant with the lowest cost per 1k
generated tokens, provided it saves at least `min_saving` of full precision's cost; both were
measured on the same machine in one run, so the cost ratio is the inverse throughput ratio
(the price per hour is the same) and the choice holds even where cost.prices has no row.
"""

from __future__ import annotations

from typing import Any

from pipelines.config.params import VariantChoiceParams

FULL = "full"


def quality(variant: dict[str, Any], params: VariantChoiceParams) -> tuple[bool, str]:
    """Whether the variant's quality loss is within the tolerances, and the figures that say so."""
    comparison = variant["comparison"]
    metric, confidence = comparison["metric"], int(round(comparison["confidence"] * 100))
    detail = (f"{metric} vs full precision {comparison['improvement']:+.4f}, {confidence}% CI "
              f"[{comparison['low']:+.4f}, {comparison['high']:+.4f}] "
              f"(lower bound must be >= {-params.tolerance:+.4f})")
    worse = [f"{name}={value} ({entry['improvement']:+.4f} [{entry['low']:+.4f}, {entry['high']:+.4f}], n={entry['n']})"
             for name, values in variant.get("slices", {}).items() for value, entry in values.items()
             if entry["low"] < -params.slice_tolerance]
    if worse:
        detail += f"; slices whose lower bound is below {-params.slice_tolerance:+.4f}: {', '.join(worse)}"
    return comparison["low"] >= -params.tolerance and not worse, detail


def saving(variant: dict[str, Any], full: dict[str, Any]) -> float:
    """The share of full precision's cost per generated token the variant saves (negative: dearer)."""
    mine, theirs = variant["serving"]["tokens_per_second"], full["serving"]["tokens_per_second"]
    return 1.0 - theirs / mine if mine > 0 else float("-inf")


def choose(results: dict[str, Any], params: VariantChoiceParams) -> dict[str, Any]:
    """{"variant": name or "full", "reason": one line, "candidates": {name: {"quality_ok", "saving", "detail"}}}."""
    variants, full = results.get("variants") or {}, results.get("full")
    candidates: dict[str, dict[str, Any]] = {}
    for name, variant in variants.items():
        ok, detail = quality(variant, params)
        cut = saving(variant, full)
        cost = variant["serving"].get("cost_per_1k_tokens")
        priced = f", {cost:.6f} {results.get('currency', '')} per 1k tokens" if cost is not None else ""
        candidates[name] = {"quality_ok": ok, "saving": round(cut, 4),
                            "detail": f"{detail}; {variant['serving']['tokens_per_second']:.1f} vs "
                                      f"{full['serving']['tokens_per_second']:.1f} tokens/s at "
                                      f"{results['concurrency']} in flight: saves {cut:+.1%} of the cost{priced}"}

    def chosen(variant: str, reason: str) -> dict[str, Any]:
        return {"variant": variant, "reason": reason, "candidates": candidates,
                "measured_on": results.get("machine"), "device": results.get("device")}

    if not variants:
        return chosen(FULL, "no quantized variant was made" + (f" ({results['note']})" if results.get("note") else ""))
    if params.choose == FULL:
        return chosen(FULL, "promote.variant.choose is full")
    if params.choose != "cheapest":
        if params.choose not in candidates:
            return chosen(FULL, f"variant {params.choose} (promote.variant.choose) was not made on "
                                f"{results.get('device')}")
        entry = candidates[params.choose]
        if not entry["quality_ok"]:
            return chosen(FULL, f"variant {params.choose} (promote.variant.choose) loses too much: {entry['detail']}")
        return chosen(params.choose, f"variant {params.choose} as promote.variant.choose names, within the "
                                     f"tolerances: {entry['detail']}")
    within = {n: c for n, c in candidates.items() if c["quality_ok"]}
    if not within:
        return chosen(FULL, "no variant within the quality tolerances: " +
                      "; ".join(f"{n}: {c['detail']}" for n, c in candidates.items()))
    best = max(within, key=lambda n: within[n]["saving"])
    if within[best]["saving"] < params.min_saving:
        return chosen(FULL, f"no variant within the tolerances is at least {params.min_saving:.0%} cheaper to serve: "
                      + "; ".join(f"{n}: {c['detail']}" for n, c in within.items()))
    return chosen(best, f"the cheapest variant within the tolerances: {within[best]['detail']}")
