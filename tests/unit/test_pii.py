"""PII patterns: what they catch and what they leave alone (real dictionary text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.data.pii import find_pii, redact

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
        # issue 15: AWS secret keys, SSNs, IP addresses, IBANs and European phone formats were missed
        ("aws key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY here", "api_key"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLE", "api_key"),
        ("my SSN is 123-45-6789", "ssn"),
        ("ssn 078 05 1120", "ssn"),
        ("reach me on 192.168.1.20 or 81.2.69.160", "ip_address"),
        ("v6 2001:db8:85a3::8a2e:370:7334 today", "ip_address"),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "ip_address"),
        ("link-local fe80::1ff:fe23:4567:890a", "ip_address"),
        ("IBAN DE89 3704 0044 0532 0130 00", "iban"),
        ("pay to GB82WEST12345698765432 please", "iban"),
        ("FR14 2004 1010 0505 0001 3M02 606", "iban"),
        ("NL91 ABNA 0417 1643 00", "iban"),
        ("appelez le +33 1 23 45 67 89", "phone"),
        ("ruf an: +49 30 12345678", "phone"),
        ("0049 30 1234567", "phone"),
        ("+44 (0)20 7946 0958", "phone"),
        ("Tel. 030 1234567", "phone"),
        ("Tel. 030/12345678", "phone"),
        ("call 020 7946 0958", "phone"),
        ("bel 06-12345678", "phone"),
        ("chiama 02 1234 5678", "phone"),
        ("mobil 0171 1234567", "phone"),
        ("appelez le 01 23 45 67 89", "phone"),
        ("portable 06.12.34.56.78", "phone"),
        ("llama al 912 345 678", "phone"),
        ("llama al 612 34 56 78", "phone"),
    ],
)
def test_catches(text, kind):
    assert kind in find_pii(text)
    assert f"[{kind.upper()}]" in redact(text)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("IBAN DE89 3704 0044 0532 0130 00 thanks", "0532"),
        ("FR14 2004 1010 0505 0001 3M02 606", "3M02"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLE", "bPxRf"),
        ("ssn 123-45-6789, ip 10.1.2.3, tel +33 1 23 45 67 89", "45"),
    ],
)
def test_redaction_leaves_no_piece_behind(text, secret):
    # the kinds are replaced in an order where no kind takes a piece of another's match
    assert secret not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "A building in which the business of banking transacted.",
        "ISO 8859-1 is a character set from 1987.",
        "The Intel 80386 ran at 16 MHz.",
        "RFC 2822 describes the Internet Message Format.",
        "Deoxyribonucleic acid, a nucleic acid.",
        "The loopback address 127.0.0.1 (or ::1 in IPv6) names the host itself.",
        "On 01.02.2020 at 12:30, version 2.6.32 of Linux.",
        "ISBN 0-201-63361-2, published in 1994-01-02.",
        "In C++, std::cout and Foo::Bar; add::bead.",
        "About 700 000 000 people; the 80386 and the 68000.",
    ],
)
def test_leaves_ordinary_text_alone(text):
    assert find_pii(text) == []


def test_committed_sample_is_clean():
    for name in ("wordnet", "foldoc"):
        for line in (REPO / "data" / "sample" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            assert find_pii(row["prompt"] + " " + row["response"]) == [], row["id"]
