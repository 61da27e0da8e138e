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
    from pipelines.model_source import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))
