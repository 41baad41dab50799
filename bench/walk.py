"""The map a newcomer reads first (docs/design.md, "The map"): which of the
project's files one request passes through, from its arrival to the browser and to
its stored analysis, and how often it comes back to a file it had left.

One single ingest and one `/v1/batch`, each after a first one that warmed the
caches (the key, the customer), traced with ``threading.setprofile`` in every
thread that works for it: the request's, the group committer's, the fan-out's
(to a socket of the organization), the analysis task's (on a thread of its own,
as a consumer's worker thread runs it) and its result writer's.
Only the project's own files count (not its libraries, tests or benchmarks).
Each thread's files are listed in the order it entered them; a return is an
entry into a file the same thread had already left.

    .venv/bin/python -m bench.walk [--json] [--functions]
"""
import argparse
import collections
import json
import os
import sys
import threading

from bench.common import ROOT, scratch_environment

EXCLUDED = tuple(os.path.join(ROOT, name) + os.sep for name in (".venv", "tests", "bench", "migrations"))


class Walk:
    """The project files each thread entered, in order (consecutive repeats folded)."""

    def __init__(self):
        self.by_thread = collections.defaultdict(list)
        self.recording = False
        self._lock = threading.Lock()

    def __call__(self, frame, event, arg):
        if event != "call" or not self.recording:
            return
        path = frame.f_code.co_filename
        if not path.startswith(ROOT) or path.startswith(EXCLUDED):
            return
        name = os.path.relpath(path, ROOT)
        steps = self.by_thread[threading.current_thread().name]
        if steps and steps[-1][0] == name:
            steps[-1][2] += 1
        else:
            with self._lock:
                steps.append([name, frame.f_code.co_name, 1])  # file, function entered first, calls

    def summary(self):
        """Files, returns, and each thread's steps as "file" or, with the function
        entered first, "file:function" under "entered". ``glances`` counts the
        returns that come straight back from one call of one function in another
        file that called no other project code (a helper such as ``utcnow``)."""
        threads = {thread: [name for name, _, _ in steps] for thread, steps in self.by_thread.items()}
        return {"files": sorted({name for names in threads.values() for name in names}),
                "returns": sum(len(names) - len(set(names)) for names in threads.values()),
                "glances": sum(_glances(steps) for steps in self.by_thread.values()),
                "threads": threads,
                "entered": {thread: ["%s:%s" % (name, function) for name, function, _ in steps]
                            for thread, steps in self.by_thread.items()}}


def _glances(steps):
    """Returns to a file right after one call into another that went no further."""
    return sum(1 for before, helper, after in zip(steps, steps[1:], steps[2:], strict=False)
               if after[0] == before[0] and helper[2] == 1)


def traced(action):
    """The walk of ``action()``: every thread the runtime started is profiled (the
    profiler was set before they started) but records only meanwhile."""
    walk = Walk()
    _profiler.delegate = walk
    walk.recording = True
    try:
        action()
    finally:
        walk.recording = False
    return walk.summary()


class _Switch:
    """The profiler every thread gets at its start; it hands events to ``delegate``."""

    def __init__(self):
        self.delegate = None

    def __call__(self, frame, event, arg):
        if self.delegate is not None:
            self.delegate(frame, event, arg)


_profiler = _Switch()


def on_worker_thread(task, *args):
    """Run ``task`` on a thread of its own, as a consumer's worker thread runs it."""
    worker = threading.Thread(target=task, args=args, name="analysis-task")
    worker.start()
    worker.join()


def walks():
    import models
    import tasks
    from app import create_app
    from ingest import runtime
    from tests.feed_client import LocalSocket
    from tests.helpers import interaction, make_customer, make_organization

    app = create_app({"TESTING": True})
    with app.app_context():
        models.migrate()
    process = runtime.of(app)
    threading.setprofile(_profiler)
    sys.setprofile(_profiler)
    process.start()
    try:
        org = make_organization(app, "Walk")
        customer = make_customer(app, org, external_id="walker")
        browser = LocalSocket(process.bus, org["organizationId"], org["readKey"])
        client = app.test_client()
        headers = {"Authorization": "Bearer " + org["ingestKey"]}

        def single():
            response = client.post("/api/data/ingest", json=interaction(customer), headers=headers)
            created = browser.next()
            on_worker_thread(tasks.analyze.call_local, [response.get_json()["id"]])
            assert browser.next()["data"]["id"] == created["data"]["id"]

        def batch():
            event = {"type": "track", "userId": "walker", "event": "Signed Up", "messageId": os.urandom(8).hex()}
            assert client.post("/v1/batch", json={"batch": [event]}, headers=headers).status_code == 200
            created = browser.next()
            on_worker_thread(tasks.analyze.call_local, [created["data"]["id"]])
            browser.next()

        single(), batch()  # warm the caches
        return {"single ingest": traced(single), "/v1/batch": traced(batch)}
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        process.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--functions", action="store_true", help="name the function each step entered")
    args = parser.parse_args()
    scratch_environment()
    found = walks()
    if args.json:
        print(json.dumps(found, indent=1))
        return
    for name, walk in found.items():
        print("%s: %d files, %d returns (%d of them glances: back from a one-function helper)"
              % (name, len(walk["files"]), walk["returns"], walk["glances"]))
        for thread, steps in walk["entered" if args.functions else "threads"].items():
            files = walk["threads"][thread]
            print("  %s (%d files, %d returns): %s" % (thread, len(set(files)), len(files) - len(set(files)),
                                                       " > ".join(steps)))


if __name__ == "__main__":
    main()
