"""Command `settings`: where the services are (tracking, inference log, DVC remote, service, token), and why.

    llmops settings                   # every deployment setting, its value (passwords hidden), where it came from
    llmops settings --configure-dvc   # also make the resolved DVC remote the default in .dvc/config.local

The embedded default (one workstation: SQLite files, the local DVC remote `.dvc-storage/`)
and the team stack (docker/compose.yaml: PostgreSQL, MinIO, an MLflow server with auth, a
served model) run the same code and differ only in these settings. Every one is resolved by
the same rule, here and nowhere else:

    1. the value in params.yaml (or `--set` / `dvc exp run -S` for one run), when it is not null;
    2. else the environment variable;
    3. else the embedded default.

    setting            param                    environment variable          embedded default
    tracking           tracking.uri             MLFLOW_TRACKING_URI           sqlite:///<project>/mlflow.db
    inference log      inference_log.url        LLMOPS_INFERENCE_LOG_URL      sqlite:///data/inference/inference.db
    DVC remote         dvc_remote.url           LLMOPS_DVC_REMOTE             .dvc/config's default (.dvc-storage/)
    DVC S3 endpoint    dvc_remote.endpoint_url  LLMOPS_DVC_REMOTE_ENDPOINT    none (AWS S3 itself)
    deploy target      deploy.service_url       LLMOPS_SERVICE_URL            none: `deploy` records the intent
    serving token      serve.token_file         $<serve.token_env>            none: `serve` refuses to start
                                                (LLMOPS_API_TOKEN)
    engine Python      serve.engine.python      LLMOPS_VLLM_PYTHON            .venv-vllm/bin/python (make install)
    engine URL         serve.engine.url         LLMOPS_VLLM_URL               none: `serve` starts its engines

The Model Registry is the tracking server's (MLflow's own default: the registry URI is the
tracking URI), so `tracking` names both. The committed params.yaml leaves every one of these
null, so a deployment's environment decides; a value written in params.yaml is a visible,
versioned decision that wins. Why not the environment first: MLflow writes
MLFLOW_TRACKING_URI into the process environment whenever a tracking URI is set, so an
environment-first rule would let one store's URI override an explicit param later in the
same process.

These are deployment settings, never run parameters: a run (`llmops experiment start`, so
every Airflow run and its trigger form) cannot change any of them, nor anything else outside
params.RUN_OVERRIDABLE, and is refused with the variable to set instead (DEPLOYMENT_SETTINGS).
Otherwise whoever may trigger a run could send the serving token and the MLflow credentials
to a host of their choosing. A value committed to params.yaml stays readable (a reviewed
change, by people who can change the code anyway; test projects and benchmarks use it), and
`--set` on the command line is for someone who already holds the workspace.

Secrets are never params: the token comes from the file `serve.token_file` names or from the
variable `serve.token_env` names, and database or S3 passwords travel in the environment
(a URL in LLMOPS_INFERENCE_LOG_URL, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD).
"""

from pipelines.config.settings import main

__all__ = ["main"]
