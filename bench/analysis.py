"""Analyses per second of one `huey_consumer` process against raw VADER in a loop,
on the same texts, in the same run (DESIGN §12: goal >= 0.5 of raw).

    .venv/bin/python -m bench.analysis [--count 5000] [--workers 1]
"""
import argparse
import os
import subprocess
import sys
import time

from bench.common import database_argument, scratch_environment, texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raw_rate(samples):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    started = time.perf_counter()
    for text in samples:
        analyzer.polarity_scores(text)
    return len(samples) / (time.perf_counter() - started)


def consumer_rate(samples, workers):
    import models
    from app import create_app
    from peewee import fn

    from models import Customer, Interaction

    app = create_app()
    with app.app_context():
        models.migrate()
        from ingest.cli import new_organization
        org = new_organization("bench")
        customer = Customer.create(organization=org["organizationId"])
        service = app.extensions["ingest"]
        for start in range(0, len(samples), 1000):
            items = [{"customerId": str(customer.id), "timestamp": "2026-01-01T00:00:00Z",
                      "channel": "chat", "eventType": "message", "content": text}
                     for text in samples[start:start + 1000]]
            service.ingest_batch(org["organizationId"], {"interactions": items})

    consumer = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "huey_consumer"),
                                 "tasks.huey", "-w", str(workers), "-k", "thread"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with models.db.connection_context():
            while Interaction.select().where(Interaction.analysis_status == "pending").exists():
                time.sleep(0.2)
            first, last = (Interaction.select(fn.MIN(Interaction.analyzed_at),
                                              fn.MAX(Interaction.analyzed_at)).scalar(as_tuple=True))
    finally:
        consumer.terminate()
        consumer.wait()
    # analyzed_at is stamped once per task (of 100), so the first task's time is not
    # counted: rate over the tasks after it.
    return (len(samples) - 100) / (last - first).total_seconds()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    database_argument(parser)
    args = parser.parse_args()
    url = scratch_environment(args.database_url)
    samples = texts(args.count)
    raw = raw_rate(samples)
    consumer = consumer_rate(samples, args.workers)
    raw_again = raw_rate(samples)
    baseline = (raw + raw_again) / 2
    print("raw VADER loop:       %8.0f analyses/s (runs: %.0f, %.0f)" % (baseline, raw, raw_again))
    print("one consumer process: %8.0f analyses/s (-w %d)" % (consumer, args.workers))
    print("ratio: %.2f (goal >= 0.5)" % (consumer / baseline))
    from tests.dbs import drop_scratch_database
    drop_scratch_database(url)


if __name__ == "__main__":
    main()
