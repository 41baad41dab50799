"""The live feed (DESIGN §8): the page at /feed and its WebSocket at /api/feed/ws.

Protocol (JSON text frames): the client sends {"type": "auth", "token": KEY}
within AUTH_TIMEOUT seconds; the server answers {"type": "ready", ...} or
closes with 4401 (bad key) or 4403 (no read scope). Then the server sends
the organization's events as they happen, and {"type": "dropped", "count": N}
when this socket fell behind and events were dropped for it.
"""
import functools
import json
import logging
import struct

from flask import Blueprint, current_app, render_template
from flask_sock import Sock

from ingest.auth import find_key
from models import db

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 10
SEND_POLL = 25.0  # seconds between checks that a quiet client is still there
# A client that reads nothing for this long is disconnected (its browser page
# reconnects), so a dead peer never holds a thread for the TCP timeout.
SEND_TIMEOUT = 20

sock = Sock()
feed = Blueprint("feed", __name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@feed.get("/feed")
def page():
    response = current_app.make_response(render_template("feed.html"))
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@sock.route("/api/feed/ws", bp=feed)
def socket(ws):
    organization_id = _authenticate(ws)
    if organization_id is None:
        return
    ws.sock.settimeout(SEND_TIMEOUT)
    bus = current_app.extensions["bus"]
    subscription = bus.subscribe(organization_id)
    log.info("feed socket connected", extra={"organization_id": organization_id})
    try:
        ws.send(json.dumps({"type": "ready", "organizationId": organization_id}))
        while ws.connected and not subscription.closed:
            messages = subscription.take(timeout=SEND_POLL)
            if messages and ws.connected:
                ws.sock.sendall(b"".join(text_frame(message) for message in messages))
            while ws.receive(timeout=0) is not None:
                pass  # nothing more is expected from the client; keep its buffer empty
        if subscription.closed:
            ws.close(1001, "server restarting")
    except OSError:
        log.info("feed socket timed out", extra={"organization_id": organization_id})
    finally:
        bus.unsubscribe(subscription)


@functools.lru_cache(maxsize=4096)
def text_frame(message):
    """A server-to-client WebSocket text frame (RFC 6455 §5.2: final, unmasked).

    Every socket of an organization is sent the same event, so each is framed
    once (the cache) and a batch goes out in one write, instead of one
    simple-websocket send, with its own framing and system call, per event and socket.
    """
    payload = message.encode("utf-8")
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


def _authenticate(ws):
    """The organization id of a valid read key sent first, or None after closing."""
    raw = ws.receive(timeout=AUTH_TIMEOUT)
    try:
        message = json.loads(raw) if raw is not None else {}
        token = message.get("token") if message.get("type") == "auth" else None
    except (ValueError, AttributeError):
        token = None
    try:
        api_key = find_key(token)
    finally:
        db.close()  # a socket lives long; it must not hold a database connection
    if api_key is None:
        ws.close(4401, "authentication failed" if raw is not None else "authentication timed out")
        return None
    if "read" not in api_key.scope_set:
        ws.close(4403, "this key lacks the read scope")
        return None
    return str(api_key.organization_id)
