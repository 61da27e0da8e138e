"""Label Studio, the review tool: its server process, its login, and a REST client.

    llmops review serve          # (make review) Label Studio on 127.0.0.1:<review.port> until Ctrl-C
    LabelStudioServer(python, data_dir, port).start() ... .stop()    # also a context manager
    connect(params) -> LabelStudio                                   # the REST client the other commands use

Label Studio runs from a virtualenv of its own (`review.python`, `.venv-review`, made by `make
install`): its pins would downgrade the project's pyarrow and numpy. The project never imports it:
it starts `label_studio.server` as a process and talks to it over REST with httpx. The official
`label-studio-sdk` is not used for the same reason (in our venv it would downgrade numpy and pull
opencv, black and ~40 other packages); the few endpoints below are Label Studio 1.23's public API.

The server binds 127.0.0.1 only: it is Django's development server (`runserver`), which Django
says must not face a network. Its SQLite database, media, secret key and `login.json` (the admin's
e-mail, password and API token, mode 0600, reused on every restart) live in `review.data_dir`.
It starts with no network use: no version check, no Sentry, no analytics, and with Host/CORS
checks and invite-only sign-up set for loopback. A first start on a new data dir runs the
database migrations (~30-60 s on 2 cores); a restart takes a few seconds.

Reviewers: the admin printed by `llmops review serve`, and people who join through the
organisation's invite link (`create_user` does that from a script, as a person would in the UI).
Each annotation records who made it (`completed_by`), which inter-reviewer agreement needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config.params import Params, ReviewParams
from pipelines.errors import LLMOpsError
from pipelines.io import atomic_path

logger = logging.getLogger(__name__)

URL_ENV = "LLMOPS_REVIEW_URL"
TOKEN_ENV = "LLMOPS_REVIEW_TOKEN"
LOGIN_FILE = "login.json"
LOG_FILE = "label-studio.log"
ADMIN_EMAIL = "admin@llmops.local"
SERVE_HINT = "start it with `llmops review serve` or set LLMOPS_REVIEW_URL"
EXPORT_TYPES = ("JSON", "JSON_MIN")

# The blind side-by-side view of `llmops review request`: the prompt, two answers (which one is the
# candidate is in the task's meta, never shown), a required preference and an optional rewrite.
# Data fields: prompt, answer_a, answer_b.
CANDIDATE_CONFIG = """<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <View style="display: flex; gap: 1em; margin-top: 1em;">
    <View style="flex: 1; min-width: 0; padding: 0.5em 1em; border: 1px solid #ccc; border-radius: 4px;">
      <Header value="Answer A"/>
      <Text name="answer_a" value="$answer_a"/>
    </View>
    <View style="flex: 1; min-width: 0; padding: 0.5em 1em; border: 1px solid #ccc; border-radius: 4px;">
      <Header value="Answer B"/>
      <Text name="answer_b" value="$answer_b"/>
    </View>
  </View>
  <Header value="Which answer is better?"/>
  <Choices name="preference" toName="prompt" choice="single-radio" required="true" showInline="true">
    <Choice value="A"/>
    <Choice value="B"/>
    <Choice value="Tie"/>
  </Choices>
  <Header value="Write a better answer (optional)"/>
  <TextArea name="better_answer" toName="prompt" rows="4" editable="true" maxSubmissions="1"
            placeholder="Write a better answer (optional)"/>
</View>
"""

# The correction view of `llmops review corrections`: a production answer that monitoring or a
# user flagged; the reviewer approves it, corrects it, or rejects the prompt.
# Data fields: prompt, answer, flags (why it was flagged), feedback (the user's, may be "").
CORRECTION_CONFIG = """<View>
  <Header value="Production prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="The model's answer"/>
  <Text name="answer" value="$answer"/>
  <Header value="Why it was flagged"/>
  <Text name="flags" value="$flags"/>
  <Header value="User feedback"/>
  <Text name="feedback" value="$feedback"/>
  <Header value="Verdict"/>
  <Choices name="verdict" toName="answer" choice="single-radio" required="true" showInline="true">
    <Choice value="Approve answer"/>
    <Choice value="Corrected"/>
    <Choice value="Reject prompt"/>
  </Choices>
  <Header value="Corrected answer (with Corrected)"/>
  <TextArea name="correction" toName="answer" rows="6" editable="true" maxSubmissions="1"
            placeholder="The answer the model should have given"/>
