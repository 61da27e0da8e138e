"""The registry's status, history and model-card rendering, who acts, and what counts as uncommitted.

Pure functions over tags and a throw-away git repository; the same behaviour against a real
`mlflow server` is in tests/integration/test_registry.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipelines.registry.model_registry import (
    CARD_MARKER,
    actor,
    alias_status,
    card_head,
    event_json,
    history_of,
    next_history_key,
    render_state,
)


def test_history_is_numbered_in_order_and_survives_a_bad_entry():
    tags = {"history.0002": json.dumps({"action": "promoted"}), "history.0001": json.dumps({"action": "registered"}),
            "history.0010": "not json", "promotion.status": "champion", "historyX": "ignored"}
    events = history_of(tags)
    assert [(e["n"], e["action"]) for e in events] == [(1, "registered"), (2, "promoted"), (10, "unreadable")]
    assert next_history_key(tags) == "history.0011"
    assert next_history_key({}) == "history.0001"


def test_aliases_impose_the_status():
    assert alias_status(["champion", "previous-champion"]) == "champion"
    assert alias_status(["previous-champion", "challenger"]) == "previous-champion"
    assert alias_status(["challenger"]) is None


def test_card_renders_status_latest_decision_and_the_whole_history():
    events = [
        {"at": "t1", "action": "registered", "by": "cli:ann@host", "reason": "", "from": None, "to": "candidate"},
        {"at": "t2", "action": "forced", "by": "airflow:bob", "airflow_run": "manual__1", "reason": "hotfix | urgent",
         "from": "candidate", "to": "champion", "checks": [["beats_base", False, "lower bound -0.05"]],
         "gate_passed": False, "mode": "auto", "forced": True},
        {"at": "t3", "action": "rolled-back", "by": "cli:ann@host", "reason": "canary failed", "from": "champion",
         "to": "rolled-back"},
    ]
    tags = {"promotion.status": "rolled-back", **{f"history.{i:04d}": json.dumps(e) for i, e in enumerate(events, 1)}}
    card = render_state(["challenger"], tags)
    assert card.startswith(CARD_MARKER)
    assert "## Status: **rolled-back**" in card and "Aliases: challenger" in card
    assert "**PROMOTED** (gate failed, mode auto, forced by airflow:bob)" in card
    assert "- FAIL `beats_base`: lower bound -0.05" in card and "- reason: hotfix | urgent" in card
    rows = [line for line in card.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    assert "airflow:bob (run manual__1)" in rows[1] and "hotfix \\| urgent" in rows[1]  # a | cannot split the row
    assert "| rolled-back |" in rows[2] and "champion -> rolled-back" in rows[2] and "canary failed" in rows[2]


def test_rerendering_replaces_the_generated_part_instead_of_appending():
    head = "# model card\n\nevidence"
    once = head + "\n\n" + render_state([], {"promotion.status": "candidate"})
    twice = card_head(once) + "\n\n" + render_state(["champion"], {"promotion.status": "champion"})
    assert card_head(twice) == head
    assert twice.count(CARD_MARKER) == 1 and twice.count("## Status") == 1 and "**champion**" in twice


def test_a_long_event_is_shortened_to_fit_one_tag():
    event = {"action": "rejected", "reason": "x" * 20000, "checks": [["a", False, "y" * 9000]]}
    text = event_json(event)
    assert len(text) <= 4900
    assert json.loads(text)["action"] == "rejected"


def test_actor_is_the_triggering_airflow_user_else_the_command_line_user():
    assert actor({"LLMOPS_TRIGGERED_BY": "alice", "LLMOPS_AIRFLOW_RUN_ID": "manual__x"})["by"] == "airflow:alice"
    scheduled = actor({"LLMOPS_TRIGGERED_BY": "", "LLMOPS_AIRFLOW_RUN_ID": "scheduled__y",
                       "LLMOPS_AIRFLOW_RUN_TYPE": "scheduled"})
    assert scheduled["by"] == "airflow:scheduled" and scheduled["airflow_run"] == "scheduled__y"
    cli = actor({"MLFLOW_TRACKING_USERNAME": "llmops-ci"})
    assert cli["by"].startswith("cli:") and "@" in cli["by"] and cli["registry_user"] == "llmops-ci"
    assert "airflow_run" not in cli


# --- what counts as uncommitted ----------------------------------------------------------

def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A committed project: source, params, dvc.lock naming two outputs (a metrics file and a folder)."""
    root = tmp_path / "project"
    (root / "pipelines").mkdir(parents=True)
    (root / "reports" / "train").mkdir(parents=True)
    (root / "pipelines" / "train.py").write_text("print('train')\n")
    (root / "params.yaml").write_text("train: {max_steps: 3}\n")
    (root / "reports" / "train" / "metrics.json").write_text("{}\n")
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train:\n    cmd: llmops train\n    outs:\n"
        "    - path: reports/train/metrics.json\n      md5: a\n    - path: models/adapter\n      md5: b.dir\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    return root


def test_a_pipeline_run_alone_leaves_the_version_clean(checkout: Path):
    from pipelines.registry.tracking import git_state

    # what `dvc repro` does with core.autostage: rewrite dvc.lock and the metrics, and stage them
    (checkout / "dvc.lock").write_text((checkout / "dvc.lock").read_text().replace("md5: a", "md5: c"))
    (checkout / "reports" / "train" / "metrics.json").write_text('{"loss": 1}\n')
    _git(checkout, "add", "dvc.lock", "reports/train/metrics.json")
    state = git_state(checkout)
    assert len(state["mlflow.source.git.commit"]) == 40
    assert state["git_dirty"] == "false" and state["git_dirty_files"] == ""


def test_a_dirty_version_says_which_files(checkout: Path):
    from pipelines.registry.tracking import git_state

    (checkout / "dvc.lock").write_text((checkout / "dvc.lock").read_text() + "# changed\n")
    (checkout / "pipelines" / "train.py").write_text("print('edited')\n")
    (checkout / "params.yaml").write_text("train: {max_steps: 4}\n")
    _git(checkout, "add", "params.yaml")  # staged or not, an edit is an edit
    (checkout / "untracked.txt").write_text("not part of the commit either way\n")
    state = git_state(checkout)
    assert state["git_dirty"] == "true"
    assert state["git_dirty_files"] == "params.yaml, pipelines/train.py"


def test_a_project_in_a_subfolder_of_the_repository(checkout: Path, tmp_path: Path):
    from pipelines.registry.tracking import git_state

    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "README").write_text("x\n")
    checkout.rename(outer / "project")
    project = outer / "project"
    subprocess.run(["rm", "-rf", str(project / ".git")], check=True)
    _git(outer, "init", "-q")
    _git(outer, "add", "-A")
    _git(outer, "commit", "-q", "-m", "init")
    (project / "reports" / "train" / "metrics.json").write_text('{"loss": 2}\n')
    assert git_state(project)["git_dirty"] == "false"
    (project / "pipelines" / "train.py").write_text("print('edited')\n")
    assert git_state(project)["git_dirty_files"] == "pipelines/train.py"


def test_outside_git_there_is_no_state(tmp_path: Path):
    from pipelines.registry.tracking import git_state

    assert git_state(tmp_path) == {}
