"""Hosts in network namespaces (tests/helpers/netns.py): reachability, isolation, hostnames, cleanup.

Each host has its own network stack on a private /24 behind a bridge in a "switch" namespace.
These tests check the helper does what later multi-host tests rely on: one host reaches a server
in another with its own source address, nothing reaches the root namespace's services, a host can
carry its own hostname, and closing the topology leaves no namespace and no process behind. The
last test runs a real Locust master and two workers on three hosts against a server on a fourth.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers.netns import NetemUnavailable, Topology, netns_unavailable_reason, remove_stale_namespaces

PY = sys.executable

# Binds ip:0, publishes the port through a file, then answers each connection with the peer's address.
ECHO_PEER_SERVER = """
import os, socket, sys
ip, port_file = sys.argv[1], sys.argv[2]
srv = socket.socket()
srv.bind((ip, 0))
srv.listen(16)
with open(port_file + ".tmp", "w") as fh:
    fh.write(str(srv.getsockname()[1]))
os.replace(port_file + ".tmp", port_file)
while True:
    conn, peer = srv.accept()
    conn.sendall(peer[0].encode() + b"\\n")
    conn.close()
"""

READ_LINE_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    print(s.makefile().readline().strip())
"""

PRINT_HOSTNAME = "import os, socket; print(socket.gethostname(), os.uname().nodename)"


@pytest.fixture(autouse=True)
def _needs_netns():
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} before writing {path.name}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} not written within {timeout_s} s")
        time.sleep(0.02)
    return path.read_text()


def is_dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_host_reaches_a_server_in_another_host_from_its_own_address(tmp_path):
    with Topology(["client", "server", "other"]) as net:
        port_file = tmp_path / "port"
        server = net.popen("server", [PY, "-c", ECHO_PEER_SERVER, net.ip("server"), str(port_file)])
        port = int(wait_for_file(port_file, server))

        # The server saw the client's eth0 address: the packets crossed the bridge between two stacks.
        for host in ("client", "other"):
            proc = net.run(host, [PY, "-c", READ_LINE_CLIENT, net.ip("server"), str(port)])
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip() == net.ip(host)

        assert net.tcp_connect("client", net.ip("server"), port) is None
        # Same address, a port nobody listens on: reachable host, refused port.
        assert net.tcp_connect("client", net.ip("server"), port + 1 if port < 65535 else port - 1) == (
            "ConnectionRefusedError")
        assert len({net.ip(h) for h in net.hosts}) == 3
        assert all(net.ip(h) in {str(a) for a in net.subnet.hosts()} for h in net.hosts)


def test_hosts_cannot_reach_services_of_the_root_namespace(tmp_path):
    root_server = socket.socket()
    root_server.bind(("0.0.0.0", 0))
    root_server.listen(4)
    port = root_server.getsockname()[1]
    try:
        # Control: from the root namespace the service answers.
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        root_addrs = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                                    text=True, check=True).stdout
        root_ips = [line.split()[3].split("/")[0] for line in root_addrs.splitlines()]

        with Topology(["a", "b"]) as net:
            # Control: the same probe does connect inside the topology.
            port_file = tmp_path / "port"
            server = net.popen("b", [PY, "-c", ECHO_PEER_SERVER, net.ip("b"), str(port_file)])
            assert net.tcp_connect("a", net.ip("b"), int(wait_for_file(port_file, server))) is None

            # 127.0.0.1 in a host is the host's own loopback, where nothing listens.
            assert net.tcp_connect("a", "127.0.0.1", port) == "ConnectionRefusedError"
            # The root namespace's own addresses are not routed from a host at all.
            for ip in root_ips:
                if ip in {net.ip(h) for h in net.hosts}:
                    continue
                assert net.tcp_connect("a", ip, port, timeout_s=1.0) is not None, ip
    finally:
        root_server.close()


