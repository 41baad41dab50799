"""The application factory: what it honours, what it refuses, what it shares."""
import threading

import pytest

import tasks
from app import create_app
from tests.helpers import bearer, interaction


def test_two_apps_in_one_process_share_one_writer(org, customer_id):
    def writer_threads():
        return len([t for t in threading.enumerate() if t.name == "group-commit"])

    create_app({"TESTING": True}).test_client().post(
        "/api/data/ingest", headers=bearer(org["ingestKey"]), json=interaction(customer_id))
    before = writer_threads()
    first, second = create_app({"TESTING": True}), create_app({"TESTING": True, "COMMIT_TIMEOUT": 7})
    assert first.extensions["ingest"].writer is second.extensions["ingest"].writer
    assert second.extensions["ingest"].commit_timeout == 7  # per-app settings still apply
    for app in (first, second):
        response = app.test_client().post("/api/data/ingest", headers=bearer(org["ingestKey"]),
                                          json=interaction(customer_id))
        assert response.status_code == 201
    assert writer_threads() == before


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
    assert app.extensions["ingest"].max_batch_items == 3
