"""Command `settings`: where the services are (tracking, inference log, DVC remote, service, token), and why.

The library side of the command `llmops settings`; what it reads and writes, and how
it is run: pipelines/commands/settings.py.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.config.params import (
    DeployParams,
    DvcRemoteParams,
    InferenceLogParams,
    Params,
    QuantizeParams,
    ServeParams,
    SweepParams,
    TrackingParams,
)
from pipelines.errors import LLMOpsError

logger = logging.getLogger(__name__)

TRACKING_ENV = "MLFLOW_TRACKING_URI"
INFERENCE_LOG_ENV = "LLMOPS_INFERENCE_LOG_URL"
DVC_REMOTE_ENV = "LLMOPS_DVC_REMOTE"
DVC_ENDPOINT_ENV = "LLMOPS_DVC_REMOTE_ENDPOINT"
SERVICE_URL_ENV = "LLMOPS_SERVICE_URL"
VLLM_PYTHON_ENV = "LLMOPS_VLLM_PYTHON"
VLLM_URL_ENV = "LLMOPS_VLLM_URL"
SWEEP_STORAGE_ENV = "LLMOPS_SWEEP_STORAGE"
QUANTIZE_PYTHON_ENV = "LLMOPS_QUANTIZE_PYTHON"
# vLLM's own virtualenv, next to the project's (scripts/install.sh)
DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
# llm-compressor's own virtualenv, likewise
DEFAULT_QUANTIZE_PYTHON = Path(__file__).resolve().parents[2] / ".venv-quantize" / "bin" / "python"

DEFAULT_TRACKING_DB = "mlflow.db"
DEFAULT_SWEEP_DB = "sweeps.db"  # Optuna's tables; not in mlflow.db: both keep an alembic_version table
DEFAULT_INFERENCE_LOG = "sqlite:///data/inference/inference.db"
DVC_REMOTE_NAME = "team"  # the remote `--configure-dvc` writes to .dvc/config.local

# Every deployment setting's param -> where a deployment sets it instead (the run refusal names
# it). serve.token_env names the variable that holds the token; changing it would read another
# variable of the worker's environment, so it is a deployment setting too.
DEPLOYMENT_SETTINGS: dict[str, str] = {
    "tracking.uri": TRACKING_ENV,
    "inference_log.url": INFERENCE_LOG_ENV,
    "dvc_remote.url": DVC_REMOTE_ENV,
    "dvc_remote.endpoint_url": DVC_ENDPOINT_ENV,
    "deploy.service_url": SERVICE_URL_ENV,
    "serve.token_file": "LLMOPS_API_TOKEN (the variable serve.token_env names)",
    "serve.token_env": "LLMOPS_API_TOKEN",
    "serve.engine.python": VLLM_PYTHON_ENV,
    "serve.engine.url": VLLM_URL_ENV,
    "sweep.storage": SWEEP_STORAGE_ENV,
    "quantize.python": QUANTIZE_PYTHON_ENV,
}


@dataclass(frozen=True)
class Setting:
    name: str
    value: str | None
    source: str  # "params" | "env" | "default" | "unset"
    param: str
    env: str
    secret: bool = False  # never print the value
    when_unset: str = ""  # what happens without a value

    def shown(self) -> str:
        if self.value is None:
            return "-"
        return "(set, hidden)" if self.secret else hide_password(self.value)

    def where(self) -> str:
        if self.source == "unset":
            return f"unset: {self.when_unset}" if self.when_unset else "unset"
        return {"params": f"params: {self.param}", "env": f"env: {self.env}"}.get(self.source, self.source)


def resolve(name: str, param: str, param_value: object, env: str, default: str | None,
            environ: Mapping[str, str] | None = None, secret: bool = False, when_unset: str = "") -> Setting:
    """The one rule: a non-null param, else a non-empty environment variable, else the default."""
    environ = os.environ if environ is None else environ
    if param_value is not None and str(param_value).strip():
        return Setting(name, str(param_value), "params", param, env, secret, when_unset)
    if environ.get(env, "").strip():
        return Setting(name, environ[env].strip(), "env", param, env, secret, when_unset)
    return Setting(name, default, "default" if default is not None else "unset", param, env, secret, when_unset)


def hide_password(value: str) -> str:
    """A URL without its password (`scheme://user:***@host/...`); other strings unchanged."""
    return re.sub(r"(://[^:/@\s]*:)[^@/\s]+@", r"\1***@", value)


# --- the settings --------------------------------------------------------------------------

def tracking_uri(params: TrackingParams, root: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> Setting:
    default = f"sqlite:///{(root or Path.cwd()).resolve() / DEFAULT_TRACKING_DB}"
    return resolve("tracking", "tracking.uri", params.uri, TRACKING_ENV, default, environ)


def inference_log_url(params: InferenceLogParams, environ: Mapping[str, str] | None = None) -> Setting:
    return resolve("inference log", "inference_log.url", params.url, INFERENCE_LOG_ENV, DEFAULT_INFERENCE_LOG,
                   environ)


def dvc_remote(params: DvcRemoteParams, environ: Mapping[str, str] | None = None) -> Setting:
    return resolve("DVC remote", "dvc_remote.url", params.url, DVC_REMOTE_ENV, None, environ,
                   when_unset=".dvc/config's default remote")


def dvc_remote_endpoint(params: DvcRemoteParams, environ: Mapping[str, str] | None = None) -> Setting:
    return resolve("DVC S3 endpoint", "dvc_remote.endpoint_url", params.endpoint_url, DVC_ENDPOINT_ENV, None,
                   environ, when_unset="AWS S3 itself, for s3:// remotes")


def service_url(params: DeployParams, environ: Mapping[str, str] | None = None) -> Setting:
    return resolve("deploy target", "deploy.service_url", params.service_url, SERVICE_URL_ENV, None, environ,
                   when_unset="`llmops deploy` records the intent only")


def api_token(params: ServeParams, environ: Mapping[str, str] | None = None) -> Setting:
    """The bearer token: from the file serve.token_file names, else the variable serve.token_env names."""
    environ = os.environ if environ is None else environ
    if params.token_file is not None:
        path = Path(params.token_file)
        if not path.is_file():
            raise LLMOpsError(f"serve.token_file {path} does not exist; create it with a secret token "
                              f"(e.g. `openssl rand -hex 32 > {path}`), or set it to null and use {params.token_env}")
        return Setting("serving token", path.read_text(encoding="utf-8").strip(), "params", "serve.token_file",
                       params.token_env, secret=True)
    return resolve("serving token", "serve.token_file", None, params.token_env, None, environ, secret=True,
                   when_unset="`llmops serve` refuses to start")


def vllm_python(params: ServeParams, environ: Mapping[str, str] | None = None) -> Setting:
    return resolve("engine Python", "serve.engine.python", params.engine.python, VLLM_PYTHON_ENV,
                   str(DEFAULT_VLLM_PYTHON), environ)


def quantize_python(params: QuantizeParams, environ: Mapping[str, str] | None = None) -> Setting:
    return resolve("quantizer Python", "quantize.python", params.python, QUANTIZE_PYTHON_ENV,
                   str(DEFAULT_QUANTIZE_PYTHON), environ)


def vllm_url(params: ServeParams, environ: Mapping[str, str] | None = None) -> Setting:
    return resolve("engine URL", "serve.engine.url", params.engine.url, VLLM_URL_ENV, None, environ,
                   when_unset="`llmops serve` starts and supervises its own engines")


def sweep_storage(params: SweepParams, root: Path | None = None,
                  environ: Mapping[str, str] | None = None) -> Setting:
    """The Optuna study's database (`llmops sweep`): several workers pointed at one PostgreSQL
    database run trials of one study at once."""
    default = f"sqlite:///{(root or Path.cwd()).resolve() / DEFAULT_SWEEP_DB}"
    return resolve("sweep storage", "sweep.storage", params.storage, SWEEP_STORAGE_ENV, default, environ)


def all_settings(params: Params, root: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> list[Setting]:
    return [tracking_uri(params.tracking, root, environ), inference_log_url(params.inference_log, environ),
            dvc_remote(params.dvc_remote, environ), dvc_remote_endpoint(params.dvc_remote, environ),
            service_url(params.deploy, environ), api_token(params.serve, environ),
            vllm_python(params.serve, environ), vllm_url(params.serve, environ),
            sweep_storage(params.sweep, root, environ), quantize_python(params.quantize, environ)]


# --- the DVC remote --------------------------------------------------------------------------

def dvc_remote_commands(url: str | None, endpoint: str | None) -> list[list[str]]:
    """The `dvc` commands that make `url` the default remote in .dvc/config.local (git-ignored),
    or, with no url, drop that local default so .dvc/config's remote applies again."""
    if url is None:
        return [["remote", "default", "--local", "--unset"]]
    commands = [["remote", "add", "--local", "--force", "--default", DVC_REMOTE_NAME, url]]
    if endpoint:
        commands.append(["remote", "modify", "--local", DVC_REMOTE_NAME, "endpointurl", endpoint])
    return commands


