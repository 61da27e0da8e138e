"""Fixtures for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support import BIN, REPO, MlflowServer, Project, free_port, make_project, require, stop_process_group

if TYPE_CHECKING:
    from pipelines.review.labelstudio import LabelStudio


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` process per test module (SQLite backend, temporary artifact root)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


# --- Label Studio, the review tool (pipelines/review/labelstudio.py) ----------------------------

REVIEW_PYTHON = REPO / ".venv-review" / "bin" / "python"


@dataclass
class LabelStudioSession:
    """A running Label Studio that `llmops review serve` started, and its admin."""

    url: str
    token: str
    username: str
    password: str
    data_dir: Path
    client: LabelStudio  # the admin's REST client
    output: list[str]  # what `llmops review serve` printed so far
    process: subprocess.Popen


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphan server


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory):
    """One real Label Studio per test session, started as people start it, `llmops review serve`, on a
    free loopback port with its data in a temporary folder; stopped with Ctrl-C (SIGINT) at the end.
    A first start migrates a new SQLite database: ~30-60 s on 2 cores."""
    from pipelines.review.labelstudio import LabelStudio, port_in_use

    require(REVIEW_PYTHON.exists(), f"Label Studio is not installed at {REVIEW_PYTHON} (`make install` creates "
                                    ".venv-review)")
    root = tmp_path_factory.mktemp("label-studio")
    data_dir, port = root / "data", free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LLMOPS_REVIEW_URL", "LLMOPS_REVIEW_TOKEN")}
    process = subprocess.Popen(
        [str(BIN / "llmops"), "review", "serve", "--params", str(REPO / "params.yaml"),
         "--set", f"review.port={port}", "--set", f"review.data_dir={data_dir}",
         "--set", f"review.python={REVIEW_PYTHON}", "--set", "review.url=null"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=_die_with_parent)
    output: list[str] = []

    def read() -> None:
        for line in process.stdout:
            output.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any(line.startswith("Label Studio is up") for line in output):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process_group(process, 20)
            reader.join(5)
            pytest.fail("`llmops review serve` did not start Label Studio:\n" + "".join(output[-40:]))
        time.sleep(0.2)
    login = json.loads((data_dir / "login.json").read_text())
    url = f"http://127.0.0.1:{port}"
    client = LabelStudio(url, login["token"])
    yield LabelStudioSession(url=url, token=login["token"], username=login["username"], password=login["password"],
                             data_dir=data_dir, client=client, output=output, process=process)
    client.close()
    process.send_signal(signal.SIGINT)  # Ctrl-C: serve stops Label Studio and exits
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop_process_group(process, 10)
        pytest.fail("`llmops review serve` did not stop on Ctrl-C within 60 s")
    reader.join(5)
    assert not port_in_use("127.0.0.1", port), "Label Studio outlived `llmops review serve`"
