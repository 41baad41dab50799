"""The capacity model's arithmetic (bench/capacity.py) and docs/CAPACITY.md agree."""
import os

from bench import capacity

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "CAPACITY.md")


def test_needs_grow_with_the_rate():
    rows = [capacity.needs(10 ** e) for e in range(2, 7)]
    for smaller, larger in zip(rows, rows[1:], strict=False):
        for key in ("web", "consumer", "postgres", "redis", "disk_per_day_gb", "wal_mb_per_s"):
            assert smaller[key] <= larger[key], key
    assert rows[0]["one_primary"] and not rows[-1]["one_primary"]


def test_one_primary_is_enough_up_to_its_limit_only():
    limit = capacity.one_primary_limit()
    assert capacity.needs(limit * 0.99)["one_primary"]
    assert not capacity.needs(limit * 1.01)["one_primary"]


def test_the_doc_shows_the_models_table(capsys):
    capacity.table([1000, 10000, 100000])
    doc = open(DOC).read()
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) >= 5  # the header, its rule and a row per rate
    for line in printed:
        assert line in doc
