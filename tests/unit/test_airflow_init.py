"""docker/airflow/init.sh clones a private repository without leaking its token.

Real git clones over HTTP from a real server that demands the token (git's "dumb" HTTP
protocol: a bare repository served as files, behind Basic auth). The Airflow, DVC and llmops
steps that follow the clone are not what is tested here: stand-ins on PATH record that they
ran and with which environment (the compose stack runs the real ones: docker/README.md)."""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support import REPO, require

INIT = REPO / "docker" / "airflow" / "init.sh"
SECRET = "ghp_s3cr3tT0ken0123456789abcdef"


class _AuthHandler(SimpleHTTPRequestHandler):
    expected = ""
    authorized: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.authorized.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def git_server(tmp_path):
    require(subprocess.run(["git", "--version"], capture_output=True).returncode == 0, "git is not installed")
    source = tmp_path / "source"
    source.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(source)], check=True)
    (source / "params.yaml").write_text("paths: {}\n")
    subprocess.run([*git, "-C", str(source), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(source), "commit", "-q", "-m", "init"], check=True)
    served = tmp_path / "served"
    served.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(source), str(served / "repo.git")], check=True)
    subprocess.run(["git", "-C", str(served / "repo.git"), "update-server-info"], check=True)

    handler = type("Handler", (_AuthHandler,), {
        "expected": "Basic " + base64.b64encode(f"oauth2:{SECRET}".encode()).decode(), "authorized": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}/repo.git", handler
    finally:
        server.shutdown()
        server.server_close()


def run_init(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    stubs, calls = tmp_path / "bin", tmp_path / "calls"
    stubs.mkdir(exist_ok=True)
    calls.mkdir(exist_ok=True)
    for tool in ("llmops", "dvc", "airflow"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}/log"\nenv >> "{calls}/env"\n')
        (stubs / tool).chmod(0o755)
    workspace = tmp_path / "workspace"
    base = {"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
            "GIT_CONFIG_NOSYSTEM": "1", "AIRFLOW_VAR_LLMOPS_REPO": str(workspace), "LLMOPS_GIT_REF": "main",
            "AIRFLOW_ADMIN_USER": "admin", "AIRFLOW_ADMIN_PASSWORD": "pw"}
    (tmp_path / "home").mkdir(exist_ok=True)
    result = subprocess.run(["bash", str(INIT)], env={**base, **env}, capture_output=True, text=True, timeout=120)
    return result, workspace, calls


def assert_no_secret(result: subprocess.CompletedProcess, workspace: Path, calls: Path) -> None:
    assert SECRET not in result.stdout + result.stderr, result.stdout + result.stderr
    if (workspace / ".git").exists():
        assert SECRET not in (workspace / ".git" / "config").read_text()
    if (calls / "env").exists():
        assert SECRET not in (calls / "env").read_text()  # dvc, airflow and llmops never inherit it


def test_a_token_in_the_url_clones_but_is_never_logged_nor_kept(tmp_path, git_server):
    address, handler = git_server
    result, workspace, calls = run_init(tmp_path, LLMOPS_GIT_URL=f"http://oauth2:{SECRET}@{address}")
    assert result.returncode == 0, result.stderr
    assert_no_secret(result, workspace, calls)
    assert f"cloning http://{address} (main)" in result.stdout
    assert (workspace / "params.yaml").exists() and handler.authorized  # the server saw the token
    assert subprocess.run(["git", "-C", str(workspace), "remote", "get-url", "origin"], capture_output=True,
                          text=True).stdout.strip() == f"http://{address}"
    assert "llmops settings --configure-dvc" in (calls / "log").read_text()


def test_a_token_from_its_own_variable_works_the_same(tmp_path, git_server):
    address, _ = git_server
    result, workspace, calls = run_init(tmp_path, LLMOPS_GIT_URL=f"http://{address}", LLMOPS_GIT_USER="oauth2",
                                        LLMOPS_GIT_TOKEN=SECRET)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result, workspace, calls)
    assert (workspace / "params.yaml").exists()


def test_a_wrong_token_fails_in_one_message_without_the_token(tmp_path, git_server):
    address, _ = git_server
    wrong = SECRET[::-1]
    result, workspace, calls = run_init(tmp_path, LLMOPS_GIT_URL=f"http://oauth2:{wrong}@{address}")
    assert result.returncode != 0
    assert wrong not in result.stdout + result.stderr
    assert f"airflow-init: cloning http://{address} failed" in result.stderr
    assert not (calls / "log").exists()  # stopped before anything else ran


def test_an_old_clone_loses_the_token_its_remote_url_carries(tmp_path, git_server):
    address, _ = git_server
    result, workspace, calls = run_init(tmp_path, LLMOPS_GIT_URL=f"http://oauth2:{SECRET}@{address}")
    assert result.returncode == 0
    subprocess.run(["git", "-C", str(workspace), "remote", "set-url", "origin", f"http://oauth2:{SECRET}@{address}"],
                   check=True)  # what the old script left in the volume
    again, _, _ = run_init(tmp_path, LLMOPS_GIT_URL=f"http://oauth2:{SECRET}@{address}")
    assert again.returncode == 0
    assert "removed the credentials from the workspace's remote URL" in again.stdout
    assert_no_secret(again, workspace, calls)
