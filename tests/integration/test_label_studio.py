"""Label Studio, the review tool, for real: `llmops review serve`, the REST client, two reviewers,
exports, a restart on the same data, and the blind side-by-side view in a browser.

One server per test session (the `label_studio` fixture, tests/integration/conftest.py): a first
start migrates a new database (~30-60 s on 2 cores); every test here reuses it.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import time
from pathlib import Path

import httpx
import pytest

from pipelines.review.labelstudio import (
    CANDIDATE_CONFIG,
    CORRECTION_CONFIG,
    LabelStudio,
    LabelStudioServer,
    ReviewError,
    ReviewUnavailable,
    choice,
    text,
)
from tests.integration.conftest import REVIEW_PYTHON
from tests.support import free_port, require

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ARTIFACTS = Path(os.environ.get("LLMOPS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def candidate_tasks(n: int, tag: str) -> list[dict]:
    return [{"data": {"prompt": f"What does the noun \"{tag}{i}\" mean?",
                      "answer_a": f"Answer from the left model about {tag}{i}.",
                      "answer_b": f"Answer from the right model about {tag}{i}."},
             "meta": {"item": f"{tag}-{i}", "a": "candidate"}} for i in range(n)]


def test_serve_prints_the_login_and_the_url_answers(label_studio):
    printed = "".join(label_studio.output)
    for value in (label_studio.url, label_studio.username, label_studio.password, label_studio.token):
        assert value in printed
    assert httpx.get(f"{label_studio.url}/health", timeout=10).status_code == 200
    mode = stat.S_IMODE((label_studio.data_dir / "login.json").stat().st_mode)
    assert mode == 0o600, oct(mode)
    checked = label_studio.client.check()
    assert checked["version"] == "1.23.2" and checked["user"] == label_studio.username
    # loopback only: another Host name is refused (DNS rebinding), and the bind address is 127.0.0.1
    assert httpx.get(f"{label_studio.url}/health", headers={"Host": "evil.example"}, timeout=10).status_code == 400


def test_a_project_created_twice_is_one_project_and_both_label_configs_are_valid(label_studio):
    client = label_studio.client
    first = client.ensure_project("test candidate once", CANDIDATE_CONFIG, description="first")
    again = client.ensure_project("test candidate once", CANDIDATE_CONFIG, description="second")
    assert first == again
    assert [p["id"] for p in client.projects() if p["title"] == "test candidate once"] == [first]
    assert client.project("test candidate once")["description"] == "second"
    assert client.project("test candidate") is None  # the API's title filter is a substring match: not ours
    corrections = client.ensure_project("test corrections", CORRECTION_CONFIG)
    [task_id] = client.import_tasks(corrections, [{
        "data": {"prompt": "What does the computing term \"daemon\" mean?", "answer": "A demon.",
                 "flags": "drift: new domain", "feedback": ""},
        "meta": {"request_id": "r1"}}])
    client.annotate(task_id, [choice("verdict", "Corrected", "answer"),
                              text("correction", "A background process.", "answer")])
    [record] = client.export(corrections, "JSON_MIN")
    assert record["verdict"] == "Corrected" and record["correction"] == "A background process."


def test_two_reviewers_annotate_the_same_tasks_and_the_exports_show_both(label_studio):
    admin = label_studio.client
    project = admin.ensure_project("test two reviewers", CANDIDATE_CONFIG, maximum_annotations=2)
    sent = candidate_tasks(3, "bank")
    ids = admin.import_tasks(project, sent)
    assert len(ids) == 3 and len(set(ids)) == 3
    listed = {t["id"]: t for t in admin.tasks(project)}
    assert sorted(listed) == sorted(ids)
    assert [listed[i]["meta"]["item"] for i in ids] == ["bank-0", "bank-1", "bank-2"]
    assert listed[ids[0]]["data"] == sent[0]["data"]

    # a second reviewer joins through the invite link, as a person would, and answers with their own token
    reviewer = admin.create_user("reviewer2@llmops.local", "second-reviewer-pw-1")
    assert admin.create_user("reviewer2@llmops.local", "second-reviewer-pw-1")["id"] == reviewer["id"]  # idempotent
    second = LabelStudio(label_studio.url, reviewer["token"])
    me = admin.check()["id"]
    admin.annotate(ids[0], [choice("preference", "A"), text("better_answer", "A place to keep money.")])
    second.annotate(ids[0], [choice("preference", "B")])
    second.annotate(ids[1], [choice("preference", "Tie")])
    # the admin may also record an answer given elsewhere on a reviewer's behalf
    admin.annotate(ids[2], [choice("preference", "A")], completed_by=reviewer["id"])

    task = {t["id"]: t for t in admin.tasks(project)}[ids[0]]
    by = {a["completed_by"] if isinstance(a["completed_by"], int) else a["completed_by"]["id"]: a
          for a in task["annotations"]}
    assert set(by) == {me, reviewer["id"]}
    assert by[me]["result"][0]["value"]["choices"] == ["A"]
    assert by[reviewer["id"]]["result"][0]["value"]["choices"] == ["B"]

    full = {t["id"]: t for t in admin.export(project, "JSON")}
    assert sorted(full) == sorted(ids)  # annotated tasks only
    assert len(full[ids[0]]["annotations"]) == 2 and full[ids[0]]["meta"]["item"] == "bank-0"
    flat = admin.export(project, "JSON_MIN")  # one flat record per annotation
    assert sorted((r["id"], r["annotator"], r["preference"]) for r in flat) == sorted([
        (ids[0], me, "A"), (ids[0], reviewer["id"], "B"), (ids[1], reviewer["id"], "Tie"),
        (ids[2], reviewer["id"], "A")])
    assert next(r for r in flat if r["annotator"] == me)["better_answer"] == "A place to keep money."
    assert len(admin.export(project, "JSON", all_tasks=True)) == 3

    admin.delete_task(ids[1])
    assert sorted(t["id"] for t in admin.tasks(project)) == sorted([ids[0], ids[2]])
    assert all(r["id"] != ids[1] for r in admin.export(project, "JSON_MIN"))
    admin.delete_task(ids[1])  # already gone: no error
    second.close()


def test_refusals_are_one_line_review_errors(label_studio):
    with pytest.raises(ReviewError, match=r"refused the API token .*LLMOPS_REVIEW_TOKEN") as refused:
        LabelStudio(label_studio.url, "not-a-token").check()
    assert "\n" not in str(refused.value)
    with pytest.raises(ReviewError, match="refused POST /api/projects/: 400") as bad:
        label_studio.client.ensure_project("test a bad config", "<View><Choices name='x'/></View>")
    assert "\n" not in str(bad.value)
    with pytest.raises(ReviewError, match="has no /api/tasks/999999/"):
        label_studio.client.task(999999)


def test_a_personal_access_token_works_too(label_studio):
    """Label Studio >= 1.17 gives new organisations personal access tokens (JWT) rather than legacy ones."""
    made = httpx.post(f"{label_studio.url}/api/token/", headers={"Authorization": f"Token {label_studio.token}"},
                      timeout=30)
    assert made.status_code == 201, made.text
    with LabelStudio(label_studio.url, made.json()["token"]) as client:
        assert client.check()["user"] == label_studio.username


def test_unreachable_and_down_are_one_line_review_unavailable(label_studio):
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ReviewUnavailable) as down:
        LabelStudio(f"http://127.0.0.1:{port}", label_studio.token).check()
    assert str(down.value) == (f"Label Studio at http://127.0.0.1:{port} is unreachable (connection refused); start "
                               "it with `llmops review serve` or set LLMOPS_REVIEW_URL")
    assert time.monotonic() - started < 10  # retried briefly


def test_a_restart_on_the_same_data_reuses_the_login(label_studio, tmp_path):
    """A copy of the session's data dir, started by LabelStudioServer: no migrations, same admin and token."""
    copy = tmp_path / "data"
    copy.mkdir(mode=0o700)
    for name in ("login.json", ".env"):
        shutil.copy2(label_studio.data_dir / name, copy / name)
    with sqlite3.connect(label_studio.data_dir / "label_studio.sqlite3") as source, \
            sqlite3.connect(copy / "label_studio.sqlite3") as target:
        source.backup(target)
    started = time.monotonic()
    with LabelStudioServer(REVIEW_PYTHON, copy, free_port()) as server:
        restart = time.monotonic() - started
        assert server.login.token == label_studio.token
        client = server.client()
        assert client.check()["user"] == label_studio.username
        assert client.project("test two reviewers") is not None
        url = server.url
    print(f"restart on a migrated database: {restart:.1f} s")
    with pytest.raises(ReviewUnavailable, match="unreachable"):
        LabelStudio(url, label_studio.token, retries=0).check()


