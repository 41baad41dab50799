"""The /feed page in headless Chromium (Debian's, driven by Playwright): it
connects from #key= and from the form, shows events as they arrive with the
customer's name and their sentiment when it lands, opens a row's details,
filters and pauses, renders content as text, resumes from the cursor of the last
change it processed whenever its socket comes back (a worker killed, every
worker restarted), so that what happened meanwhile is shown, whatever its event
time, and nothing twice (not even a change that arrives twice), starts over from
the oldest change kept when its cursor expired (4410) and live when the server
does not know it (4400), drops an erased customer's rows, and raises no
JavaScript error.

One stack serves the module (each test has its own organization), but for the
tests that stop web workers."""
import collections
import datetime
import json
import os
import re
import shutil
import signal
import time

import pytest
import requests

from tests.helpers import UTC, bearer, interaction, stored_over_http
from tests.servers import CHROMIUM, CHROMIUM_ARGS, wait_until


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI (apt-get install chromium)")
        pytest.skip("no Chromium at " + CHROMIUM)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    page.urls = []
    page.on("request", lambda request: page.urls.append(request.url))
    page.sockets = []  # each socket the page opened: the frames it sent and received

    def watch(socket):
        page.urls.append(socket.url)
        frames = {"sent": [], "received": []}
        page.sockets.append(frames)
        socket.on("framesent", lambda payload: frames["sent"].append(payload))
        socket.on("framereceived", lambda payload: frames["received"].append(payload))

    page.on("websocket", watch)
    yield page
    context.close()
    assert page.errors == [], "JavaScript errors: %s" % page.errors


def ingest_surely(stack, org, customer_id, message_id):
    """Ingest, retrying with the same messageId while workers restart (nginx may
    answer 502 for a request on a connection the dying worker closed, and a
    request may wait long for a worker still starting)."""
    for _ in range(20):
        try:
            response = requests.post(stack.url + "/api/data/ingest", headers=bearer(org["ingestKey"]),
                                     json=interaction(customer_id, messageId=message_id), timeout=5)
            if response.status_code in (200, 201):
                return response.json()["id"]
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.1)
    raise AssertionError("could not ingest %s" % message_id)


def row(page, interaction_id):
    return page.locator('#rows tr[data-id="%s"]' % interaction_id)


