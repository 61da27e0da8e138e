"""`llmops experiment start`: a run's params as DVC overrides on the committed params.yaml, only
the run parameters (params.RUN_OVERRIDABLE), one run at a time per workspace.

`experiment save` needs the outputs of a whole run: tests/integration/test_airflow.py checks it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from pipelines.errors import ParamsError
from pipelines.registry.experiments import DVC_WORKSPACE_RUN, STATE, ExperimentError, OverrideRefused, end, save, start
from tests.support import commit, make_project


@pytest.fixture
def repo(tmp_path):
    project = make_project(tmp_path / "project")
    commit(project, "init")
    return project


def params(project) -> dict:
    return yaml.safe_load((project.root / "params.yaml").read_text())


def test_start_applies_overrides_to_head_and_validates(repo):
    head = (repo.root / "params.yaml").read_text()
    start(repo.root, "run-1", ["train.max_steps=7", "base_model.source='org/model'"])
    assert params(repo)["train"]["max_steps"] == 7 and params(repo)["base_model"]["source"] == "org/model"
    assert "# Every tunable value" in (repo.root / "params.yaml").read_text()  # DVC's writer keeps comments
    end(repo.root, "run-1")
    # the next run starts from HEAD again, not from the last run's overrides
    start(repo.root, "run-2", ["train.learning_rate=0.001"])
    assert params(repo)["train"]["max_steps"] == yaml.safe_load(head)["train"]["max_steps"]
    assert params(repo)["train"]["learning_rate"] == 0.001
    end(repo.root, "run-2")
    start(repo.root, "run-3", [])
    assert (repo.root / "params.yaml").read_text() == head
    assert json.loads((repo.root / STATE).read_text())["name"] == "run-3"


@pytest.mark.parametrize(("override", "message"), [
    ("train.max_steps=0", "train.max_steps: Input should be greater than 0 (got 0)"),
    ("train.max_steps=[1", "is not valid `dvc exp run -S` syntax"),
    ("train.no_such_key=1", "no_such_key"),
])
def test_a_bad_override_fails_before_anything_changes(repo, override, message):
    before = (repo.root / "params.yaml").read_text()
    with pytest.raises(ParamsError) as caught:
        start(repo.root, "bad", [override])
    assert message in str(caught.value)
    assert str(repo.root / ".dvc" / "tmp") not in str(caught.value)  # names params.yaml, not a temp file
    assert (repo.root / "params.yaml").read_text() == before
    assert not list((repo.root / ".dvc" / "tmp").glob("tmp*"))


def test_uncommitted_edits_are_never_overwritten(repo):
    path = repo.root / "params.yaml"
    path.write_text(path.read_text() + "\n# my edit\n")
    with pytest.raises(ExperimentError, match="edits that are not committed") as caught:
        start(repo.root, "run", ["train.max_steps=7"])
    assert "git stash" in str(caught.value)
    assert path.read_text().endswith("# my edit\n")
    # what an earlier run wrote is not a user's edit
    path.write_text(path.read_text().replace("\n# my edit\n", ""))
    start(repo.root, "run", ["train.max_steps=7"])
    end(repo.root, "run")
    start(repo.root, "run-2", ["train.max_steps=8"])
    assert params(repo)["train"]["max_steps"] == 8


def test_start_needs_a_commit(tmp_path):
    project = make_project(tmp_path / "project")  # git init, nothing committed
    with pytest.raises(ExperimentError, match="is not committed to git.*git commit"):
        start(project.root, "run", [])


# --- what a run may change ---------------------------------------------------------------

def assert_unchanged(repo, before: str) -> None:
    assert (repo.root / "params.yaml").read_text() == before
    assert not (repo.root / STATE).exists()  # the workspace was not taken


@pytest.mark.parametrize(("override", "message"), [
    # a service endpoint or credential: where the worker's environment sets it instead
    ("tracking.uri=http://attacker.invalid:5000", "tracking.uri is a deployment setting, not a run parameter: "
                                                  "set MLFLOW_TRACKING_URI in the environment of the workers"),
    ("deploy.service_url=http://attacker.invalid", "deploy.service_url is a deployment setting, not a run parameter: "
                                                   "set LLMOPS_SERVICE_URL"),
    ("serve.token_file=/etc/hostname", "serve.token_file is a deployment setting"),
    ("serve.token_env=HOME", "serve.token_env is a deployment setting"),
    ("inference_log.url=sqlite:////tmp/x.db", "set LLMOPS_INFERENCE_LOG_URL"),
    ("dvc_remote.url=s3://attacker/store", "set LLMOPS_DVC_REMOTE"),
    ("serve.engine.python=/tmp/evil", "set LLMOPS_VLLM_PYTHON"),
    ("~tracking", "tracking.uri is a deployment setting"),  # deleting the section is a change too
    # the layout and the gates: a commit, not a run
    ("paths.raw_dir=/etc", "paths.raw_dir is the project's layout, not a run parameter"),
    ("train.adapter_dir=/tmp/elsewhere", "train.adapter_dir is the project's layout"),
    ("promote.min_improvement=-1", "promote.min_improvement is not a run parameter"),
    ("validate.min_rows=1", "validate.min_rows is not a run parameter"),
    ("registry.model_name=other", "registry.model_name is not a run parameter"),
    ("train.deepspeed.hostfile=/tmp/hosts", "train.deepspeed.hostfile is not a run parameter"),
    # the spelling does not matter: the result is compared with HEAD key by key
    ("train={max_steps:3,adapter_dir:/tmp/x}", "train.adapter_dir is the project's layout"),
])
def test_a_run_cannot_change_what_is_not_a_run_parameter(repo, override, message):
    before = (repo.root / "params.yaml").read_text()
    with pytest.raises(OverrideRefused) as caught:
        start(repo.root, "run", ["train.max_steps=7", override])
    assert message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value) and "refused" in str(caught.value)
    assert_unchanged(repo, before)


def test_every_run_parameter_may_still_be_set(repo):
    (repo.root / "data" / "raw" / "new.jsonl").write_text('{"prompt": "a word", "response": "a meaning"}\n')
    start(repo.root, "run", ["train.lora.r=16", "train.learning_rate=0.001", "prepare.seed=7",
                             "base_model.revision=main", "base_model.dtype=bfloat16",
                             "ingest.sources=[{kind:bundled,name:foldoc},{kind:file,path:'data/raw/new.jsonl'}]"])
    data = params(repo)
    assert data["train"]["lora"]["r"] == 16 and data["prepare"]["seed"] == 7
    assert data["ingest"]["sources"][1] == {"kind": "file", "path": "data/raw/new.jsonl"}


@pytest.mark.parametrize("path", ["/etc/hostname", "../outside.jsonl", "data/raw/../../params.yaml",
                                  "data/raw/link.jsonl", "data/ingested/pairs.jsonl"])
def test_a_file_source_must_resolve_inside_the_data_folders(repo, tmp_path, path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"prompt": "secret", "response": "data"}\n')
    (repo.root / "data" / "raw" / "link.jsonl").symlink_to(outside)  # inside by name, outside in fact
    before = (repo.root / "params.yaml").read_text()
    with pytest.raises(OverrideRefused, match=r"ingest.sources\[0\].path .* is outside the project's data folders: "
                                              r"copy the file under data/raw/ or data/sample/"):
        start(repo.root, "run", [f"ingest.sources=[{{kind:file,path:'{path}'}}]"])
    assert_unchanged(repo, before)


def test_a_review_source_reads_only_a_folder_of_the_project(repo):
    before = (repo.root / "params.yaml").read_text()
    with pytest.raises(OverrideRefused, match=r"ingest.sources\[1\].path / is outside the project's data folders: "
                                              r"name data/feedback/ \(or leave path out\), data/raw/ or data/sample/"):
        start(repo.root, "run", ["ingest.sources=[{kind:bundled,name:wordnet},{kind:review,path:'/'}]"])
    assert_unchanged(repo, before)
    start(repo.root, "run", ["ingest.sources=[{kind:bundled,name:wordnet},{kind:review},"
                             "{kind:review,path:data/feedback}]"])
    assert params(repo)["ingest"]["sources"][1:] == [{"kind": "review"}, {"kind": "review", "path": "data/feedback"}]


def test_hf_sources_and_base_models_from_a_run_stay_inside_the_project(repo, tmp_path):
    before = (repo.root / "params.yaml").read_text()
    with pytest.raises(OverrideRefused, match=r"data_files /etc/hostname is outside the project's data folders"):
        start(repo.root, "run", ["ingest.sources=[{kind:hf,name:json,data_files:['/etc/hostname']}]"])
    with pytest.raises(OverrideRefused, match=r"name /etc is a local folder outside the project's data folders"):
        start(repo.root, "run", ["ingest.sources=[{kind:hf,name:'/etc'}]"])
    with pytest.raises(OverrideRefused, match=r"base_model.source .* is a local folder outside the project"):
        start(repo.root, "run", [f"base_model.source='{tmp_path}'"])
    assert_unchanged(repo, before)
    start(repo.root, "run", ["ingest.sources=[{kind:hf,name:'org/dataset'}]", "base_model.source='org/model'"])


def test_the_cli_refusal_is_one_line_naming_the_variable(repo):
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "experiment", "start", "--name", "run",
                             "-S", "deploy.service_url=http://attacker.invalid"], cwd=repo.root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "deploy.service_url is a deployment setting" in line and "LLMOPS_SERVICE_URL" in line


# --- one run at a time -------------------------------------------------------------------

def test_a_second_run_is_refused_until_the_first_ends(repo):
    start(repo.root, "run-1", ["train.max_steps=7"])
    written = (repo.root / "params.yaml").read_text()
    with pytest.raises(ExperimentError, match=r"orchestrated run run-1 \(started .* on .*\) has not ended in .*"
                                              r"`llmops experiment end --name run-1`"):
        start(repo.root, "run-2", ["train.max_steps=8"])
    assert (repo.root / "params.yaml").read_text() == written  # run-1's params stay
    start(repo.root, "run-1", ["train.max_steps=7"])  # the same run again (a retried task) is not refused
    assert end(repo.root, "run-2") is False  # another run's end never frees the workspace
    with pytest.raises(ExperimentError, match="has not ended"):
        start(repo.root, "run-2", [])
    assert end(repo.root, "run-1") is True
    assert end(repo.root, "run-1") is False  # idempotent
    start(repo.root, "run-2", ["train.max_steps=8"])
    assert params(repo)["train"]["max_steps"] == 8


def _dvc_exp_run_record(repo, pid: int) -> None:
    path = repo.root / DVC_WORKSPACE_RUN
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "stdin": None, "stdout": None, "stderr": None, "returncode": None}))


def test_start_is_refused_while_dvc_exp_run_runs_in_the_workspace(repo):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _dvc_exp_run_record(repo, sleeper.pid)  # what `dvc exp run` writes while it runs here
        before = (repo.root / "params.yaml").read_text()
        with pytest.raises(ExperimentError, match=rf"`dvc exp run` \(pid {sleeper.pid}\) is running in "):
            start(repo.root, "run", ["train.max_steps=7"])
        assert_unchanged(repo, before)
    finally:
        sleeper.kill()
        sleeper.wait()
    start(repo.root, "run", ["train.max_steps=7"])  # its pid is gone: a stale record
    assert params(repo)["train"]["max_steps"] == 7


def test_start_is_refused_while_a_dvc_command_holds_the_repository_lock(repo):
    # DVC's own lock, taken by DVC's own code in another process (what `dvc repro` holds)
    code = ("import sys, time; from dvc.repo import Repo, lock_repo\n"
            "with Repo(sys.argv[1]) as repo, lock_repo(repo):\n    print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(repo.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (repo.root / "params.yaml").read_text()
        began = time.monotonic()
        with pytest.raises(ExperimentError, match=rf"a DVC command \(pid {holder.pid}\) holds the repository lock"):
            start(repo.root, "run", ["train.max_steps=7"])
        assert time.monotonic() - began < 30
        assert_unchanged(repo, before)
    finally:
        holder.kill()
        holder.wait()
    start(repo.root, "run", ["train.max_steps=7"])


def test_save_refuses_params_that_changed_during_the_run(repo):
    start(repo.root, "run", ["train.max_steps=7"])
    path = repo.root / "params.yaml"
    path.write_text(path.read_text().replace("max_steps: 7", "max_steps: 9"))  # e.g. someone's `dvc exp run -S`
    with pytest.raises(ExperimentError, match=r"is not what `llmops experiment start --name run` wrote.*not saved "
                                              r"as run"):
        save(repo.root, "run")

