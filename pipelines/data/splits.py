"""How rows fall into splits, shared by `validate` and `prepare`: the split names, the
normalised prompt a row is keyed by, the seeded split assignment and the record of those settings."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from pipelines.config.params import PrepareParams

SPLITS = ("train", "validation", "test")
_NON_WORD = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: the key for exact duplicates."""
    return _SPACE.sub(" ", _NON_WORD.sub(" ", text.lower())).strip()


def split_of(prompt: str, validation_fraction: float, test_fraction: float, seed: int) -> str:
    """The split of a prompt: a seeded hash mapped to [0, 1), cut at the fractions."""
    digest = hashlib.sha256(f"{seed}\x1f{normalise_text(prompt)}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + validation_fraction:
        return "validation"
    return "train"


def file_md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - a content fingerprint, as DVC uses, not security
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_settings(prepare: PrepareParams) -> dict[str, Any]:
    """The prepare params the split column was computed with (prepare refuses others)."""
    return {"validation_fraction": prepare.validation_fraction, "test_fraction": prepare.test_fraction,
            "seed": prepare.seed}
