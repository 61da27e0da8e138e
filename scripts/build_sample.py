"""Rebuild the committed sample corpus in data/sample/ from Debian packages.

    apt-get install wordnet-base dict-foldoc
    python scripts/build_sample.py            # rewrites data/sample/*.jsonl

The output is deterministic: the same package versions give byte-identical files
(rows are chosen by a SHA-256 of their key, not by a random generator). A fresh
clone does not need this script: the sample it produced is committed.

wordnet.jsonl  instruction pairs "What does the noun "bank" mean?" -> the gloss of the
               lemma's most frequent sense (WordNet lists senses by frequency).
foldoc.jsonl   pairs "What does the computing term "X" mean?" -> the first sentences of
               the FOLDOC entry; a different domain, used as drifted production
               traffic and as new-domain training data.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

from pipelines.data.pii import find_pii
from pipelines.io import atomic_write_text

WORDNET_DIR = Path("/usr/share/wordnet")
FOLDOC_DICT = Path("/usr/share/dictd/foldoc.dict.dz")
FOLDOC_INDEX = Path("/usr/share/dictd/foldoc.index")

POS_NAMES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
# How many pairs to keep per part of speech (roughly WordNet's own proportions).
WORDNET_COUNTS = {"noun": 3600, "verb": 1200, "adjective": 1200, "adverb": 400}
FOLDOC_COUNT = 3000

# WordNet's lexicographer file names, indexed by the lex_filenum field of data.* lines.
# The list is fixed by the WordNet 3.0 documentation (lexnames(5WN)); Debian's
# wordnet-base does not ship the `lexnames` file, so it is written out here.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon",
    "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body",
    "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
]

LEMMA_OK = re.compile(r"^[a-z][a-z_'-]{1,29}$")


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _sentence(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def wordnet_pairs(wordnet_dir: Path = WORDNET_DIR) -> list[dict]:
    rows: list[dict] = []
    for short, pos in POS_NAMES.items():
        synsets: dict[str, tuple[int, str, str]] = {}
        for line in (wordnet_dir / f"data.{short}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header lines start with two spaces
            head, gloss = line.split("|", 1)
            fields = head.split()
            definition, _, examples = gloss.strip().partition("; \"")
            first_example = re.findall(r'([^"]+)"', examples)[:1]
            synsets[fields[0]] = (int(fields[1]), definition.strip(), "".join(first_example))
        candidates = []
        for line in (wordnet_dir / f"index.{short}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma, synset_cnt = fields[0], int(fields[2])
            if not LEMMA_OK.match(lemma):
                continue
            first_offset = fields[-synset_cnt]  # offsets are ordered by sense frequency
            lexnum, definition, example = synsets[first_offset]
            if len(definition) < 8:
                continue
            term = lemma.replace("_", " ")
            prompt = f'What does the {pos} "{term}" mean?'
            response = _sentence(definition)
            if find_pii(prompt) or find_pii(response):
                continue
            candidates.append({
                "id": f"wn-{short}-{first_offset}-{lemma}",
                "prompt": prompt,
                "response": response,
                "source": "wordnet",
                "domain": "general",
                "pos": pos,
                "term": term,
                "category": LEXNAMES[lexnum],
                "senses": synset_cnt,
                "example": example,
            })
        candidates.sort(key=lambda r: _rank(r["id"]))
        rows.extend(candidates[: WORDNET_COUNTS[pos]])
    rows.sort(key=lambda r: r["id"])
    return rows


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(value: str) -> int:
    number = 0
    for char in value:
        number = number * 64 + _B64.index(char)
    return number


def _clean_foldoc(body: str) -> tuple[str, str]:
    """(category, first sentences) of a FOLDOC entry body."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", body) if p.strip()]
    text = next((p for p in paragraphs if p.startswith(("<", "1.")) or len(p) > 40), "")
    text = re.sub(r"^1\.\s*", "", text)
    category = ""
    match = re.match(r"<([^>]+)>\s*", text)
    if match:
        category, text = match.group(1).split(",")[0].strip(), text[match.end():]
    text = re.sub(r"\{\(?https?://[^}]*\}", "", text)
    text = re.sub(r"\(https?://[^)]*\)", "", text)
    text = re.sub(r"\{([^}]*)\}", r"\1", text)
    text = re.sub(r"\s+", " ", text).strip()
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
    short = " ".join(sentences[:2])
    if len(short) > 400:
        short = sentences[0]
    return category, short


def foldoc_pairs(dict_path: Path = FOLDOC_DICT, index_path: Path = FOLDOC_INDEX) -> list[dict]:
    blob = gzip.open(dict_path, "rb").read()
    seen_offsets: set[int] = set()
    candidates = []
    for line in index_path.read_text(encoding="utf-8").splitlines():
        headword, offset_b64, length_b64 = line.split("\t")
        offset, length = _b64(offset_b64), _b64(length_b64)
        if headword.startswith("00-") or offset in seen_offsets:
            continue  # dictd metadata entries, and aliases of an entry already taken
        seen_offsets.add(offset)
        entry = blob[offset: offset + length].decode("utf-8", errors="replace")
        lines = entry.split("\n")
        term = lines[0].strip()
        body = "\n".join(lines[1:])
        category, response = _clean_foldoc(body)
        if not term or len(term) > 40 or not re.search(r"[A-Za-z]", term):
            continue
        if len(response) < 30 or response.lower().startswith(("see ", "compare ")):
            continue
        prompt = f'What does the computing term "{term}" mean?'
        if find_pii(prompt) or find_pii(response):
            continue
        candidates.append({
            "id": f"foldoc-{offset}",
            "prompt": prompt,
            "response": _sentence(response),
            "source": "foldoc",
            "domain": "computing",
            "pos": "term",
            "term": term,
            "category": category or "general",
            "senses": 1,
            "example": "",
        })
    candidates.sort(key=lambda r: _rank(r["id"]))
    rows = candidates[:FOLDOC_COUNT]
    rows.sort(key=lambda r: r["id"])
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/sample"))
    args = parser.parse_args(argv)
    for needed in (WORDNET_DIR / "data.noun", FOLDOC_DICT):
        if not needed.exists():
            print(f"error: {needed} not found; install it with "
                  "`apt-get install wordnet-base dict-foldoc`", file=sys.stderr)
            return 1
    wordnet = wordnet_pairs()
    foldoc = foldoc_pairs()
    write_jsonl(wordnet, args.out / "wordnet.jsonl")
    write_jsonl(foldoc, args.out / "foldoc.jsonl")
    print(f"wrote {len(wordnet)} WordNet pairs and {len(foldoc)} FOLDOC pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
