"""The application factory and the dev server (DESIGN §2, §11).

`python app.py` runs everything in one process: the web server, SQLite, the
SQLite queue with consumer threads, the in-memory event bus.
Production: `gunicorn -c gunicorn.conf.py "app:create_app()"` plus
`huey_consumer tasks.huey -w N`.
"""
import argparse

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

import models
import tasks
from ingest import api, body, cli, config, errors, feed, logs, metrics, overload, security
from ingest.auth import KeyCache
from ingest.service import IngestService


def create_app(test_config=None):
    """Build the app. ``test_config`` overrides settings read from the environment.

    The queue, the event bus and the sweep come from the environment only
    (tasks.py reads it at import), so that web and consumer processes always
    agree; overriding them here is refused (config.ENVIRONMENT_ONLY). The
    database, the writer thread and the bus are the process's: every app
    created in one process shares them.
    """
    settings = config.load(overrides=test_config, fixed=tasks.settings)
    app = Flask(__name__, instance_path=config.INSTANCE_PATH)
    app.config.update(settings)
    app.json.sort_keys = False  # metadata and traits read back in the order they were sent
    # The feed's sockets are read, written and pinged by its fan-out thread (ingest/feed.py).
    app.config["SOCK_SERVER_OPTIONS"] = {"thread_class": feed.NoReaderThread}
    logs.configure(settings["LOG_LEVEL"])
    models.bind(settings["DATABASE_URL"], settings["DB_POOL_SIZE"])

    logs.init_app(app)
    models.init_app(app)
    security.init_app(app)
    errors.register(app)
    body.init_app(app)
    bus = tasks.event_bus()
    app.extensions["bus"] = bus
    app.extensions["keys"] = KeyCache()
    app.extensions["ingest"] = IngestService(tasks.enqueue_analysis, bus.publish,
                                             settings["MAX_BATCH_ITEMS"], settings["COMMIT_TIMEOUT"])
    app.extensions["queue_size"] = tasks.huey.pending_count
    app.extensions["rate_limit"] = _limit(settings["RATE_LIMIT"], settings)
    app.extensions["auth_failures"] = _limit(settings["AUTH_FAILURE_LIMIT"], settings)
    app.extensions["backlog"] = overload.Backlog(settings["ANALYSIS_BACKLOG_MAX"])
    metrics.init_app(app, app.extensions["backlog"], bus)
    app.register_blueprint(api.api)
    app.register_blueprint(api.segment_api)
    app.register_blueprint(api.health)
    app.register_blueprint(feed.feed)
    cli.init_app(app)
    if settings["TRUSTED_PROXIES"]:  # the client's address from X-Forwarded-For (ingest/auth.py)
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings["TRUSTED_PROXIES"])
    return app


def _limit(spec, settings):
    """The RateLimit of ``spec`` in RATE_LIMIT_URL's store, or None for no limit."""
    return overload.RateLimit(spec, settings["RATE_LIMIT_URL"]) if spec else None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the ingest service (dev, embedded).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)

    app = create_app()
    with app.app_context():
        models.migrate(app.config["PARTITION_INTERVAL"])
        cli.greet_first_start("http://%s:%d" % (args.host, args.port))
    consumer = tasks.start_embedded_consumer()
    try:
        app.run(host=args.host, port=args.port, threaded=True, use_reloader=False)
    finally:
        consumer.stop(graceful=True)


if __name__ == "__main__":
    main()
