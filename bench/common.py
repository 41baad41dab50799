"""Shared set-up for the side-by-side benchmarks: a scratch environment and sample texts."""
import os
import random
import tempfile

WORDS = ("love great terrible awful fine okay happy sad slow fast broken excellent refund "
         "delivery support price quality product order late early helpful rude friendly "
         "the a is was and but very not really quite so too my your our package app").split()


def texts(count, seed=7):
    """Chat-like messages of 6 to 30 words."""
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 30))).capitalize() + "."
            for _ in range(count)]


def scratch_environment(server_url=None):
    """Point DATABASE_URL/QUEUE_URL at fresh files, or a scratch database on the
    PostgreSQL server of ``server_url``; call before importing the app."""
    from tests.dbs import create_scratch_database

    run_dir = tempfile.mkdtemp(prefix="ingest-bench-")
    os.environ["INSTANCE_PATH"] = run_dir
    os.environ["DATABASE_URL"] = create_scratch_database(server_url, run_dir)
    os.environ["QUEUE_URL"] = "sqlite:///" + os.path.join(run_dir, "queue.db")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    return os.environ["DATABASE_URL"]


def database_argument(parser):
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="a postgresql:// server to bench on (a scratch database is "
                             "created there); default SQLite")
