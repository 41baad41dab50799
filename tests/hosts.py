"""Hosts of their own on this machine (DESIGN §18): each a Linux network namespace
with one address, joined to the others by a bridge, as machines on one LAN are.
A process started on a host sees only that host's network: its loopback is its
own, and the others are reached at their addresses only. The tests' process
stays on the bridge's own address, as a client on the LAN.

Needs root (`ip netns`, veth pairs, a bridge); ``available()`` says why not."""
import os
import shutil
import signal
import subprocess

from tests.servers import BIN, ROOT, wait_until

SUBNET = "10.231.0"  # private, /24; the bridge is .1


def available():
    """None if hosts can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    name = "ingest-probe-%d" % os.getpid()
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return "ip netns add failed: " + probe.stderr.strip()
    subprocess.run(["ip", "netns", "del", name], check=True)
    return None


def ip(*args, namespace=None):
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run(prefix + ["ip", *args], check=True, capture_output=True)


class Network:
    """A bridge and the hosts on it; ``close()`` removes every trace."""

    def __init__(self):
        self.tag = "%04d" % (os.getpid() % 10000)
        self.bridge = "ibr" + self.tag
        self.hosts = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", SUBNET + ".1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def host(self, name):
        """A new host on the bridge, with the next address."""
        host = Host(self, name, "%s.%d" % (SUBNET, len(self.hosts) + 2))
        self.hosts.append(host)  # before it is made: close() removes what was made of it
        host.make(self.bridge)
        return host

    def close(self):
        for host in self.hosts:
            try:
                host.kill_all()
            finally:
                subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
                subprocess.run(["ip", "link", "del", host.link], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class Host:
    """One host: its namespace, its address, and the veth pair that is its link to
    the bridge (``cut`` takes the link down, ``mend`` brings it back)."""

    def __init__(self, network, name, address):
        self.name, self.address = name, address
        self.namespace = "ingest-%s-%s" % (name, network.tag)
        self.link = "v%s%s" % (network.tag, name[:6])  # the bridge's end (15 characters at most)

    def make(self, bridge):
        ip("netns", "add", self.namespace)
        ip("link", "add", self.link, "type", "veth", "peer", "name", "eth0", "netns", self.namespace)
        ip("link", "set", self.link, "master", bridge)
        ip("link", "set", self.link, "up")
        ip("addr", "add", self.address + "/24", "dev", "eth0", namespace=self.namespace)
        ip("link", "set", "eth0", "up", namespace=self.namespace)
        ip("link", "set", "lo", "up", namespace=self.namespace)

    def command(self, argv):
        """``argv`` run on this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    @staticmethod
    def port():
        return 8000  # every host has its ports to itself

    def pids(self):
        """The host's processes (none if its namespace was never made)."""
        listed = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True)
        return [int(pid) for pid in listed.stdout.split()]

    def kill_all(self):
        """SIGKILL every process of the host, as if it lost power."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not self.pids(), timeout=10, message="every process of %s gone" % self.name)

    def cut(self):
        """The host's cable pulled: its processes run on, and nothing reaches them."""
        ip("link", "set", self.link, "down")

    def mend(self):
        ip("link", "set", self.link, "up")


def init_db(env):
    """`flask init-db` against the environment's database, from the tests' own host."""
    subprocess.run([os.path.join(BIN, "flask"), "--app", "app", "init-db"], cwd=ROOT,
                   env={**os.environ, **env}, check=True, capture_output=True)
