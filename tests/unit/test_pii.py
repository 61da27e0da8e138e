"""PII patterns: what they catch and what they leave alone (real dictionary text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.pii import find_pii, redact

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("mail jane.doe@example.co.uk today", "email"),
        ("call 555-123-4567", "phone"),
        ("call (555) 123-4567", "phone"),
        ("ring +44 20 7946 0958", "phone"),
        ("card 4111 1111 1111 1111", "credit_card"),
        ("card 4111-1111-1111-1111", "credit_card"),
        ("key sk-live-ABCDEF0123456789abcdef", "api_key"),
        ("AKIAIOSFODNN7EXAMPLE leaked", "api_key"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "api_key"),
        ("secret a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8", "api_key"),
    ],
)
def test_catches(text, kind):
    assert kind in find_pii(text)
    assert f"[{kind.upper()}]" in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "A building in which the business of banking transacted.",
        "ISO 8859-1 is a character set from 1987.",
        "The Intel 80386 ran at 16 MHz.",
        "RFC 2822 describes the Internet Message Format.",
        "Deoxyribonucleic acid, a nucleic acid.",
    ],
)
def test_leaves_ordinary_text_alone(text):
    assert find_pii(text) == []


def test_committed_sample_is_clean():
    for name in ("wordnet", "foldoc"):
        for line in (REPO / "data" / "sample" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            assert find_pii(row["prompt"] + " " + row["response"]) == [], row["id"]
