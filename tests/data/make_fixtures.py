"""Rebuild the fixture files in tests/data/fixtures/ from the committed sample.

    python tests/data/make_fixtures.py

good.jsonl holds 150 clean WordNet pairs; every other file is good.jsonl with one kind of
deliberate damage, named after it. The files are committed so a reviewer can read them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "wordnet.jsonl"
# The split settings conflicting_answers.jsonl is built for (params.yaml's `prepare` defaults);
# tests/data/test_suite.py validates it with the same ones.
SPLIT_SETTINGS = {"validation_fraction": 0.05, "test_fraction": 0.1, "seed": 42}


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main() -> None:
    HERE.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[::40][:150]]
    write("good.jsonl", rows)

    blank = [dict(r) for r in rows]
    for i in (3, 50, 99):
        blank[i]["response"] = "   " if i != 50 else ""
    write("blank_response.jsonl", blank)

    pii = [dict(r) for r in rows]
    pii[5]["response"] = "Write to jane.doe@example.com for the definition."
    pii[6]["prompt"] = 'What does the noun "hotline" mean? Call me at 555-123-4567.'
    pii[7]["response"] = "Paid with card 4111 1111 1111 1111 yesterday."
    pii[8]["response"] = "The key is sk-live-ABCDEF0123456789abcdef0123 do not share."
    write("pii.jsonl", pii)

    wrong_pos = [dict(r) for r in rows]
    wrong_pos[10]["pos"] = "pronoun"
    write("wrong_pos.jsonl", wrong_pos)

    too_long = [dict(r) for r in rows]
    too_long[20]["response"] = "very " * 600 + "long."
    write("too_long.jsonl", too_long)

    duplicates = [dict(r) for r in rows] + [dict(rows[0]), dict(rows[1])]
    for i, row in enumerate(duplicates[-2:]):
        row["id"] = f"dup-{i}"
    write("duplicates.jsonl", duplicates)

    write("wrong_schema.jsonl", [{"question": r["prompt"], "answer": r["response"]} for r in rows])
    non_text = [dict(r) for r in rows]
    non_text[4]["response"] = 42
    write("non_text.jsonl", non_text)
    (HERE / "empty.jsonl").write_text("")

    # One prompt of the test split and one of the train split get a second, different answer.
    sys.path.insert(0, str(REPO))
    from pipelines.data.splits import split_of

    def first_in(split: str) -> int:
        return next(i for i, r in enumerate(rows) if split_of(r["prompt"], **SPLIT_SETTINGS) == split)

    conflicting = [dict(r) for r in rows]
    for split, index in (("test", first_in("test")), ("train", first_in("train"))):
        conflicting.append({**rows[index], "id": f"conflict-{split}",
                            "response": f"Something else entirely, unlike the definition in row {index}."})
    write("conflicting_answers.jsonl", conflicting)


if __name__ == "__main__":
    main()
