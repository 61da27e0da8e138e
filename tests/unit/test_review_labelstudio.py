"""The review tool's failure paths and plumbing that need no Label Studio (the real server:
tests/integration/test_label_studio.py)."""

from __future__ import annotations

import json
import socket
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipelines.config.params import load_params
from pipelines.review.labelstudio import (
    CANDIDATE_CONFIG,
    CORRECTION_CONFIG,
    LabelStudio,
    LabelStudioServer,
    Login,
    ReviewUnavailable,
    connect,
)
from tests.support import REPO, free_port


def params(**review: object):
    return load_params(REPO / "params.yaml", [f"review.{key}={value}" for key, value in review.items()])


def test_a_missing_install_is_one_line_naming_the_fix(tmp_path):
    server = LabelStudioServer(".venv-review/bin/python-nowhere", tmp_path / "data", free_port())
    with pytest.raises(ReviewUnavailable) as missing:
        server.start()
    assert str(missing.value) == ("Label Studio is not installed at .venv-review/bin/python-nowhere; run "
                                  "`make install` (or set review.python)")


def test_a_taken_port_is_refused_before_starting(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        fake = tmp_path / "python"
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
        with pytest.raises(ReviewUnavailable, match=f"port {port} on 127.0.0.1 is in use .*review.port"):
            LabelStudioServer(fake, tmp_path / "data", port).start()


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'django.db.utils.OperationalError: disk I/O error'\nexit 3\n")
    fake.chmod(0o755)
    server = LabelStudioServer(fake, tmp_path / "data", free_port(), startup_timeout=30)
    with pytest.raises(ReviewUnavailable, match=r"exited with 3 before it answered") as died:
        server.start()
    assert "disk I/O error" in str(died.value)
    assert not server.running()
    # the login was made before the start and is kept for the next one, readable by its owner only
    login = tmp_path / "data" / "login.json"
    assert stat.S_IMODE(login.stat().st_mode) == 0o600
    assert Login.read(login) == server.login


def test_a_relative_python_is_found_although_the_server_starts_in_its_data_folder(tmp_path, monkeypatch):
    """params.yaml's review.python is relative to the project (.venv-review/bin/python); the server's
    working directory is review.data_dir (make demo once failed here with FileNotFoundError)."""
    venv = tmp_path / ".venv-review" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("#!/bin/sh\necho started from $(pwd)\nexit 3\n")
    (venv / "python").chmod(0o755)
    monkeypatch.chdir(tmp_path)
    server = LabelStudioServer(".venv-review/bin/python", "data/review", free_port(), startup_timeout=30)
    with pytest.raises(ReviewUnavailable, match=r"exited with 3 before it answered") as died:
        server.start()
    assert f"started from {tmp_path / 'data' / 'review'}" in str(died.value)


def test_the_server_runs_on_loopback_with_no_network_and_no_inherited_accounts(tmp_path):
    server = LabelStudioServer("python", tmp_path, 8099, base_env={"USERNAME": "me", "PASSWORD": "x", "HOST": "h",
                                                                   "LLMOPS_REVIEW_TOKEN": "t", "PATH": "/bin"})
    command = server.command()
    assert command[command.index("--internal-host") + 1] == "127.0.0.1"
    env = server.environment(Login("a@b.c", "pw", "tok"))
    assert not {"USERNAME", "PASSWORD", "HOST", "LLMOPS_REVIEW_TOKEN"} & set(env)
    assert env["LABEL_STUDIO_USERNAME"] == "a@b.c" and env["PATH"] == "/bin"
    assert env["LABEL_STUDIO_LATEST_VERSION_CHECK"] == "false" and env["LABEL_STUDIO_COLLECT_ANALYTICS"] == "false"
    assert env["LABEL_STUDIO_SENTRY_DSN"] == "" and env["LABEL_STUDIO_FRONTEND_SENTRY_DSN"] == ""


def test_unreachable_is_one_line_naming_the_fix():
    port = free_port()
    with pytest.raises(ReviewUnavailable) as down:
        LabelStudio(f"http://127.0.0.1:{port}", "token", retries=1, backoff=0.01).check()
    assert str(down.value) == (f"Label Studio at http://127.0.0.1:{port} is unreachable (connection refused); "
                               "start it with `llmops review serve` or set LLMOPS_REVIEW_URL")


def test_connect_takes_the_url_and_the_token_from_params_env_or_the_login_file(tmp_path):
    data = tmp_path / "data"
    with pytest.raises(ReviewUnavailable, match="no Label Studio API token .*LLMOPS_REVIEW_TOKEN.*review serve"):
        connect(params(data_dir=data, port=8123), environ={})
    Login("a@b.c", "pw", "from-file").write(data / "login.json")
    client = connect(params(data_dir=data, port=8123), environ={})
    assert (client.url, client.token) == ("http://127.0.0.1:8123", "from-file")
    client = connect(params(data_dir=data), environ={"LLMOPS_REVIEW_URL": "http://ls.example:8080/",
                                                     "LLMOPS_REVIEW_TOKEN": "from-env"})
    assert (client.url, client.token) == ("http://ls.example:8080", "from-env")
    client = connect(params(data_dir=data, url="http://review.internal"), environ={"LLMOPS_REVIEW_URL": "http://x"})
    assert client.url == "http://review.internal"


def test_a_broken_login_file_names_itself(tmp_path):
    path = tmp_path / "login.json"
    path.write_text(json.dumps({"username": "a"}))
    with pytest.raises(Exception, match=f"{path} is not a Label Studio login"):
        Login.read(path)


@pytest.mark.parametrize(("config", "fields", "controls"), [
    (CANDIDATE_CONFIG, {"prompt", "answer_a", "answer_b"}, {"preference": ["A", "B", "Tie"]}),
    (CORRECTION_CONFIG, {"prompt", "answer", "flags", "feedback"},
     {"verdict": ["Approve answer", "Corrected", "Reject prompt"]}),
])
def test_the_label_configs_show_the_data_fields_and_ask_one_required_choice(config, fields, controls):
    root = ET.fromstring(config)
    assert {t.get("value").lstrip("$") for t in root.iter("Text")} == fields
    for choices in root.iter("Choices"):
        assert choices.get("required") == "true" and choices.get("choice") == "single-radio"
        assert [c.get("value") for c in choices.iter("Choice")] == controls[choices.get("name")]
    assert {c.get("name") for c in root.iter("Choices")} == set(controls)
    assert len(list(root.iter("TextArea"))) == 1


def test_the_login_is_written_atomically_with_owner_only_mode(tmp_path: Path):
    login = Login.new()
    login.write(tmp_path / "login.json")
    assert stat.S_IMODE((tmp_path / "login.json").stat().st_mode) == 0o600
    assert Login.read(tmp_path / "login.json") == login
    assert list(tmp_path.iterdir()) == [tmp_path / "login.json"]  # no temporary left behind
