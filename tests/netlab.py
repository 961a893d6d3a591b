"""Network-namespace lab for real-packet end-to-end tests (needs root).

Topology: one "node" namespace routing between any number of "pod"
namespaces (external clients are just pods with other addresses).  Each pod
is wired to the node by its own veth pair: ``eth0`` in the pod, ``v<N>-<name>``
(<= 15 chars) in the node, the pod's default route pointing at the node side.
The node has IPv4/IPv6 forwarding on and, by default, a dummy ``uplink0``
carrying its default routes (like a real node's uplink: traffic to unknown
addresses, e.g. an un-programmed ClusterIP, is silently dropped there).
kproxy programs nftables inside the node namespace.  Every namespace has
IPv6 DAD off (addresses usable at once) and ICMP error rate limiting off, so
that each of many probes to a rejecting service gets its ICMP answer.

Namespaces are named ``kp<pid>x<n>-<name>`` (``lab.prefix`` + "-" + name), so
parallel labs never collide.  ``close()`` (also run on ``with`` exit and, as a
last resort, at interpreter exit) kills every process the lab started, by PID,
and deletes every namespace it created.

API::

    Lab(prefix=None, node_uplink=True)      # creates the node namespace at once
      .prefix, .node, .pods (dict name -> Pod), .started_pids (list[int])
      .node()                               # == .node (callable for convenience)
      .pod(name, addr=None, gw=None, v6=None, gw6=None) -> Pod
            # addr/gw/v6/gw6 are CIDRs ("10.0.1.2/24"); addr defaults to
            # 10.0.<N>.2/24, gw to the first other host of the pod's subnet;
            # IPv6 only when v6 is given.
      .remove_pod(name)
      .namespaces() -> list[str]            # netns names currently owned
      .close()                              # idempotent

    Netns (Node and Pod):
      .name                                 # netns name, for "ip netns exec NAME ..."
      .label                                # short name ("node", "pod-a")
      .exec_argv(argv) -> list[str]         # ["ip", "netns", "exec", NAME, *argv]
      .run(argv, check=True, input=None, timeout=30) -> CompletedProcess (text, captured;
            raises CommandError, which shows stdout/stderr, when check and rc != 0)
      .ip(*commands)                        # "ip -n NAME -batch -"; e.g. ns.ip("link set lo up")
      .popen(argv, **popen_kwargs) -> Popen # background process, killed on close
      .add_address(cidr, dev="lo")          # dev is created (add_dummy) if missing
      .add_dummy(dev)                       # up, NOARP, drops all it sends (dummy, else ifb)
      .add_route(dst, via=None, dev=None)
      .serve(port, proto="tcp", name=None, bind=None, timeout=10) -> Server
            # proto tcp|udp|both; returns once the server is listening
      .probe(host, port, proto="tcp", count=1, timeout=1.0, source=None) -> list[ProbeResult]

    Pod(Netns): .addr .gw .addr6 .gw6 (plain addresses or None),
                .cidr .cidr6 (with prefix), .dev ("eth0"), .host_dev (node side)
    Server: .ns .name .port .proto .proc .pid .alive .stop()
    ProbeResult: .outcome ("ok"|"refused"|"unreachable"|"timeout"|"error"),
                 .elapsed, .reply (dict|None), .sport (client port), .error,
                 .ok, .name, .local, .peer, .peer_port (from the reply)

    available() -> None or a string saying why the lab cannot run here.

Pytest fixture::

    @pytest.fixture
    def lab():
        with netlab.Lab() as lab:
            yield lab
"""

import atexit
import dataclasses
import ipaddress
import itertools
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER = HERE / "endpoint_server.py"
CLIENT = HERE / "probe_client.py"
NETNS_DIR = "/run/netns"
HAVE_IPV6 = os.path.exists("/proc/sys/net/ipv6")
_lab_counter = itertools.count()


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the captured output."""

    def __str__(self):
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def _run(argv, check=True, input=None, timeout=30):
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def _stop_process(proc, timeout=5.0):
    """Kill one Popen (by its PID), reap it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


