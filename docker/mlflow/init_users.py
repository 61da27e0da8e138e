"""One-off set-up of the MLflow server's users and permissions (the mlflow-init service; safe to run again).

The server runs MLflow's basic-auth app with `default_permission = NO_PERMISSIONS`
(docker/mlflow/entrypoint.sh): a user sees and changes only what it is granted. This script,
run with the admin account, makes the two service accounts of the team stack:

    user (docker/.env)      used by                                  may
    MLFLOW_PIPELINE_USER    the Airflow workers and the trainer      MANAGE the experiments it creates
                            (train, evaluate, register, promote,     and the registered model: runs,
                            rollback, monitor)                       versions, aliases, tags
    MLFLOW_SERVE_USER       serve (`llmops serve`)                   READ the registered model and the
                                                                     experiment holding its artifacts;
                                                                     nothing else, no write anywhere

The admin account is for people and for this script only: no service holds it. Passwords are set
from the environment on every run, so rotating one is: change docker/.env, rerun mlflow-init,
restart the service.

The experiment (LLMOPS_EXPERIMENT, params.yaml `tracking.experiment`) and the registered model
(LLMOPS_MODEL_NAME, `registry.model_name`) are created here, by the pipeline user (so it owns them,
as it would had the first run created them), because a grant names an existing experiment id.
The registry's promotion lock (`<model>--promotion-lock`, pipelines/registry/model_registry.py) is denied to the
serving user, so it cannot block promotions by creating it.

Environment: MLFLOW_TRACKING_URI, MLFLOW_ADMIN_USER / MLFLOW_ADMIN_PASSWORD, MLFLOW_PIPELINE_USER /
MLFLOW_PIPELINE_PASSWORD, MLFLOW_SERVE_USER / MLFLOW_SERVE_PASSWORD, LLMOPS_EXPERIMENT,
LLMOPS_MODEL_NAME. Uses the REST API only (requests, which MLflow depends on).
"""

from __future__ import annotations

import os
import sys
import time

import requests

TIMEOUT = 30


class Setup:
    def __init__(self, uri: str, admin: tuple[str, str]) -> None:
        self.uri = uri.rstrip("/")
        self.admin = admin

    def call(self, method: str, path: str, auth: tuple[str, str], ok: tuple[int, ...] = (200,), **kwargs):
        response = requests.request(method, f"{self.uri}{path}", auth=auth, timeout=TIMEOUT, **kwargs)
        if response.status_code not in ok:
            raise SystemExit(f"mlflow-init: {method} {path} as {auth[0]}: HTTP {response.status_code} "
                             f"{response.text[:300]}")
        return response

    def user(self, name: str, password: str) -> None:
        """The user exists with this password (created, or its password set again)."""
        found = self.call("GET", "/api/2.0/mlflow/users/get", self.admin, ok=(200, 404), params={"username": name})
        if found.status_code == 404:
            self.call("POST", "/api/2.0/mlflow/users/create", self.admin, json={"username": name, "password": password})
        else:
            self.call("PATCH", "/api/2.0/mlflow/users/update-password", self.admin,
                      json={"username": name, "password": password})

    def grant(self, user: str, resource_type: str, resource_id: str, permission: str) -> None:
        """The user holds exactly `permission` on the resource (a grant made earlier, or the MANAGE
        MLflow gives a creator, is replaced: the API has grant and revoke, no update)."""
        body = {"username": user, "resource_type": resource_type, "resource_id": resource_id}
        granted = self.call("POST", "/api/3.0/mlflow/users/permissions/grant", self.admin, ok=(200, 400),
                            json={**body, "permission": permission})
        if granted.status_code == 400:
            if granted.json().get("error_code") != "RESOURCE_ALREADY_EXISTS":
                raise SystemExit(f"mlflow-init: granting {permission} on {resource_type} {resource_id} to {user}: "
                                 f"{granted.text[:300]}")
            self.call("POST", "/api/3.0/mlflow/users/permissions/revoke", self.admin, json=body)
            self.call("POST", "/api/3.0/mlflow/users/permissions/grant", self.admin,
                      json={**body, "permission": permission})

    def experiment(self, name: str, owner: tuple[str, str]) -> str:
        """The experiment's id, created by `owner` when it does not exist yet."""
        found = self.call("GET", "/api/2.0/mlflow/experiments/get-by-name", self.admin, ok=(200, 404),
                          params={"experiment_name": name})
        if found.status_code == 200:
            return found.json()["experiment"]["experiment_id"]
        return self.call("POST", "/api/2.0/mlflow/experiments/create", owner, json={"name": name}).json()[
            "experiment_id"]

    def registered_model(self, name: str, owner: tuple[str, str]) -> None:
        found = self.call("GET", "/api/2.0/mlflow/registered-models/get", self.admin, ok=(200, 404),
                          params={"name": name})
        if found.status_code == 404:
            self.call("POST", "/api/2.0/mlflow/registered-models/create", owner, json={"name": name})

    def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                if requests.get(f"{self.uri}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"mlflow-init: {self.uri} did not answer within {seconds:.0f} s")
            time.sleep(2)


def required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise SystemExit(f"mlflow-init: set {name} (docker/.env)")
    return value


def main() -> int:
    setup = Setup(required("MLFLOW_TRACKING_URI"), (required("MLFLOW_ADMIN_USER"), required("MLFLOW_ADMIN_PASSWORD")))
    pipeline = (required("MLFLOW_PIPELINE_USER"), required("MLFLOW_PIPELINE_PASSWORD"))
    serve = (required("MLFLOW_SERVE_USER"), required("MLFLOW_SERVE_PASSWORD"))
    experiment_name = os.environ.get("LLMOPS_EXPERIMENT") or "llmops"
    model = os.environ.get("LLMOPS_MODEL_NAME") or "llmops-dictionary"
    setup.wait(float(os.environ.get("MLFLOW_INIT_WAIT_SECONDS", "300")))

    setup.user(*pipeline)
    setup.user(*serve)
    experiment_id = setup.experiment(experiment_name, pipeline)
    setup.registered_model(model, pipeline)
    # Explicit grants as well: the experiment or the model may predate this script (made by admin).
    setup.grant(pipeline[0], "experiment", experiment_id, "MANAGE")
    setup.grant(pipeline[0], "registered_model", model, "MANAGE")
    setup.grant(serve[0], "experiment", experiment_id, "READ")
    setup.grant(serve[0], "registered_model", model, "READ")
    setup.grant(serve[0], "registered_model", f"{model}--promotion-lock", "DENY")
    print(f"mlflow-init: users {pipeline[0]} (MANAGE) and {serve[0]} (READ) on experiment "
          f"'{experiment_name}' ({experiment_id}) and registered model '{model}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
