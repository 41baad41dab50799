"""Fixtures: a fresh database per test run (SQLite by default, PostgreSQL when
DATABASE_URL says so), emptied before each test; `app`, `client`, `runner` as in
Flask's tutorial; an organization with keys; injected storage faults; the
production stack (nginx, gunicorn, huey_consumer, Redis).

Markers (pytest.ini): a test gets `processes`, `redis` and `browser` from the
fixtures it uses (FIXTURE_MARKERS), or has them written on it; a test that
starts a process or uses Redis without its marker fails (see _expect_marker).

The environment is set here, before the app and tasks modules are imported,
because the web app and the queue consumers read their configuration from it.
"""
import contextlib
import os
import sys
import tempfile

import pytest
from flask.testing import FlaskClient

from tests import dbs
from tests.openapi_check import check_response

RUN_DIR = tempfile.mkdtemp(prefix="ingest-tests-")
os.environ["INSTANCE_PATH"] = RUN_DIR
os.environ["DATABASE_URL"] = dbs.create_scratch_database(os.environ.get("DATABASE_URL"), RUN_DIR)
os.environ.setdefault("QUEUE_URL", "sqlite:///" + os.path.join(RUN_DIR, "queue.db"))
os.environ.setdefault("LOG_LEVEL", "WARNING")

import models  # noqa: E402  (after the environment is set)
from ingest import runtime  # noqa: E402
from tests.helpers import make_customer, make_organization, started_app  # noqa: E402


def pytest_sessionstart(session):
    models.db.initialize(models.make_database(os.environ["DATABASE_URL"]))
    models.migrate()


def pytest_sessionfinish(session):
    dbs.drop_scratch_database(os.environ["DATABASE_URL"])


def pytest_report_header(config):
    return "database: %s" % os.environ["DATABASE_URL"]


# The markers of a test that uses one of these fixtures, directly or through another.
FIXTURE_MARKERS = {
    "stack": ("processes", "redis"),
    "module_stack": ("processes", "redis"),
    "make_stack": ("processes",),  # test_consumer: gunicorn and consumers (its Redis queues are marked there)
    "browser": ("processes", "browser"),  # test_page: Chromium
    "nginx_gunicorn": ("processes",),  # test_e2e
    "gunicorn": ("processes",),  # test_segment, test_erasure_races
    "single_worker_gunicorn": ("processes",),  # test_hardening
    "limited_server": ("processes", "redis"),  # test_overload
    "replication": ("processes",),  # test_replica: a PostgreSQL primary and its streaming replica
}


@pytest.hookimpl(tryfirst=True)  # before -m selects by them
def pytest_collection_modifyitems(items):
    for item in items:
        for marker in {m for name in item.fixturenames for m in FIXTURE_MARKERS.get(name, ())}:
            item.add_marker(marker)


_running = None  # the test whose setup, call or teardown runs now


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _running
    _running = item
    try:
        return (yield)
    finally:
        _running = None


def _expect_marker(marker, doing):
    """Fail the running test if it is doing what its missing ``marker`` says."""
    if _running is not None and _running.get_closest_marker(marker) is None:
        raise AssertionError("%s %s but is not marked %r: add it to FIXTURE_MARKERS in tests/conftest.py "
                             "or write @pytest.mark.%s on the test" % (_running.nodeid, doing, marker, marker))


def _audit(event, args):
    """Every process a test starts passes here: subprocess.Popen raises the audit
    event of that name (PEP 578) with (executable, args, cwd, env) before it forks,
    and what a hook raises aborts the start."""
    if event != "subprocess.Popen" or _running is None:
        return
    program = os.path.basename(os.fsdecode(args[0]))
    _expect_marker("processes", "starts a process (%s)" % program)
    if program == "redis-server":
        _expect_marker("redis", "starts redis-server")


sys.addaudithook(_audit)  # (for the whole run: a hook cannot be removed)


@pytest.fixture
def app():
    """The app, its runtime started (and stopped after the test), on emptied tables."""
    with started_app({"TESTING": True}) as app:
        dbs.empty_tables()
        yield app


@pytest.fixture
def make_app():
    """``make_app(config)``: an app built with ``config``, its runtime started for the test."""
    with contextlib.ExitStack() as stack:
        yield lambda config: stack.enter_context(started_app(config))


class SpecCheckedClient(FlaskClient):
    """A test client that checks every JSON response against the published spec."""

    def open(self, *args, **kwargs):
        response = super().open(*args, **kwargs)
        if response.is_json and response.status_code != 405:
            request = response.request
            check_response(request.method, request.path, response.status_code, response.get_json())
        return response


@pytest.fixture
def running():
    """``running(part)``: ``part.start()`` now, ``part.stop()`` after the test; returns ``part``."""
    started = []

    def start(part):
        part.start()
        started.append(part)
        return part
    yield start
    for part in reversed(started):
        part.stop()


@pytest.fixture
def client(app):
    app.test_client_class = SpecCheckedClient
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def service(app):
    with app.app_context():
        yield runtime.of(app).service


@pytest.fixture
def org(app):
    """An organization with an ingest key and a read key."""
    return make_organization(app, "Acme")


@pytest.fixture
def customer_id(app, org):
    return make_customer(app, org, external_id="c-1")

@pytest.fixture
def storage_faults(app):
    """Database-level faults (real triggers, no mocks), removed after the test.

    An interaction whose content is FAIL_INSERT fails its INSERT; a customer
    named FAIL_UPDATE fails the counter UPDATE, after its chunk's rows were
    inserted in the same transaction.
    """
    dbs.install_faults()
    yield dbs
    dbs.remove_faults()


REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def require_redis():
    """Redis for the tests that need it: skipped on a laptop without it, a failure in CI."""
    import redis
    _expect_marker("redis", "uses Redis")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        if os.environ.get("CI"):
            pytest.fail("Redis is required in CI and is not reachable at %s: %s" % (REDIS_URL, error))
        pytest.skip("Redis not reachable at %s" % REDIS_URL)
    return REDIS_URL


@contextlib.contextmanager
def production_stack(directory, env=None, sockets_per_address=None):
    """The production shape: nginx in front of gunicorn with 2 workers, a
    huey_consumer process, Redis as the event bus; yields the web front.
    ``env``: more settings for both processes; ``sockets_per_address``: nginx's
    bound on one address's feed sockets, if not deploy/nginx.conf's."""
    from tests.servers import Consumer, Production

    env = {"EVENTS_URL": require_redis(), "QUEUE_URL": "sqlite:///%s" % (directory / "queue.db"),
           **(env or {})}
    web = Production(directory, workers=2, env=env, sockets_per_address=sockets_per_address)
    consumer = Consumer(directory / "consumer.log", env=env)
    try:
        yield web
    finally:
        consumer.stop()
        web.stop()


@pytest.fixture
def stack(app, tmp_path):
    with production_stack(tmp_path) as web:
        yield web


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory):
    """One production stack for a module whose tests do not disturb each other.
    Its feed tests hold up to 2,000 sockets from 127.0.0.1, as that many browsers
    behind one office's address would."""
    with production_stack(tmp_path_factory.mktemp("stack"), sockets_per_address=2500) as web:
        yield web
