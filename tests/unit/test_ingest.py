"""Stage `ingest`: every source kind, the normalised schema, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines.config.params import BundledSource, FileSource, HFSource
from pipelines.data.sources import SCHEMA, ingest
from pipelines.errors import DataError

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
    with pytest.raises(DataError, match="broken.jsonl line 1 is not JSON"):
        ingest([file_source(path)], SAMPLE)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        ingest([file_source(path)], SAMPLE)


# --- a file that cannot be read: one line naming the file, the line and the fix -----------

GOOD_LINES = (FIXTURES / "good.jsonl").read_bytes().splitlines(keepends=True)


def damaged_jsonl(tmp_path: Path, line: int, replacement: bytes, name: str = "mine.jsonl") -> Path:
    """good.jsonl with its `line` (1-based) replaced."""
    lines = list(GOOD_LINES)
    lines[line - 1] = replacement
    path = tmp_path / name
    path.write_bytes(b"".join(lines))
    return path


def one_line_error(sources, sample_dir=SAMPLE) -> str:
    with pytest.raises(DataError) as error:
        ingest(sources, sample_dir)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("line, replacement, expected", [
    (4, b'{"prompt": "What does the noun \\"cat\\" mean?", "response": \n',
     r"mine\.jsonl line 4 is not JSON \(Expecting value at column \d+\); fix or remove that line"),
    (57, b'{"prompt": "What is a caf\xe9?", "response": "A coffee house."}\n',
     r"mine\.jsonl line 57: byte b'\\xe9' \(byte 26 of the line\) is not UTF-8 .*; re-save the file as UTF-8"),
    (2, b'["What is a cat?", "An animal."]\n', r"mine\.jsonl line 2 is a JSON array, not an object; fix or remove"),
    (150, b'{"prompt": "a", "response": "b"} {"prompt": "c"}\n', r"mine\.jsonl line 150 is not JSON \(Extra data"),
])
def test_a_bad_jsonl_line_is_named_with_its_number_and_the_fix(tmp_path, line, replacement, expected):
    message = one_line_error([file_source(damaged_jsonl(tmp_path, line, replacement))])
    assert re.search(expected, message), message
    assert message.startswith("ingest.sources[0] (file): ")


def test_a_bad_data_file_of_a_datasets_source_is_one_line(tmp_path):
    path = damaged_jsonl(tmp_path, 3, b'{"prompt": "cut off\n')
    message = one_line_error([HFSource(kind="hf", name="json", data_files=[str(path)])])
    assert ("ingest.sources[0] (hf): datasets.load_dataset('json', split='train') could not read its data files"
            in message)
    assert "name it as a `file` source to be told the bad line" in message


def test_a_byte_order_mark_and_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(GOOD_LINES[:5]) + b"\n\n" + b"".join(GOOD_LINES[5:10]))
    frame, _ = ingest([file_source(path)], SAMPLE)
    assert len(frame) == 10 and frame.loc[0, "prompt"] == json.loads(GOOD_LINES[0])["prompt"]


def test_a_damaged_bundled_sample_says_how_to_restore_it(tmp_path):
    samples = tmp_path / "sample"
    samples.mkdir()
    lines = (SAMPLE / "foldoc.jsonl").read_bytes().splitlines(keepends=True)
    lines[99] = lines[99][:30] + b"\n"  # a line cut off
    (samples / "foldoc.jsonl").write_bytes(b"".join(lines))
    message = one_line_error([BundledSource(kind="bundled", name="foldoc")], samples)
    assert f"ingest.sources[0] (bundled): {samples / 'foldoc.jsonl'} line 100 is not JSON" in message
    assert f"restore it with `git checkout -- {samples / 'foldoc.jsonl'}`" in message


def _csv(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "mine.csv"
    path.write_bytes(b"question,answer\n" + b"".join(f"What is thing {i}?,A thing.\n".encode() for i in range(5))
                     + body)
    return path


@pytest.mark.parametrize("body, expected", [
    (b"Qu'est-ce qu'un caf\xe9?,Un lieu.\n",
     r"mine\.csv line 7: byte b'\\xe9' \(byte 20 of the line\) is not UTF-8 .*; re-save the file as UTF-8"),
    (b"What is a, comma?,A mark.\n", r"mine\.csv is not valid CSV: Expected 2 fields in line 7, saw 3; quote fields"),
    (b'"What is an open quote?,A mark.\n', r"mine\.csv is not valid CSV: EOF inside string .*; quote fields"),
])
def test_a_bad_csv_row_is_named_with_its_line_and_the_fix(tmp_path, body, expected):
    message = one_line_error([file_source(_csv(tmp_path, body), prompt_field="question", response_field="answer")])
    assert re.search(expected, message), message


def _parquet(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "mine.parquet"
    pd.DataFrame(rows(500)).to_parquet(path)
    return path, path.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "corrupt pages", "not parquet"])
def test_a_truncated_or_corrupt_parquet_file_is_one_line_with_the_fix(tmp_path, damage):
    path, data = _parquet(tmp_path)
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt pages":
        path.write_bytes(data[:100] + bytes(b ^ 0x5A for b in data[100:1500]) + data[1500:])
    else:
        path.write_text("question,answer\nWhat is a cat?,An animal.\n")
    message = one_line_error([file_source(path, prompt_field="question", response_field="answer")])
    assert re.search(r"cannot read .*mine\.parquet as parquet \(.+\): the file is truncated or corrupt; "
                     r"write it again from its source", message), message


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_a_missing_column_is_named_in_every_format(tmp_path, suffix):
    path = tmp_path / f"mine{suffix}"
    frame = pd.DataFrame(rows()).drop(columns="answer")
    {".csv": lambda: frame.to_csv(path, index=False), ".parquet": lambda: frame.to_parquet(path),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True)}[suffix]()
    message = one_line_error([file_source(path, prompt_field="question", response_field="answer")])
    assert "source 'mine' has no column 'answer' for the response (columns: question, pos)" in message
    assert "set response_field in params.yaml" in message


def test_the_cli_prints_one_line_and_no_traceback(tmp_path):
    """`llmops ingest` on a damaged sample: exit 1 and one line on stderr, not a traceback."""
    samples = tmp_path / "sample"
    samples.mkdir()
    (samples / "wordnet.jsonl").write_bytes(b"".join(GOOD_LINES[:9]) + b"\xff\xfe{not json}\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "ingest", "--set", f"paths.sample_dir={samples}",
         "--set", f"paths.ingested={tmp_path}/out/pairs.parquet", "--set", f"paths.reports_dir={tmp_path}/reports",
         "--set", "ingest.sources=[{kind: bundled, name: wordnet}]"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or "error:" in line]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert f"llmops ingest: error: ingest.sources[0] (bundled): {samples / 'wordnet.jsonl'} line 10:" in errors[0]
    assert not (tmp_path / "out").exists()