def test_connects_from_fragment_and_shows_events_live(module_stack, page, org, customer_id):
    page.goto(module_stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    interaction_id = stored_over_http(module_stack.url, org["ingestKey"], customer_id,
                            content="Absolutely wonderful support!")
    ingested = time.monotonic()
    row(page, interaction_id).wait_for(timeout=1000)
    print("\nrow visible %.0f ms after the ingest response" % ((time.monotonic() - ingested) * 1000))
    page.wait_for_function("() => document.querySelector('#rows td.customer').textContent === 'c-1'")
    cells = row(page, interaction_id).locator("td").all_inner_texts()
    assert cells[1:5] == ["c-1", "chat", "message", "Absolutely wonderful support!"]  # external id
    badge = row(page, interaction_id).locator(".badge")
    badge.locator("text=positive").wait_for(timeout=15000)
    assert "badge-positive" in badge.get_attribute("class")
    assert not any(org["readKey"] in url for url in page.urls), "the key went into a URL"


def test_form_connect_filter_and_pause(module_stack, page, org, customer_id):
    page.goto(module_stack.url + "/feed")
    page.get_by_label("Read key").fill(org["readKey"])
    page.get_by_role("button", name="Connect").click()
    page.wait_for_selector("#state.state-open")
    chat = stored_over_http(module_stack.url, org["ingestKey"], customer_id, channel="chat")
    email = stored_over_http(module_stack.url, org["ingestKey"], customer_id, channel="email")
    row(page, chat).wait_for()
    row(page, email).wait_for()

    page.get_by_label("Channel").select_option("email")
    assert row(page, email).is_visible() and not row(page, chat).is_visible()
    page.get_by_label("Channel").select_option("")
    assert row(page, chat).is_visible()

    page.get_by_role("button", name="Pause").click()
    held = stored_over_http(module_stack.url, org["ingestKey"], customer_id, content="arrives while paused")
    page.wait_for_function("() => feed.held.length === 1")  # it arrived, and was held back
    assert row(page, held).count() == 0
    page.get_by_role("button", name="Resume").click()
    row(page, held).wait_for(timeout=2000)


def test_content_is_text_never_html(module_stack, page, org, customer_id):
    page.goto(module_stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    payload = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'
    interaction_id = stored_over_http(module_stack.url, org["ingestKey"], customer_id, content=payload)
    row(page, interaction_id).wait_for()
    assert row(page, interaction_id).locator("td").nth(4).inner_text() == payload
    assert page.locator("#rows img, #rows script").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_bad_key_shows_state_and_does_not_retry(module_stack, page, org):
    page.goto(module_stack.url + "/feed#key=ik_wrong")
    page.wait_for_selector("#state.state-error")
    assert page.locator("#state").inner_text() == "invalid key"


def test_page_sends_a_csp_forbidding_inline_scripts(module_stack):
    response = requests.get(module_stack.url + "/feed")
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy


def test_a_row_opens_the_whole_interaction(module_stack, page, org, customer_id):
    page.goto(module_stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    interaction_id = stored_over_http(module_stack.url, org["ingestKey"], customer_id, content="Thanks!",
                            messageId="order-7", metadata={"order": {"id": 7, "items": ["tea"]}})
    row(page, interaction_id).click()
    page.wait_for_selector("#details[open]")
    assert page.locator("#details-metadata").inner_text() == (
        '{\n  "order": {\n    "id": 7,\n    "items": [\n      "tea"\n    ]\n  }\n}')
    fields = page.locator("#details-fields").inner_text()
    assert "order-7" in fields and interaction_id in fields and "Event time" in fields
    page.get_by_role("button", name="Close").click()
    assert not page.locator("#details").is_visible()


def shown_ids(page):
    return page.evaluate("() => [...document.querySelectorAll('#rows tr')].map(tr => tr.dataset.id)")


def auths(page):
    """The `after` of each auth message the page sent, a socket after another."""
    return [json.loads(frames["sent"][0]).get("after") for frames in page.sockets if frames["sent"]]


def assert_each_socket_resumed_where_the_last_left_off(page):
    """The first socket authenticated without a cursor (live from then on), and
    each later one with the cursor of the last change the page had received (or,
    before any, the one its first socket started after, as `ready` said). The
    page's cursor is the last one received: awaited, as a change may still be
    arriving (a late analysis), and Playwright reports its frame after the page
    has taken it."""
    def last_received():
        cursor = None
        for frames in page.sockets:
            if frames["sent"]:  # (one that closed before it opened sent nothing)
                assert json.loads(frames["sent"][0]).get("after") == cursor
            for payload in map(json.loads, frames["received"]):
                if payload["type"] != "ready" or cursor is None:
                    cursor = payload.get("cursor", cursor)
        return cursor

    wait_until(lambda: page.evaluate("() => feed.cursor") == last_received(), timeout=10,
               message="the page's cursor to be the last one its sockets received")


def socket_worker(stack, org):
    """The pid of the web worker holding the page's socket (from its log line)."""
    return wait_until(lambda: next((line["pid"] for line in reversed(stack.log_lines())
                                    if line.get("message") == "feed socket connected"
                                    and line.get("organization_id") == org["organizationId"]), None),
                      timeout=5, message="the log line of the page's socket")  # logs are written by a thread


def wait_for_analysis(page, interaction_id):
    page.wait_for_function("id => !['…', 'pending'].includes(feed.rows.get(id)?.textContent)",
                           arg=interaction_id, timeout=15000)


def test_what_happened_while_the_page_was_cut_off_is_shown_once_whatever_its_time(stack, page, org,
                                                                                  customer_id):
    """The issue's case: the worker holding the page's socket hangs, an interaction
    with a week-old event time is stored meanwhile, and the worker dies. The page
    reconnects from the cursor of the last change it processed and shows that
    interaction, once (a catch-up by event time never asked for a week back)."""
    page.goto(stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    first = stored_over_http(stack.url, org["ingestKey"], customer_id, content="before the cut")
    row(page, first).wait_for()
    wait_for_analysis(page, first)  # its last change is in: the page's cursor stays put
    worker = socket_worker(stack, org)
    os.kill(worker, signal.SIGSTOP)  # the socket stays open, and says nothing
    a_week_ago = datetime.datetime.now(UTC) - datetime.timedelta(days=7)
    try:
        # Straight to gunicorn: nginx may hold a kept-alive connection to the stopped worker.
        week_old = stored_over_http(stack.web.url, org["ingestKey"], customer_id, content="sent a week late",
                          timestamp=a_week_ago.isoformat())
    finally:
        os.kill(worker, signal.SIGKILL)
    page.wait_for_selector("#state.state-reconnecting")
    row(page, week_old).wait_for(timeout=20000)
    wait_for_analysis(page, week_old)
    assert shown_ids(page) == [week_old, first]
    when = row(page, week_old).locator("td").first
    assert when.get_attribute("title").startswith(a_week_ago.date().isoformat())
    assert ", " in when.inner_text()  # its date, not only a time of day
    assert len(page.sockets) >= 2 and auths(page)[0] is None
    assert_each_socket_resumed_where_the_last_left_off(page)
    assert not any("/api/interactions?" in url for url in page.urls), "caught up by time"


def test_after_every_worker_restarts_the_page_shows_every_interaction_exactly_once(stack, page, org,
                                                                                  customer_id):
    """Every web worker restarts (gunicorn's HUP, as in a deploy: the old ones close
    their sockets with 1001) while interactions keep coming: the page reconnects
    from its cursor each time, its sockets bring every change once and in order,
    and each interaction is shown once."""
    page.goto(stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    sent = [ingest_surely(stack, org, customer_id, "before-%d" % n) for n in range(5)]
    page.wait_for_function("n => document.querySelectorAll('#rows tr').length === n", arg=5)
    old_workers = set(stack.worker_pids())
    os.kill(stack.process.pid, signal.SIGHUP)
    page.wait_for_selector("#state.state-reconnecting")
    sent += [ingest_surely(stack, org, customer_id, "during-%d" % n) for n in range(20)]
    wait_until(lambda: not old_workers & set(stack.worker_pids()), message="the old workers to leave")
    page.wait_for_selector("#state.state-open", timeout=20000)
    sent += [ingest_surely(stack, org, customer_id, "after-%d" % n) for n in range(5)]
    page.wait_for_function("n => document.querySelectorAll('#rows tr').length >= n", arg=len(sent))
    shown = collections.Counter(shown_ids(page))
    assert set(shown) == set(sent) and max(shown.values()) == 1

    def caught_up():  # (an analysis queued by a worker as it stopped may wait for the sweep)
        stored = [item["cursor"] for item in changes_of(stack.url, org)]
        return stored if stored[-1] == page.evaluate("() => feed.cursor") else None

    stored = wait_until(caught_up, message="the page to have the last change stored")
    received = [change["cursor"] for frames in page.sockets for change in map(json.loads, frames["received"])
                if "cursor" in change and change["type"] != "ready"]
    assert received[:len(stored)] == stored  # every change, in order, once
    assert len(page.sockets) >= 2
    assert_each_socket_resumed_where_the_last_left_off(page)
    assert not any("/api/interactions?" in url for url in page.urls), "caught up by time"


def test_a_change_that_arrives_twice_is_shown_once(module_stack, page, org, customer_id):
    """Between the page and the server, a proxy repeats every change at once and
    later resends them all, newest first: each interaction is shown once, the
    page's cursor never moves back and its next socket resumes after the newest
    change. A `dropped` notice is shown, briefly."""
    proxies, auth_cursors, delivered = [], [], []

    def proxy(ws):
        server = ws.connect_to_server()
        proxies.append(ws)

        def from_page(message):
            auth_cursors.append(json.loads(message).get("after"))
            server.send(message)

        def from_server(message):
            ws.send(message)
            if '"cursor"' in message and '"ready"' not in message:
                ws.send(message)
                delivered.append(message)
                if len(delivered) == 4:
                    for earlier in reversed(delivered):
                        ws.send(earlier)

        ws.on_message(from_page)
        server.on_message(from_server)

    page.route_web_socket(re.compile(r"/api/feed/ws$"), proxy)
    page.goto(module_stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    sent = [stored_over_http(module_stack.url, org["ingestKey"], customer_id, content="twice? %d" % n)
            for n in range(3)]
    for interaction_id in sent:
        row(page, interaction_id).wait_for()
        wait_for_analysis(page, interaction_id)
    assert len(delivered) == 6
    assert shown_ids(page) == sent[::-1]
    assert page.evaluate("() => feed.cursor") == json.loads(delivered[-1])["cursor"]

    from playwright.sync_api import expect
    proxies[0].send(json.dumps({"type": "dropped", "count": 3}))
    notice = page.locator("#notice")
    expect(notice).to_contain_text("3 event(s) were dropped")
    notice.wait_for(state="hidden", timeout=10000)

    proxies[0].close(code=1001, reason="going away")
    page.wait_for_selector("#state.state-reconnecting")
    page.wait_for_selector("#state.state-open")
    assert auth_cursors == [None, json.loads(delivered[-1])["cursor"]]
    later = stored_over_http(module_stack.url, org["ingestKey"], customer_id)
    row(page, later).wait_for()
    assert collections.Counter(shown_ids(page)) == collections.Counter(sent + [later])


def changes_of(url, org):
    response = requests.get(url + "/api/changes?limit=1000", headers=bearer(org["readKey"]))
    assert response.status_code == 200, response.text
    return response.json()["items"]


def connect_with_stored_cursor(page, url, org, cursor):
    """The page as a tab reloaded with ``cursor`` kept from its last life."""
    page.goto(url + "/feed")
    page.evaluate("([key, cursor]) => sessionStorage.setItem(cursorName(key), cursor)",
                  [org["readKey"], cursor])
    page.get_by_label("Read key").fill(org["readKey"])
    page.get_by_role("button", name="Connect").click()


def test_a_page_whose_cursor_expired_resumes_from_the_oldest_change_kept(module_stack, app, page, org,
                                                                         customer_id):
    """The changes after the page's cursor are no longer all kept (4410): it
    resumes from the oldest one kept and says so in its connection state."""
    from ingest import changes
    from models import utcnow

    stored_over_http(module_stack.url, org["ingestKey"], customer_id)  # created and analysed, then forgotten
    wait_until(lambda: len(changes_of(module_stack.url, org)) == 2, message="its analysis")
    after_gone = changes_of(module_stack.url, org)[0]["cursor"]  # after it was created
    with app.app_context():
        assert changes.prune(utcnow(), org["organizationId"]) == 2
    expired = requests.get(module_stack.url + "/api/changes?after=" + after_gone, headers=bearer(org["readKey"]))
    assert expired.status_code == 410
    kept = stored_over_http(module_stack.url, org["ingestKey"], customer_id)
    connect_with_stored_cursor(page, module_stack.url, org, after_gone)
    row(page, kept).wait_for()
    page.wait_for_selector("#state.state-open")
    assert "resumed from the oldest change kept" in page.locator("#state").inner_text()
    assert shown_ids(page) == [kept]
    assert auths(page) == [after_gone, expired.json()["details"]["oldestCursor"]]


def test_a_cursor_the_server_does_not_know_is_dropped_and_the_page_goes_live(module_stack, page, org,
                                                                               customer_id):
    """An `after` the server refuses (4400): the page forgets it and connects
    without one, live from then on."""
    connect_with_stored_cursor(page, module_stack.url, org, "not-a-cursor")
    page.wait_for_selector("#state.state-open")
    assert "could not resume" in page.locator("#state").inner_text()
    assert auths(page) == ["not-a-cursor", None]
    interaction_id = stored_over_http(module_stack.url, org["ingestKey"], customer_id)
    row(page, interaction_id).wait_for()
    stored = page.evaluate("key => sessionStorage.getItem(cursorName(key))", org["readKey"])
    assert stored not in (None, "not-a-cursor")  # the one its new socket started after


def test_a_reloaded_tab_resumes_where_it_left_off(module_stack, page, org, customer_id):
    """The cursor outlives a reload of the tab (sessionStorage): what was stored
    while the page was gone is shown after it comes back."""
    page.goto(module_stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    seen = stored_over_http(module_stack.url, org["ingestKey"], customer_id)
    row(page, seen).wait_for()
    wait_for_analysis(page, seen)
    page.goto("about:blank")
    missed = stored_over_http(module_stack.url, org["ingestKey"], customer_id)
    page.goto(module_stack.url + "/feed#key=" + org["readKey"])
    row(page, missed).wait_for()
    assert shown_ids(page) == [missed]
    assert_each_socket_resumed_where_the_last_left_off(page)
    assert not any(org["readKey"] in url for url in page.urls), "the key went into a URL"


def test_an_erased_customers_rows_leave_the_page(module_stack, page, org, customer_id):
    page.goto(module_stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    gone = stored_over_http(module_stack.url, org["ingestKey"], customer_id)
    row(page, gone).wait_for()
    # Its name is looked up first: a lookup after the erasure would be a (harmless)
    # 404, which the browser reports as a console error.
    page.wait_for_function("() => document.querySelector('#rows td.customer').textContent === 'c-1'")
    assert requests.delete(module_stack.url + "/api/customers/" + customer_id,
                           headers=bearer(org["ingestKey"])).status_code == 204
    row(page, gone).wait_for(state="detached", timeout=5000)
    assert "erased" in page.locator("#notice").inner_text()
