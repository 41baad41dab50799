"""The application factory and the dev server (DESIGN §2, §11).

`python app.py` runs everything in one process: the web server, SQLite, the
SQLite queue with consumer threads, the in-memory event bus.
Production: `gunicorn -c gunicorn.conf.py "app:create_app()"` plus
`huey_consumer tasks.huey -w N`.
"""
import argparse
import signal

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

import models
import tasks
from ingest import api, cli, config, errors, feed, logs, metrics, runtime, web


def create_app(test_config=None):
    """Build the app and its process runtime (ingest/runtime.py), not yet started.
    ``test_config`` overrides settings read from the environment.

    The queue, the event bus and the sweep come from the environment only
    (tasks.py reads it at import), so that web and consumer processes always
    agree; overriding them here is refused (config.ENVIRONMENT_ONLY).
    """
    settings = config.load(overrides=test_config, fixed=tasks.settings)
    app = Flask(__name__, instance_path=config.INSTANCE_PATH)
    app.config.update(settings)
    app.json.sort_keys = False  # metadata and traits read back in the order they were sent
    # The feed's sockets are read, written and pinged by its fan-out thread (ingest/feed.py).
    app.config["SOCK_SERVER_OPTIONS"] = {"thread_class": feed.NoReaderThread}
    logs.configure(settings["LOG_LEVEL"])
    process = tasks.make_runtime(settings)
    process.bind()  # the CLI's commands query without starting anything
    app.extensions["runtime"] = process

    web.init_app(app)
    errors.register(app)
    metrics.init_app(app, process.backlog, process.bus, process.replica)
    app.register_blueprint(api.api)
    app.register_blueprint(api.segment_api)
    app.register_blueprint(api.health)
    app.register_blueprint(feed.feed)
    cli.init_app(app)
    if settings["TRUSTED_PROXIES"]:  # the client's address from X-Forwarded-For (ingest/auth.py)
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings["TRUSTED_PROXIES"])
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the ingest service (dev, embedded).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)

    app = create_app()
    with app.app_context():
        models.migrate(app.config["PARTITION_INTERVAL"])
        cli.greet_first_start("http://%s:%d" % (args.host, args.port))
    process = runtime.of(app)
    process.start()
    consumer = tasks.start_embedded_consumer()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app.run(host=args.host, port=args.port, threaded=True, use_reloader=False)
    finally:
        consumer.stop(graceful=True)
        process.stop()


def _interrupt(signum, frame):
    """SIGTERM stops the dev server as Ctrl-C does: its consumer and runtime stop cleanly."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
