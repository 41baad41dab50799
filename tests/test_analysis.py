"""The analysis itself (DESIGN §7), in process: labels, idempotency, sweep, events;
and the dev server's embedded consumer, as `python app.py` runs it."""
import os
import re
import subprocess
import sys

import pytest
import requests

import tasks
from ingest import analysis, runtime
from models import Interaction
from tests.feed_client import LocalSocket
from tests.helpers import bearer, interaction
from tests.servers import ROOT, free_port, wait_until


@pytest.mark.parametrize("compound, label", [
    (0.05, "positive"), (0.0499, "neutral"), (0.0, "neutral"), (-0.0499, "neutral"),
    (-0.05, "negative"), (0.9, "positive"), (-0.9, "negative")])
def test_label_thresholds(compound, label):
    assert analysis.label_for(compound) == label


def stored(service, org, customer_id, content):
    interaction_id, _ = service.ingest_one(org["organizationId"], interaction(customer_id, content=content))
    return interaction_id


def test_analyze_is_idempotent_and_skips_empty_content(service, org, customer_id):
    happy = stored(service, org, customer_id, "Great service, I am very happy")
    blank = stored(service, org, customer_id, "   ")
    results = analysis.score_and_store([happy, blank])
    assert {r["id"]: r["analysis_status"] for r in results} == {str(happy): "done", str(blank): "skipped"}
    before = {row.id: (row.analysis_status, row.sentiment_score, row.analyzed_at)
              for row in Interaction.select()}
    assert analysis.score_and_store([happy, blank]) == []
    after = {row.id: (row.analysis_status, row.sentiment_score, row.analyzed_at)
             for row in Interaction.select()}
    assert after == before
    assert before[happy][0] == "done" and before[happy][1] > 0.05
    assert before[blank][:2] == ("skipped", None)


def test_task_publishes_interaction_analyzed(service, org, customer_id):
    browser = LocalSocket(runtime.current().bus, org["organizationId"], org["readKey"])
    sad = stored(service, org, customer_id, "This is awful, I am so disappointed")
    events = [browser.next()]
    tasks.analyze.call_local([str(sad)])
    events.append(browser.next())
    browser.close()
    assert [e["type"] for e in events] == ["interaction.created", "interaction.analyzed"]
    data = events[1]["data"]
    assert data["id"] == str(sad)
    assert data["analysisStatus"] == "done"
    assert data["sentiment"]["label"] == "negative"


def test_failure_keeps_the_error_enters_the_feed_and_retry_requeues(client, service, org, customer_id):
    broken = stored(service, org, customer_id, "anything")
    [failed] = analysis.mark_failed([broken], RuntimeError("vader exploded"))
    assert (failed["id"], failed["analysis_status"], failed["label"]) == (str(broken), "failed", None)
    assert analysis.mark_failed([broken], RuntimeError("again")) == []  # failed already: no second change
    row = Interaction.get_by_id(broken)
    assert (row.analysis_status, row.analysis_error) == ("failed", "vader exploded")
    assert analysis.requeue_failed() == [row.id]
    assert Interaction.get_by_id(broken).analysis_status == "pending"
    analysis.score_and_store([broken])
    feed = client.get("/api/changes", headers=bearer(org["readKey"])).get_json()["items"]
    # The failure stays a failure in the feed once a retry has succeeded.
    assert [(item["type"], item["data"]["analysisStatus"], item["data"]["sentiment"]) for item in feed] == [
        ("interaction.created", "pending", None), ("interaction.analyzed", "failed", None),
        ("interaction.analyzed", "done", {"label": "neutral", "score": 0.0})]


def test_sweep_finds_only_old_pending(service, org, customer_id):
    fresh = stored(service, org, customer_id, "hello")
    assert analysis.stale_pending(60) == []
    assert analysis.stale_pending(-1) == [fresh]


@pytest.mark.processes
def test_dev_server_runs_everything_embedded(tmp_path):
    """`python app.py` on an empty instance: demo printed, ingest analysed in-process."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "QUEUE_URL")}
    env.update(INSTANCE_PATH=str(tmp_path), LOG_LEVEL="INFO")
    log = open(tmp_path / "dev.log", "w+")
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        base = "http://127.0.0.1:%d" % port

        def printed():
            text = open(tmp_path / "dev.log").read()
            return "live feed:" in text and re.search(r"ingest key: (\S+)\s+read key:\s+(\S+)", text)
        keys = wait_until(printed, message="the demo to be printed")
        ingest_key, read_key = keys.group(1), keys.group(2)
        assert base + "/feed#key=" + read_key in open(tmp_path / "dev.log").read()
        wait_until(lambda: _up(base), message="the dev server")
        customer = requests.post(base + "/api/customers", json={"externalId": "dev"},
                                 headers=bearer(ingest_key)).json()["id"]
        response = requests.post(base + "/api/data/ingest", headers=bearer(ingest_key),
                                 json=interaction(customer, content="I love it"))
        assert response.status_code == 201
        url = base + "/api/interactions/" + response.json()["id"]
        done = wait_until(lambda: requests.get(url, headers=bearer(read_key)).json()["sentiment"],
                          message="the embedded consumer's analysis")
        assert done["label"] == "positive"
    finally:
        code = stopped(process)
    assert code == 0, "SIGTERM did not stop the dev server cleanly (exit %s)" % code


def stopped(process, grace=15):
    """The exit code of ``process`` after SIGTERM; SIGKILL's if it has not exited
    within ``grace`` seconds (killed, so that the test leaves nothing running)."""
    process.terminate()
    try:
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _up(base):
    try:
        return requests.get(base + "/healthz", timeout=1).ok
    except requests.ConnectionError:
        return False


def test_a_task_out_of_budget_leaves_the_rest_pending_for_later(service, org, customer_id):
    ids = [stored(service, org, customer_id, "fine %d" % n) for n in range(5)]
    scored, failed, unread = analysis.score(ids, budget=0)
    assert (scored, failed) == ([], {}) and sorted(unread) == sorted(map(str, ids))
    assert {row.analysis_status for row in Interaction.select()} == {"pending"}


def test_vader_reads_a_bounded_part_of_a_text():
    assert analysis.readable("😀" * 10_000) == "😀" * analysis.READ_EMOJI
    assert len(analysis.readable("word " * 5_000)) == analysis.READ_CHARACTERS
    assert analysis.readable("I love it") == "I love it"
