"""Write the forgetting check's question set: configs/lm_eval/llmops_general.jsonl.

    python scripts/make_general_task.py

General-capability questions outside the training domains (WordNet definitions, the FOLDOC
computing glossary, reviewed production answers): one-digit sums, which of two numbers is
larger (two choices: chance 0.5), the next letter, day and month. Written by this script (the project's own, under the
project's licence; no third-party text), deterministic (seed 0), four choices otherwise (chance
0.25). The lm-eval-harness task that reads it: configs/lm_eval/llmops_general.yaml.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "configs" / "lm_eval" / "llmops_general.jsonl"
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def question(rng: random.Random, kind: str, text: str, right: str, pool: list[str]) -> dict:
    wrong = rng.sample([x for x in pool if x != right], 3)
    choices = wrong + [right]
    rng.shuffle(choices)
    return {"kind": kind, "question": text, "choices": choices, "answer": choices.index(right)}


def main() -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(24):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append(question(rng, "sum", f"What is {a} plus {b}?", str(a + b), [str(n) for n in range(2, 19)]))
    for _ in range(24):
        a, b = rng.sample(range(10, 100), 2)
        rows.append({"kind": "larger", "question": f"Which number is larger, {a} or {b}?",
                     "choices": [str(a), str(b)], "answer": 0 if a > b else 1})
    letters = string.ascii_uppercase
    for i in rng.sample(range(25), 20):
        rows.append(question(rng, "letter", f"Which letter comes after {letters[i]} in the alphabet?",
                             letters[i + 1], list(letters)))
    for i in range(7):
        rows.append(question(rng, "day", f"Which day of the week comes after {DAYS[i]}?", DAYS[(i + 1) % 7], DAYS))
    for i in range(12):
        rows.append(question(rng, "month", f"Which month comes after {MONTHS[i]}?", MONTHS[(i + 1) % 12], MONTHS))
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} questions to {OUT}")


if __name__ == "__main__":
    main()
