"""A one-node lab for fastpath runs inside the test VM (used by the VM scenarios and the
benchmark; needs root and a kernel with flowtables).

Topology (tests/netlab.py): ``client`` pod (10.0.3.2, fd00:3::2) -> ``node`` namespace,
where kproxy runs and routes -> ``server`` pod (10.0.1.2, fd00:1::2), which runs an
iperf3 server on 5201 and tests/endpoint_server.py on 8080. Services (ClusterIP ->
server): ``bulk`` 172.30.0.10:5201, ``bulk6`` [fd00:30::10]:5201, ``echo``
172.30.0.20:80 -> 8080, ``optout`` 172.30.0.30:5201 (annotated
``kproxy.io/fastpath: "false"``).

Per-flow forward counting, for tests only: table ``inet fpcount`` (not a kproxy-* name,
so kproxy never touches it) with a forward chain at priority -300 that counts every
forwarded packet of a TCP connection in dynamic sets keyed by the connection's original
client address and port. Offloaded packets skip the forward hook, so a flow's count
stops growing once it is offloaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
for p in (str(TESTS),):
    if p not in sys.path:
        sys.path.insert(0, p)

import netlab  # noqa: E402
import objects  # noqa: E402

BULK, BULK6, ECHO, OPTOUT = "172.30.0.10", "fd00:30::10", "172.30.0.20", "172.30.0.30"
IPERF_PORT = 5201
CLUSTER_CIDR = "10.0.0.0/16"

COUNT_TABLE = """\
table inet fpcount {
    set flows4 { type ipv4_addr . inet_service ; flags dynamic ; counter ; size 65535 ; }
    set flows6 { type ipv6_addr . inet_service ; flags dynamic ; counter ; size 65535 ; }
    chain count {
        type filter hook forward priority -300 ; policy accept ;
        meta nfproto ipv4 meta l4proto tcp update @flows4 { ct original ip saddr . ct original proto-src }
        meta nfproto ipv6 meta l4proto tcp update @flows6 { ct original ip6 saddr . ct original proto-src }
    }
}
"""


def wait_for(cond, timeout: float, what: str, interval: float = 0.2):
    """Poll ``cond()`` until it returns a true value (returned) or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def base_objects(optout_annotation="false"):
    ann = {"kproxy.io/fastpath": optout_annotation} if optout_annotation is not None else {}
    optout = objects.service("optout", OPTOUT, [("iperf", "TCP", IPERF_PORT)])
    optout["metadata"]["annotations"] = ann
    return [
        objects.service("bulk", BULK, [("iperf", "TCP", IPERF_PORT)]),
        objects.endpoint_slice("bulk", ["10.0.1.2"], [("iperf", "TCP", IPERF_PORT)]),
        objects.service("bulk6", BULK6, [("iperf", "TCP", IPERF_PORT)], ipFamilies=["IPv6"]),
        objects.endpoint_slice("bulk6", ["fd00:1::2"], [("iperf", "TCP", IPERF_PORT)], address_type="IPv6"),
        objects.service("echo", ECHO, [("http", "TCP", 80)]),
        objects.endpoint_slice("echo", ["10.0.1.2"], [("http", "TCP", 8080)]),
        optout,
        objects.endpoint_slice("optout", ["10.0.1.2"], [("iperf", "TCP", IPERF_PORT)]),
    ]


