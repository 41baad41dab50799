"""Simulated traffic for the demo (`flask --app app demo --stream`): plausible
interactions posted to a running server over HTTP, so the live feed shows life."""
import datetime
import json
import random
import time
import urllib.error
import urllib.request

import click

MESSAGES = (
    "I love the new dashboard, great work!", "The delivery was late again, very disappointing.",
    "Can you tell me where my order is?", "Thanks, the support team was super helpful.",
    "The app keeps crashing when I open settings. Terrible.", "Just browsing the pricing page.",
    "Refund received, thank you so much!", "Why was I charged twice? This is unacceptable.",
    "The checkout was quick and easy.", "Meh, it works I guess.", "",
)
DEMO_CHANNELS = ("web", "mobile", "email", "chat", "phone", "social")
EVENT_TYPES = ("page_view", "message", "email_received", "call_ended", "review", "click")


def interaction(customer_ids, rnd=random):
    return {
        "customerId": rnd.choice(customer_ids),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "channel": rnd.choice(DEMO_CHANNELS),
        "eventType": rnd.choice(EVENT_TYPES),
        "content": rnd.choice(MESSAGES),
        "metadata": {"simulated": True},
    }


def stream(base_url, ingest_key, customer_ids, rate, count=0):
    """Post interactions at ``rate`` a second until ``count`` (0: Ctrl-C)."""
    interval, sent = 1.0 / rate, 0
    click.echo("streaming %.1f interactions/s to %s (Ctrl-C to stop)" % (rate, base_url))
    try:
        while not count or sent < count:
            started = time.monotonic()
            request = urllib.request.Request(
                base_url + "/api/data/ingest", data=json.dumps(interaction(customer_ids)).encode(),
                headers={"Authorization": "Bearer " + ingest_key, "Content-Type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=10).close()
                sent += 1
            except (urllib.error.URLError, OSError) as error:
                click.echo("post failed: %s" % error, err=True)
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    click.echo("sent %d interactions" % sent)
