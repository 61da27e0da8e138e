"""evaluate's seeded sample of the test split, and the top-up that keeps a small new domain a slice."""

from __future__ import annotations

import pandas as pd

from pipelines.evaluation.harness import select_examples


def split(general: int, production: int) -> pd.DataFrame:
    rows = [{"id": f"g{i:04d}", "domain": "general"} for i in range(general)]
    rows += [{"id": f"p{i:04d}", "domain": "production"} for i in range(production)]
    return pd.DataFrame(rows)


def test_a_small_domain_is_topped_up_to_the_slice_size_and_the_sample_is_reproducible():
    frame = split(600, 13)
    plain = select_examples(frame, 200, seed=0)
    assert len(plain) == 200 and (plain["domain"] == "production").sum() < 10  # what the top-up is for
    sample = select_examples(frame, 200, seed=0, top_up=["domain"], min_size=10)
    assert (sample["domain"] == "production").sum() == 10
    assert set(plain["id"]) < set(sample["id"]) and len(sample) == 200 + 10 - (plain["domain"] == "production").sum()
    assert sample.equals(select_examples(frame, 200, seed=0, top_up=["domain"], min_size=10))
    assert list(sample["id"]) == sorted(sample["id"])


def test_a_domain_too_small_for_a_slice_and_the_whole_split_are_left_as_they_are():
    frame = split(600, 6)
    assert select_examples(frame, 200, seed=0, top_up=["domain"], min_size=10).equals(select_examples(frame, 200,
                                                                                                       seed=0))
    assert len(select_examples(frame, None, seed=0, top_up=["domain"], min_size=10)) == 606
    assert len(select_examples(frame, 200, seed=0, top_up=["no_such_column"], min_size=10)) == 200