</View>
"""


class ReviewUnavailable(LLMOpsError):
    """Label Studio cannot be reached or started (down, not installed, no login)."""


class ReviewError(LLMOpsError):
    """Label Studio answered but refused the request (a wrong token, a bad label config, ...)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of the refusal, when there was one


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- the login --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Login:
    """The admin of a Label Studio that `LabelStudioServer` started: made on its first start."""

    username: str  # Label Studio logs in by e-mail
    password: str
    token: str  # a legacy API token: `Authorization: Token <token>`

    @classmethod
    def new(cls, username: str = ADMIN_EMAIL) -> Login:
        return cls(username=username, password=secrets.token_urlsafe(18), token=secrets.token_hex(20))

    @classmethod
    def read(cls, path: Path) -> Login | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(username=str(data["username"]), password=str(data["password"]), token=str(data["token"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ReviewError(f"{path} is not a Label Studio login ({_one_line(error)}); delete it together "
                              f"with the database beside it to start afresh") from None

    def write(self, path: Path) -> None:
        """Atomically, readable by the owner only (it holds the admin's password and token)."""
        with atomic_path(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"username": self.username, "password": self.password, "token": self.token}, handle,
                          indent=2)
                handle.write("\n")


def login_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / LOGIN_FILE


# --- the server process -----------------------------------------------------------------------

# The kernel stops Label Studio when the process that started it dies (PR_SET_PDEATHSIG), so a
# `llmops review serve` killed with SIGKILL leaves no server holding the port; then it runs
# `label_studio.server` as `python -m` would.
BOOTSTRAP = (
    "import ctypes, runpy, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except OSError:\n"
    "    pass\n"
    "sys.argv = ['label-studio', *sys.argv[1:]]\n"
    "runpy.run_module('label_studio.server', run_name='__main__', alter_sys=True)\n"
)
# Label Studio also reads these settings without its LABEL_STUDIO_ prefix: a shell's USERNAME and
# PASSWORD would otherwise become an account, its HOST the public URL, its PORT the port.
_UNPREFIXED = ("USERNAME", "PASSWORD", "USER_TOKEN", "HOST", "PORT", "DEBUG", "DATABASE_NAME", "DJANGO_DB",
               "BASE_DATA_DIR")
# Credentials of the project's other services: Label Studio needs none of them.
_SECRETS = ("LLMOPS_REVIEW_TOKEN", "LLMOPS_API_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
            "AWS_SECRET_ACCESS_KEY")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


class LabelStudioServer:
    """One Label Studio process on 127.0.0.1:<port>, with its data (and login) in `data_dir`."""

    host = "127.0.0.1"

    def __init__(self, python: Path | str, data_dir: Path | str, port: int = 8081, *,
                 startup_timeout: float = 300.0, base_env: dict[str, str] | None = None) -> None:
        # absolute but not resolved: Label Studio starts in data_dir, and a venv's python is a
        # symlink whose target would not see the venv's packages
        self.python = Path(os.path.abspath(python))
        self.configured_python = str(python)  # as the user wrote it, for messages
        self.data_dir = Path(data_dir)
        self.port = port
        self.url = f"http://{self.host}:{port}"
        self.startup_timeout = startup_timeout
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.log_path = self.data_dir / LOG_FILE
        self.login_path = login_path(self.data_dir)
        self.process: subprocess.Popen | None = None
        self._login: Login | None = None

    @classmethod
    def from_params(cls, review: ReviewParams, **kwargs: Any) -> LabelStudioServer:
        return cls(review.python, review.data_dir, review.port, **kwargs)

    @property
    def login(self) -> Login:
        if self._login is None:
            raise ReviewUnavailable(f"Label Studio at {self.url} is not started; call start() first")
        return self._login

    def command(self) -> list[str]:
        return [str(self.python), "-c", BOOTSTRAP, "start", "--no-browser", "--data-dir",
                str(self.data_dir.resolve()), "--internal-host", self.host, "--port", str(self.port),
                # the admin's token is a legacy API token (`Authorization: Token ...`): it never expires,
                # which scripts and the review DAG need; applied when the organisation is created
                "--enable-legacy-api-token"]

    def environment(self, login: Login) -> dict[str, str]:
        env = dict(self.base_env)
        for name in _UNPREFIXED:
            env.pop(name, None)
            env.pop(f"HEARTEX_{name}", None)
        for name in _SECRETS:
            env.pop(name, None)
        prefixed = {
            "BASE_DATA_DIR": str(self.data_dir.resolve()),
            # the admin, created on the first start (an existing one is kept as it is)
            "USERNAME": login.username, "PASSWORD": login.password, "USER_TOKEN": login.token,
            "HOST": "",  # relative URLs: the UI works under whatever name the browser used
            # no network: no PyPI version check, no error reports to Sentry, no usage analytics
            "LATEST_VERSION_CHECK": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false", "CONVERTER_DOWNLOAD_RESOURCES": "false",
            # loopback only: refuse other Host names (DNS rebinding) and other origins; people join
            # through the invite link, not an open sign-up page
            "ALLOWED_HOSTS": f"{self.host},localhost",
            "CORS_ALLOWED_ORIGINS": f"{self.url},http://localhost:{self.port}",
            "DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "DEBUG": "false",  # no Django debug pages with settings and tracebacks
        }
        env.update({f"LABEL_STUDIO_{name}": value for name, value in prefixed.items()})
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> LabelStudioServer:
        if not self.python.exists():
            raise ReviewUnavailable(f"Label Studio is not installed at {self.configured_python}; run `make install` "
                                    "(or set review.python)")
        if port_in_use(self.host, self.port):
            raise ReviewUnavailable(f"port {self.port} on {self.host} is in use (is Label Studio already running? "
                                    f"`llmops review serve` prints its login); stop it or set review.port")
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        login = Login.read(self.login_path)
        if login is None:
            login = Login.new()
            login.write(self.login_path)  # before the start: a start that dies half-way made this admin
        self._login = login
        first = not (self.data_dir / "label_studio.sqlite3").exists()
        logger.info("starting Label Studio on %s (data: %s%s)", self.url, self.data_dir,
                    "; a first start migrates a new database, ~30-60 s" if first else "")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), env=self.environment(login), cwd=self.data_dir,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self) -> None:
        """Until /health answers and the admin's token works; fails early when the process dies."""
        import httpx

        deadline = time.monotonic() + self.startup_timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ReviewUnavailable(f"Label Studio exited with {self.process.returncode} before it answered on "
                                        f"{self.url}; its log {self.log_path} ends:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError as error:
                last = error
            time.sleep(0.5)
        else:
            raise ReviewUnavailable(f"Label Studio did not answer on {self.url} within {self.startup_timeout:.0f} s "
                                    f"(last: {_one_line(last)}); its log {self.log_path} ends:\n{self.log_tail()}")
        try:
            with self.client() as client:
                who = client.whoami()
        except ReviewError as error:
            if error.status != 401:
                raise
            who = {}
        if who.get("email") != self.login.username:
            raise ReviewError(f"the token in {self.login_path} is not the admin's in Label Studio's database in "
                              f"{self.data_dir} (was login.json replaced?); put the old one back, or move the "
                              "folder away to start afresh")

    def client(self) -> LabelStudio:
        return LabelStudio(self.url, self.login.token)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("Label Studio did not stop within %.0f s; killing it", timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(params: Params, **_: Any) -> None:
    """`llmops review serve`: Label Studio in the foreground until Ctrl-C (or SIGTERM)."""
    review = params.review
    server = LabelStudioServer.from_params(review)
    # Ctrl-C and a supervisor's SIGTERM stop the server too; SIGINT explicitly, since a process started in
    # the background by a non-interactive shell (nohup, `cmd &`, CI) inherits it as ignored
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    print(f"starting Label Studio on {server.url} (data: {server.data_dir}; log: {server.log_path}) ...",
          flush=True)
    try:
        with server:
            login = server.login
            elsewhere = review.url or os.environ.get(URL_ENV)
            print(f"\nLabel Studio is up: {server.url}\n"
                  f"  user:      {login.username}\n"
                  f"  password:  {login.password}\n"
                  f"  API token: {login.token}\n"
                  f"The other `llmops review` commands read the token from {server.login_path} (or "
                  f"{TOKEN_ENV}).\n"
                  f"Loopback only (Django's development server); stop with Ctrl-C.\n"
                  + (f"Note: review.url / {URL_ENV} points at {elsewhere}: the other commands talk to that one.\n"
                     if elsewhere and elsewhere.rstrip("/") != server.url else ""), flush=True)
            while server.running():
                time.sleep(1)
            raise ReviewUnavailable(f"Label Studio exited with {server.process.returncode}; its log "
                                    f"{server.log_path} ends:\n{server.log_tail()}")
    except KeyboardInterrupt:
        print("stopping Label Studio ...", flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- the REST client --------------------------------------------------------------------------

def _is_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


class LabelStudio:
    """Label Studio 1.23's REST API, the calls the review commands need.

    `token` is a legacy API token (`Authorization: Token ...`, what `LabelStudioServer` makes) or a
    personal access token (a JWT refresh token, the default for new organisations in Label Studio
    >= 1.17: exchanged at /api/token/refresh/ for a short-lived `Bearer` access token).
    Connection errors are retried briefly, then raise ReviewUnavailable; refusals raise ReviewError.
    """

    def __init__(self, url: str, token: str, *, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.25) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._http = httpx.Client(base_url=self.url, timeout=timeout, follow_redirects=False)
        self._access: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudio:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing --

    def _auth(self, refresh: bool = False) -> dict[str, str]:
        if not _is_jwt(self.token):
            return {"Authorization": f"Token {self.token}"}
        if self._access is None or refresh:
            body = self._send("POST", "/api/token/refresh/", json={"refresh": self.token}, auth=False).json()
            self._access = body["access"]
        return {"Authorization": f"Bearer {self._access}"}

    def _unreachable(self, reason: str) -> ReviewUnavailable:
        return ReviewUnavailable(f"Label Studio at {self.url} is unreachable ({reason}); {SERVE_HINT}")

    def _send(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> Any:
        import httpx

        reason = ""
        refreshed = False
        attempt = 0
        extra_headers = kwargs.pop("headers", {})
        while True:
            headers = {**extra_headers, **(self._auth() if auth else {})}
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:  # nothing was sent: safe to retry
                reason = _reason(error)
            except httpx.TimeoutException:
                raise self._unreachable(f"no answer to {method} {path} within {self.timeout:.0f} s") from None
            except httpx.TransportError as error:  # cut mid-request: only a read is safe to repeat
                if method != "GET":
                    raise self._unreachable(f"{method} {path} was cut: {_reason(error)}") from None
                reason = _reason(error)
            else:
                if response.status_code in (502, 503, 504):  # a proxy in front of a server that is down
                    reason = f"{response.status_code} {response.reason_phrase}"
                elif response.status_code == 401 and auth and _is_jwt(self.token) and not refreshed:
                    refreshed = True  # the access token expired: refresh it once
                    self._auth(refresh=True)
                    continue
                elif response.is_error:
                    raise ReviewError(self._refusal(method, path, response), response.status_code)
                else:
                    return response
            if attempt >= self.retries:
                raise self._unreachable(reason)
            time.sleep(self.backoff * 2 ** attempt)
            attempt += 1

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return json.loads(response.content)
        except ValueError:
            raise ReviewError(f"Label Studio at {self.url} answered {method} {path} with something that is not JSON "
                              f"({_one_line(response.text, 120)}); is {self.url} Label Studio?") from None

    def _refusal(self, method: str, path: str, response: Any) -> str:
        detail = ""
        try:
            body = response.json()
            if isinstance(body, dict):
                detail = str(body.get("detail") or "")
                if body.get("validation_errors"):
                    detail += " " + json.dumps(body["validation_errors"], ensure_ascii=False)
            else:
                detail = json.dumps(body, ensure_ascii=False)
        except ValueError:
            if "<html" not in response.text[:500].lower():
                detail = response.text
        detail = _one_line(detail or response.reason_phrase, 300)
        if response.status_code == 401:
            return (f"Label Studio at {self.url} refused the API token ({detail}); set {TOKEN_ENV} to a token of that "
                    f"server (its Account & Settings page), or use the one `llmops review serve` prints")
        if response.status_code == 404:
            return f"Label Studio at {self.url} has no {path} (404: {detail})"
        return f"Label Studio at {self.url} refused {method} {path}: {response.status_code} {detail}"

    def _pages(self, path: str, params: dict[str, Any], key: str) -> Iterator[dict[str, Any]]:
        page, seen = 1, 0
        while True:
            body = self._json("GET", path, params={**params, "page": page})
            if isinstance(body, list):  # an unpaginated answer
                yield from body
                return
            items = body.get(key) or []
            yield from items
            seen += len(items)
            total = body.get("total", body.get("count"))
            if not items or (total is not None and seen >= total) or (total is None and not body.get("next")):
                return
            page += 1

    # -- who and what --

    def whoami(self) -> dict[str, Any]:
        return self._json("GET", "/api/current-user/whoami")

    def check(self) -> dict[str, Any]:
        """That the server answers and the token works: {"version": ..., "user": <e-mail>, "id": ...}."""
        version = self._json("GET", "/api/version", auth=False) or {}
        who = self.whoami()
        return {"version": version.get("release"), "user": who.get("email"), "id": who.get("id")}

    def projects(self) -> list[dict[str, Any]]:
        return list(self._pages("/api/projects/", {"page_size": 100}, "results"))

    def project(self, title: str) -> dict[str, Any] | None:
        """The project with exactly this title (the lowest id if there are several), or None."""
        # the API's title filter matches substrings: compare exactly here
        found = [p for p in self._pages("/api/projects/", {"title": title, "page_size": 100}, "results")
                 if p.get("title") == title]
        return min(found, key=lambda p: int(p["id"])) if found else None

    def ensure_project(self, title: str, label_config: str, description: str = "", **settings: Any) -> int:
        """The id of the project titled `title`, created if missing; its label config, description and
        `settings` (project fields, e.g. maximum_annotations=2) are brought up to date. Label Studio
        refuses a label config that existing annotations do not fit (ReviewError)."""
        wanted = {"label_config": label_config, "description": description, **settings}
        found = self.project(title)
        if found is None:
            created = self._json("POST", "/api/projects/", json={"title": title, **wanted})
            logger.info("Label Studio: created project %s %r", created["id"], title)
            return int(created["id"])
        changed = {key: value for key, value in wanted.items() if found.get(key) != value}
        if changed:
            self._json("PATCH", f"/api/projects/{found['id']}/", json=changed)
        return int(found["id"])

    # -- tasks and annotations --

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]], *, batch: int = 500) -> list[int]:
        """Create tasks ({"data": {...}, "meta": {...}}: data is shown, meta is bookkeeping); their ids."""
        for task in tasks:
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise ValueError(f"a Label Studio task is {{'data': {{...}}, 'meta': {{...}}}}, got {task!r:.200}")
        ids: list[int] = []
        for start in range(0, len(tasks), batch):
            chunk = tasks[start:start + batch]
            body = self._json("POST", f"/api/projects/{project_id}/import", params={"return_task_ids": "true"},
                              json=chunk)
            created = body.get("task_ids")
            if created is None:  # a release that does not return them: the newest tasks are these
                newest = sorted(int(t["id"]) for t in self._pages("/api/tasks/", {"project": project_id,
                                                                                  "page_size": 100}, "tasks"))
                created = newest[-len(chunk):]
            if len(created) != len(chunk):
                raise ReviewError(f"Label Studio at {self.url} created {len(created)} of {len(chunk)} tasks in "
                                  f"project {project_id}")
            ids += [int(task_id) for task_id in created]
        return ids

    def tasks(self, project_id: int, *, page_size: int = 100) -> list[dict[str, Any]]:
        """Every task of the project with its data, meta and annotations (each with `result`,
        `completed_by`, `was_cancelled`, `created_at`, `updated_at`)."""
        return list(self._pages("/api/tasks/", {"project": project_id, "fields": "all", "page_size": page_size},
                                "tasks"))

    def task(self, task_id: int) -> dict[str, Any]:
        return self._json("GET", f"/api/tasks/{task_id}/")

    def export(self, project_id: int, export_type: str = "JSON", *, all_tasks: bool = False) -> list[dict[str, Any]]:
        """Label Studio's export: JSON (one record per task, annotations inside) or JSON_MIN (one flat
        record per annotation: the data fields, each control's value, `annotator`, `annotation_id`).
        Only annotated tasks unless `all_tasks`."""
        if export_type not in EXPORT_TYPES:
            raise ValueError(f"export_type must be one of {EXPORT_TYPES}, got {export_type!r}")
        return self._json("GET", f"/api/projects/{project_id}/export",
                          params={"exportType": export_type, "download_all_tasks": str(all_tasks).lower()})

    def annotate(self, task_id: int, result: list[dict[str, Any]], completed_by: int | None = None,
                 **fields: Any) -> dict[str, Any]:
        """Answer a task as this client's user, as a reviewer does in the UI (the admin may pass another
        user's id as `completed_by`). `result` is Label Studio's: e.g. choice(...) and text(...)."""
        body: dict[str, Any] = {"result": result, **fields}
        if completed_by is not None:
            body["completed_by"] = completed_by
        return self._json("POST", f"/api/tasks/{task_id}/annotations/", json=body)

    def delete_task(self, task_id: int) -> None:
        """Delete a task and its annotations; a task already gone is no error."""
        try:
            self._send("DELETE", f"/api/tasks/{task_id}/")
        except ReviewError as error:
            if error.status != 404:
                raise

    # -- people --

    def invite_url(self) -> str:
        """The organisation's invite link (a person signs up with it and joins as a reviewer)."""
        return self.url + self._json("GET", "/api/invite")["invite_url"]

    def create_user(self, email: str, password: str) -> dict[str, Any]:
        """A reviewer who signs up through the invite link, as a person would; logs in instead when the
        e-mail is taken. Returns {"id", "email", "token"}: `LabelStudio(url, token)` acts as them.
        Label Studio wants a password of 8 characters or more, not too common."""
        import httpx

        invite = self.invite_url()
        with httpx.Client(base_url=self.url, timeout=self.timeout, follow_redirects=False) as browser:
            def submit(page: str, form: dict[str, str]) -> bool:
                shown = browser.get(page)
                if shown.status_code != 200:
                    raise ReviewError(f"Label Studio at {self.url} refused to show {page.split('?')[0]} "
                                      f"({shown.status_code})")
                found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', shown.text)
                csrf = found.group(1) if found else browser.cookies.get("csrftoken", "")
                answer = browser.post(page, data={**form, "csrfmiddlewaretoken": csrf},
                                      headers={"Referer": f"{self.url}{page}"})
                return answer.status_code == 302  # to the projects page: signed up or logged in

            path = invite[len(self.url):]
            if not (submit(path, {"email": email, "password": password})
                    or submit("/user/login/", {"email": email, "password": password})):
                raise ReviewError(f"Label Studio at {self.url} did not let {email} sign up or log in (a password "
                                  "under 8 characters or too common, or the e-mail is taken with another password)")
            if _is_jwt(self.token):  # the organisation uses personal access tokens: make one
                token = browser.post("/api/token/", headers={"X-CSRFToken": browser.cookies.get("csrftoken", ""),
                                                             "Referer": self.url}).json()["token"]
            else:
                token = browser.get("/api/current-user/token").json()["token"]
            who = browser.get("/api/current-user/whoami").json()
        return {"id": int(who["id"]), "email": who["email"], "token": token}

    def users(self) -> list[dict[str, Any]]:
        return list(self._pages("/api/users/", {}, "results"))


def _reason(error: Exception) -> str:
    text = str(error)
    if "refused" in text.lower():
        return "connection refused"
    if "name or service not known" in text.lower() or "nodename nor servname" in text.lower():
        return "unknown host"
    return _one_line(text or type(error).__name__, 120)


def annotation_reviewer(annotation: dict[str, Any]) -> str:
    """Who made an annotation: `completed_by` is a user id in task lists, a user object in a task."""
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        return str(who.get("email") or who.get("username") or who.get("id"))
    return str(who)


def annotation_values(annotation: dict[str, Any], name: str, key: str) -> list[str]:
    """The values one control (`from_name`) gave in an annotation, e.g. ("preference", "choices")."""
    for result in annotation.get("result") or []:
        if result.get("from_name") == name:
            return [str(v) for v in (result.get("value") or {}).get(key) or []]
    return []


def choice(name: str, value: str, to_name: str = "prompt") -> dict[str, Any]:
    """One Choices answer for `annotate`: choice("preference", "A")."""
    return {"from_name": name, "to_name": to_name, "type": "choices", "value": {"choices": [value]}}


def text(name: str, value: str, to_name: str = "prompt") -> dict[str, Any]:
    """One TextArea answer for `annotate`: text("better_answer", "...")."""
    return {"from_name": name, "to_name": to_name, "type": "textarea", "value": {"text": [value]}}


# --- where the tool is ------------------------------------------------------------------------

def connect(params: Params, environ: dict[str, str] | None = None) -> LabelStudio:
    """The client for the configured Label Studio. URL: review.url, else LLMOPS_REVIEW_URL, else
    http://127.0.0.1:<review.port>; token: LLMOPS_REVIEW_TOKEN, else the login `llmops review serve`
    left in review.data_dir. Nothing is sent yet (`check()` does)."""
    env = os.environ if environ is None else environ
    review = params.review
    url = review.url or env.get(URL_ENV) or f"http://127.0.0.1:{review.port}"
    token = env.get(TOKEN_ENV, "").strip()
    if not token:
        login = Login.read(login_path(review.data_dir))
        if login is None:
            raise ReviewUnavailable(f"no Label Studio API token for {url}: set {TOKEN_ENV}, or start Label Studio "
                                    f"with `llmops review serve` (it writes {login_path(review.data_dir)})")
        token = login.token
    return LabelStudio(url, token)