def available():
    """Return None if the lab can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [tool for tool in ("ip", "sysctl") if not shutil.which(tool)]
    return f"missing tools: {missing}" if missing else None


def _owned_netns():
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


def _gateway_for(iface):
    """Default node-side address for a pod address: first other host of its subnet."""
    for host in iface.network.hosts():
        if host != iface.ip:
            return ipaddress.ip_interface(f"{host}/{iface.network.prefixlen}")
    raise ValueError(f"no room for a gateway in {iface.network}")


@dataclasses.dataclass
class ProbeResult:
    """One attempt made by probe_client.py."""

    outcome: str
    elapsed: float
    reply: dict | None = None
    sport: int | None = None
    error: str | None = None

    ok = property(lambda self: self.outcome == "ok")
    name = property(lambda self: (self.reply or {}).get("name"))
    local = property(lambda self: (self.reply or {}).get("local"))
    peer = property(lambda self: (self.reply or {}).get("peer"))
    peer_port = property(lambda self: (self.reply or {}).get("peer_port"))


class Server:
    """An endpoint_server.py running in a namespace (see Netns.serve)."""

    def __init__(self, ns, port, proto="tcp", name=None, bind=None, timeout=10.0):
        self.ns, self.port, self.proto = ns, port, proto
        self.name = name or ns.label
        argv = [sys.executable, SERVER, "--name", self.name, "--port", port, "--proto", proto]
        if bind:
            argv += ["--bind", bind]
        self._stderr = tempfile.TemporaryFile()
        self.proc = ns.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr)
        self.pid = self.proc.pid
        ns.servers.append(self)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout):
        """Wait for the server's "ready" line (it is printed after listen())."""
        deadline = time.monotonic() + timeout
        fd, line = self.proc.stdout.fileno(), b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                chunk = os.read(fd, 64) if left > 0 and sel.select(left) else None
                if not chunk:
                    break
                line += chunk
        if line.strip() != b"ready":
            self.stop()
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace")
            raise RuntimeError(f"server {self.name} in {self.ns.name} did not start: {line!r} {err}")

    @property
    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        """Kill the server (idempotent)."""
        _stop_process(self.proc)
        self._stderr.close()
        if self in self.ns.servers:
            self.ns.servers.remove(self)

    def __repr__(self):
        return f"<Server {self.name} {self.proto}/{self.port} in {self.ns.name} pid={self.pid}>"


