"""The command line of DESIGN §10, and `changes export` of §16."""
import datetime
import json
import os
import pty
import re
import signal
import subprocess

import pytest

from ingest import analysis, changes
from ingest.auth import KEY_CACHE_SECONDS
from models import ApiKey, Change, Customer, Organization, utcnow
from tests.helpers import bearer, interaction, make_customer, make_organization, post_interaction
from tests.servers import BIN, ROOT, Gunicorn, wait_until
from tests.test_changes import follow


def test_init_db_is_idempotent(runner):
    result = runner.invoke(args=["init-db"])
    assert result.exit_code == 0
    assert "up to date" in result.output


def test_create_org_json_gives_working_keys(app, runner, client):
    result = runner.invoke(args=["create-org", "Acme", "--json"])
    assert result.exit_code == 0
    created = json.loads(result.output)
    assert set(created) == {"organizationId", "ingestKey", "readKey"}
    response = client.post("/api/customers", json={"externalId": "x"},
                           headers=bearer(created["ingestKey"]))
    assert response.status_code == 201
    customer = response.get_json()["id"]
    assert client.get("/api/customers/" + customer,
                      headers=bearer(created["readKey"])).status_code == 200
    with app.app_context():
        hashes = [k.key_hash for k in ApiKey.select()]
    assert created["ingestKey"] not in hashes and len(hashes) == 2


def test_create_key_and_revoke_it(runner, client, org, customer_id):
    result = runner.invoke(args=["create-key", org["organizationId"], "--scope", "ingest",
                                 "--scope", "read", "--json"])
    assert result.exit_code == 0, result.output
    created = json.loads(result.output)
    assert created["scopes"] == ["ingest", "read"]
    assert post_interaction(client, created["key"], customer_id).status_code == 201

    result = runner.invoke(args=["revoke-key", created["prefix"]])
    assert result.exit_code == 0 and "revoked 1" in result.output
    # Keys are cached: a revoked one is refused within KEY_CACHE_SECONDS.
    wait_until(lambda: client.get("/api/customers/" + customer_id,
                                  headers=bearer(created["key"])).status_code == 401,
               timeout=KEY_CACHE_SECONDS + 2, interval=0.2, message="the key to be refused")
    assert post_interaction(client, created["key"], customer_id).status_code == 401
    assert runner.invoke(args=["revoke-key", created["prefix"]]).exit_code != 0


def test_create_key_for_unknown_org_fails_cleanly(runner):
    result = runner.invoke(args=["create-key", "00000000-0000-0000-0000-000000000000",
                                 "--scope", "read"])
    assert result.exit_code != 0 and "no organization" in result.output
    assert runner.invoke(args=["create-key", "nope", "--scope", "read"]).exit_code != 0


def test_demo_prints_a_curl_line_that_works(app, runner, client):
    result = runner.invoke(args=["demo", "--json"])
    assert result.exit_code == 0
    demo = json.loads(result.output)
    assert demo["feedUrl"].endswith("/feed#key=" + demo["readKey"])
    assert "curl" in demo["curl"] and demo["ingestKey"] in demo["curl"]
    body = json.loads(demo["curl"].split("-d '")[1].rstrip("'"))
    response = client.post("/api/data/ingest", json=body, headers=bearer(demo["ingestKey"]))
    assert response.status_code == 201
    with app.app_context():
        assert Organization.select().count() == 1
        assert Customer.select().count() == 3


# changes export (DESIGN §16) -----------------------------------------------------

BIG = 10_000  # changes enough for an export to be stopped in the middle (10 pages)


def store(service, org, customer_id, count):
    """Ingest ``count`` interactions in batches of 1,000; their ids."""
    ids = []
    for start in range(0, count, 1000):
        batch = service.ingest_batch(org["organizationId"], {"interactions": [
            interaction(customer_id, content="n%d" % n) for n in range(start, min(count, start + 1000))]})
        ids += [str(i) for i in batch.ids]
    return ids


def export(runner, org, *args):
    return runner.invoke(args=["changes", "export", "--org", org["organizationId"], *args])


def parsed(text):
    return [json.loads(line) for line in text.splitlines()]


def start_export(org, *args, **popen):
    """`flask changes export` in a process of its own."""
    return subprocess.Popen([os.path.join(BIN, "flask"), "--app", "app", "changes", "export",
                             "--org", org["organizationId"], *args], cwd=ROOT, **popen)


