"""Airflow cluster policy of the team stack: the GPU stages go to the GPU worker's Celery queue.

The DAGs in dags/ name no queue, so they run unchanged under any executor; this file, installed
as $AIRFLOW_HOME/config/airflow_local_settings.py in the airflow image (docker/airflow.Dockerfile),
routes the tasks listed in LLMOPS_GPU_TASKS (default: train and evaluate of llmops_training) to the
queue LLMOPS_GPU_QUEUE (default: gpu), which only the `trainer` service consumes
(`airflow celery worker --queues gpu`). Every other task stays on the default queue of the CPU
worker. Applied when the dag-processor parses a DAG; tested in tests/unit/test_docker.py.
"""

from __future__ import annotations

import os

TRAINING_DAG = "llmops_training"


def gpu_tasks() -> set[str]:
    return {name.strip() for name in os.environ.get("LLMOPS_GPU_TASKS", "train,evaluate").split(",") if name.strip()}


def task_policy(task) -> None:  # noqa: ANN001 - Airflow's BaseOperator; not imported here (parse time)
    if task.dag_id == TRAINING_DAG and task.task_id in gpu_tasks():
        task.queue = os.environ.get("LLMOPS_GPU_QUEUE", "gpu")
