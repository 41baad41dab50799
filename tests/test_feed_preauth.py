"""Feed sockets that never authenticate (hardening round 3, issue 21 #1): a socket
waiting for its auth message holds no request thread, so thousands of them, opened
without a key, leave /healthz and every tenant's ingest as fast as without them."""
import time

import pytest
import requests

from ingest.fanout import AUTH_TIMEOUT
from tests.feed_client import RawSocket
from tests.helpers import interaction, make_customer, make_organization
from tests.idle_sockets import IdleSockets
from tests.servers import Gunicorn, wait_until

REQUESTS = 150
TIMEOUT = 15.0  # a request that takes longer counts as this long
# A p99 of REQUESTS is their second slowest, so one stall of the shared 2-core machine
# decides it: p99s under 15 ms are compared as 15 ms (a CI run measured 21 ms beside a
# 7 ms control). A socket holding a request thread would cost seconds (AUTH_TIMEOUT).
FLOOR = 0.015
# A crowd's window ends this long before the server would close its oldest socket
# (AUTH_TIMEOUT after the upgrade): the crowd sees an upgrade after the server started
# its clock, and the pair of requests under way must end before the closes begin.
MARGIN = 1.5
WINDOWS = 5  # crowds opened at most to send REQUESTS pairs while they are held


def timings(url, key, customer_id, pairs, go_on=lambda: True):
    """Latencies (seconds) of /healthz and of single ingest, sent in turn: ``pairs``
    pairs, fewer if ``go_on()`` turns false before one."""
    session = requests.Session()
    took = {"health": [], "ingest": []}
    for _ in range(pairs):
        if not go_on():
            break
        for name, send in (("health", lambda: session.get(url + "/healthz", timeout=TIMEOUT)),
                           ("ingest", lambda: session.post(
                               url + "/api/data/ingest", json=interaction(customer_id),
                               headers={"Authorization": "Bearer " + key}, timeout=TIMEOUT))):
            start = time.monotonic()
            try:
                response = send()
                assert response.status_code in (200, 201), response.text
            except requests.Timeout:
                pass
            took[name].append(time.monotonic() - start)
    return took


def p99(took):
    return {name: sorted(values)[int(len(values) * 0.99) - 1] for name, values in took.items()}


def p99s(url, key, customer_id):
    """p99 latency (seconds) of /healthz and of single ingest, sent in turn."""
    return p99(timings(url, key, customer_id, REQUESTS))


def held(idle, count):
    """Whether all ``count`` idle sockets are open, but for the few still retrying
    their connection, and the server will not close any within MARGIN."""
    return idle.open >= 0.98 * count and time.monotonic() < idle.oldest() + AUTH_TIMEOUT - MARGIN


def p99s_while_held(url, key, customer_id, count):
    """As p99s, each pair sent while ``count`` idle sockets are held. The server
    closes a crowd's sockets AUTH_TIMEOUT after their upgrades, nearly all at once as
    they were opened, and the crowd re-opens them at once: a burst of upgrade
    requests, not idle sockets. So a crowd serves one window, from its opening to
    MARGIN before its first close, and is then closed; new ones are opened until
    REQUESTS pairs are sent."""
    took = {"health": [], "ingest": []}
    for _ in range(WINDOWS):
        idle = IdleSockets(url, count)
        try:
            wait_until(lambda: idle.open >= 0.98 * count, timeout=60, message="%d idle sockets" % count)
            window = timings(url, key, customer_id, REQUESTS - len(took["ingest"]), lambda: held(idle, count))
        finally:
            idle.close()
        for name, values in window.items():
            took[name] += values
        if len(took["ingest"]) == REQUESTS:
            return p99(took)
    raise AssertionError("only %d pairs sent while %d sockets were held, in %d crowds: opening them takes "
                         "about as long as the server holds them" % (len(took["ingest"]), count, WINDOWS))


def assert_within_twice(before, attacked, after):
    """Each p99 with the sockets held within twice the slower of the controls run
    before and after them (ingest slows as its tables grow, and a machine's speed
    drifts within a run)."""
    for name in before:
        control = max(before[name], after[name], FLOOR)
        assert attacked[name] <= 2 * control, (name, before, attacked, after)


@pytest.fixture
def tenant(app):
    org = make_organization(app, "Bystander")
    return org["ingestKey"], make_customer(app, org)


@pytest.mark.processes
def test_five_thousand_idle_unauthenticated_sockets_hold_no_request_thread(app, tenant, tmp_path):
    """gunicorn alone (2 workers of WEB_THREADS threads each): 5,000 upgraded sockets
    that never send their auth message, each request sent while they are held
    (p99s_while_held)."""
    web = Gunicorn(tmp_path / "web.log", workers=2)
    try:
        before = p99s(web.url, *tenant)
        attacked = p99s_while_held(web.url, *tenant, 5000)
        after = p99s(web.url, *tenant)
        print("p99 before %s, with 5,000 idle sockets %s, after %s" % (before, attacked, after))
        assert_within_twice(before, attacked, after)
    finally:
        web.stop()


def test_through_nginx_one_address_holds_a_bounded_number_of_idle_sockets(tenant, stack):
    """The production front: 5,000 sockets without a key from one address. nginx lets
    500 of them (its per-address bound) through and answers the rest 429; health and
    another tenant's ingest keep their p99."""
    before = p99s(stack.url, *tenant)
    idle = IdleSockets(stack.url, 5000, refused_pause=5.0)
    try:
        wait_until(lambda: idle.open >= 500 and idle.refusals >= 4500, timeout=60,
                   message="500 idle sockets and 4,500 refusals")
        attacked = p99s(stack.url, *tenant)
        print("p99 before %s, with %d idle sockets (%d refusals) %s"
              % (before, idle.open, idle.refusals, attacked))
        assert idle.open <= 500
    finally:
        idle.close()
    assert_within_twice(before, attacked, p99s(stack.url, *tenant))


@pytest.mark.processes
def test_sockets_with_unknown_keys_spend_the_address_budget_of_failures(tmp_path):
    """AUTH_FAILURE_LIMIT covers feed sockets as it covers requests: once an address
    failed too often, its next sockets are closed 1013 without a key lookup."""
    web = Gunicorn(tmp_path / "web.log", workers=1, env={"AUTH_FAILURE_LIMIT": "1/h burst 3"})
    try:
        codes = []
        for n in range(5):
            raw = RawSocket(web.url)
            raw.send_text('{"type": "auth", "token": "ik_unknown_%d"}' % n)
            codes.append(raw.close_code())
        assert codes == [4401, 4401, 4401, 1013, 1013]
    finally:
        web.stop()
