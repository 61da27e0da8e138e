"""`{kind: review}`: ingest reads the reviewed rows with their `rejected` answer and provenance,
prepare keeps them without leaking a prompt into two splits, and the retrain policy counts them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipelines.config.params import BundledSource, PrepareParams, ReviewSource, parse_params
from pipelines.data.preparation import prepare
from pipelines.data.sources import PROVENANCE, SCHEMA, ingest
from pipelines.data.splits import normalise_text
from pipelines.errors import DataError, ParamsError
from pipelines.monitoring.monitor import count_new_rows

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
REVIEW = ReviewSource(kind="review")


def reviewed(prompts: list[str], *, corrected: bool = True, start: int = 0) -> pd.DataFrame:
    """Rows as `llmops review export` writes them (pipelines/review/corrections.py COLUMNS)."""
    return pd.DataFrame([{
        "id": f"review-req-{n}", "prompt": prompt, "response": f"A reviewed answer {n}.",
        "rejected": f"The model's answer {n}." if corrected else None, "source": "review", "domain": "production",
        "request_id": f"req-{n}", "task_id": n + 1, "reviewer": "1", "reviewed_at": "2026-12-06T10:00:00Z",
        "window": "2026-12-06T00:00:00+00:00"} for n, prompt in enumerate(prompts, start)])


def test_every_parquet_file_under_the_folder_is_read_with_its_provenance(tmp_path):
    reviewed(["What is a daemon?", "What is a kernel?"]).to_parquet(tmp_path / "corrections.parquet")
    (tmp_path / "more").mkdir()
    reviewed(["What is a shell?"], corrected=False, start=2).to_parquet(tmp_path / "more" / "candidate.parquet")
    # a writer's temporary file (pipelines/io.py atomic_path) is not data
    (tmp_path / ".corrections.parquet.x.tmp").mkdir()
    reviewed(["half written"]).to_parquet(tmp_path / ".corrections.parquet.x.tmp" / "corrections.parquet")
    frame, metrics = ingest([BundledSource(kind="bundled", name="wordnet", max_rows=20), REVIEW], SAMPLE, tmp_path)
    assert list(frame.columns) == SCHEMA and metrics["rows_by_source"] == {"wordnet": 20, "review": 3}
    rows = frame[frame["source"] == "review"].reset_index(drop=True)
    assert rows["prompt"].tolist() == ["What is a daemon?", "What is a kernel?", "What is a shell?"]
    assert rows["rejected"].tolist() == ["The model's answer 0.", "The model's answer 1.", None]
    assert rows.loc[1, PROVENANCE].tolist() == ["req-1", 2, "1", "2026-12-06T10:00:00Z", "2026-12-06T00:00:00+00:00"]
    assert set(rows["domain"]) == {"production"} and rows["id"].tolist()[0] == "review-req-0"
    base = frame[frame["source"] == "wordnet"]
    assert base[["rejected", *PROVENANCE]].isna().all().all()  # nobody reviewed these


def test_an_explicit_path_wins_and_an_empty_folder_is_no_rows(tmp_path):
    (tmp_path / "mine").mkdir()
    reviewed(["What is a daemon?"]).to_parquet(tmp_path / "mine" / "x.parquet")
    frame, _ = ingest([ReviewSource(kind="review", path=tmp_path / "mine")], SAMPLE, tmp_path / "elsewhere")
    assert frame["prompt"].tolist() == ["What is a daemon?"]
    (tmp_path / "empty").mkdir()
    frame, metrics = ingest([BundledSource(kind="bundled", name="wordnet", max_rows=5), REVIEW], SAMPLE,
                            tmp_path / "empty")
    assert len(frame) == 5 and metrics["rows_by_source"] == {"wordnet": 5, "review": 0}
    with pytest.raises(DataError, match="the sources hold no rows"):
        ingest([REVIEW], SAMPLE, tmp_path / "empty")


def test_bad_review_input_is_named(tmp_path):
    with pytest.raises(DataError, match=r"ingest.sources\[0\] \(review\): review folder .*missing does not exist"):
        ingest([REVIEW], SAMPLE, tmp_path / "missing")
    with pytest.raises(DataError, match="needs a folder"):
        ingest([REVIEW], SAMPLE)
    rows = reviewed(["What is a daemon?"]).astype(object)
    rows.loc[0, "rejected"] = 42
    rows.to_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="column 'rejected' of source 'review' must hold text"):
        ingest([REVIEW], SAMPLE, tmp_path)
    with pytest.raises(ParamsError, match=r"ingest.sources\[0\].pathh"):
        parse_params({"ingest": {"sources": [{"kind": "review", "pathh": "data/feedback"}]}})


def test_prepare_keeps_rejected_and_a_repeated_prompt_stays_in_one_split(tmp_path, tiny_tokenizer):
    base, _ = ingest([BundledSource(kind="bundled", name="wordnet", max_rows=400)], SAMPLE)
    # production repeats prompts the base data holds (in every split), with other answers
    repeated = base["prompt"].iloc[::10].tolist()
    reviewed(repeated).to_parquet(tmp_path / "corrections.parquet")
    frame, _ = ingest([BundledSource(kind="bundled", name="wordnet", max_rows=400), REVIEW], SAMPLE, tmp_path)
    splits, _ = prepare(frame, PrepareParams(), tiny_tokenizer)
    where: dict[str, set[str]] = {}
    for name, part in splits.items():
        assert "rejected" in part.columns and set(PROVENANCE) <= set(part.columns)
        for prompt in part["prompt"]:
            where.setdefault(normalise_text(prompt), set()).add(name)
    assert all(len(names) == 1 for names in where.values())
    review = pd.concat(splits.values())
    review = review[review["source"] == "review"]
    assert len(review) == len(repeated) and review["rejected"].notna().all()
    assert {names.pop() for prompt, names in where.items()
            if prompt in {normalise_text(p) for p in repeated}} == {"train", "validation", "test"}


def test_the_retrain_policy_counts_reviewed_rows_whose_prompt_is_new(tmp_path):
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    pd.DataFrame({"prompt": ["What is a cat?", "What is a dog?"], "response": ["A.", "B."]}).to_parquet(
        tmp_path / "pairs.parquet")
    params = parse_params({
        "paths": {"ingested": str(tmp_path / "pairs.parquet"), "feedback_dir": str(feedback)},
        "ingest": {"sources": [{"kind": "bundled", "name": "wordnet"}]},
        "monitor": {"retrain": {"new_data": {"kind": "review"}, "min_new_rows": 2}},
    })
    assert count_new_rows(params) == 0  # nothing reviewed yet
    reviewed(["What is a cat?", "What is a daemon?"]).to_parquet(feedback / "corrections.parquet")
    reviewed(["What is a kernel?"], start=2).to_parquet(feedback / "candidate_reviews.parquet")
    assert count_new_rows(params) == 2  # the cat is known already
    explicit = params.monitor.retrain.model_copy(update={"new_data": ReviewSource(kind="review", path=feedback)})
    assert count_new_rows(params.model_copy(update={"monitor": params.monitor.model_copy(
        update={"retrain": explicit})})) == 2
