"""A cluster whose every process has a network of its own (issue 13).

`Net` makes one network namespace per process name, each with one address
on a shared bridge (itself in a namespace of its own, so nothing of the
host's network is touched), plus one link from the test process (the
"ctl" address) so the test can still administer the cluster. A link
between two namespaces is cut by nftables rules in both that drop every
packet to and from the other: a silent partition, as a pulled cable or a
dead switch port gives (no RST, no ICMP), not a refused connection.

`NetCluster` is the embedded cluster (real etcd members, masters and
nodes) with each process started in its namespace and bound to its
address. Both clean up every process, namespace and link they made, even
when the test that used them failed.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

from shoalfs.cli.cluster import ETCD, EmbeddedCluster

CTL = "ctl"  # the test process's own address on the bridge (in the host's namespace)
ETCD_CLIENT, ETCD_PEER, MASTER_PORT, NODE_PORT = 2379, 2380, 9500, 9600
NFT_TABLE = """\
table inet shoal {
  set cut { type ipv4_addr; }
  chain input { type filter hook input priority 0; policy accept; ip saddr @cut drop; }
  chain output { type filter hook output priority 0; policy accept; ip daddr @cut drop; }
}
"""


def run(*args: str, input: str | None = None) -> str:
    r = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


class Net:
    """Namespaces on one bridge; cut(a, b) and heal(a, b) any pair of them."""

    def __init__(self, names: Iterable[str]) -> None:
        self.tag = secrets.token_hex(2)
        self.subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        self.names = list(names)
        self.hub = f"shoal{self.tag}"
        self.ctl_link = f"shc{self.tag}"
        self.ips = {name: f"{self.subnet}.{i + 1}" for i, name in enumerate(self.names)}
        self.ips[CTL] = f"{self.subnet}.254"
        self.cuts: set[frozenset[str]] = set()

    def netns(self, name: str) -> str:
        return f"{self.hub}-{name}"

    def wrap(self, name: str) -> list[str]:
        """A command prefix that runs a program in `name`'s network (its
        mount namespace stays the host's: a FUSE mount made there is seen here)."""
        return ["nsenter", f"--net=/var/run/netns/{self.netns(name)}", "--"]

    def up(self) -> Net:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        run("ip", "netns", "add", self.hub)
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        run("ip", "-n", self.hub, "link", "set", "br0", "up")
        # the test's own link: one end here, one on the bridge
        run("ip", "link", "add", self.ctl_link, "type", "veth", "peer", "name", "ctl", "netns", self.hub)
        run("ip", "-n", self.hub, "link", "set", "ctl", "master", "br0", "up")
        run("ip", "addr", "add", f"{self.ips[CTL]}/24", "dev", self.ctl_link)
        run("ip", "link", "set", self.ctl_link, "up")
        for i, name in enumerate(self.names):
            ns, port = self.netns(name), f"p{i}"
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "link", "add", port, "netns", self.hub, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{self.ips[name]}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run(*self.wrap(name), "nft", "-f", "-", input=NFT_TABLE)

    def _set(self, name: str, verb: str, others: Iterable[str]) -> None:
        if name == CTL:  # the host side has no rules: cutting the other side is enough
            return
        ips = ", ".join(self.ips[o] for o in others)
        if ips:
            run(*self.wrap(name), "nft", verb, "element", "inet", "shoal", "cut", f"{{ {ips} }}")

    def cut(self, a: str, others: Iterable[str]) -> None:
        """Cut every link between `a` and each of `others`, both ways."""
        new = [o for o in others if o != a and frozenset((a, o)) not in self.cuts]
        self._set(a, "add", new)
        for o in new:
            self._set(o, "add", [a])
            self.cuts.add(frozenset((a, o)))

    def isolate(self, a: str) -> None:
        """Cut `a` from every other namespace and from the test process."""
        self.cut(a, [*self.names, CTL])

    def heal(self, a: str | None = None, others: Iterable[str] | None = None) -> None:
        """Heal the links between `a` and `others` (default: every cut link)."""
        pairs = [p for p in self.cuts if a is None or (a in p and (others is None or (p - {a}) <= set(others)))]
        for pair in pairs:
            x, y = sorted(pair)
            self._set(x, "delete", [y])
            self._set(y, "delete", [x])
            self.cuts.discard(pair)

    def pids(self) -> list[int]:
        out: list[int] = []
        for name in self.names:
            r = subprocess.run(["ip", "netns", "pids", self.netns(name)], capture_output=True, text=True)
            out += [int(p) for p in r.stdout.split()]
        return out

    def down(self) -> None:
        """Kill whatever still runs in our namespaces, then delete them (their
        links go with them, the test's own link with the bridge's namespace)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 10
        while self.pids() and time.monotonic() < end:
            time.sleep(0.05)
        for ns in [self.netns(n) for n in self.names] + [self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.ctl_link], capture_output=True)

    def leftovers(self) -> list[str]:
        """Namespaces or links of ours still present (none after down())."""
        spaces = run("ip", "netns", "list")
        links = run("ip", "-o", "link", "show")
        return [line for line in spaces.splitlines() if line.startswith(self.hub)] + \
            [line for line in links.splitlines() if self.ctl_link in line]


class NetCluster(EmbeddedCluster):
    """The embedded cluster, each process in its own namespace of `net` (which
    must hold one name per etcd member, master and node)."""

    def __init__(self, data_dir: str, net: Net) -> None:
        super().__init__(data_dir)
        self.net = net

    def _address(self, name: str, role: str) -> str:
        return f"{self.net.ips[name]}:{MASTER_PORT if role == 'master' else NODE_PORT}"

    def _etcd_layout(self) -> dict[str, Any]:
        members = [n for n in self.net.names if n.startswith("etcd")]
        return {"client": ",".join(f"{self.net.ips[m]}:{ETCD_CLIENT}" for m in members), "members": members}

    def names(self) -> list[str]:
        return list(self.layout["etcd"]["members"]) + list(self.masters) + sorted(self.layout.get("nodes", {}))

    def role(self, name: str) -> str:
        return ETCD if name in self.layout["etcd"]["members"] else super().role(name)

    def _command(self, name: str) -> list[str]:
        if name not in self.layout["etcd"]["members"]:
            return self.net.wrap(name) + super()._command(name)
        peers = ",".join(f"{m}=http://{self.net.ips[m]}:{ETCD_PEER}" for m in self.layout["etcd"]["members"])
        ip = self.net.ips[name]
        return self.net.wrap(name) + [
            "etcd", "--name", name, "--data-dir", os.path.join(self.dir, "data", name),
            "--listen-client-urls", f"http://{ip}:{ETCD_CLIENT}", "--advertise-client-urls", f"http://{ip}:{ETCD_CLIENT}",
            "--listen-peer-urls", f"http://{ip}:{ETCD_PEER}", "--initial-advertise-peer-urls", f"http://{ip}:{ETCD_PEER}",
            "--initial-cluster", peers, "--initial-cluster-token", f"shoal-{self.net.tag}",
            "--initial-cluster-state", "new", "--log-level", "warn", "--logger", "zap",
            # a member cut away and back must not depose the leader with the
            # terms it ran up alone (etcd 3.4's default is off)
            "--pre-vote"]

    def node_name(self, addr: str) -> str:
        """The process listening on `addr`."""
        return next(n for n in self.names() if n not in self.layout["etcd"]["members"]
                    and (self.masters.get(n) or self.layout["nodes"][n]["listen"]) == addr)


class AckedWriter:
    """tests/acked_writer.py in a namespace: new files until stopped, each
    acknowledged one logged (see that script) for a read-back at the end."""

    def __init__(self, net: Net, ns: str, log: str, target: list[str], prefix: str) -> None:
        self.log_path = log
        self.prefix = prefix
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "acked_writer.py")
        with open(log + ".err", "wb") as err:
            self.proc = subprocess.Popen(net.wrap(ns) + [sys.executable, script, log, "--prefix", prefix, *target],
                                         stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)

    def records(self) -> list[dict[str, Any]]:
        try:
            with open(self.log_path) as f:
                return [json.loads(line) for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return []

    def acked(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "sha" in r]

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "errno" in r]

    def stop(self, timeout: float = 70) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ends after the write under way
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
