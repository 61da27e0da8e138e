"""Fixtures shared by every test tier (helpers are in tests/support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    from pipelines.model.sources import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


# --- the tiny model for training tests (tests/tiny_model.py) ---------------------------

@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A 2-layer Llama (hidden 64) with the tiny tokenizer, materialised by the base_model stage."""
    from pipelines.config.params import BaseModelParams
    from pipelines.model.materialise import materialise
    from tests.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-model")
    raw = build_tiny_model(root / "raw", tiny_tokenizer_dir)
    materialise(BaseModelParams(source=str(raw), output_dir=root / "base"), root / "base")
    return root / "base"


@pytest.fixture(scope="session")
def tiny_prepared_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Prepared train/validation/test splits of the WordNet sample, rendered for the tiny tokenizer."""
    from tests.tiny_model import write_prepared_sample

    return write_prepared_sample(tmp_path_factory.mktemp("tiny-prepared"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def mlflow_sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store per test session (artifacts go to mlruns/ beside it)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tiny_train_params(tmp_path: Path, tiny_base_model_dir: Path, tiny_prepared_dir: Path, mlflow_sqlite_uri: str):
    """Build Params for a fast train run on the tiny model, outputs under tmp_path."""
    from pipelines.config.params import parse_params

    def make(**train: object):
        section = {
            "adapter_dir": str(tmp_path / "adapter"), "merged_dir": str(tmp_path / "merged"),
            "checkpoint_dir": str(tmp_path / "checkpoints"), "max_steps": 12, "eval_steps": 6, "save_steps": 6,
            "learning_rate": 2e-3, "max_eval_samples": 16, "per_device_train_batch_size": 4,
        }
        for key, value in train.items():
            if isinstance(value, dict) and isinstance(section.get(key), dict):
                section[key] = {**section[key], **value}
            else:
                section[key] = value
        return parse_params({
            "paths": {"prepared_dir": str(tiny_prepared_dir), "reports_dir": str(tmp_path / "reports")},
            "base_model": {"source": "tiny", "output_dir": str(tiny_base_model_dir)},
            "ingest": {"sources": [{"kind": "bundled", "name": "wordnet"}]},
            "train": section,
            "tracking": {"uri": mlflow_sqlite_uri, "system_metrics_interval": 0.5},
        })

    return make
