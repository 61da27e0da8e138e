"""Stage `register`: log the candidate as an MLflow model and register it with its evidence.

Reads   the base model folder and its source.json (licence, hash), the trained adapter,
        reports/train/metrics.json (training run id), reports/evaluate/results.json,
        reports/validate/metrics.json, dvc.lock (data hashes), params.yaml, params
        `registry`.
Writes  a new version of `registry.model_name` in the MLflow Model Registry: the pyfunc
        model (merged weights + adapter + prompt format, see pipelines/model/packaging.py; the
        serving engine loads the merged weights), logged from code with no pickle, to the
        training run, with a signature and an input example; version tags holding the
        evidence (the commit, and which tracked files differed from it: pipeline outputs such
        as dvc.lock do not count); a markdown model card as its description; alias
        `challenger`; status `candidate` and history event 1 (pipelines/registry/model_registry.py). The
        validation's Data Docs go to the same run (`validation/data_docs/`), which the card
        links as a `runs:/` URI; the registered model gets a description and tags. The
        training run is reopened for this and keeps its own duration.
        Locally: `paths.reports_dir`/register/version.json (version, run id, model URI).
Run     `llmops register` or `dvc repro register`.
"""

from pipelines.config.params import Params
from pipelines.io import atomic_write_json
from pipelines.registry.registration import register


def main(params: Params) -> None:
    record = register(params)
    atomic_write_json(params.paths.report("registered_version"), record)
