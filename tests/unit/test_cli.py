"""The `llmops` command: help lists the stages; user errors are one line, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def llmops(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_stage_with_a_description():
    from pipelines.cli import COMMANDS

    result = llmops("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert "read the sources named in params.yaml" in result.stdout


def test_bad_params_is_one_line_without_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("seed: 42", "sed: 42"))
    result = llmops("prepare", "--params", str(tmp_path / "params.yaml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("llmops prepare: error: ") and "unknown key 'prepare.sed'" in lines[0]


def test_missing_input_names_the_stage_to_run(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    result = llmops("validate", "--params", str(params), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "data/ingested/pairs.parquet not found; run `llmops ingest`" in result.stderr


def test_validate_list_shows_blocking_and_warning_checks():
    result = llmops("validate", "--list")
    assert result.returncode == 0
    assert "unique_pairs" in result.stdout and "warn" in result.stdout
    assert "response_no_email" in result.stdout
