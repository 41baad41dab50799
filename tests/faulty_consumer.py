"""A real huey consumer process whose analysis fails for marked texts.

Fault injection for the retry tests (DESIGN §7), the one place a fault cannot
be made otherwise: text starting with FLAKY fails its first two attempts,
text starting with BROKEN always fails. Run as
`python -m tests.faulty_consumer -w 1 -k thread`.
"""
import collections
import sys

from huey.bin.huey_consumer import consumer_main

from ingest import analysis

FLAKY = "__flaky__"
BROKEN = "__broken__"

_real = analysis.sentiment_of
_attempts = collections.Counter()


def _faulty(content):
    if content and content.startswith(BROKEN):
        raise RuntimeError("injected analysis fault")
    if content and content.startswith(FLAKY):
        _attempts[content] += 1
        if _attempts[content] <= 2:
            raise RuntimeError("injected flaky fault (attempt %d)" % _attempts[content])
    return _real(content)


if __name__ == "__main__":
    analysis.sentiment_of = _faulty
    sys.argv = ["huey_consumer", "tasks.huey", *sys.argv[1:]]
    consumer_main()
