"""The live feed (DESIGN §8): the page at /feed and its WebSocket at /api/feed/ws.

Protocol (JSON text frames): the client sends {"type": "auth", "token": KEY}
within AUTH_TIMEOUT seconds; the server answers {"type": "ready", ...} or
closes with 4401 (bad key) or 4403 (no read scope). Then the server sends the
organization's events as they happen, {"type": "dropped", "count": N} when this
socket fell behind and events were dropped for it, and {"type": "gap"} when
events may have been missed upstream (the page then catches up through the read
API). A revoked key's sockets are closed with 4401.

A server thread runs the view only for the handshake and the auth message: the
view takes the connection away from the WSGI server, authenticates it from the
key cache, and hands it to this process's fan-out loop (ingest/fanout.py),
which serves it from then on; the thread is free again. From the upgrade on,
the socket is answered in WebSocket frames only: any failure closes it with a
close code (1009 message too big, 1011 unexpected error, 1013 try again later:
database unavailable or process full), never with an HTTP response.

permessage-deflate is never negotiated: every socket of an organization is
sent the same uncompressed frame, and nothing a client sends is ever inflated.
"""
import json
import logging
import os
import socket
import time

from flask import Blueprint, current_app, render_template, request
from flask_sock import Sock
from peewee import InterfaceError, OperationalError
from playhouse.pool import MaxConnectionsExceeded
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from ingest.accounts import hash_key
from ingest.auth import KEY_CACHE_SECONDS
from ingest.fanout import FeedSocket, text_frame
from ingest.threads import PerProcess

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 10
MAX_AUTH_MESSAGE = 4096
CLOSE_LINGER = 1.0  # seconds to wait for the client's close reply before hanging up
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
    Given to flask-sock as SOCK_SERVER_OPTIONS["thread_class"]."""

    def __init__(self, target):
        self.name = "unused"

    def start(self):
        pass


class Refused(Exception):
    """Close the socket with ``code`` and ``reason``."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Gone(Exception):
    """The client closed or vanished."""


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
        ws.close(1013, "try again later")
        return
    try:
        _serve(connection, ws.ws)
    except Refused as refused:
        _close(connection, ws.ws, refused.code, refused.reason)
    except Gone:
        connection.close()
    except Exception:
        log.exception("feed socket failed")
        _close(connection, ws.ws, 1011, "unexpected error")


def take_over(ws):
    """Move the upgraded connection out of the WSGI server's hands; returns it.

    When the view returns, the server closes the socket it gave us (gunicorn
    shuts it down and lingers on it first; Werkzeug writes a response). So the
    connection moves to a descriptor of its own, and the server's descriptor
    number is pointed at a socket whose peer is already gone: the server reads
    end-of-file, its writes fail as a dropped connection, and it closes it.
    simple-websocket is told the socket is gone, so flask-sock's own close does
    nothing.
    """
    server_socket = ws.sock
    connection = socket.socket(fileno=os.dup(server_socket.fileno()))
    placeholder, peer = socket.socketpair()
    peer.close()
    with placeholder:
        os.dup2(placeholder.fileno(), server_socket.fileno(), inheritable=False)
    ws.connected = False
    return connection


def _serve(connection, ws):
    raw = _first_message(connection, ws)
    try:
        message = json.loads(raw)
        token = message.get("token") if message.get("type") == "auth" else None
    except (ValueError, AttributeError, RecursionError):
        token = None
    key_hash = hash_key(token)
    try:
        principal = current_app.extensions["keys"].principal(key_hash) if key_hash else None
    except UNAVAILABLE:
        raise Refused(1013, "database unavailable; try again later") from None
    if principal is None:
        raise Refused(4401, "authentication failed")
    if "read" not in principal.scopes:
        raise Refused(4403, "this key lacks the read scope")
    organization_id = principal.organization_id
    greeting = text_frame(json.dumps({"type": "ready", "organizationId": organization_id}))
    bus = current_app.extensions["bus"]
    connection.settimeout(None)
    if not bus.attach(FeedSocket(connection, ws, organization_id, key_hash), greeting):
        raise Refused(1013, "this server holds all the sockets it can; try again later")
    _watch_keys(bus.fanout, current_app.extensions["keys"])
    log.info("feed socket connected", extra={"organization_id": organization_id})


def _first_message(connection, ws):
    """The client's first message (its auth), answering its pings meanwhile."""
    deadline = time.monotonic() + AUTH_TIMEOUT
    parts, size = [], 0
    while True:
        for event in ws.events():
            if isinstance(event, Ping):
                connection.sendall(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise Gone()
            elif isinstance(event, BytesMessage):
                raise Refused(4401, "authentication failed")
            elif isinstance(event, TextMessage):
                parts.append(event.data)
                size += len(event.data)
                if size > MAX_AUTH_MESSAGE:
                    raise Refused(1009, "the auth message is too big")
                if event.message_finished:
                    return "".join(parts)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refused(4401, "authentication timed out")
        connection.settimeout(remaining)
        try:
            data = connection.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            raise Gone() from None
        if not data:
            raise Gone()
        ws.receive_data(data)


def _close(connection, ws, code, reason):
    """Send a close frame, wait briefly for the client's reply, hang up."""
    try:
        connection.settimeout(CLOSE_LINGER)
        connection.sendall(ws.send(CloseConnection(code=code, reason=reason)))
        connection.shutdown(socket.SHUT_WR)
        while connection.recv(4096):
            pass
    except Exception:  # the client is gone or slow: hang up all the same
        pass
    finally:
        connection.close()


def _watch_keys(fanout, keys):
    """Start this process's check of the keys its sockets were opened with: every
    KEY_CACHE_SECONDS, the sockets of a key revoked meanwhile are closed (4401)."""
    _key_watch.start(fanout, keys)


def _check_keys(fanout, keys):
    while True:
        time.sleep(KEY_CACHE_SECONDS)
        in_use = fanout.key_hashes()
        if not in_use:
            continue
        try:
            revoked = in_use - keys.live(in_use)
        except Exception:  # the database is away; keep the sockets, ask again later
            log.warning("could not check the feed sockets' keys", exc_info=True)
            continue
        if revoked:
            fanout.close_keys(revoked, 4401, "key revoked")


_key_watch = PerProcess(("feed-keys", _check_keys))
