"""The live feed (DESIGN §8): the page at /feed and its WebSocket at /api/feed/ws.

Protocol (JSON text frames): the client sends {"type": "auth", "token": KEY}
within AUTH_TIMEOUT seconds; the server answers {"type": "ready", ...} or
closes with 4401 (bad key) or 4403 (no read scope). Then the server sends the
organization's events as they happen, and {"type": "dropped", "count": N} when
this socket fell behind and events were dropped for it (they follow, in order,
once it has drained). Events the bus lost upstream are read from the store by
the fan-out (FanOut.resync), so a socket never misses one. A revoked key's
sockets are closed with 4401.

A server thread runs the view only for the handshake: the view takes the
connection away from the WSGI server and hands it to this process's fan-out loop
(ingest/fanout.py), which waits for the auth message and serves the socket from
then on; the thread is free again at once, so sockets that never authenticate
cost no thread. The loop hands the auth message to ``authenticate`` here, on one
of its auth threads (the key cache may ask the database). From the upgrade on,
the socket is answered in WebSocket frames only: any failure closes it with a
close code (1009 message too big, 1011 unexpected error, 1013 try again later:
database unavailable or process full), never with an HTTP response.

permessage-deflate is never negotiated: every socket of an organization is
sent the same uncompressed frame, and nothing a client sends is ever inflated.
"""
import functools
import json
import logging
import os
import socket

from flask import Blueprint, current_app, g, render_template, request
from flask_sock import Sock
from peewee import InterfaceError, OperationalError
from playhouse.pool import MaxConnectionsExceeded
from wsproto.events import CloseConnection
from wsproto.frame_protocol import CloseReason

from ingest import changes
from ingest.accounts import Scope
from ingest.auth import AddressRefused, check_key
from ingest.fanout import Close, FeedSocket, Refused, text_frame

log = logging.getLogger(__name__)

REFUSE_TIMEOUT = 0.1  # seconds a request thread spends sending a refusal's close frame
UNAVAILABLE = (OperationalError, InterfaceError, MaxConnectionsExceeded, TimeoutError)

# The socket route is on the feed blueprint, whose before_request strips the
# compression offer; Sock.init_app only registers routes made without a
# blueprint, so the factory registers the blueprint and needs no init_app.
sock = Sock()
feed = Blueprint("feed", __name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class NoReaderThread:
    """simple-websocket starts a reader thread per socket; the feed reads and writes
    its sockets itself (one fan-out thread per process), so that thread never runs.
    Given to flask-sock as SOCK_SERVER_OPTIONS["thread_class"], a documented option;
    that its reader is then never needed is ours to know: simple-websocket's
    ``thread_class(target=...).start()`` is pinned by tests/test_feed_contract.py.

    Why not a thread or greenlet per socket, as flask-sock documents for many
    sockets: measured side by side (gevent workers), that costs many times the
    CPU per delivered event and misses the §12 live rows (docs/BENCHMARKS.md)."""

    def __init__(self, target):
        self.name = "unused"

    def start(self):
        pass


@feed.get("/feed")
def page():
    response = current_app.make_response(render_template("feed.html"))
    response.headers["Content-Security-Policy"] = CSP
    return response


@feed.before_request
def refuse_compression():
    if request.endpoint == "feed.websocket":
        request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


@sock.route("/api/feed/ws", bp=feed)
def websocket(ws):
    try:
        connection = take_over(ws)
    except OSError:  # out of descriptors: answer on the server's socket, as it is
        log.exception("could not take over a feed socket")
        ws.close(CloseReason.TRY_AGAIN_LATER, "try again later")
        return
    process = g.runtime
    bus, keys = process.bus, process.keys
    check = functools.partial(check_key, address=request.remote_addr or "unknown", keys=keys,
                              failures=process.auth_failures)
    if not bus.fanout.greet(FeedSocket(connection, ws.ws), functools.partial(authenticate, bus, keys, check)):
        _refuse(connection, ws.ws, CloseReason.TRY_AGAIN_LATER,
                "this server holds all the sockets it can; try again later")


def take_over(ws):
    """Move the upgraded connection out of the WSGI server's hands; returns it.

    When the view returns, the server closes the socket it gave us (gunicorn
    shuts it down and lingers on it first; Werkzeug writes a response). So the
    connection moves to a descriptor of its own, and the server's descriptor
    number is pointed at a socket whose peer is already gone: the server reads
    end-of-file, its writes fail as a dropped connection, and it closes it.
    simple-websocket is told the socket is gone, so flask-sock's own close does
    nothing. What this reads and sets of simple-websocket (``sock``, ``connected``)
    and how gunicorn closes the descriptor are pinned by tests/test_feed_contract.py.
    """
    server_socket = ws.sock
    connection = socket.socket(fileno=os.dup(server_socket.fileno()))
    placeholder, peer = socket.socketpair()
    peer.close()
    with placeholder:
        os.dup2(placeholder.fileno(), server_socket.fileno(), inheritable=False)
    ws.connected = False
    return connection


def authenticate(bus, keys, check, feed_socket, message):
    """Check a socket's auth message (with ``check``: auth.check_key for the socket's
    address) and hand the socket to the bus; raises Refused. Runs on one of the
    fan-out's auth threads."""
    try:
        parsed = json.loads(message)
        token = parsed.get("token") if parsed.get("type") == "auth" else None
    except (ValueError, AttributeError, RecursionError):
        parsed, token = {}, None
    try:
        principal = check(token)
    except UNAVAILABLE:
        raise Refused(CloseReason.TRY_AGAIN_LATER, "database unavailable; try again later") from None
    except AddressRefused:
        raise Refused(CloseReason.TRY_AGAIN_LATER,
                      "too many failed authentications from this address; try again later") from None
    if principal is None:
        raise Refused(Close.UNAUTHORIZED, "authentication failed")
    if Scope.READ not in principal.scopes:
        raise Refused(Close.FORBIDDEN, "this key lacks the read scope")
    feed_socket.after = _after(principal.organization_id, parsed.get("after"))
    try:
        feed_socket.start = bus.fanout.start_position(principal.organization_id)
    except UNAVAILABLE:
        raise Refused(CloseReason.TRY_AGAIN_LATER, "database unavailable; try again later") from None
    feed_socket.authenticated(principal.organization_id, principal.key_hash)
    cursor = changes.cursor(principal.organization_id, feed_socket.starts_after())
    greeting = text_frame(json.dumps({"type": "ready", "organizationId": principal.organization_id, "cursor": cursor}))
    if not bus.attach(feed_socket, greeting):
        raise Refused(CloseReason.TRY_AGAIN_LATER, "this server holds all the sockets it can; try again later")
    log.info("feed socket connected", extra={"organization_id": principal.organization_id})


def _after(organization_id, cursor):
    """The position of the auth message's ``after`` cursor (None without one)."""
    if cursor is None:
        return None
    try:
        return changes.position_of(organization_id, cursor if isinstance(cursor, str) else "")
    except changes.BadCursor:
        raise Refused(Close.BAD_CURSOR, "after is not a cursor of this organization's changes") from None


def _refuse(connection, ws, code, reason):
    """Send a close frame if the client takes it at once, and hang up."""
    try:
        connection.settimeout(REFUSE_TIMEOUT)
        connection.sendall(ws.send(CloseConnection(code=code, reason=reason)))
    except OSError:
        pass
    finally:
        connection.close()
