"""Deployment settings: one rule for each (a non-null param, else the environment, else the default)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import settings
from pipelines.config.params import DeployParams, DvcRemoteParams, InferenceLogParams, ServeParams, TrackingParams
from pipelines.errors import LLMOpsError
from tests.support import REPO

# setting -> (function, params with the param set, env variable, embedded default)
CASES = {
    "tracking": (lambda p, env: settings.tracking_uri(p, Path("/srv/project"), env),
                 TrackingParams(uri="http://from-params:5000"), "MLFLOW_TRACKING_URI",
                 "sqlite:////srv/project/mlflow.db", TrackingParams()),
    "inference log": (settings.inference_log_url, InferenceLogParams(url="postgresql+psycopg2://p@h/params"),
                      "LLMOPS_INFERENCE_LOG_URL", "sqlite:///data/inference/inference.db", InferenceLogParams()),
    "DVC remote": (settings.dvc_remote, DvcRemoteParams(url="s3://from-params/store"), "LLMOPS_DVC_REMOTE", None,
                   DvcRemoteParams()),
    "DVC S3 endpoint": (settings.dvc_remote_endpoint, DvcRemoteParams(endpoint_url="http://params:9000"),
                        "LLMOPS_DVC_REMOTE_ENDPOINT", None, DvcRemoteParams()),
    "deploy target": (settings.service_url, DeployParams(service_url="http://params:8000"), "LLMOPS_SERVICE_URL",
                      None, DeployParams()),
}


@pytest.mark.parametrize("name", CASES)
def test_without_param_or_env_the_embedded_default_applies(name):
    resolve, _, _, default, unset = CASES[name]
    setting = resolve(unset, {})
    assert (setting.value, setting.source) == (default, "default" if default else "unset")


@pytest.mark.parametrize("name", CASES)
def test_the_environment_fills_a_null_param(name):
    resolve, _, env, _, unset = CASES[name]
    setting = resolve(unset, {env: "from-env://value"})
    assert (setting.value, setting.source, setting.env) == ("from-env://value", "env", env)


@pytest.mark.parametrize("name", CASES)
def test_a_param_that_is_set_wins_over_the_environment(name):
    resolve, params, env, _, _ = CASES[name]
    setting = resolve(params, {env: "from-env://value"})
    assert setting.source == "params"
    assert setting.value.startswith(("http://", "postgresql", "s3://"))
    assert "from-env" not in setting.value


@pytest.mark.parametrize("name", CASES)
def test_an_empty_environment_variable_counts_as_unset(name):
    resolve, _, env, default, unset = CASES[name]
    assert resolve(unset, {env: "  "}).value == default


def test_the_committed_params_leave_every_service_setting_to_the_environment():
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert data["tracking"]["uri"] is None
    assert data["inference_log"]["url"] is None
    assert data["dvc_remote"] == {"url": None, "endpoint_url": None}
    assert data["deploy"]["service_url"] is None
    assert data["serve"]["token_file"] is None and data["serve"]["token_env"] == "LLMOPS_API_TOKEN"


def test_token_comes_from_the_file_named_in_params_before_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file-0123456789\n")
    env = {"LLMOPS_API_TOKEN": "from-env-0123456789"}
    from_file = settings.api_token(ServeParams(token_file=token_file), env)
    assert (from_file.value, from_file.source) == ("from-file-0123456789", "params")
    from_env = settings.api_token(ServeParams(), env)
    assert (from_env.value, from_env.source) == ("from-env-0123456789", "env")
    other_name = settings.api_token(ServeParams(token_env="TEAM_TOKEN"), {"TEAM_TOKEN": "t" * 20, **env})
    assert other_name.value == "t" * 20
    unset = settings.api_token(ServeParams(), {})
    assert unset.value is None and "refuses to start" in unset.where()
    assert from_env.shown() == "(set, hidden)"


def test_a_token_file_that_does_not_exist_is_an_error_naming_it(tmp_path):
    with pytest.raises(LLMOpsError, match=r"serve.token_file .*missing does not exist"):
        settings.api_token(ServeParams(token_file=tmp_path / "missing"), {})


def test_passwords_never_show():
    assert settings.hide_password("postgresql+psycopg2://llmops:s3cr3t@db:5432/inference") == \
        "postgresql+psycopg2://llmops:***@db:5432/inference"
    assert settings.hide_password("http://mlflow:5000") == "http://mlflow:5000"
    setting = settings.inference_log_url(InferenceLogParams(), {"LLMOPS_INFERENCE_LOG_URL": "postgresql://u:pw@h/d"})
    assert "pw" not in setting.shown()


def test_the_stages_read_the_same_settings(monkeypatch, tmp_path):
    """tracking.py, the inference log and deploy go through pipelines/config/settings.py."""
    from pipelines.registry.tracking import resolve_tracking_uri
    from pipelines.serving.inference_log import InferenceLog

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-mlflow:5000")
    assert resolve_tracking_uri(TrackingParams()) == "http://env-mlflow:5000"
    assert resolve_tracking_uri(TrackingParams(uri="sqlite:////x/m.db")) == "sqlite:////x/m.db"
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("LLMOPS_INFERENCE_LOG_URL", url)
    log = InferenceLog.from_params(InferenceLogParams(spool_dir=tmp_path / "spool"))
    try:
        assert str(log.engine.url) == url
    finally:
        log.close()


def test_deploy_finds_the_service_in_the_environment(monkeypatch):
    from pipelines.serving import deploy

    monkeypatch.setenv("LLMOPS_SERVICE_URL", "http://serve:8000")
    assert settings.service_url(DeployParams()).value == "http://serve:8000"
    assert deploy.SERVICE_URL_ENV == "LLMOPS_SERVICE_URL"


def test_dvc_remote_commands():
    assert settings.dvc_remote_commands("s3://bucket/store", "http://minio:9000") == [
        ["remote", "add", "--local", "--force", "--default", "team", "s3://bucket/store"],
        ["remote", "modify", "--local", "team", "endpointurl", "http://minio:9000"],
    ]
    assert settings.dvc_remote_commands("/mnt/nfs/dvc", None) == [
        ["remote", "add", "--local", "--force", "--default", "team", "/mnt/nfs/dvc"]]
    assert settings.dvc_remote_commands(None, None) == [["remote", "default", "--local", "--unset"]]


def test_llmops_settings_configures_dvc_from_the_environment_and_back(tmp_path):
    bin_dir = Path(sys.executable).parent
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(bin_dir / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".dvc" / "config").write_text((REPO / ".dvc" / "config").read_text())
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "LLMOPS_DVC_REMOTE": "s3://llmops-dvc/store",
           "LLMOPS_DVC_REMOTE_ENDPOINT": "http://minio:9000",
           "LLMOPS_INFERENCE_LOG_URL": "postgresql+psycopg2://llmops:hunter2@db/inference"}

    def run(environ):
        result = subprocess.run([str(bin_dir / "llmops"), "settings", "--configure-dvc"], cwd=tmp_path, env=environ,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        default = subprocess.run([str(bin_dir / "dvc"), "remote", "default"], cwd=tmp_path, env=environ,
                                 capture_output=True, text=True, check=True).stdout.strip()
        return result.stdout, default

    out, default = run(env)
    assert default == "team"
    assert "hunter2" not in out and "llmops:***@db/inference" in out and "env: LLMOPS_INFERENCE_LOG_URL" in out
    local = (tmp_path / ".dvc" / "config.local").read_text()
    assert "s3://llmops-dvc/store" in local and "endpointurl = http://minio:9000" in local
    # Without the variable the committed .dvc/config's remote is the default again.
    _, default = run({k: v for k, v in env.items() if not k.startswith("LLMOPS_DVC")})
    assert default == "local"


def test_the_server_reads_its_token_by_the_same_rule_and_refuses_a_short_one(tmp_path, monkeypatch):
    from pipelines.serving.app import read_token

    token_file = tmp_path / "token"
    token_file.write_text("from-file-0123456789\n")
    monkeypatch.setenv("LLMOPS_API_TOKEN", "from-env-0123456789")
    assert read_token(ServeParams(token_file=token_file)) == "from-file-0123456789"
    assert read_token(ServeParams()) == "from-env-0123456789"
    monkeypatch.setenv("LLMOPS_API_TOKEN", "short")
    with pytest.raises(LLMOpsError, match="at least 16 characters.*LLMOPS_API_TOKEN"):
        read_token(ServeParams())


def test_every_deployment_setting_is_listed_as_one_no_run_may_change(tmp_path):
    """A new setting added to all_settings without an entry in DEPLOYMENT_SETTINGS would be
    overridable by a run's params: this fails first."""
    from pipelines.config.params import load_params, run_overridable

    params = load_params(REPO / "params.yaml")
    for setting in settings.all_settings(params, tmp_path, {}):
        assert setting.param in settings.DEPLOYMENT_SETTINGS, setting.param
        assert not run_overridable(setting.param), setting.param
        assert settings.DEPLOYMENT_SETTINGS[setting.param].startswith(setting.env), setting.param


def test_the_default_vllm_interpreter_is_beside_the_projects_virtualenv():
    from pipelines.config.settings import DEFAULT_VLLM_PYTHON

    assert (DEFAULT_VLLM_PYTHON.parents[2] / "pyproject.toml").is_file()  # .venv-vllm/bin/python at the root
