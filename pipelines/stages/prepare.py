"""Stage `prepare`: deduplicate, split and format validated pairs for training.

Reads   `paths.ingested` and `paths.validate_dir`/result.json (it refuses data whose
        validation failed or is stale, including a validation run with other split
        fractions or seed: validate checks conflicting answers per split), params `prepare`
        and `base_model` (tokenizer and chat template).
Writes  `paths.prepared_dir`/{train,validation,test}.parquet with `prompt_text` and
        `completion_text` (the model's input and what it learns to produce), with the chat
        template also `prompt_messages` and `completion_messages` (the same as messages,
        which the train stage hands to TRL), and token counts; reports/prepare/metrics.json
        (rows, duplicates removed, token length percentiles). The folder is built aside and swapped in whole.
Run     `llmops prepare` or `dvc repro prepare`.

Splits are assigned per prompt by a seeded hash of the normalised prompt, so one prompt
never lands in two splits, and adding data later does not move existing pairs between
splits (the test set stays a test set across retraining).
"""

from __future__ import annotations

import logging

from pipelines.config.params import Params
from pipelines.data.preparation import check_validation, prepare
from pipelines.io import atomic_path, atomic_write_json, read_parquet
from pipelines.model.sources import load_tokenizer

logger = logging.getLogger(__name__)


def main(params: Params) -> None:
    paths = params.paths
    check_validation(paths.validation_file(), paths.ingested, params.prepare)
    frame = read_parquet(paths.ingested, produced_by="ingest")
    tokenizer = load_tokenizer(params.base_model.source, params.base_model.revision)
    splits, metrics = prepare(frame, params.prepare, tokenizer)
    with atomic_path(paths.prepared_dir) as tmp_dir:
        tmp_dir.mkdir()
        for name, part in splits.items():
            part.to_parquet(tmp_dir / f"{name}.parquet", index=False)
    atomic_write_json(paths.metrics("prepare"), metrics)
    logger.info("prepare: %s", ", ".join(f"{name}={len(part)}" for name, part in splits.items()))
