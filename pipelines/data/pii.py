"""Patterns for personal data and secrets, in one place.

The same patterns feed the Great Expectations PII screen (`validate`), the sample
builder (rows with PII never enter the committed sample) and redaction of the inference
log (prompts, answers, errors, feedback comments and the strings in a request's decoding
parameters, such as its `stop` sequences). They are written here because no maintained
library covers this small, offline, regex-level screen without pulling in a model download
(Presidio needs a spaCy model from a hub).

Kinds: e-mail addresses; API keys and secrets (well-known key formats, AWS secret access
keys, long mixed tokens); IBANs; IPv4 and IPv6 addresses; US social security numbers;
phone numbers (North-American, international with `+` or `00`, and the national formats of
European countries with a trunk 0, the French pairs and the Spanish 9 digits); card numbers.
A regex screen is a net with holes (a phone number written in words, a name): it lowers the
exposure, it does not certify text free of personal data.
"""

from __future__ import annotations

import re

# Each pattern is searched anywhere in a value (re.search semantics). Order matters for
# redaction: each kind is replaced in turn, so a kind whose matches contain another kind's
# (an IBAN holds digit groups a phone pattern would take) comes first.
PII_PATTERNS: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    # Well-known key formats, an AWS secret access key (40 base64 characters mixing digits, lower
    # and upper case, or any value after an aws_secret_access_key label), then any long token that
    # mixes letters and digits.
    "api_key": (
        r"\b(?:sk|pk|rk)[-_][A-Za-z0-9_-]{16,}"
        r"|\bAKIA[0-9A-Z]{16}\b"
        r"|\bgh[pousr]_[A-Za-z0-9]{30,}"
        r"|\bxox[abpr]-[A-Za-z0-9-]{10,}"
        r"|\bAIza[0-9A-Za-z_-]{35}"
        r"|(?i:\baws_?secret(?:_access)?_?key\b)[\"']?\s*[:=]\s*[\"']?[^\s\"']+"
        r"|(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=]))(?=[A-Za-z0-9/+]{0,39}\d)"
        r"(?=[A-Za-z0-9/+]{0,39}[a-z])(?=[A-Za-z0-9/+]{0,39}[A-Z])[A-Za-z0-9/+]{40}"
        r"|\b(?=[A-Za-z0-9_-]{32})(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b"
    ),
    # Country code, two check digits, then the account in groups of four (spaced or not), at least
    # one of them all digits: DE89 3704 0044 0532 0130 00, GB82WEST12345698765432.
    "iban": r"\b[A-Z]{2}\d{2}[ ]?[A-Z0-9]{4}[ ]?\d{4}(?:[ ]?[A-Z0-9]{4}){1,6}(?:[ ]?[A-Z0-9]{1,3})?\b",
    # IPv4 (each part 0-255, not part of a longer dotted number) and IPv6 (full, or with "::",
    # holding at least one digit so that words such as "add::bead" are left alone). The loopback
    # and unspecified addresses (127.x.x.x, 0.0.0.0, ::1, ::) name no one and are left alone.
    "ip_address": (
        r"(?<![\d.])(?=\d{1,3}\.)(?!127\.|0\.0\.0\.0(?!\.?\d))(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d)"
        r"|(?<![:\w])(?=[0-9A-Fa-f]{0,4}:)(?:"
        r"(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
        r"|(?=[0-9A-Fa-f:]*\d)(?:[0-9A-Fa-f]{1,4}:){1,6}(?::[0-9A-Fa-f]{1,4}){1,6}"
        r"|(?=[0-9A-Fa-f:]*\d)(?:[0-9A-Fa-f]{1,4}:){1,7}:"
        r"|::(?!0*1?(?![:\w]))[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6}"
        r")(?![:\w])"
    ),
    # US social security number, 123-45-6789 or 123 45 6789, without the never-issued 000, 666
    # and 9xx areas, 00 groups and 0000 serials.
    "ssn": r"\b(?!000|666|9\d\d)\d{3}(?:-(?!00)\d{2}-|\s(?!00)\d{2}\s)(?!0000)\d{4}\b",
    "phone": (
        # North-American style 555-123-4567 / (555) 123-4567
        r"(?:\+\d{1,3}[\s.-]?)?\(\d{3}\)[\s.-]?\d{3}[\s.-]\d{4}\b"
        r"|\b\d{3}[\s.-]\d{3}[\s.-]\d{4}\b"
        # international: +44 20 7946 0958, +33 1 23 45 67 89, +44 (0)20 7946 0958, 0049 30 1234567
        # (8 to 15 digits after the prefix)
        r"|(?:\+|\b00)(?=(?:[\s.()/-]{0,3}\d){8,15}\b)[1-9]\d{0,2}[\s.-]?(?:\(0\)[\s.-]?)?\d{1,5}"
        r"(?:[\s./-]?\d{1,5}){1,5}\b"
        # national with a trunk 0 (9 to 12 digits): 030 1234567, 030/12345678, 020 7946 0958,
        # 06-12345678, 02 1234 5678, 0171 1234567
        r"|\b(?=0(?:[\s./-]?\d){8,11}\b)0[1-9]\d{0,4}[\s/-]\d{2,8}(?:[\s-]\d{2,5}){0,3}\b"
        # French pairs 01 23 45 67 89 / 06.12.34.56.78, Spanish 912 345 678 / 612 34 56 78
        r"|\b0[1-9](?:[\s.-]\d{2}){4}\b"
        r"|\b[6-9]\d{2}(?:\s(?!000)\d{3}\s(?!000)\d{3}|\s\d{2}\s\d{2}\s\d{2})\b"
    ),
    # 13 to 19 digits, optionally grouped by single spaces or dashes.
    "credit_card": r"\b(?:\d[ -]?){12,18}\d\b",
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