def test_export_writes_each_change_once_as_the_api_lists_it_and_where_to_resume(
        app, runner, client, service, org, customer_id):
    ids = store(service, org, customer_id, 5)
    with app.app_context():
        analysis.score_and_store(ids[:2])
    service.erase_customer(org["organizationId"], make_customer(app, org))
    result = export(runner, org)
    assert result.exit_code == 0, result.output
    listed, next_cursor = follow(client, org)
    assert parsed(result.stdout) == listed  # 5 created, 2 analyzed, 1 erasure
    assert [list(item) for item in parsed(result.stdout)] == [["cursor", "type", "data"]] * 8
    assert result.stderr.splitlines() == ["exported 8 change(s)", next_cursor]  # no bar: not a terminal

    again = export(runner, org, "--after", next_cursor)
    assert again.exit_code == 0 and again.stdout == "" and again.stderr.splitlines()[-1] == next_cursor
    more = store(service, org, customer_id, 2)
    later = export(runner, org, "--after", next_cursor)
    assert [item["data"]["id"] for item in parsed(later.stdout)] == more


def test_export_to_a_file_continues_after_its_last_whole_line(runner, client, service, org, customer_id,
                                                              tmp_path):
    out = tmp_path / "changes.ndjson"
    store(service, org, customer_id, 1500)
    first = export(runner, org, "--out", str(out))
    assert first.exit_code == 0 and first.stdout == follow(client, org)[1] + "\n"  # the cursor alone
    store(service, org, customer_id, 700)
    whole = out.read_bytes()
    with out.open("ab") as file:  # what a kill -9 in the middle of a page leaves
        file.write(b'{"cursor":"AAAAAAAAA')
    second = export(runner, org, "--out", str(out))
    listed, next_cursor = follow(client, org)
    assert second.exit_code == 0 and second.stdout == next_cursor + "\n"
    assert parsed(out.read_text()) == listed and out.read_bytes().startswith(whole)

    out.write_bytes(b'{"cursor":"AAAA')  # killed while writing its first line
    assert export(runner, org, "--out", str(out)).exit_code == 0
    assert parsed(out.read_text()) == listed


def test_export_refuses_what_would_not_continue_the_feed(app, runner, client, service, org, customer_id,
                                                         tmp_path):
    store(service, org, customer_id, 3)
    ours = follow(client, org)[0]
    other = make_organization(app, "Other")
    for cursor in (ours[0]["cursor"], "forged", ours[0]["cursor"][:-2] + "AA"):
        result = runner.invoke(args=["changes", "export", "--org", other["organizationId"], "--after", cursor])
        assert result.exit_code == 2 and "--after" in result.stderr and result.stdout == "", result.output

    out = tmp_path / "changes.ndjson"
    assert export(runner, org, "--out", str(out)).exit_code == 0
    result = export(runner, org, "--out", str(out), "--after", ours[0]["cursor"])  # lines twice
    assert result.exit_code == 2 and "--after" in result.stderr
    result = runner.invoke(args=["changes", "export", "--org", other["organizationId"], "--out", str(out)])
    assert result.exit_code == 2 and "--out" in result.stderr  # another organization's file
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nno newline at the end")
    result = export(runner, org, "--out", str(notes))
    assert result.exit_code == 2 and "--out" in result.stderr
    assert notes.read_text() == "my notes\nno newline at the end"

    unknown = runner.invoke(args=["changes", "export", "--org", "00000000-0000-0000-0000-000000000000"])
    assert unknown.exit_code == 1 and "no organization" in unknown.stderr
    assert export(runner, {"organizationId": "nope"}).exit_code == 1


def test_an_expired_cursor_is_refused_with_the_oldest_one_kept(app, runner, client, service, org,
                                                                 customer_id):
    old = follow(client, org)[1]  # before any change
    store(service, org, customer_id, 3)
    expired = follow(client, org)[0][0]["cursor"]
    with app.app_context():
        Change.update(recorded_at=utcnow() - datetime.timedelta(days=40)).execute()
    new = store(service, org, customer_id, 1)
    with app.app_context():
        changes.prune(utcnow() - datetime.timedelta(days=30))
    for cursor in (old, expired):
        result = export(runner, org, "--after", cursor)
        assert result.exit_code == 1 and result.stdout == "", result.output
        oldest = result.stderr.split("oldest cursor still good is ")[1].strip()
    resumed = export(runner, org, "--after", oldest)
    assert [item["data"]["id"] for item in parsed(resumed.stdout)] == new


