"""A scripted reviewer for `make demo`: a STAND-IN FOR PEOPLE, answering review tasks through Label
Studio's API the way a reviewer answers them in its labeling view.

    python scripts/scripted_reviewer.py candidate [--version N]   # the blind A/B tasks of a candidate
    python scripts/scripted_reviewer.py corrections               # the production answers monitoring flagged

What it knows is the bundled glossaries (data/sample: WordNet and FOLDOC), not the models: for an
A/B task it picks the answer closer (ROUGE-L) to the glossary's definition of the prompt, Tie when
they are about as close or the prompt is not in the glossary; for a correction task it approves an
answer close to the definition, writes the definition as the correction when the answer is far
from it, and rejects a prompt the glossary does not know. It answers only the tasks it has not
answered yet, so running it twice adds nothing. Real reviewers do this in the browser
(`llmops review serve`, docs/review.md); nothing in the pipeline knows the difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.config.params import load_params  # noqa: E402
from pipelines.data.splits import normalise_text  # noqa: E402
from pipelines.evaluation.metrics import rouge_l  # noqa: E402
from pipelines.review.labelstudio import choice, connect, text  # noqa: E402

TIE_MARGIN = 0.05  # ROUGE-L closer by less than this: Tie
APPROVE_AT = 0.5  # ROUGE-L of the production answer vs the definition at or above this: approve it


def glossary(sample_dir: Path) -> dict[str, str]:
    """normalised prompt -> definition, from every bundled sample."""
    known: dict[str, str] = {}
    for path in sorted(sample_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                known.setdefault(normalise_text(row["prompt"]), row["response"])
    return known


def closeness(answer: str, definition: str) -> float:
    return float(rouge_l([answer], [definition])[0])


def unanswered(client, project: int) -> list[dict]:
    me = client.whoami()["id"]
    return [task for task in client.tasks(project)
            if not any((a.get("completed_by") if not isinstance(a.get("completed_by"), dict)
                        else a["completed_by"].get("id")) == me for a in task.get("annotations") or [])]


def review_candidate(client, project: int, known: dict[str, str]) -> dict[str, int]:
    counts = {"A": 0, "B": 0, "Tie": 0}
    for task in unanswered(client, project):
        data = task["data"]
        definition = known.get(normalise_text(data["prompt"]))
        pick = "Tie"
        if definition is not None:
            a, b = closeness(data["answer_a"], definition), closeness(data["answer_b"], definition)
            pick = "Tie" if abs(a - b) < TIE_MARGIN else ("A" if a > b else "B")
        client.annotate(task["id"], [choice("preference", pick)])
        counts[pick] += 1
    return counts


def review_corrections(client, project: int, known: dict[str, str]) -> dict[str, int]:
    counts = {"Approve answer": 0, "Corrected": 0, "Reject prompt": 0}
    for task in unanswered(client, project):
        data = task["data"]
        definition = known.get(normalise_text(data["prompt"]))
        if definition is None:
            result = [choice("verdict", "Reject prompt", "answer")]
        elif closeness(data.get("answer") or "", definition) >= APPROVE_AT:
            result = [choice("verdict", "Approve answer", "answer")]
        else:
            result = [choice("verdict", "Corrected", "answer"), text("correction", definition, "answer")]
        client.annotate(task["id"], result)
        counts[result[0]["value"]["choices"][0]] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["candidate", "corrections"])
    parser.add_argument("--version", help="candidate: the version under review (default: challenger)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    client = connect(params)
    known = glossary(params.paths.sample_dir)
    if args.what == "candidate":
        from pipelines.registry.model_registry import Registry
        from pipelines.review.candidate import candidate_version

        registry = Registry(params)
        version = candidate_version(params, registry, args.version)
        project = registry.version(version).tags.get("review.project_id")
        if project is None:
            print(f"scripted reviewer: v{version} was not sent for review", file=sys.stderr)
            return 1
        counts = review_candidate(client, int(project), known)
    else:
        found = client.project(params.review.corrections_project)
        if found is None:
            print("scripted reviewer: no correction tasks yet (`llmops review corrections`)", file=sys.stderr)
            return 0
        counts = review_corrections(client, int(found["id"]), known)
    print(f"scripted reviewer (a stand-in for people): {args.what}: " +
          ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
