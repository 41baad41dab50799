"""A feed socket's flow control (ingest/fanout.py FeedSocket), without sockets: its
outbox bound, what is dropped and how the browser is told, what the kernel took,
the client's inbound budget and its auth message (DESIGN §8, §12)."""
import json
import time

from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from ingest.fanout import GREETING, INBOUND_BURST, MAX_AUTH_MESSAGE, OUTBOX_BYTES, Close, FeedSocket, text_frame
from tests.feed_client import connected_pair


def open_socket():
    """A FeedSocket past its handshake, and the browser's end of its wsproto state."""
    server, browser = connected_pair()
    return FeedSocket(None, server, "org", "key"), browser


def frames(first, count, size):
    """``count`` events from position ``first``, each a frame of about ``size`` bytes."""
    return [(position, text_frame(json.dumps({"position": position, "pad": "x" * size})))
            for position in range(first, first + count)]


def received(feed_socket, browser):
    """What the browser reads of everything queued, the outbox then sent whole."""
    data = b"".join(bytes(part) for part in feed_socket.outbox)
    feed_socket.sent(len(data), time.monotonic())
    browser.receive_data(data)
    return [json.loads(event.data) for event in browser.events() if isinstance(event, TextMessage)]


def test_events_within_the_bound_are_queued_in_order():
    feed_socket, browser = open_socket()
    assert feed_socket.push(None, frames(1, 10, 100))
    assert feed_socket.position == 10 and feed_socket.has_room()
    assert [m["position"] for m in received(feed_socket, browser)] == list(range(1, 11))
    assert feed_socket.queued == 0


def test_what_does_not_fit_is_dropped_and_the_browser_told_before_the_next_event():
    feed_socket, browser = open_socket()
    size = OUTBOX_BYTES // 10
    assert not feed_socket.push(None, frames(1, 15, size))  # 9 fit, whole frames only
    kept = feed_socket.position
    assert feed_socket.dropped == 15 - kept and feed_socket.queued <= OUTBOX_BYTES
    assert not feed_socket.has_room()
    assert [m["position"] for m in received(feed_socket, browser)] == list(range(1, kept + 1))
    # Once drained, it is told at once, and the next event follows the notice.
    assert feed_socket.push(None, frames(16, 1, 10))
    assert received(feed_socket, browser) == [{"type": "dropped", "count": 15 - kept},
                                              {"position": 16, "pad": "x" * 10}]


def test_a_partial_send_keeps_the_rest_of_the_frame_first():
    feed_socket, browser = open_socket()
    feed_socket.push(None, frames(1, 2, 1000))
    whole = b"".join(bytes(part) for part in feed_socket.outbox)
    feed_socket.sent(700, now=5.0)
    assert feed_socket.progress_at == 5.0 and feed_socket.queued == len(whole) - 700
    assert b"".join(bytes(part) for part in feed_socket.outbox) == whole[700:]


def test_a_closing_socket_takes_no_more_events():
    feed_socket, browser = open_socket()
    feed_socket.begin_close(CloseReason.GOING_AWAY, "server restarting", time.monotonic())
    queued = feed_socket.queued
    assert feed_socket.push(None, frames(1, 3, 10)) and feed_socket.queued == queued
    browser.receive_data(b"".join(bytes(part) for part in feed_socket.outbox))
    [closed] = list(browser.events())
    assert isinstance(closed, CloseConnection) and closed.code == CloseReason.GOING_AWAY


def test_a_ping_is_answered_and_a_client_over_its_inbound_budget_is_cut_off():
    feed_socket, browser = open_socket()
    now = time.monotonic()
    assert feed_socket.receive(browser.send(Ping(payload=b"hi")), now) is None
    browser.receive_data(b"".join(bytes(part) for part in feed_socket.outbox))
    assert [type(event).__name__ for event in browser.events()] == ["Pong"]
    flood = browser.send(TextMessage(data="x" * (INBOUND_BURST // 2)))
    assert feed_socket.receive(flood, now) is None  # within the burst
    assert feed_socket.receive(flood, now + 0.001) == (CloseReason.POLICY_VIOLATION,
                                                      "nothing more is expected from the client")


def test_the_auth_message_is_taken_whole_once_and_bounded():
    feed_socket, browser = open_socket()
    feed_socket.state = GREETING
    message = json.dumps({"type": "auth", "token": "k" * 100})
    part = browser.send(TextMessage(data=message[:30], message_finished=False))
    assert feed_socket.receive(part, time.monotonic()) is None
    assert feed_socket.take_auth_message() is None
    assert feed_socket.receive(browser.send(TextMessage(data=message[30:])), time.monotonic()) is None
    assert feed_socket.take_auth_message() == message and feed_socket.take_auth_message() is None

    too_big, browser = open_socket()
    too_big.state = GREETING
    assert too_big.receive(browser.send(TextMessage(data="x" * (MAX_AUTH_MESSAGE + 1))), time.monotonic()) == (
        CloseReason.MESSAGE_TOO_BIG, "the auth message is too big")
    binary, browser = open_socket()
    binary.state = GREETING
    assert binary.receive(browser.send(BytesMessage(data=b"{}")), time.monotonic()) == (Close.UNAUTHORIZED,
                                                                             "authentication failed")
