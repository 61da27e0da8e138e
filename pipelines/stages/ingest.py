"""Stage `ingest`: read the sources named in params.yaml and normalise them to one schema.

Reads   params `ingest.sources` (the bundled sample in data/sample/, local JSONL/CSV/Parquet
        files, a dataset through `datasets.load_dataset`, or `review`: every Parquet file
        under `paths.feedback_dir`, the answers people reviewed), `paths`.
Writes  `paths.ingested` (Parquet, columns SCHEMA: `rejected` and the review provenance
        columns are null for rows nobody reviewed) and reports/ingest/metrics.json.
Run     `llmops ingest` or `dvc repro ingest`.

Text columns must hold text: a source whose prompt/response columns are missing or hold
numbers stops here with a message naming the column and the fix. A file that cannot be
read stops here in one line that names the file and, for JSONL and CSV, the line: a line
that is not a JSON object, bytes that are not UTF-8, a CSV row with too many fields, a
truncated or corrupt Parquet file. Content checks (blank values, PII, lengths) are the
`validate` stage's job.
"""

from pipelines.data.sources import main

__all__ = ["main"]
