"""Production answers become training data, through a real Label Studio (the `label_studio` fixture):
a drifted monitor window with an inference log -> correction tasks -> a reviewer's annotations
through the tool's API -> `export` (blocked on an empty correction, then written and `dvc add`ed in
a real DVC repository, idempotent, a deleted task withdrawn) -> `ingest` with `{kind: review}`."""

from __future__ import annotations

import subprocess
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from tests.support import BIN
from tests.unit.test_review_corrections import write_monitor_outputs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

END = datetime(2026, 12, 6, tzinfo=UTC)
PROMPTS = ['What does the computing term "daemon" mean?', 'What does the computing term "kernel" mean?',
           'What does the computing term "shell" mean?', 'What does the computing term "widget" mean?',
           'Define the word "cat".']  # the last one the training data answers already: not sent


def production_log(root) -> str:
    """A drifted day of requests as `llmops serve` logs them, one with a thumbs down."""
    from pipelines.serving.inference_log import Feedback, InferenceLog, InferenceRecord

    url = f"sqlite:///{root / 'inference.db'}"
    log = InferenceLog(url, root / "spool")
    log.start()
    for n, prompt in enumerate(PROMPTS):
        at = END - timedelta(hours=10 - n)
        log.record(InferenceRecord(f"req-{n}", at, "chat.completions", "m", "3", prompt, f"a wrong answer {n}", 200,
                                   12.0, 8, 4))
    log.feedback(Feedback("req-1", END - timedelta(hours=5), score=0.0, comment="not what a kernel is"))
    assert log.flush(10)
    log.close()
    return url


def test_flagged_answers_are_reviewed_exported_and_ingested(tmp_path, label_studio):
    from pipelines.config.params import ReviewSource, load_params
    from pipelines.data.sources import SCHEMA, ingest
    from pipelines.errors import DataError
    from pipelines.review import corrections
    from pipelines.review.labelstudio import LabelStudio, choice, text
    from tests.support import REPO

    # a DVC repository for the dataset, as the project is one
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True)
    pd.DataFrame({"prompt": [PROMPTS[-1]], "response": ["A small domesticated feline."]}).to_parquet(
        tmp_path / "pairs.parquet")
    write_monitor_outputs(tmp_path / "reports", [(END - timedelta(days=1), False, []), (END, True, [])])
    params = load_params(REPO / "params.yaml", [
        f"review.url={label_studio.url}", f"review.data_dir={label_studio.data_dir}",
        f"review.corrections_project=corrections-{uuid.uuid4().hex[:8]}",
        f"inference_log.url={production_log(tmp_path)}", f"inference_log.spool_dir={tmp_path / 'spool'}",
        f"monitor.reports_dir={tmp_path / 'reports'}", f"paths.ingested={tmp_path / 'pairs.parquet'}",
        f"paths.feedback_dir={repo / 'data' / 'feedback'}"])

    sent = corrections.request(params)
    assert (sent["windows"], sent["created"]) == (1, 4)
    assert corrections.request(params)["created"] == 0  # sending again adds nothing
    client = label_studio.client
    tasks = {t["meta"]["request_id"]: t for t in client.tasks(sent["project_id"])}
    assert sorted(tasks) == ["req-0", "req-1", "req-2", "req-3"]
    assert tasks["req-1"]["data"]["feedback"] == "0 (thumbs down): not what a kernel is"
    assert tasks["req-1"]["data"]["flags"] == "drifted window 2026-12-06T00:00Z"
    assert tasks["req-1"]["meta"]["window"] == END.isoformat() and tasks["req-1"]["meta"]["flags"] == ["drift"]

    # a reviewer of their own answers each task in the labeling view (here: through the same API)
    person = client.create_user(f"fixer-{uuid.uuid4().hex[:6]}@example.org", "corrections-pass-2026")
    reviewer = LabelStudio(client.url, person["token"])
    reviewer.annotate(tasks["req-0"]["id"], [choice("verdict", "Approve answer", "answer")])
    reviewer.annotate(tasks["req-1"]["id"], [choice("verdict", "Corrected", "answer"),
                                             text("correction", "The core of an operating system.", "answer")])
    reviewer.annotate(tasks["req-2"]["id"], [choice("verdict", "Reject prompt", "answer")])
    reviewer.annotate(tasks["req-3"]["id"], [choice("verdict", "Corrected", "answer")])  # forgot the text

    with pytest.raises(DataError, match=rf"task {tasks['req-3']['id']} \(request req-3\): the correction is empty"):
        corrections.export(params)
    path = params.paths.feedback_dir / corrections.CORRECTIONS_FILE
    assert not path.exists()  # blocked: nothing written
    reviewer.annotate(tasks["req-3"]["id"], [choice("verdict", "Corrected", "answer"),
                                             text("correction", "A user-interface element.", "answer")])
    summary = corrections.export(params)
    assert (summary["rows"], summary["added"], summary["rejected"]) == (3, 3, 1)
    assert summary["dvc_file"] == "data/feedback/corrections.parquet.dvc" and (repo / summary["dvc_file"]).exists()
    rows = pd.read_parquet(path).set_index("request_id")
    assert rows.loc["req-1", "response"] == "The core of an operating system."
    assert rows.loc["req-1", "rejected"] == "a wrong answer 1" and rows.loc["req-0", "rejected"] is None
    # the real export: completed_by is the reviewer's user id, reviewed_at Label Studio's timestamp
    assert set(rows["reviewer"]) == {str(person["id"])} and rows["reviewed_at"].str.startswith("20").all()
    assert set(rows["task_id"]) == {tasks[r]["id"] for r in ("req-0", "req-1", "req-3")}
    assert set(rows["window"]) == {END.isoformat()}

    dvc_file = (repo / summary["dvc_file"]).read_text()
    again = corrections.export(params)  # the same export twice: nothing added, the same data version
    assert not again["changed"] and again["unchanged"] == 3 and (repo / summary["dvc_file"]).read_text() == dvc_file

    client.delete_task(tasks["req-0"]["id"])  # deleted in the tool: its row is withdrawn
    gone = corrections.export(params)
    assert gone["deleted"] == [tasks["req-0"]["id"]] and gone["withdrawn"] == 1 and gone["rows"] == 2
    assert (repo / summary["dvc_file"]).read_text() != dvc_file  # a new data version

    frame, metrics = ingest([ReviewSource(kind="review")], params.paths.sample_dir, params.paths.feedback_dir)
    assert list(frame.columns) == SCHEMA and metrics["rows_by_source"] == {"review": 2}
    assert set(frame["source"]) == {"review"} and frame["rejected"].notna().all()
    reviewer.close()
