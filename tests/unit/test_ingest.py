"""Stage `ingest`: every source kind, the normalised schema, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines.errors import DataError
from pipelines.ingest import SCHEMA, ingest
from pipelines.params import BundledSource, FileSource, HFSource

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
FIXTURES = REPO / "tests" / "data" / "fixtures"


def rows(n: int = 5) -> list[dict]:
    return [{"question": f"What is thing {i}?", "answer": f"Thing {i} is a thing.", "pos": "noun"} for i in range(n)]


def file_source(path: Path, **kw) -> FileSource:
    return FileSource(kind="file", path=path, **kw)


def test_bundled_sources_keep_their_metadata():
    frame, metrics = ingest([BundledSource(kind="bundled", name="wordnet"),
                             BundledSource(kind="bundled", name="foldoc", max_rows=100)], SAMPLE)
    assert list(frame.columns) == SCHEMA
    assert metrics == {"rows": len(frame), "rows_by_source": {"wordnet": 6400, "foldoc": 100}}
    assert set(frame["domain"]) == {"general", "computing"}
    assert set(frame["pos"]) == {"noun", "verb", "adjective", "adverb", "term"}
    assert frame["id"].is_unique


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files_with_field_mapping(tmp_path, suffix):
    path = tmp_path / f"mine{suffix}"
    frame = pd.DataFrame(rows())
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    out, _ = ingest([file_source(path, prompt_field="question", response_field="answer", domain="toys")], SAMPLE)
    assert list(out.columns) == SCHEMA
    assert out.loc[2, "prompt"] == "What is thing 2?" and out.loc[2, "response"] == "Thing 2 is a thing."
    assert set(out["source"]) == {"mine"} and set(out["domain"]) == {"toys"} and set(out["pos"]) == {"noun"}
    # ids are content hashes: stable across runs and formats
    assert out["id"].is_unique and out.loc[0, "id"].startswith("mine-")


def test_hugging_face_datasets_path_offline(tmp_path):
    """The `hf` kind goes through datasets.load_dataset; offline it reads a local dataset folder."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    pd.DataFrame(rows(8)).to_parquet(folder / "train.parquet")
    out, metrics = ingest([HFSource(kind="hf", name=str(folder), split="train",
                                    prompt_field="question", response_field="answer")], SAMPLE)
    assert len(out) == 8 and metrics["rows_by_source"] == {"my_dataset": 8}
    # and with a builder name plus data files, as for hub-hosted JSON datasets
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(3)))
    out, _ = ingest([HFSource(kind="hf", name="json", data_files=[str(data)],
                              prompt_field="question", response_field="answer")], SAMPLE)
    assert list(out["prompt"]) == [r["question"] for r in rows(3)]


def test_missing_hf_dataset_is_a_clear_error(tmp_path):
    expected = r"ingest.sources\[0\] \(hf\): datasets.load_dataset\('no-such-org/no-such-set'"
    with pytest.raises(DataError, match=expected):
        ingest([HFSource(kind="hf", name="no-such-org/no-such-set")], SAMPLE)


def test_missing_source_file(tmp_path):
    with pytest.raises(DataError, match=r"source file .*nope.jsonl does not exist; put the file there or fix the path"):
        ingest([file_source(tmp_path / "nope.jsonl")], SAMPLE)


def test_empty_file():
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        ingest([file_source(FIXTURES / "empty.jsonl")], SAMPLE)


def test_file_with_header_but_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("prompt,response\n")
    with pytest.raises(DataError, match="has no rows"):
        ingest([file_source(path)], SAMPLE)


def test_wrong_schema_names_the_columns_and_the_fix():
    with pytest.raises(DataError) as error:
        ingest([file_source(FIXTURES / "wrong_schema.jsonl")], SAMPLE)
    message = str(error.value)
    assert "has no column 'prompt'" in message
    assert "columns: answer, question" in message or "columns: question, answer" in message
    assert "set prompt_field in params.yaml" in message


def test_non_text_values_are_rejected():
    expected = r"column 'response' .* must hold text but 1 row\(s\) do not \(first at row 4: 42\)"
    with pytest.raises(DataError, match=expected):
        ingest([file_source(FIXTURES / "non_text.jsonl")], SAMPLE)


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": \n')
    with pytest.raises(DataError, match="cannot read .*broken.jsonl as jsonl"):
        ingest([file_source(path)], SAMPLE)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        ingest([file_source(path)], SAMPLE)
