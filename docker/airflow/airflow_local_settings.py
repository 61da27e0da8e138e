"""Airflow cluster policy of the team stack: the GPU stages go where the GPUs are.

The DAGs in dags/ name no queue or executor, so they run unchanged on a workstation
(`llmops airflow`); this file, installed as $AIRFLOW_HOME/config/airflow_local_settings.py in the
airflow image (docker/airflow.Dockerfile), routes the tasks listed in LLMOPS_GPU_TASKS (default:
train, evaluate and quantize of llmops_training):

* to the executor LLMOPS_GPU_EXECUTOR when it is set, e.g. `KubernetesExecutor` next to the
  Celery one (AIRFLOW__CORE__EXECUTOR=CeleryExecutor,KubernetesExecutor: Airflow's multiple
  executors), whose pod template asks for GPUs (docs/scaling.md);
* else to the Celery queue LLMOPS_GPU_QUEUE (default: gpu), which only the `trainer` service of
  docker/compose.yaml consumes (`airflow celery worker --queues gpu`).

Every other task keeps the default executor and queue. Applied by the dag-processor when it
parses a DAG; tested in tests/unit/test_docker.py.
"""

from __future__ import annotations

import os

TRAINING_DAG = "llmops_training"


def gpu_tasks() -> set[str]:
    names = os.environ.get("LLMOPS_GPU_TASKS", "train,evaluate,quantize").split(",")
    return {name.strip() for name in names if name.strip()}


def task_policy(task) -> None:  # noqa: ANN001 - Airflow's BaseOperator; not imported here (parse time)
    if task.dag_id != TRAINING_DAG or task.task_id not in gpu_tasks():
        return
    executor = os.environ.get("LLMOPS_GPU_EXECUTOR", "").strip()
    if executor:
        task.executor = executor
    else:
        task.queue = os.environ.get("LLMOPS_GPU_QUEUE", "gpu")