class FastpathLab:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lab = netlab.Lab()
        self.node = self.lab.node
        try:
            self.server = self.lab.pod("server", "10.0.1.2/24", gw="10.0.1.1/24", v6="fd00:1::2/64")
            self.client = self.lab.pod("client", "10.0.3.2/24", gw="10.0.3.1/24", v6="fd00:3::2/64")
            self.iperf_server = self.server.popen(["iperf3", "-s", "-p", IPERF_PORT], stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL)
            self.server.serve(8080, "tcp", name="server", timeout=60)
            wait_for(lambda: f":{IPERF_PORT}" in self.server.run(["ss", "-Htln"]).stdout, 60, "iperf3 to listen")
            self.node.run(["nft", "-f", "-"], input=COUNT_TABLE)
            self.config = self.workdir / "kproxy.yaml"
            self.config.write_text(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                f"hostnameOverride: {objects.NODE}\nclusterCIDR: {CLUSTER_CIDR}\n")
            self.manifests = self.workdir / "manifests"
            self.write_manifests(base_objects())
        except BaseException:
            self.lab.close()
            raise
        self.kproxy_proc = None
        self.kproxy_log = self.workdir / "kproxy.log"

    def close(self):
        self.stop_kproxy()
        self.lab.close()

    # -- kproxy ---------------------------------------------------------------------------
    def write_manifests(self, objs):
        tmp = self.workdir / "manifests.tmp"
        objects.write_manifests(tmp, objs)
        self.manifests.mkdir(exist_ok=True)
        os.replace(tmp / "objects.yaml", self.manifests / "objects.yaml")  # atomic for the watcher

    def kproxy_argv(self, *args, once=False):
        return [sys.executable, "-m", "kproxy", "run", *(["--once"] if once else []), "--config", self.config,
                "--manifests", self.manifests, "--plugin", "fastpath", *args]

    def start_kproxy(self, *args):
        self.stop_kproxy()
        self._log = open(self.kproxy_log, "a")
        self.kproxy_proc = self.node.popen(self.kproxy_argv(*args), stdout=self._log, stderr=subprocess.STDOUT)
        return self.kproxy_proc

    def stop_kproxy(self):
        if self.kproxy_proc is not None and self.kproxy_proc.poll() is None:
            self.kproxy_proc.send_signal(signal.SIGTERM)
            try:
                self.kproxy_proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kproxy_proc.kill()
                self.kproxy_proc.wait()
        self.kproxy_proc = None

    def kproxy_once(self, *args, timeout=180):
        return self.node.run(self.kproxy_argv(*args, once=True), check=False, timeout=timeout)

    def log_text(self) -> str:
        try:
            return self.kproxy_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- observing --------------------------------------------------------------------------
    def nft_json(self, *args):
        proc = self.node.run(["nft", "-j", *args], check=False)
        if proc.returncode:
            return None
        return json.loads(proc.stdout)["nftables"]

    def flowtable_devices(self):
        """The fastpath flowtable's devices, or None when there is no such flowtable."""
        items = self.nft_json("list", "flowtable", "inet", "kproxy-fastpath", "fastpath")
        for item in items or ():
            if "flowtable" in item:
                devs = item["flowtable"].get("dev", [])
                return sorted([devs] if isinstance(devs, str) else devs)
        return None

    def flowtables(self) -> str:
        return self.node.run(["nft", "list", "flowtables"]).stdout

    def offload_elements(self, version=4) -> set:
        items = self.nft_json("list", "set", "inet", "kproxy-fastpath", f"offload-v{version}")
        out = set()
        for item in items or ():
            for e in item.get("set", {}).get("elem", ()):
                val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                out.add(" . ".join(str(x) for x in val["concat"]) if isinstance(val, dict) else str(val))
        return out

    def flow_packets(self, sport: int, version=4, client=None) -> int:
        """Forwarded packets (both directions) of the TCP connection from the client's
        port ``sport`` (0 when none was seen)."""
        client = client or (self.client.addr if version == 4 else self.client.addr6)
        items = self.nft_json("list", "set", "inet", "fpcount", f"flows{version}")
        for item in items or ():
            for e in item.get("set", {}).get("elem", ()):
                if not (isinstance(e, dict) and "elem" in e):
                    continue
                addr, port = e["elem"]["val"]["concat"]
                if addr == client and int(port) == sport:
                    return int(e["elem"].get("counter", {}).get("packets", 0))
        return 0

    def conntrack_entry(self, sport: int, version=4):
        """The conntrack line of the TCP connection from the client's port, or None."""
        proc = self.node.run(["conntrack", "-L", "-f", "ipv4" if version == 4 else "ipv6", "-p", "tcp",
                              "--sport", str(sport)], check=False)
        lines = [l for l in proc.stdout.splitlines() if f"sport={sport} " in l]
        return lines[0] if lines else None

    # -- traffic ----------------------------------------------------------------------------
    def iperf(self, dst, cport, seconds, *extra):
        """Start an iperf3 client in the client pod (JSON on stdout); returns the Popen."""
        argv = ["iperf3", "-c", dst, "-p", IPERF_PORT, "--cport", cport, "-t", seconds, "-J", *extra]
        return self.client.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def iperf_result(proc, timeout=120) -> dict:
        out, err = proc.communicate(timeout=timeout)
        try:
            data = json.loads(out)
        except ValueError:
            raise RuntimeError(f"iperf3 failed (rc {proc.returncode}): {err or out}") from None
        if data.get("error"):
            raise RuntimeError(f"iperf3: {data['error']}")
        return data
