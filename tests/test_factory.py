"""The application factory: what it honours, what it refuses, what it shares."""
import threading

import pytest

import tasks
from app import create_app
from ingest import runtime
from tests.helpers import bearer, interaction, started_app


def test_two_apps_in_one_process_share_nothing(make_app, org, customer_id):
    first, second = make_app({"TESTING": True}), make_app({"TESTING": True, "COMMIT_TIMEOUT": 7})
    one, other = runtime.of(first), runtime.of(second)
    assert one.service.committer is not other.service.committer
    assert one.keys is not other.keys and one.bus is not other.bus
    assert (one.service.commit_timeout, other.service.commit_timeout) == (20, 7)
    for app in (first, second):
        response = app.test_client().post("/api/data/ingest", headers=bearer(org["ingestKey"]),
                                          json=interaction(customer_id))
        assert response.status_code == 201


def test_stopping_a_runtime_joins_every_thread_it_started(org, customer_id):
    before = set(threading.enumerate())
    with started_app({"TESTING": True}) as app:
        response = app.test_client().post("/api/data/ingest", headers=bearer(org["ingestKey"]),
                                          json=interaction(customer_id))
        assert response.status_code == 201
        assert {thread.name for thread in set(threading.enumerate()) - before} >= {
            "group-commit", "after-commit", "feed-fanout", "feed-keys", "analysis-results"}
    # limits' in-memory storage expires its counters on one-shot 10 ms timers of its own
    left = {thread for thread in set(threading.enumerate()) - before if not isinstance(thread, threading.Timer)}
    assert left == set()


@pytest.mark.parametrize("key, value", [("EVENTS_URL", "redis://127.0.0.1:6379/9"),
                                        ("QUEUE_URL", "sqlite:////tmp/elsewhere.db"),
                                        ("ANALYSIS_SWEEP_AFTER", 5)])
def test_settings_that_come_from_the_environment_cannot_be_overridden(key, value):
    with pytest.raises(ValueError, match=key):
        create_app({key: value})


def test_a_misspelt_setting_is_refused():
    with pytest.raises(ValueError, match="RATE_LIMT"):
        create_app({"TESTING": True, "RATE_LIMT": "1/s"})


def test_an_override_equal_to_the_environment_is_accepted():
    app = create_app({"QUEUE_URL": tasks.settings["QUEUE_URL"], "MAX_BATCH_ITEMS": 3})
    assert runtime.of(app).service.max_batch_items == 3


@pytest.mark.parametrize("primary, replica", [("sqlite:////tmp/ingest.db", "postgresql://replica/ingest"),
                                              ("postgresql://primary/ingest", "sqlite:////tmp/replica.db")])
def test_a_read_replica_is_refused_unless_both_databases_are_postgresql(primary, replica):
    with pytest.raises(ValueError, match="DATABASE_READ_URL"):
        create_app({"DATABASE_URL": primary, "DATABASE_READ_URL": replica})


def test_without_a_read_replica_there_is_none_to_report(app):
    assert runtime.of(app).replica is None
    assert "replica" not in app.test_client().get("/readyz").get_json()
