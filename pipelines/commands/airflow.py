"""Command `airflow`: a local Airflow for this project's DAGs (UI, scheduler, workers), until Ctrl-C.

    make airflow                  # or: llmops airflow [--port 8080] [--home airflow_home]

Runs `airflow standalone` (api-server with the UI, scheduler with the LocalExecutor,
dag-processor, triggerer) on 127.0.0.1 with a SQLite database in AIRFLOW_HOME (default
./airflow_home, git-ignored), reading the DAGs in ./dags and running their tasks in this
checkout (Airflow Variables `llmops_repo` and `llmops_bin` as environment variables). It
prints the UI's address and the login once every component reports healthy. New DAGs start
paused: switch them on in the UI.

Ctrl-C stops it cleanly: `airflow standalone` is sent SIGINT, which it forwards to its
components (SIGTERM would leave them running), and is killed with its process group only if
it is still there after a minute.

For a team, run the components as services against PostgreSQL instead (docker/).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipelines.config.params import Params
from pipelines.errors import LLMOpsError

logger = logging.getLogger(__name__)
USER = "admin"


class AirflowError(LLMOpsError):
    """Airflow did not start (port taken, a component died)."""


def _default_sigint() -> None:
    # A process started in the background by a non-interactive shell (CI, nohup, `cmd &`)
    # inherits SIGINT as ignored; standalone must take SIGINT to stop its components.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LocalAirflow:
    def __init__(self, repo: Path, home: Path, port: int = 8080, base_env: dict[str, str] | None = None) -> None:
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.repo = repo.resolve()
        self.home = home.resolve()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        return {
            **self.base_env,
            "PATH": f"{bin_dir}{os.pathsep}{self.base_env.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.repo / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW_VAR_LLMOPS_REPO": str(self.repo),
            "AIRFLOW_VAR_LLMOPS_BIN": bin_dir,
        }

    def start(self) -> None:
        import socket

        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                raise AirflowError(f"port {self.port} on 127.0.0.1 is in use (another Airflow?); stop it or pass "
                                   f"--port")
        if not (self.repo / "dags").is_dir():
            raise AirflowError(f"{self.repo / 'dags'} not found: run from the project root")
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = self.home / "standalone.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it; closed with the process
        self.process = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "standalone"],
                                        env=self.env(), cwd=self.repo, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_default_sigint)
        log.close()

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as response:
            return json.loads(response.read())

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AirflowError(f"airflow standalone exited with {self.process.returncode}; see {self.log_path}:\n"
                                   + self.log_tail())
            try:
                last = self.health()
                if all(part.get("status") == "healthy" for part in last.values() if isinstance(part, dict)):
                    return
            except OSError as error:
                last = error
            time.sleep(1)
        raise AirflowError(f"Airflow was not healthy after {timeout:.0f} s (last: {last}); see {self.log_path}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def password(self) -> str:
        path = self.home / "simple_auth_manager_passwords.json.generated"
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        return json.loads(path.read_text())[USER]

    def token(self) -> str:
        """A bearer token for the REST API (what the UI's login does)."""
        request = urllib.request.Request(f"{self.url}/auth/token", method="POST",
                                         data=json.dumps({"username": USER, "password": self.password()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["access_token"]

    def stop(self, timeout: float = 60) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)  # standalone forwards SIGINT to its components
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("airflow standalone did not stop within %.0f s; killing its process group", timeout)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        process.wait()


def main(params: Params, port: int = 8080, home: str = "airflow_home") -> None:
    airflow = LocalAirflow(Path.cwd(), Path(home), port)
    airflow.start()
    try:
        airflow.wait_healthy()
        print(f"\nAirflow is up: {airflow.url}  (user {USER}, password {airflow.password()})\n"
              f"DAGs: llmops_training, llmops_monitoring (new DAGs start paused: switch them on in the UI)\n"
              f"Logs: {airflow.log_path}; stop with Ctrl-C.\n", flush=True)
        while airflow.process is not None and airflow.process.poll() is None:
            time.sleep(1)
        raise AirflowError(f"airflow standalone exited with {airflow.process.returncode}:\n{airflow.log_tail()}")
    except KeyboardInterrupt:
        print("stopping Airflow ...", flush=True)
    finally:
        airflow.stop()