def test_hostname_is_per_host_and_leaves_the_root_alone(tmp_path):
    root_hostname = socket.gethostname()
    with Topology(["w1", "w2"]) as net:
        outs = {host: tmp_path / f"{host}.out" for host in ("w1", "w2")}
        procs = {}
        for host, out in outs.items():
            with out.open("w") as fh:
                procs[host] = net.popen(host, [PY, "-c", PRINT_HOSTNAME], hostname=f"{host}-box", stdout=fh)
        for host, proc in procs.items():
            assert proc.wait(timeout=10) == 0
            assert outs[host].read_text().split() == [f"{host}-box", f"{host}-box"]

        # Without hostname= a host shares the root's UTS namespace.
        plain = net.run("w1", [PY, "-c", PRINT_HOSTNAME])
        assert plain.stdout.split() == [root_hostname, root_hostname]

        with pytest.raises(ValueError):
            net.command("w1", ["true"], hostname="bad name")
    assert socket.gethostname() == root_hostname


SPAWN_DAEMON = "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > \"$0\"; exec sleep 300"
IGNORE_TERM = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               "open(sys.argv[1], 'w').write('ready'); time.sleep(300)")


def _start_lingering(net: Topology, tmp_path: Path) -> tuple[dict[str, subprocess.Popen], int]:
    """A plain sleeper, one that ignores SIGTERM, and a daemon that left our process group."""
    procs = {"sleep": net.popen("a", ["sleep", "300"])}
    ready = tmp_path / "ready"
    procs["stubborn"] = net.popen("b", [PY, "-c", IGNORE_TERM, str(ready)])
    daemon_pid_file = tmp_path / "daemon.pid"
    procs["parent"] = net.popen("b", ["sh", "-c", SPAWN_DAEMON, str(daemon_pid_file)], hostname="b-box")
    daemon_pid = int(wait_for_file(daemon_pid_file, procs["parent"]).strip())
    wait_for_file(ready, procs["stubborn"])
    # Really outside the process group we kill (once setsid(1) has run in the daemon).
    deadline = time.monotonic() + 10
    while os.getpgid(daemon_pid) == procs["parent"].pid:
        assert time.monotonic() < deadline, "the daemon never left its process group"
        time.sleep(0.01)
    assert not is_dead(daemon_pid)
    return procs, daemon_pid


def test_cleanup_kills_every_process_and_deletes_every_namespace(tmp_path):
    links_before = root_links()
    net = Topology(["a", "b"], grace_s=0.5)
    with net:
        names = {net.switch_ns, net.netns("a"), net.netns("b")}
        assert names <= netns_names()
        procs, daemon_pid = _start_lingering(net, tmp_path)

    assert not names & netns_names()
    assert procs["sleep"].returncode == -signal.SIGTERM
    assert procs["stubborn"].returncode == -signal.SIGKILL  # escalated after the grace period
    assert all(is_dead(p.pid) for p in procs.values())
    assert is_dead(daemon_pid)
    assert root_links() == links_before
    net.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        net.popen("a", ["true"])


