"""Patterns for personal data and secrets, in one place.

The same patterns feed the Great Expectations PII screen (`validate`), the sample
builder (rows with PII never enter the committed sample) and, later, redaction of
the inference log. They are written here because no maintained library covers this
small, offline, regex-level screen without pulling in a model download (Presidio
needs a spaCy model from a hub).
"""

from __future__ import annotations

import re

# Each pattern is searched anywhere in a value (re.search semantics).
PII_PATTERNS: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    # North-American style 555-123-4567 / (555) 123-4567, and international +44 20 7946 0958.
    "phone": (
        r"(?:\+\d{1,3}[\s.-]?)?\(\d{3}\)[\s.-]?\d{3}[\s.-]\d{4}\b"
        r"|\b\d{3}[\s.-]\d{3}[\s.-]\d{4}\b"
        r"|\+\d{1,3}(?:[\s.-]\d{2,5}){2,4}\b"
    ),
    # 13 to 19 digits, optionally grouped by single spaces or dashes.
    "credit_card": r"\b(?:\d[ -]?){12,18}\d\b",
    # Well-known key formats, then any long token that mixes letters and digits.
    "api_key": (
        r"\b(?:sk|pk|rk)[-_][A-Za-z0-9_-]{16,}"
        r"|\bAKIA[0-9A-Z]{16}\b"
        r"|\bgh[pousr]_[A-Za-z0-9]{30,}"
        r"|\bxox[abpr]-[A-Za-z0-9-]{10,}"
        r"|\bAIza[0-9A-Za-z_-]{35}"
        r"|\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b"
    ),
}

_COMPILED = {name: re.compile(pattern) for name, pattern in PII_PATTERNS.items()}


def find_pii(text: str) -> list[str]:
    """Names of the PII kinds found in `text` (empty when clean)."""
    return [name for name, rx in _COMPILED.items() if rx.search(text)]


def redact(text: str) -> str:
    """Replace every PII match with a `[KIND]` placeholder."""
    for name, rx in _COMPILED.items():
        text = rx.sub(f"[{name.upper()}]", text)
    return text
