"""A candidate's blind A/B review through a real Label Studio and a real `mlflow server`: request
(test and production prompts, answers of the candidate and of its opponent), reviewers answering
through the tool's API, collect, and the promote gate in required mode waiting, then deciding."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support import Workspace, build_tiny_base, evaluation, register, require

ARTIFACTS = Path(os.environ.get("LLMOPS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_base(tmp_path_factory.mktemp("base") / "base", tiny_tokenizer_dir)


def production_log(root):
    """An inference log with three answered requests and one error, as `llmops serve` writes it."""
    from pipelines.serving.inference_log import InferenceLog, InferenceRecord

    url = f"sqlite:///{root / 'inference.db'}"
    log = InferenceLog(url, root / "spool")
    log.start()
    now = datetime.now(UTC)
    for i, (prompt, status) in enumerate([('What does the noun "kernel" mean?', 200),
                                          ('What does the noun "daemon" mean?', 200),
                                          ('What does the noun "daemon" mean?', 200),  # asked twice: sent once
                                          ('What does the noun "shell" mean?', 500)]):
        log.record(InferenceRecord(f"req-{i}", now - timedelta(hours=i + 1), "chat.completions", "m", "1", prompt,
                                   "an answer" if status == 200 else "", status, 10.0, 5, 2))
    log.close()
    return url


def logged(uri, results):
    """evaluate's results as `register` finds them, and in an MLflow run as `llmops evaluate` logs them
    (the review DAG gates again with the evaluation the version was registered with)."""
    from mlflow import MlflowClient

    # the client, not mlflow's global active run/experiment (another module's server may be cached there)
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run("0")  # the Default experiment every server has
    client.log_dict(run.info.run_id, results, "evaluation/results.json")
    client.set_terminated(run.info.run_id)
    return {**results, "mlflow_run_id": run.info.run_id}


def answer_all(client, project, prefer, reviewers):
    """Each reviewer answers every task as a person would in the labeling view (by the label, A or
    B); `prefer` says which system this scripted stand-in likes, read from the recorded order."""
    from pipelines.review.labelstudio import LabelStudio, choice

    for reviewer in reviewers:
        as_reviewer = LabelStudio(client.url, reviewer["token"])
        for task in client.tasks(project):
            side = "A" if task["meta"]["a"] == prefer else "B"
            as_reviewer.annotate(task["id"], [choice("preference", side)])
        as_reviewer.close()


def test_required_review_waits_for_people_then_promotes_or_rejects(tmp_path, tiny_base, tiny_prepared_dir,
                                                                   mlflow_server, label_studio):
    from pipelines.registry.model_registry import STATUS_TAG, Registry
    from pipelines.registry.promotion import apply
    from pipelines.review import candidate

    model_name = f"review-{uuid.uuid4().hex[:8]}"
    ws = Workspace(tmp_path, tiny_base, mlflow_server.uri, model_name)
    log_url = production_log(tmp_path)
    review = [f"review.url={label_studio.url}", f"review.data_dir={label_studio.data_dir}",
              f"paths.prepared_dir={tiny_prepared_dir}", f"inference_log.url={log_url}",
              "review.candidate.test_prompts=3", "review.candidate.production_prompts=5",
              "review.candidate.max_new_tokens=6", "promote.human_review=required", "promote.min_reviews=8",
              "promote.min_win_rate_low=0.5", f"review.candidate_project=cand-{model_name}"]
    version = register(ws, logged(mlflow_server.uri, evaluation(0.02)))
    params = ws.params(*review)
    registry = Registry(params)

    # request: 3 test prompts + the 2 distinct answered production prompts, vs the base model
    sent = candidate.request(params)
    assert (sent["version"], sent["new_tasks"], sent["tasks"]) == (version, 5, 5)
    assert candidate.request(params)["new_tasks"] == 0  # sending again adds nothing
    client = label_studio.client
    tasks = client.tasks(sent["project_id"])
    sources = sorted(t["meta"]["source"] for t in tasks)
    assert sources == ["production"] * 2 + ["test"] * 3
    assert {t["data"]["prompt"] for t in tasks if t["meta"]["source"] == "production"} == {
        'What does the noun "kernel" mean?', 'What does the noun "daemon" mean?'}
    for t in tasks:  # the labeling view shows two answers and nothing that names the systems
        assert set(t["data"]) == {"prompt", "answer_a", "answer_b"} and t["meta"]["opponent"] == "base model"

    # the gate with no judgements yet: not promoted, awaiting review, said on the card
    decision = apply(params, evaluation(0.02), version)
    assert not decision.promoted and "0 of 8 human judgements" in " ".join(decision.reasons)
    assert registry.version(version).tags[STATUS_TAG] == "awaiting-review"
    assert "AWAITING HUMAN REVIEW" in registry.version(version).description
    assert candidate.decide(params)["status"] == "awaiting-review"  # the review DAG: still waiting

    # two reviewers prefer the candidate on every task: 10 judgements, clear preference
    second = client.create_user(f"ann-{model_name}@example.org", "reviewer-pass-2026")
    admin = {"token": label_studio.token}
    answer_all(client, sent["project_id"], "candidate", [admin, second])
    result = candidate.decide(params)
    assert result["promoted"] and result["status"] == "champion"
    tags = registry.version(version).tags
    assert tags["review.judgements"] == "10" and tags["review.reviewers"] == "2"
    assert float(tags["review.win_rate"]) == 1.0 and tags["review.agreement_tasks"] == "5"
    assert tags["review.agreement_alpha"] == ""  # both always chose the candidate: alpha is undefined
    card = registry.version(version).description
    assert "## Human review" in card and "win rate 1.0000" in card and "from 10 judgements" in card
    summary = json.loads((ws.root / "reports" / "review" / f"v{version}" / "summary.json").read_text())
    assert summary["overall"]["wins"] == 10 and summary["by_source"]["production"]["judgements"] == 4
    # every automatic metric against the people's choices, on the 3 test-split tasks (they have a reference)
    agreement = summary["metric_agreement"]
    assert set(agreement) == {"rouge_l", "bleu", "normalised_match", "semantic_similarity", "bertscore_f1"}
    for name, entry in agreement.items():
        assert 0 <= entry["agree"] <= entry["tasks"] <= 3 and entry["tasks"] + entry["metric_ties"] == 3, entry
        assert tags[f"review.metric_agreement.{name}.tasks"] == str(entry["tasks"])
    assert "| metric | agrees with people | interval | tasks |" in card

    screenshot_model_card(mlflow_server.uri, model_name, version)

    # the next candidate: reviewers prefer the champion; the gate rejects it
    (tmp_path / "next").mkdir()
    ws2 = Workspace(tmp_path / "next", tiny_base, mlflow_server.uri, model_name, seed=1)
    next_version = register(ws2, logged(mlflow_server.uri, evaluation(0.02, champion_version=version)))
    params2 = ws2.params(*review)
    sent2 = candidate.request(params2)
    assert sent2["version"] == next_version and sent2["tasks"] == 5
    assert all(t["meta"]["opponent"] == f"champion v{version}" for t in client.tasks(sent2["project_id"]))
    apply(params2, evaluation(0.02, champion_version=version), next_version)
    answer_all(client, sent2["project_id"], "opponent", [admin, second])
    result = candidate.decide(params2)
    assert not result["promoted"] and result["status"] == "rejected"
    assert "lower bound must exceed 0.500" in " ".join(result["reasons"])
    assert registry.alias_version("champion") == version


def screenshot_model_card(uri, model_name, version):
    """The version's page in MLflow's UI, as a reviewer of the registry sees it: the model card with
    its human review section (kept in test-artifacts/ for a person to look at)."""
    require(Path("/usr/bin/chromium").exists(), "Debian chromium is not installed (scripts/install.sh installs it "
                                                "as root)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "model-card-human-review.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(f"{uri}/#/models/{model_name}/versions/{version}")
            page.get_by_text("Human review", exact=True).first.wait_for(timeout=60_000)
            page.get_by_text("from 10 judgements", exact=False).first.wait_for(timeout=10_000)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


def test_a_review_tool_that_is_down(tmp_path, tiny_base, mlflow_server, label_studio):
    """A clear one-line error; in required mode nothing is promoted; the training DAG's advisory
    request goes on with a warning."""
    from pipelines.errors import LLMOpsError
    from pipelines.registry.promotion import apply
    from pipelines.review import candidate
    from tests.support import free_port

    model_name = f"down-{uuid.uuid4().hex[:8]}"
    ws = Workspace(tmp_path, tiny_base, mlflow_server.uri, model_name)
    version = register(ws, evaluation(0.02))
    down = [f"review.url=http://127.0.0.1:{free_port()}", f"review.data_dir={label_studio.data_dir}"]
    params = ws.params(*down, "promote.human_review=required")
    with pytest.raises(LLMOpsError) as error:
        candidate.request(params)
    message = str(error.value)
    assert "unreachable" in message and "llmops review serve" in message and "\n" not in message
    decision = apply(params, evaluation(0.02), version)
    assert not decision.promoted and "llmops review request" in " ".join(decision.reasons)
    advisory = candidate.request(ws.params(*down, "promote.human_review=advisory"), when_enabled=True)
    assert "unreachable" in advisory["skipped"]
    assert candidate.request(ws.params(*down, "promote.human_review=off"), when_enabled=True) == {
        "skipped": "promote.human_review is off"}
