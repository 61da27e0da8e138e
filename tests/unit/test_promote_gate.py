"""The promotion gate: pure decisions over evaluate's results."""

from __future__ import annotations

from pipelines.config.params import PromoteParams
from pipelines.registry.promotion import decide, gate


def results(vs_base=(0.10, 0.05, 0.15), vs_champion=None, slices=None, champion_version=None):
    def diff(improvement, low, high):
        return {"improvement": improvement, "low": low, "high": high, "confidence": 0.95}

    out = {
        "primary_metric": "rouge_l",
        "systems": {"candidate": {"rouge_l": 0.5}, "base": {"rouge_l": 0.4}},
        "comparisons": {"base": {"rouge_l": diff(*vs_base)}},
        "slices": slices or {},
        "champion_version": champion_version,
    }
    if vs_champion is not None:
        out["systems"]["champion"] = {"rouge_l": 0.5 - vs_champion[0]}
        out["comparisons"]["champion"] = {"rouge_l": diff(*vs_champion)}
    return out


def test_passes_when_ci_lower_bound_beats_base():
    passed, checks = gate(results(), PromoteParams(min_improvement=0.01))
    assert passed and [c.name for c in checks] == ["beats_base"]


def test_fails_when_ci_lower_bound_is_not_above_min_improvement():
    passed, checks = gate(results(vs_base=(0.10, 0.005, 0.2)), PromoteParams(min_improvement=0.01))
    assert not passed
    assert "lower bound must exceed +0.0100" in checks[0].detail


def test_champion_tolerance_and_slices():
    params = PromoteParams(champion_tolerance=0.02, slice_tolerance=0.05)
    slices = {"pos": {"noun": {"n": 50, "candidate": {"rouge_l": 0.50}, "champion": {"rouge_l": 0.52}},
                      "verb": {"n": 20, "candidate": {"rouge_l": 0.30}, "champion": {"rouge_l": 0.40}}}}
    passed, checks = gate(results(vs_champion=(-0.01, -0.03, 0.01), slices=slices, champion_version="3"), params)
    by_name = {c.name: c for c in checks}
    assert by_name["not_worse_than_champion"].passed
    assert not by_name["no_slice_worse_than_champion"].passed
    assert "pos=verb (-0.1000, n=20)" in by_name["no_slice_worse_than_champion"].detail
    assert not passed
    passed, _ = gate(results(vs_champion=(-0.05, -0.08, -0.01), champion_version="3"), params)
    assert not passed


def test_decide_modes_force_and_stale_champion():
    auto = decide(results(), PromoteParams(mode="auto"), current_champion=None)
    assert auto.passed and auto.promoted and auto.reasons == []

    manual = decide(results(), PromoteParams(mode="manual"), current_champion=None)
    assert manual.passed and not manual.promoted and "manual approval" in manual.reasons[0]

    failing = results(vs_base=(-0.1, -0.2, 0.0))
    rejected = decide(failing, PromoteParams(), current_champion=None)
    assert not rejected.promoted and "lower bound" in rejected.reasons[0]
    forced = decide(failing, PromoteParams(), current_champion=None, force=True)
    assert forced.promoted and forced.forced and not forced.passed

    stale = decide(results(champion_version=None), PromoteParams(), current_champion="4")
    assert not stale.promoted
    assert "champion changed from none to v4" in stale.reasons[-1]
