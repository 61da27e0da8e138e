"""Stage `ingest`: read the sources named in params.yaml and normalise them to one schema.

Reads   params `ingest.sources` (the bundled sample in data/sample/, local JSONL/CSV/Parquet
        files, or a dataset through `datasets.load_dataset`), `paths`.
Writes  `paths.ingested` (Parquet, columns SCHEMA) and reports/ingest/metrics.json.
Run     `llmops ingest` or `dvc repro ingest`.

Text columns must hold text: a source whose prompt/response columns are missing or hold
numbers stops here with a message naming the column and the fix. Content checks (blank
values, PII, lengths) are the `validate` stage's job.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import DataError
from pipelines.io import atomic_write_json, write_parquet
from pipelines.params import BundledSource, FileSource, HFSource, Params, Source

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

# The normalised schema every later stage reads.
SCHEMA = ["id", "prompt", "response", "source", "domain", "pos", "category"]
TEXT_COLUMNS = ("prompt", "response")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _pair_hash(prompt: object, response: object) -> str:
    return hashlib.sha256(f"{prompt}\x1f{response}".encode()).hexdigest()[:16]


def _describe(source: Source, index: int) -> str:
    return f"ingest.sources[{index}] ({source.kind})"


def read_source(source: Source, index: int, sample_dir: Path) -> tuple[str, pd.DataFrame]:
    """(label, raw frame) of one source; raises DataError naming the source and the fix."""
    import pandas as pd

    where = _describe(source, index)
    if isinstance(source, BundledSource):
        path = sample_dir / f"{source.name}.jsonl"
        if not path.exists():
            raise DataError(f"{where}: bundled sample {path} is missing; restore it with `git checkout -- {path}`")
        return source.name, pd.read_json(path, lines=True, dtype=False)
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
        try:
            if fmt == "jsonl":
                frame = pd.read_json(path, lines=True, dtype=False)
            elif fmt == "csv":
                frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
            else:
                frame = pd.read_parquet(path)
        except (ValueError, OSError, pd.errors.ParserError) as error:
            raise DataError(f"{where}: cannot read {path} as {fmt}: {str(error).splitlines()[0]}") from None
        return path.stem, frame
    return source.name.rstrip("/").split("/")[-1], _load_hf(source, where)


def _load_hf(source: HFSource, where: str) -> pd.DataFrame:
    import datasets

    try:
        dataset = datasets.load_dataset(
            source.name, source.config, split=source.split, revision=source.revision,
            data_files=source.data_files,
        )
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        raise DataError(
            f"{where}: datasets.load_dataset('{source.name}', split='{source.split}') failed: "
            f"{str(error).splitlines()[0]} (offline? use a local dataset folder or files)"
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
    for column in ("pos", "category"):
        out[column] = frame[column].astype(object) if column in frame.columns else None
    out = out[SCHEMA]
    if source.max_rows is not None:
        out = out.head(source.max_rows)
    return out.reset_index(drop=True)


def ingest(sources: list[Source], sample_dir: Path) -> tuple[pd.DataFrame, dict]:
    import pandas as pd

    frames, counts = [], {}
    for index, source in enumerate(sources):
        where = _describe(source, index)
        label, raw = read_source(source, index, sample_dir)
        frame = normalise(raw, source, label, where)
        counts[label] = counts.get(label, 0) + len(frame)
        frames.append(frame)
        logger.info("%s: %d rows from %s", where, len(frame), label)
    pairs = pd.concat(frames, ignore_index=True)
    return pairs, {"rows": len(pairs), "rows_by_source": counts}


def main(params: Params) -> None:
    pairs, metrics = ingest(params.ingest.sources, params.paths.sample_dir)
    write_parquet(pairs, params.paths.ingested)
    atomic_write_json(params.paths.metrics("ingest"), metrics)
    logger.info("ingest: wrote %d rows to %s", len(pairs), params.paths.ingested)