def configure_dvc(root: Path, params: Params, environ: Mapping[str, str] | None = None) -> list[list[str]]:
    """Apply the resolved DVC remote to the checkout at `root`; return the commands run."""
    url = dvc_remote(params.dvc_remote, environ).value
    endpoint = dvc_remote_endpoint(params.dvc_remote, environ).value
    beside = Path(sys.executable).parent / "dvc"  # the dvc of this environment, whatever PATH says
    dvc = str(beside) if beside.exists() else "dvc"
    commands = dvc_remote_commands(url, endpoint)
    for args in commands:
        result = subprocess.run([dvc, *args], cwd=root, capture_output=True, text=True)
        if result.returncode != 0 and not (url is None and "not set" in result.stderr + result.stdout):
            raise LLMOpsError(f"`dvc {' '.join(args)}` failed in {root}: {(result.stderr or result.stdout).strip()}")
    return commands


def main(params: Params, configure_dvc_remote: bool = False) -> None:
    settings = all_settings(params)
    width = max(len(s.name) for s in settings)
    for setting in settings:
        print(f"{setting.name:<{width}}  {setting.shown():<60}  ({setting.where()})")
    if configure_dvc_remote:
        configure_dvc(Path.cwd(), params)
        remote = dvc_remote(params.dvc_remote).value
        print(f"DVC default remote: {hide_password(remote)} (in .dvc/config.local)" if remote
              else "DVC default remote: the one .dvc/config names (no local override)")