def test_a_reviewer_sees_both_answers_side_by_side_and_answers_in_the_browser(label_studio):
    require(Path("/usr/bin/chromium").exists(), "Debian chromium is not installed (scripts/install.sh installs it "
                                                "as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright is not installed (pip install -e '.[dev]')")
    client = label_studio.client
    project = client.ensure_project("test browser review", CANDIDATE_CONFIG)
    left = "A sloping land beside a body of water, such as a river."
    right = "A financial institution that accepts deposits and lends money."
    [task_id] = client.import_tasks(project, [{"data": {"prompt": "What does the noun \"bank\" mean?",
                                                        "answer_a": left, "answer_b": right},
                                               "meta": {"item": "browser-1"}}])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "label-studio-candidate-task.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{label_studio.url}/user/login/")
            page.fill("input[name=email]", label_studio.username)
            page.fill("input[name=password]", label_studio.password)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
            page.goto(f"{label_studio.url}/projects/{project}/data?task={task_id}")
            try:
                page.get_by_text(left).first.wait_for(timeout=120_000)
                page.get_by_text(right).first.wait_for(timeout=30_000)
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "label-studio-candidate-task-failed.png"), full_page=True)
                raise
            # the two panel headers, visible (the same words may also sit in hidden parts of the page)
            for header in ("Answer A", "Answer B"):
                page.locator(f":text-is('{header}'):visible").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            # answer it as a reviewer: B is better, then Submit (each choice is a radio button named by its value)
            page.locator("input[type=radio][name=B]").check()
            page.get_by_role("button", name="Submit").first.click()
            deadline = time.monotonic() + 60
            while not client.task(task_id).get("annotations") and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000  # kept as a test artifact
    [annotation] = client.task(task_id)["annotations"]
    assert [r["value"] for r in annotation["result"] if r["from_name"] == "preference"] == [{"choices": ["B"]}]