class Netns:
    """A network namespace owned by a Lab."""

    def __init__(self, lab, label):
        self.lab, self.label = lab, label
        self.name = f"{lab.prefix}-{label}"
        self.procs = []  # background Popen objects (servers included)
        self.servers = []

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"

    def exec_argv(self, argv):
        """argv wrapped so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def run(self, argv, check=True, input=None, timeout=30):
        """Run argv inside the namespace and wait; output is captured as text."""
        return _run(self.exec_argv(argv), check=check, input=input, timeout=timeout)

    def ip(self, *commands, check=True):
        """Run `ip` commands (e.g. "addr add 10.0.0.1/24 dev eth0") in this namespace."""
        return _run(["ip", "-n", self.name, "-batch", "-"], check=check, input="\n".join(commands) + "\n")

    def popen(self, argv, **kwargs):
        """Start argv in the background in this namespace; it is killed on close."""
        proc = subprocess.Popen(self.exec_argv(argv), **kwargs)  # ip netns exec execs: same PID
        self.procs.append(proc)
        self.lab.started_pids.append(proc.pid)
        return proc

    def add_address(self, cidr, dev="lo"):
        """Add an address (CIDR or bare) to dev; a missing dev is created as a dummy."""
        iface = ipaddress.ip_interface(cidr)
        if self.ip(f"link show dev {dev}", check=False).returncode:
            self.add_dummy(dev)
        self.ip(f"addr add {iface.with_prefixlen} dev {dev}" + (" nodad" if iface.version == 6 else ""))

    def add_dummy(self, dev):
        """Create an up, NOARP device that silently drops what is sent through it.

        Uses a "dummy" link, or an "ifb" link (same behaviour) on kernels without
        the dummy driver.
        """
        if self.ip(f"link add {dev} type dummy", check=False).returncode:
            self.ip(f"link add {dev} type ifb")
        self.ip(f"link set {dev} up")

    def add_route(self, dst, via=None, dev=None):
        """Add a route, e.g. add_route("172.30.0.0/16", dev="uplink0")."""
        self.ip(f"route add {dst}" + (f" via {via}" if via else "") + (f" dev {dev}" if dev else ""))

    def serve(self, port, proto="tcp", name=None, bind=None, timeout=10.0):
        """Start endpoint_server.py here; returns once it listens."""
        return Server(self, port, proto, name, bind, timeout)

    def probe(self, host, port, proto="tcp", count=1, timeout=1.0, source=None):
        """Run probe_client.py here; returns one ProbeResult per attempt."""
        argv = [sys.executable, CLIENT, "--host", host, "--port", port, "--proto", proto,
                "--count", count, "--timeout", timeout]
        if source:
            argv += ["--source", source]
        out = self.run(argv, timeout=count * (timeout + 1) + 30).stdout
        return [ProbeResult(**r) for r in json.loads(out)]

    def _stop_all(self):
        for server in list(self.servers):
            server.stop()
        for proc in self.procs:
            _stop_process(proc)
        self.procs.clear()


class Node(Netns):
    """The router namespace.  Callable: lab.node() is lab.node."""

    def __call__(self):
        return self


class Pod(Netns):
    """A namespace attached to the node by a veth pair (see Lab.pod)."""

    dev = "eth0"

    def __init__(self, lab, label, index, cidr, gw, cidr6=None, gw6=None):
        super().__init__(lab, label)
        self.host_dev = f"v{index}-{label}"[:15]
        self.cidr, self.cidr6 = cidr, cidr6
        self.addr, self.gw = str(cidr.ip), str(gw.ip)
        self.addr6 = str(cidr6.ip) if cidr6 else None
        self.gw6 = str(gw6.ip) if gw6 else None


class Lab:
    """A node namespace plus pods; see the module docstring."""

    def __init__(self, prefix=None, node_uplink=True):
        existing = _owned_netns()
        while prefix is None or any(n.startswith(prefix + "-") for n in existing):
            if prefix is not None and not prefix.startswith(f"kp{os.getpid()}x"):
                raise ValueError(f"namespaces with prefix {prefix!r} already exist")
            prefix = f"kp{os.getpid()}x{next(_lab_counter)}"  # skip leftovers of a dead process
        self.prefix = prefix
        self.pods = {}
        self.started_pids = []
        self._all = []  # every live Netns, in creation order
        self._index = itertools.count(1)
        self._closed = False
        atexit.register(self.close)
        try:
            self.node = self._create(Node(self, "node"), [
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ])
            if node_uplink:
                self.node.add_dummy("uplink0")
                self.node.ip("route add 0.0.0.0/0 dev uplink0",
                             *(["route add ::/0 dev uplink0"] if HAVE_IPV6 else []))
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _create(self, ns, sysctls=()):
        """Create the namespace of ns: loopback up, no IPv6 DAD, no ICMP rate limit."""
        _run(["ip", "netns", "add", ns.name])
        self._all.append(ns)
        ns.ip("link set lo up")
        settings = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv4.icmp_ratemask=0", "net.ipv6.icmp.ratemask=", *sysctls]
        ns.run(["sysctl", "-q", "-e", "-w", *settings])  # -e: tolerate a kernel without IPv6
        return ns

    def pod(self, name, addr=None, gw=None, v6=None, gw6=None):
        """Create a namespace wired to the node; see the module docstring."""
        if self._closed:
            raise RuntimeError("lab is closed")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name == "node" or name in self.pods:
            raise ValueError(f"bad or duplicate pod name {name!r}")
        index = next(self._index)
        cidr = ipaddress.ip_interface(addr or f"10.{index >> 8}.{index & 255}.2/24")
        gw = ipaddress.ip_interface(gw) if gw else _gateway_for(cidr)
        cidr6 = ipaddress.ip_interface(v6) if v6 else None
        gw6 = (ipaddress.ip_interface(gw6) if gw6 else _gateway_for(cidr6)) if v6 else None
        pod = self._create(Pod(self, name, index, cidr, gw, cidr6, gw6))
        self.pods[name] = pod
        host_cmds = [f"link add {pod.host_dev} type veth peer name {pod.dev} netns {pod.name}",
                     f"addr add {gw.with_prefixlen} dev {pod.host_dev}",
                     f"link set {pod.host_dev} up"]
        pod_cmds = [f"addr add {cidr.with_prefixlen} dev {pod.dev}",
                    f"link set {pod.dev} up",
                    f"route add 0.0.0.0/0 via {gw.ip}"]
        if v6:
            host_cmds.insert(2, f"addr add {gw6.with_prefixlen} dev {pod.host_dev} nodad")
            pod_cmds += [f"addr add {cidr6.with_prefixlen} dev {pod.dev} nodad",
                         f"route add ::/0 via {gw6.ip}"]
        try:
            self.node.ip(*host_cmds)
            pod.ip(*pod_cmds)
        except BaseException:
            self.remove_pod(name)
            raise
        return pod

    def remove_pod(self, name):
        """Stop the pod's processes and delete its namespace and veth pair."""
        pod = self.pods.pop(name)
        pod._stop_all()
        self.node.ip(f"link del {pod.host_dev}", check=False)
        self._delete(pod)

    def _delete(self, ns):
        _run(["ip", "netns", "del", ns.name], check=False)
        self._all.remove(ns)

    def namespaces(self):
        """Names of the namespaces this lab currently owns."""
        return [ns.name for ns in self._all]

    def close(self):
        """Kill the lab's processes and delete its namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for ns in self._all:
            ns._stop_all()
        for ns in reversed(list(self._all)):
            self._delete(ns)
        self.pods.clear()
