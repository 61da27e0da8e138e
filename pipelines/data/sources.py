"""Stage `ingest`: read the sources named in params.yaml and normalise them to one schema.

The library side of the stage `ingest`; what it reads and writes, and how
it is run: pipelines/stages/ingest.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config.params import BundledSource, FileSource, HFSource, Params, ReviewSource, Source
from pipelines.errors import DataError
from pipelines.io import atomic_write_json, write_parquet

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

# Where a reviewed row comes from (`llmops review export`, docs/review.md): the inference log's
# request, the Label Studio task, who reviewed it and when, and the monitor window that flagged it.
PROVENANCE = ["request_id", "task_id", "reviewer", "reviewed_at", "window"]
# The normalised schema every later stage reads. `rejected` is the answer a reviewer corrected
# (the other side of a preference pair); it and the provenance are null for rows nobody reviewed.
SCHEMA = ["id", "prompt", "response", "source", "domain", "pos", "category", "rejected", *PROVENANCE]
REVIEW_SOURCE = "review"  # the label (and default `source`) of the rows a `review` source reads
TEXT_COLUMNS = ("prompt", "response")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# How to repair a file that cannot be read (a bundled sample is restored instead).
FIX_ENCODING = "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)"
FIX_JSON_LINE = 'fix or remove that line: each line must be one JSON object such as {"prompt": ..., "response": ...}'
FIX_CSV = "quote fields that hold commas, quotes or line breaks; one record per row"
FIX_PARQUET = "write it again from its source (e.g. pandas `DataFrame.to_parquet`) or restore it (`dvc checkout`)"


def _pair_hash(prompt: object, response: object) -> str:
    return hashlib.sha256(f"{prompt}\x1f{response}".encode()).hexdigest()[:16]


def _describe(source: Source, index: int) -> str:
    return f"ingest.sources[{index}] ({source.kind})"


def read_source(source: Source, index: int, sample_dir: Path,
                feedback_dir: Path | None = None) -> tuple[str, pd.DataFrame]:
    """(label, raw frame) of one source; raises DataError naming the source and the fix.
    `feedback_dir` is the folder a `review` source without a path reads (paths.feedback_dir)."""
    where = _describe(source, index)
    if isinstance(source, ReviewSource):
        return REVIEW_SOURCE, read_review_folder(source.path or feedback_dir, where)
    if isinstance(source, BundledSource):
        path = sample_dir / f"{source.name}.jsonl"
        restore = f"restore it with `git checkout -- {path}` (or rebuild it: `make sample`)"
        if not path.exists():
            raise DataError(f"{where}: bundled sample {path} is missing; {restore}")
        return source.name, read_file(path, "jsonl", where, restore)
    if isinstance(source, FileSource):
        path = source.path
        if not path.exists():
            raise DataError(
                f"{where}: source file {path} does not exist; put the file there or fix the path in params.yaml"
            )
        if path.is_dir():
            raise DataError(f"{where}: {path} is a folder; name a .jsonl, .csv or .parquet file")
        fmt = source.format if source.format != "auto" else FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"{where}: cannot tell the format of {path} from its suffix; "
                f"use one of {', '.join(sorted(FORMATS))} or set format: jsonl|csv|parquet"
            )
        if path.stat().st_size == 0:
            raise DataError(f"{where}: source file {path} is empty; it must hold at least one row")
        return path.stem, read_file(path, fmt, where)
    return source.name.rstrip("/").split("/")[-1], _load_hf(source, where)


def review_files(folder: Path) -> list[Path]:
    """The Parquet files of a review folder, sorted; hidden files and folders (a writer's
    temporary file, DVC's cache links) are not data."""
    return sorted(path for path in folder.rglob("*.parquet")
                  if not any(part.startswith(".") for part in path.relative_to(folder).parts))


def read_review_folder(folder: Path | None, where: str) -> pd.DataFrame:
    """Every Parquet file under `folder`, concatenated (columns: the union); no file is no rows."""
    import pandas as pd

    if folder is None:
        raise DataError(f"{where}: a review source needs a folder: set its `path` or paths.feedback_dir")
    if not folder.is_dir():
        raise DataError(f"{where}: review folder {folder} does not exist; create it (`mkdir -p {folder}`), "
                        "run `llmops review export`, or fix the path in params.yaml")
    frames = [read_file(path, "parquet", where) for path in review_files(folder)]
    frames = [frame for frame in frames if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_file(path: Path, fmt: str, where: str, fix: str | None = None) -> pd.DataFrame:
    """A JSONL, CSV or Parquet file as a raw frame; any decoding problem is one DataError line
    naming the file, the line (JSONL, CSV) and `fix` (default: how to repair the file)."""
    import pandas as pd
    import pyarrow

    try:
        if fmt == "jsonl":
            return _read_jsonl(path, where, fix)
        if fmt == "csv":
            try:
                return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
            except UnicodeDecodeError:
                line, detail = _first_non_utf8_line(path)
                raise DataError(f"{where}: {path} line {line}: {detail}; {fix or FIX_ENCODING}") from None
            except pd.errors.ParserError as error:  # pandas names the line ("Expected 2 fields in line 5, saw 3")
                detail = str(error).strip().splitlines()[-1].replace("Error tokenizing data. C error: ", "")
                raise DataError(f"{where}: {path} is not valid CSV: {detail}; {fix or FIX_CSV}") from None
        return pd.read_parquet(path)
    except DataError:
        raise
    except (ValueError, OSError, pyarrow.ArrowException) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if fmt != "parquet" or isinstance(error, PermissionError):
            raise DataError(f"{where}: cannot read {path} as {fmt} ({detail}); "
                            f"{fix or 'check that the file exists and is readable'}") from None
        # Parquet has no lines: pyarrow says what is wrong (no footer: truncated; bad pages: corrupt)
        raise DataError(f"{where}: cannot read {path} as parquet ({detail}): the file is truncated or corrupt; "
                        f"{fix or FIX_PARQUET}") from None


def _read_jsonl(path: Path, where: str, fix: str | None) -> pd.DataFrame:
    """One JSON object per line (blank lines skipped, a UTF-8 byte order mark accepted).

    Parsed here with `json` rather than `pandas.read_json(lines=True)`: pandas reports a bad
    line with neither its number nor the cause ("Expected object or value"), and a line that
    is valid JSON but not an object ends in an AttributeError.
    """
    import pandas as pd

    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: {path} line {number}: {_bad_bytes(raw, error)}; "
                                f"{fix or FIX_ENCODING}") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: {path} line {number} is not JSON ({error.msg} at column {error.colno}); "
                                f"{fix or FIX_JSON_LINE}") from None
            if not isinstance(record, dict):
                kind = {list: "array", str: "string", bool: "boolean"}.get(type(record), "number or null")
                raise DataError(f"{where}: {path} line {number} is a JSON {kind}, not an object; "
                                f"{fix or FIX_JSON_LINE}")
            records.append(record)
    return pd.DataFrame.from_records(records) if records else pd.DataFrame()


