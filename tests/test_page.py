"""The /feed page in headless Chromium (Debian's, driven by Playwright): it
connects from #key= and from the form, shows events as they arrive with the
customer's name and their sentiment when it lands, opens a row's details,
filters and pauses, renders content as text, catches up what it missed while
its socket was gone (each interaction shown exactly once), drops an erased
customer's rows, and raises no JavaScript error.

One stack serves the module (each test has its own organization), but for the
test that restarts a worker."""
import collections
import os
import re
import shutil
import signal
import time

import pytest
import requests

from tests.helpers import bearer, ingest, interaction
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
    page.on("websocket", lambda socket: page.urls.append(socket.url))
    yield page
    context.close()
    assert page.errors == [], "JavaScript errors: %s" % page.errors


def ingest_surely(stack, org, customer_id, message_id):
    """Ingest, retrying with the same messageId while a worker restarts (nginx may
    answer 502 for a request on a connection the dying worker closed)."""
    for _ in range(20):
        try:
            response = requests.post(stack.url + "/api/data/ingest", headers=bearer(org["ingestKey"]),
                                     json=interaction(customer_id, messageId=message_id), timeout=5)
            if response.status_code in (200, 201):
                return response.json()["id"]
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError("could not ingest %s" % message_id)


def row(page, interaction_id):
    return page.locator('#rows tr[data-id="%s"]' % interaction_id)


def test_connects_from_fragment_and_shows_events_live(module_stack, page, org, customer_id):
    page.goto(module_stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    interaction_id = ingest(module_stack.url, org["ingestKey"], customer_id,
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
    chat = ingest(module_stack.url, org["ingestKey"], customer_id, channel="chat")
    email = ingest(module_stack.url, org["ingestKey"], customer_id, channel="email")
    row(page, chat).wait_for()
    row(page, email).wait_for()

    page.get_by_label("Channel").select_option("email")
    assert row(page, email).is_visible() and not row(page, chat).is_visible()
    page.get_by_label("Channel").select_option("")
    assert row(page, chat).is_visible()

    page.get_by_role("button", name="Pause").click()
    held = ingest(module_stack.url, org["ingestKey"], customer_id, content="arrives while paused")
    page.wait_for_function("() => feed.held.length === 1")  # it arrived, and was held back
    assert row(page, held).count() == 0
    page.get_by_role("button", name="Resume").click()
    row(page, held).wait_for(timeout=2000)


def test_content_is_text_never_html(module_stack, page, org, customer_id):
    page.goto(module_stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    payload = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'
    interaction_id = ingest(module_stack.url, org["ingestKey"], customer_id, content=payload)
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
    interaction_id = ingest(module_stack.url, org["ingestKey"], customer_id, content="Thanks!",
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


def test_after_its_socket_is_cut_the_page_shows_every_interaction_exactly_once(stack, page, org,
                                                                             customer_id):
    """The worker holding the page's socket restarts (as in a deploy) while
    interactions keep coming: after the reconnect the page has read what it
    missed through the API, and shows each interaction once."""
    page.goto(stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    sent = [ingest_surely(stack, org, customer_id, "before-%d" % n) for n in range(5)]
    page.wait_for_function("n => document.querySelectorAll('#rows tr').length === n", arg=5)
    worker = wait_until(lambda: next((line["pid"] for line in reversed(stack.log_lines())
                                      if line.get("message") == "feed socket connected"
                                      and line.get("organization_id") == org["organizationId"]), None),
                        timeout=5, message="the log line of the page's socket")  # logs are written by a thread
    os.kill(worker, signal.SIGTERM)
    page.wait_for_selector("#state.state-reconnecting")
    sent += [ingest_surely(stack, org, customer_id, "during-%d" % n) for n in range(20)]
    page.wait_for_selector("#state.state-open", timeout=20000)
    sent += [ingest_surely(stack, org, customer_id, "after-%d" % n) for n in range(5)]
    page.wait_for_function("n => document.querySelectorAll('#rows tr').length >= n", arg=len(sent))
    shown = collections.Counter(shown_ids(page))
    assert set(shown) == set(sent) and max(shown.values()) == 1
    notice = page.locator("#notice").inner_text()
    caught_up = int(re.search(r"caught up (\d+)", notice).group(1))
    print("\n" + notice)
    assert caught_up >= 1, "nothing was missed: the test proves nothing"


def test_an_erased_customers_rows_leave_the_page(module_stack, page, org, customer_id):
    page.goto(module_stack.url + "/feed#key=" + org["readKey"])
    page.wait_for_selector("#state.state-open")
    gone = ingest(module_stack.url, org["ingestKey"], customer_id)
    row(page, gone).wait_for()
    # Its name is looked up first: a lookup after the erasure would be a (harmless)
    # 404, which the browser reports as a console error.
    page.wait_for_function("() => document.querySelector('#rows td.customer').textContent === 'c-1'")
    assert requests.delete(module_stack.url + "/api/customers/" + customer_id,
                           headers=bearer(org["ingestKey"])).status_code == 204
    row(page, gone).wait_for(state="detached", timeout=5000)
    assert "erased" in page.locator("#notice").inner_text()
