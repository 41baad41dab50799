"""Random UUIDs (version 4), as uuid.uuid4 makes them, without a system call each.

uuid.uuid4 reads 16 bytes from os.urandom every time; on the ingest path that
is a system call per interaction and per request id. Here the bytes come from
os.urandom 4 KiB at a time. A forked process starts with an empty buffer, so
no two processes ever hand out the same bytes.
"""
import os
import threading
import uuid

_BUFFER_BYTES = 4096
_state = {"buffer": b"", "offset": 0}
_lock = threading.Lock()


def _forget():
    _state["buffer"], _state["offset"] = b"", 0


os.register_at_fork(after_in_child=_forget)


def uuid4():
    with _lock:
        offset = _state["offset"]
        if offset + 16 > len(_state["buffer"]):
            _state["buffer"], offset = os.urandom(_BUFFER_BYTES), 0
        _state["offset"] = offset + 16
        return uuid.UUID(bytes=_state["buffer"][offset:offset + 16], version=4)
