"""Several "hosts" on one machine: one Linux network namespace per host, joined by a bridge.

The bridge lives in its own "switch" namespace and every host namespace is joined to it by a
veth pair (``eth0`` in the host, ``p<i>`` on the bridge), so nothing is ever created in the root
namespace: Docker's FORWARD DROP policy and br_netfilter there cannot touch our traffic, and
fresh namespaces start with empty firewall rules. Names and the /24 subnet are random per
topology so concurrent test runs do not collide.

    with Topology(["srv", "master", "w1", "w2"]) as net:
        server = net.popen("srv", [...], stdout=log)
        net.wait_port("master", net.ip("srv"), 8000, timeout_s=10)

Needs root, ``ip`` (iproute2) and ``unshare`` (util-linux); see ``netns_unavailable_reason``.
"""

from __future__ import annotations

import atexit
import functools
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

__all__ = ["NetemUnavailable", "Topology", "netns_unavailable_reason", "remove_stale_namespaces"]

# Namespace names: PREFIX-<creator pid>-<random>-h-<host> and PREFIX-<creator pid>-<random>-switch.
PREFIX = "envt"
_HOST_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_STALE_RE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-")
_IP_TIMEOUT_S = 15.0

_Stream = int | IO[Any] | None


class NetemUnavailable(RuntimeError):
    """``tc``/netem cannot add a delay on this machine (no ``tc``, or the kernel lacks sch_netem)."""