@pytest.mark.processes
def test_ctrl_c_or_sigterm_stops_after_a_whole_page_and_the_cursor_resumes_exactly(
        runner, service, org, customer_id, tmp_path):
    store(service, org, customer_id, BIG)
    listed = parsed(export(runner, org).stdout)

    out = tmp_path / "changes.ndjson"  # Ctrl-C with --out: the cursor on stdout, exit 130
    stopped = start_export(org, "--out", str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: out.exists() and out.stat().st_size, message="the first page")
    stopped.send_signal(signal.SIGINT)
    stdout, stderr = stopped.communicate(timeout=60)
    assert stopped.returncode == 130 and "stopped by SIGINT" in stderr, stderr
    assert 0 < len(parsed(out.read_text())) < BIG
    assert export(runner, org, "--after", stdout.strip(), "--out", str(out)).exit_code == 0
    assert parsed(out.read_text()) == listed

    # SIGTERM with the changes on stdout: the cursor is stderr's last line, exit 143
    errors = tmp_path / "stderr.txt"
    stopped = start_export(org, stdout=subprocess.PIPE, stderr=errors.open("w"), text=True)
    head = stopped.stdout.readline()
    stopped.terminate()
    rest = stopped.stdout.read()
    assert stopped.wait(timeout=60) == 128 + signal.SIGTERM and "stopped by SIGTERM" in errors.read_text()
    after = export(runner, org, "--after", errors.read_text().splitlines()[-1])
    assert parsed(head + rest + after.stdout) == listed


@pytest.mark.processes
def test_after_a_kill_9_the_same_command_completes_the_file(runner, service, org, customer_id, tmp_path):
    store(service, org, customer_id, BIG)
    out, full = tmp_path / "changes.ndjson", tmp_path / "full.ndjson"
    killed = start_export(org, "--out", str(out), stdout=subprocess.DEVNULL)
    wait_until(lambda: out.exists() and out.stat().st_size, message="the first page")
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    assert export(runner, org, "--out", str(out)).exit_code == 0
    assert export(runner, org, "--out", str(full)).exit_code == 0
    assert out.read_bytes() == full.read_bytes()
    assert len({item["cursor"] for item in parsed(out.read_text())}) == BIG


@pytest.mark.processes
def test_a_progress_bar_only_on_a_terminal(service, org, customer_id, tmp_path):
    store(service, org, customer_id, 1500)
    terminal, stderr = pty.openpty()
    out = tmp_path / "changes.ndjson"
    with_bar = start_export(org, "--out", str(out), stdout=subprocess.PIPE, stderr=stderr)
    os.close(stderr)
    shown = b""
    while True:
        try:
            shown += os.read(terminal, 65536)
        except OSError:  # the process closed the terminal
            break
    os.close(terminal)
    assert with_bar.wait() == 0 and with_bar.stdout.read().strip()
    assert "1500/1500" in shown.decode() and "━" in shown.decode()
    assert len(parsed(out.read_text())) == 1500


# The README's incremental sync through GET /api/changes, word for word.
# The README's five-line sync loop, word for word.
SYNC_LOOP = re.search(r"```python\n(import pathlib, requests\n.*?)```",
                      open(os.path.join(ROOT, "README.md")).read(), re.S).group(1)


@pytest.mark.processes
def test_the_readmes_sync_loop_applies_each_change_once_across_runs_and_crashes(
        client, service, org, customer_id, tmp_path, monkeypatch):
    store(service, org, customer_id, 2500)
    monkeypatch.chdir(tmp_path)
    web = Gunicorn(tmp_path / "web.log", workers=1)
    applied, crashes = [], []

    def process(items):
        if len(applied) == 1000 and not crashes:  # the sync dies on its second page
            crashes.append(items)
            raise RuntimeError("crash")
        applied.extend(items)

    def sync():
        exec(SYNC_LOOP, {"URL": web.url, "READ_KEY": org["readKey"], "process": process})

    try:
        with pytest.raises(RuntimeError):
            sync()
        sync()
        assert applied == follow(client, org)[0]
        store(service, org, customer_id, 3)
        sync()  # a later run, from cron: the new changes only
    finally:
        web.stop()
    assert applied == follow(client, org)[0] and len(applied) == 2503