def test_cleanup_also_happens_when_the_test_body_fails(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with Topology(["a", "b"], grace_s=0.5) as net:
            names = {net.switch_ns, net.netns("a"), net.netns("b")}
            procs, daemon_pid = _start_lingering(net, tmp_path)
            1 / 0
    assert not names & netns_names()
    assert all(is_dead(p.pid) for p in procs.values())
    assert is_dead(daemon_pid)


# A test process that never leaves its with block. Told to go on, it exits normally (atexit must clean
# up); or it is SIGKILLed (nothing runs in it; the stale sweep of any later topology must clean up).
ABANDON = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
from helpers.netns import Topology
net = Topology(["a"]).__enter__()
sleeper = net.popen("a", ["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(net.switch_ns, net.netns("a"), sleeper.pid, flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("ending", ["exit", "kill"])
def test_an_abandoned_topology_is_cleaned_up_at_exit_or_by_the_next_sweep(ending):
    tests_dir = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([PY, "-c", ABANDON, str(tests_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        switch_ns, host_ns, sleeper_pid = child.stdout.readline().split()
        assert {switch_ns, host_ns} <= netns_names()
        assert not is_dead(int(sleeper_pid))
        if ending == "exit":
            child.stdin.write("go on\n")
            child.stdin.close()
            assert child.wait(timeout=30) == 0
        else:
            child.kill()
            child.wait(timeout=30)
            # A concurrent test run may sweep them first; either way they must be gone after this.
            remove_stale_namespaces()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        if not child.stdin.closed:
            child.stdin.close()
    assert not {switch_ns, host_ns} & netns_names()
    deadline = time.monotonic() + 5  # the orphaned sleeper is reaped by init, not by us
    while not is_dead(int(sleeper_pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert is_dead(int(sleeper_pid))


def test_add_delay_slows_the_path_down():
    with Topology(["a", "b"]) as net:
        try:
            net.add_delay("a", 200)
        except NetemUnavailable as exc:
            pytest.skip(str(exc))
        qdisc = net.run("a", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "netem" in qdisc and "delay 200" in qdisc
        # A refused connect is one round trip, so it cannot be quicker than the added delay.
        probe = ("import socket, sys, time; t = time.monotonic()\n"
                 "try: socket.create_connection((sys.argv[1], 9), timeout=5)\n"
                 "except ConnectionRefusedError: print(time.monotonic() - t)")
        out = net.run("a", [PY, "-c", probe, net.ip("b")])
        assert float(out.stdout) >= 0.2, out


LOCUSTFILE = """
from locust import HttpUser, constant, task

class Visitor(HttpUser):
    wait_time = constant(0.1)

    @task
    def index(self):
        self.client.get("/")
"""


@pytest.mark.slow
def test_locust_master_and_two_workers_on_separate_hosts(tmp_path):
    (tmp_path / "locustfile.py").write_text(LOCUSTFILE)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello\n")
    # Fixed ports are safe here: each namespace is fresh and has its own port space.
    web_port, master_port = 8000, 5557
    with Topology(["srv", "master", "w1", "w2"]) as net:
        logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("srv", "master", "w1", "w2")}
        try:
            net.popen("srv", [PY, "-m", "http.server", "--bind", net.ip("srv"), str(web_port)],
                      cwd=tmp_path / "www", stdout=logs["srv"], stderr=subprocess.STDOUT)
            net.wait_port("master", net.ip("srv"), web_port)
            locust = [PY, "-m", "locust", "-f", str(tmp_path / "locustfile.py")]
            master = net.popen("master", [*locust, "--master", "--master-bind-host", net.ip("master"),
                                          "--master-bind-port", str(master_port), "--expect-workers", "2",
                                          "--headless", "-u", "4", "-r", "4", "-t", "3s", "--only-summary",
                                          "--host", f"http://{net.ip('srv')}:{web_port}"],
                               hostname="master", cwd=tmp_path, stdout=logs["master"], stderr=subprocess.STDOUT)
            workers = [net.popen(w, [*locust, "--worker", "--master-host", net.ip("master"),
                                     "--master-port", str(master_port)],
                                 hostname=w, cwd=tmp_path, stdout=logs[w], stderr=subprocess.STDOUT)
                       for w in ("w1", "w2")]
            master_rc = master.wait(timeout=60)
            worker_rcs = [w.wait(timeout=30) for w in workers]
        finally:
            for fh in logs.values():
                fh.close()
        master_log = (tmp_path / "master.log").read_text()
        assert master_rc == 0, master_log[-3000:]
        assert worker_rcs == [0, 0], [(tmp_path / f"{w}.log").read_text()[-2000:] for w in ("w1", "w2")]
        # The master knew its workers by their own hostnames...
        assert "w1_" in master_log and "w2_" in master_log, master_log[-3000:]
        # ...and the server saw requests from both worker addresses, none from the master.
        clients = {line.split()[0] for line in (tmp_path / "srv.log").read_text().splitlines()
                   if '"GET / HTTP/1.1" 200' in line}
        assert clients == {net.ip("w1"), net.ip("w2")}
