"""What the live feed relies on in simple-websocket, pinned (ingest/feed.py).

The feed serves its sockets from one fan-out loop per process instead of a
thread (or greenlet) per socket, the way flask-sock documents: that was measured
side by side and kept (docs/BENCHMARKS.md, "The documented way to serve many
sockets"). It takes four things of simple-websocket's Server for granted, which
an upgrade could change without a word: its reader is made with
``thread_class(target=...)`` and started with ``start()`` (NoReaderThread makes
that a no-op); the upgraded connection is ``ws.sock`` and its wsproto state
``ws.ws``; a Server whose ``connected`` is False sends nothing on ``close()``
(flask-sock closes every socket after its view). If one breaks, this fails
first; the feed's own tests (test_feed, test_feed_safety, test_feed_preauth)
follow.
"""
import base64
import os
import socket

import pytest
import simple_websocket
from wsproto import WSConnection

from ingest import feed


def handshake_environ(sock):
    """The WSGI environ gunicorn gives an upgrade request on ``sock``."""
    return {"gunicorn.socket": sock, "REQUEST_METHOD": "GET", "PATH_INFO": "/api/feed/ws",
            "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "local",
            "HTTP_CONNECTION": "Upgrade", "HTTP_UPGRADE": "websocket", "HTTP_SEC_WEBSOCKET_VERSION": "13",
            "HTTP_SEC_WEBSOCKET_KEY": base64.b64encode(os.urandom(16)).decode()}


def test_the_feed_takes_the_connection_from_simple_websocket_as_it_expects():
    server_side, client_side = socket.socketpair()
    started = []

    class RecordingNoReader(feed.NoReaderThread):
        def start(self):
            started.append(True)

    with server_side, client_side:
        ws = simple_websocket.Server(handshake_environ(server_side), thread_class=RecordingNoReader)
        assert started == [True]  # the reader is made with thread_class and started, nothing else
        assert ws.sock is server_side and isinstance(ws.ws, WSConnection) and ws.connected
        assert client_side.recv(4096).startswith(b"HTTP/1.1 101")

        connection = feed.take_over(ws)
        with connection:
            with pytest.raises(simple_websocket.ConnectionClosed):
                ws.close()  # what flask-sock does after the view: nothing reaches the client
            server_side.settimeout(5)
            assert server_side.recv(16) == b""  # the server's descriptor reads end-of-file
            connection.sendall(b"still ours")
            client_side.settimeout(5)
            assert client_side.recv(64) == b"still ours"