def _bad_bytes(raw: bytes, error: UnicodeDecodeError) -> str:
    return (f"byte {raw[error.start:error.start + 1]!r} (byte {error.start + 1} of the line) is not UTF-8 "
            f"({error.reason})")


def _first_non_utf8_line(path: Path) -> tuple[int, str]:
    """(line number, what is wrong) of the first line that is not UTF-8 (pandas gives only a buffer offset)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, _bad_bytes(raw, error)
    return 0, "bytes that are not UTF-8"


def _load_hf(source: HFSource, where: str) -> pd.DataFrame:
    import datasets

    try:
        dataset = datasets.load_dataset(
            source.name, source.config, split=source.split, revision=source.revision,
            data_files=source.data_files,
        )
    except datasets.exceptions.DatasetGenerationError as error:  # a data file it could not parse
        cause = error.__cause__ or error.__context__ or error
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(
            f"{where}: datasets.load_dataset('{source.name}', split='{source.split}') could not read its data "
            f"files ({detail}); fix the file, or name it as a `file` source to be told the bad line"
        ) from None
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetsError) as error:
        raise DataError(
            f"{where}: datasets.load_dataset('{source.name}', split='{source.split}') failed: "
            f"{(str(error).splitlines() or [type(error).__name__])[0]} (offline? use a local dataset folder or files)"
        ) from None
    return dataset.to_pandas()


def normalise(frame: pd.DataFrame, source: Source, label: str, where: str) -> pd.DataFrame:
    """Map a raw frame to SCHEMA; text columns must exist and hold text."""
    import pandas as pd

    if len(frame) == 0:
        raise DataError(f"{where}: source '{label}' has no rows; it must hold at least one row")
    mapping = {"prompt": source.prompt_field, "response": source.response_field}
    for target, column in mapping.items():
        if column not in frame.columns:
            raise DataError(
                f"{where}: source '{label}' has no column '{column}' for the {target} "
                f"(columns: {', '.join(map(str, frame.columns))}); set {target}_field in params.yaml"
            )
    for column in [*mapping.values(), *(["rejected"] if "rejected" in frame.columns else [])]:
        values = frame[column]
        bad = values[values.notna() & ~values.map(lambda v: isinstance(v, str))]
        if len(bad):
            raise DataError(
                f"{where}: column '{column}' of source '{label}' must hold text but {len(bad)} row(s) do not "
                f"(first at row {bad.index[0]}: {bad.iloc[0]!r}); fix the source or map another column"
            )
    out = pd.DataFrame({
        "prompt": frame[mapping["prompt"]].astype(object),
        "response": frame[mapping["response"]].astype(object),
    })
    if source.id_field:
        if source.id_field not in frame.columns:
            raise DataError(f"{where}: id_field '{source.id_field}' is not a column of source '{label}'")
        out["id"] = frame[source.id_field].astype(str)
    elif "id" in frame.columns:
        out["id"] = frame["id"].astype(str)
    else:
        out["id"] = [f"{label}-{_pair_hash(p, r)}" for p, r in zip(out["prompt"], out["response"])]
    out["source"] = frame["source"].astype(str) if "source" in frame.columns else label
    if "domain" in frame.columns:
        out["domain"] = frame["domain"].astype(object)
    else:
        out["domain"] = source.domain or "general"
    for column in ("pos", "category", "rejected", *PROVENANCE):
        out[column] = frame[column].astype(object) if column in frame.columns else None
    out = out[SCHEMA]
    if source.max_rows is not None:
        out = out.head(source.max_rows)
    return out.reset_index(drop=True)


def ingest(sources: list[Source], sample_dir: Path, feedback_dir: Path | None = None) -> tuple[pd.DataFrame, dict]:
    import pandas as pd

    frames, counts = [], {}
    for index, source in enumerate(sources):
        where = _describe(source, index)
        label, raw = read_source(source, index, sample_dir, feedback_dir)
        if isinstance(source, ReviewSource) and len(raw) == 0:  # nothing reviewed yet: the folder fills over time
            logger.warning("%s: no reviewed rows yet in %s", where, source.path or feedback_dir)
            counts.setdefault(label, 0)
            continue
        frame = normalise(raw, source, label, where)
        counts[label] = counts.get(label, 0) + len(frame)
        frames.append(frame)
        logger.info("%s: %d rows from %s", where, len(frame), label)
    if not frames:
        raise DataError("ingest: the sources hold no rows (only empty review folders); add a source with data")
    pairs = pd.concat(frames, ignore_index=True)
    return pairs, {"rows": len(pairs), "rows_by_source": counts}


def main(params: Params) -> None:
    pairs, metrics = ingest(params.ingest.sources, params.paths.sample_dir, params.paths.feedback_dir)
    write_parquet(pairs, params.paths.ingested)
    atomic_write_json(params.paths.metrics("ingest"), metrics)
    logger.info("ingest: wrote %d rows to %s", len(pairs), params.paths.ingested)
