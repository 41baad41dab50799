"""PostgreSQL servers of the tests' own: a primary with a database ``ingest``, or a
streaming replica of one (``pg_basebackup -R``), on this machine's loopback or on a
host of tests/hosts.py, listening on that host's address only. Debian's server
programs refuse root, so they run as the postgres OS user."""
import glob
import ipaddress
import os
import shutil
import subprocess
import tempfile

import psycopg

from tests.servers import LOCAL, wait_until


def program(name):
    """A program of the newest PostgreSQL server installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/" + name), key=lambda path: int(path.split("/")[4]))
    assert found, "PostgreSQL's server programs (/usr/lib/postgresql/*/bin) are needed"
    return found[-1]


class Postgres:
    """A server on ``host`` (its address) and ``port``, started; ``remove()`` when done."""

    def __init__(self, port, host=LOCAL, primary=None):
        self.host, self.port = host, port
        self.root = tempfile.mkdtemp(prefix="ingest-pg-")  # not under pytest's: postgres must reach it
        shutil.chown(self.root, "postgres", "postgres")
        self.directory = os.path.join(self.root, "data")
        if primary is None:
            self._run("initdb", "-D", self.directory, "--auth=trust", "-U", "postgres")
            network = ipaddress.ip_interface(host.address + "/24").network  # the host's LAN
            with open(os.path.join(self.directory, "pg_hba.conf"), "a") as hba:
                hba.write("host all all %s trust\nhost replication all %s trust\n" % (network, network))
        else:
            self._run("pg_basebackup", "-R", "-X", "stream", "--checkpoint=fast", "-D", self.directory,
                      "-h", primary.host.address, "-p", str(primary.port), "-U", "postgres")
        self.start()
        if primary is None:
            self.sql("CREATE DATABASE ingest", database="postgres")
        else:
            wait_until(lambda: self.value("SELECT EXISTS (SELECT 1 FROM pg_stat_wal_receiver "
                                          "WHERE status = 'streaming')"),
                       timeout=60, message="the replica to stream from the primary")

    def url(self, database="ingest"):
        return "postgresql://postgres@%s:%d/%s" % (self.host.address, self.port, database)

    def start(self):
        self._run("pg_ctl", "start", "-w", "-D", self.directory, "-l", os.path.join(self.root, "server.log"),
                  "-o", "-p %d -c listen_addresses=%s -c unix_socket_directories='' -c fsync=off "
                  "-c max_connections=300" % (self.port, self.host.address))

    def stop(self):
        """Stop at once (a crash, as far as the service can tell); nothing if not running."""
        if os.path.exists(os.path.join(self.directory, "postmaster.pid")):
            self._run("pg_ctl", "stop", "-m", "immediate", "-D", self.directory)

    def remove(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def sql(self, query, *params, database="ingest"):
        """The rows of ``query`` (None for a statement that returns none)."""
        with psycopg.connect(self.url(database), autocommit=True) as connection:
            cursor = connection.execute(query, params)
            return cursor.fetchall() if cursor.description else None

    def value(self, query, *params):
        return self.sql(query, *params)[0][0]

    def _run(self, name, *args):
        done = subprocess.run(self.host.command(["runuser", "-u", "postgres", "--", program(name), *args]),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, "%s failed: %s" % (name, done.stderr.strip())