def _ip_path() -> str:
    return shutil.which("ip") or "ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([_ip_path(), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=_IP_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {_first_line(proc.stderr) or f'exit {proc.returncode}'}")
    return proc


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@functools.cache
def netns_unavailable_reason() -> str | None:
    """Why host namespaces cannot be made here, in one line; None when they can.

    Probes for real: creates a namespace with a bridge and a veth inside it, runs a command in it
    under its own UTS namespace, and deletes it.
    """
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the tests as root"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (package {package})"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    steps = [
        ["netns", "add", probe],
        ["-n", probe, "link", "add", "br0", "type", "bridge"],
        ["-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "eth0"],
        ["netns", "exec", probe, "unshare", "--uts", "true"],
    ]
    try:
        for step in steps:
            try:
                proc = _ip(*step, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"'ip {' '.join(step[:4])}' failed: {exc}"
            if proc.returncode != 0:
                why = _first_line(proc.stderr) or f"exit {proc.returncode}"
                return f"'ip {' '.join(step)}' failed: {why}"
    finally:
        subprocess.run([_ip_path(), "netns", "del", probe], capture_output=True, timeout=_IP_TIMEOUT_S)
    return None


def _netns_names() -> list[str]:
    proc = _ip("netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by a test process that died without cleaning up; returns their names.

    Only names made by this module whose creating process is gone are touched, so topologies
    of concurrent test runs survive.
    """
    removed = []
    for ns in _netns_names():
        match = _STALE_RE.match(ns)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        for pid in _netns_pids(ns):
            _signal(pid, signal.SIGKILL)
        if _ip("netns", "del", ns, check=False).returncode == 0:
            removed.append(ns)
    return removed


def _signal(pid: int, sig: int, *, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# Topologies still open, closed at interpreter exit if a test never reached its __exit__. Strong
# references on purpose: a topology nobody holds any more must still be cleaned up.
_OPEN: set[Topology] = set()
_atexit_registered = False


def _close_open_topologies() -> None:
    for topo in list(_OPEN):
        topo.close()


# Sets the hostname inside the new UTS namespace, then becomes argv. Python instead of hostname(1),
# which minimal images lack; -I -S keeps its start-up to a few milliseconds.
_SETHOSTNAME = "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execvp(sys.argv[2], sys.argv[2:])"

# Runs inside a host namespace: connect until it works or the deadline passes. Prints "ok" or the
# last error's class name (ConnectionRefusedError, OSError[ENETUNREACH] ...).
_CONNECT = """
import errno, socket, sys, time
ip, port, timeout_s, once = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
deadline = time.monotonic() + timeout_s
while True:
    left = max(0.05, deadline - time.monotonic())
    try:
        socket.create_connection((ip, port), timeout=min(left, 2.0)).close()
        print("ok")
        break
    except OSError as exc:
        name = type(exc).__name__
        if type(exc) is OSError and exc.errno:
            name += "[" + errno.errorcode.get(exc.errno, str(exc.errno)) + "]"
        if once or time.monotonic() >= deadline:
            print(name)
            break
        time.sleep(0.05)
"""


class Topology:
    """Hosts on one switched /24, each in its own network namespace; a context manager.

    Entering creates the namespaces (``lo`` and ``eth0`` up, one address each); leaving, or
    ``close()``, kills every process started in them (SIGTERM, then SIGKILL after ``grace_s``)
    and deletes every namespace, also when the test failed. An atexit hook covers topologies
    whose ``with`` block never finished; entering sweeps namespaces of test processes that were
    killed outright (``remove_stale_namespaces``).
    """

    def __init__(self, hosts: Sequence[str], *, grace_s: float = 3.0) -> None:
        hosts = list(hosts)
        if not hosts:
            raise ValueError("a topology needs at least one host")
        for host in hosts:
            if not _HOST_RE.match(host):
                raise ValueError(f"bad host name {host!r}: use [a-z][a-z0-9-]*, at most 32 characters")
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"duplicate host names in {hosts}")
        if len(hosts) > 250:
            raise ValueError("at most 250 hosts fit in the /24")
        self.hosts: tuple[str, ...] = tuple(hosts)
        self.grace_s = grace_s
        tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"
        self.switch_ns = f"{tag}-switch"
        self._netns = {host: f"{tag}-h-{host}" for host in hosts}
        self.subnet = ipaddress.ip_network(f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.0/24")
        # .1 is left free (a gateway, should a test ever want one).
        self._ips = {host: str(self.subnet.network_address + 10 + i) for i, host in enumerate(hosts)}
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"Topology(hosts={list(self.hosts)!r}, subnet={str(self.subnet)!r}, switch_ns={self.switch_ns!r})"

    def __enter__(self) -> Topology:
        global _atexit_registered
        if not _atexit_registered:
            atexit.register(_close_open_topologies)
            _atexit_registered = True
        _OPEN.add(self)
        try:
            remove_stale_namespaces()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)

    def _build(self) -> None:
        sw = self.switch_ns
        self._add_ns(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _ip("-n", sw, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            ns = self._netns[host]
            self._add_ns(ns)
            # Created inside the switch namespace with the peer straight in the host's: no name ever
            # appears in the root namespace, so concurrent topologies cannot clash there.
            port = f"p{i}"
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "br0")
            _ip("-n", sw, "link", "set", port, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self._ips[host]}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    # -- addresses and commands ---------------------------------------------------------------

    def netns(self, host: str) -> str:
        """The namespace name of ``host`` (for ``ip netns exec`` by hand)."""
        self._check_host(host)
        return self._netns[host]

    def ip(self, host: str) -> str:
        """The IPv4 address of ``host``'s ``eth0``."""
        self._check_host(host)
        return self._ips[host]

    def command(self, host: str, argv: Sequence[str], *, hostname: str | None = None) -> list[str]:
        """The argv that runs ``argv`` inside ``host``'s namespace (and own UTS namespace with ``hostname``)."""
        ns = self.netns(host)
        argv = [os.fspath(a) for a in argv]
        if not argv:
            raise ValueError("empty argv")
        prefix = [_ip_path(), "netns", "exec", ns]
        if hostname is None:
            return [*prefix, *argv]
        if not 0 < len(hostname) <= 64 or not re.match(r"^[A-Za-z0-9][A-Za-z0-9.-]*$", hostname):
            raise ValueError(f"bad hostname {hostname!r}")
        unshare = shutil.which("unshare") or "unshare"
        return [*prefix, unshare, "--uts", sys.executable, "-I", "-S", "-c", _SETHOSTNAME, hostname, *argv]

    def popen(self, host: str, argv: Sequence[str], *, hostname: str | None = None,
              env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
              stdin: _Stream = subprocess.DEVNULL, stdout: _Stream = None, stderr: _Stream = None,
              text: bool = False) -> subprocess.Popen:
        """Start ``argv`` in ``host``'s namespace, in its own process group; stopped on close.

        ``hostname`` also gives it its own UTS namespace with that name. Send output to a file
        rather than an unread pipe. With ``env``, ``argv[0]`` is looked up on ``env``'s PATH.
        """
        self._check_open()
        proc = subprocess.Popen(self.command(host, argv, hostname=hostname), env=env, cwd=cwd, stdin=stdin,
                                stdout=stdout, stderr=stderr, text=text, start_new_session=True)
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], *, hostname: str | None = None, timeout_s: float = 30.0,
            capture_output: bool = True, text: bool = True, check: bool = False,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``host``'s namespace to completion (output captured as text by default)."""
        self._check_open()
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.command(host, argv, hostname=hostname), timeout=timeout_s,
                              capture_output=capture_output, text=text, check=check, start_new_session=True,
                              **kwargs)

    def tcp_connect(self, host: str, ip: str, port: int, *, timeout_s: float = 2.0) -> str | None:
        """One TCP connect from inside ``host`` to ``ip:port``: None when it works, else the error's name."""
        out = self._connect(host, ip, port, timeout_s, once=True)
        return None if out == "ok" else out

    def wait_port(self, host: str, ip: str, port: int, timeout_s: float = 10.0) -> None:
        """Wait until a TCP connect from inside ``host`` to ``ip:port`` works; TimeoutError after ``timeout_s``."""
        out = self._connect(host, ip, port, timeout_s, once=False)
        if out != "ok":
            raise TimeoutError(f"{host} could not connect to {ip}:{port} within {timeout_s:g} s (last: {out})")

    def _connect(self, host: str, ip: str, port: int, timeout_s: float, *, once: bool) -> str:
        proc = self.run(host, [sys.executable, "-I", "-S", "-c", _CONNECT, ip, str(port), str(timeout_s),
                               "1" if once else "0"], timeout_s=timeout_s + 15)
        if proc.returncode != 0:
            raise RuntimeError(f"connect probe in {host} failed: {_first_line(proc.stderr[-2000:])}")
        return proc.stdout.strip()

    def add_delay(self, host: str, delay_ms: float) -> None:
        """Delay every packet leaving ``host``'s eth0 by ``delay_ms`` (tc netem); NetemUnavailable if impossible."""
        tc = shutil.which("tc")
        if tc is None:
            raise NetemUnavailable("'tc' is not installed (package iproute2)")
        proc = self.run(host, [tc, "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", f"{delay_ms:g}ms"])
        if proc.returncode != 0:
            why = _first_line(proc.stderr) or f"exit {proc.returncode}"
            if "unknown" in why.lower() or "not found" in why.lower() or "no such" in why.lower():
                raise NetemUnavailable(f"tc netem is unavailable (kernel without sch_netem?): {why}")
            raise RuntimeError(f"tc qdisc replace ... netem in {host}: {why}")

    # -- cleanup ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process in the topology and delete its namespaces; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        host_ns = [ns for ns in self._created if ns != self.switch_ns]
        try:
            self._stop_processes(host_ns)
        finally:
            # Host namespaces first (their veths go with them), then the switch and its bridge.
            errors = []
            for ns in [*host_ns, *[ns for ns in self._created if ns == self.switch_ns]]:
                proc = _ip("netns", "del", ns, check=False)
                if proc.returncode != 0 and ns in _netns_names():
                    errors.append(f"{ns}: {_first_line(proc.stderr)}")
            self._created.clear()
            if errors:
                raise RuntimeError(f"could not delete namespaces: {'; '.join(errors)}")

    def _stop_processes(self, namespaces: Sequence[str]) -> None:
        # Our process groups, plus anything else still in the namespaces (daemons that left their group).
        def stray() -> list[int]:
            pids = [pid for ns in namespaces for pid in _netns_pids(ns)]
            return [pid for pid in pids if pid != os.getpid()]

        # Only groups whose leader is still unreaped: a reaped leader's pid may belong to someone
        # else by now, and whatever stayed in its group is still in a namespace, so the sweep finds it.
        running = [p for p in self._procs if p.poll() is None]
        strays = stray()
        if not running and not strays:
            self._reap()
            return
        for proc in running:
            _signal(proc.pid, signal.SIGTERM, group=True)
        for pid in strays:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self._procs) and not stray():
                break
            time.sleep(0.05)
        for proc in running:
            if proc.poll() is None:
                _signal(proc.pid, signal.SIGKILL, group=True)
        for _ in range(3):  # a process may fork while we kill
            pids = stray()
            if not pids:
                break
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.05)
        self._reap()

    def _reap(self) -> None:
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()

    def _check_host(self, host: str) -> None:
        if host not in self._netns:
            raise KeyError(f"no host {host!r} in this topology (hosts: {', '.join(self.hosts)})")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this topology is closed")
        if not self._created:
            raise RuntimeError("enter the topology (with Topology(...) as net) before starting processes")
