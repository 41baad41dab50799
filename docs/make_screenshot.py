"""Regenerate docs/feed.png: the live feed under a simulated stream.

    .venv/bin/python -m docs.make_screenshot      (needs Redis and /usr/bin/chromium)
"""
import os
import tempfile
import threading

from bench.common import scratch_environment

scratch_environment()
os.environ["EVENTS_URL"] = "redis://127.0.0.1:6379/15"

import models  # noqa: E402  (after the environment is set)
from app import create_app  # noqa: E402
from ingest import simulate  # noqa: E402
from ingest.cli import create_demo  # noqa: E402
from tests.servers import CHROMIUM, CHROMIUM_ARGS, Consumer, Gunicorn  # noqa: E402

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feed.png")


def main():
    logs = tempfile.mkdtemp()
    with create_app().app_context():
        models.migrate()
        web = Gunicorn(os.path.join(logs, "web.log"), workers=2)
        demo = create_demo(web.url)
    consumer = Consumer(os.path.join(logs, "consumer.log"))
    from playwright.sync_api import sync_playwright
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 720})
            page.goto(demo["feedUrl"])
            page.wait_for_selector("#state.state-open")
            sender = threading.Thread(target=simulate.stream, args=(
                web.url, demo["ingestKey"], demo["customerIds"], 12, 120))
            sender.start()
            page.wait_for_timeout(9000)
            page.screenshot(path=OUTPUT)
            sender.join()
            browser.close()
    finally:
        consumer.stop()
        web.stop()
    print("wrote", OUTPUT)


if __name__ == "__main__":
    main()
