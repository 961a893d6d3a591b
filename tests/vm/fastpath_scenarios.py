#!/usr/bin/env python3
"""The fastpath scenarios, run inside the test VM in one boot (as root).

Usage (in the guest; tests/vm/test_fastpath_vm.py does this through run_in_vm)::

    .venv/bin/python tests/vm/fastpath_scenarios.py [--only NAME ...]

Every scenario prints one line ``@@fastpath-scenario@@ {json}`` with its name, outcome
("passed", "failed", "skipped"), a message and measured details; the host turns each
into a separate pytest result. Real packets go through ClusterIPs served by ``kproxy
run --plugin fastpath`` in the lab of fastpath_lab.py. Every wait polls a condition
with a generous bound; nothing relies on fixed short sleeps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastpath_lab import BULK, BULK6, ECHO, OPTOUT, FastpathLab, base_objects, wait_for  # noqa: E402

MARK = "@@fastpath-scenario@@"
THRESHOLD = 20
MIN_INTERVAL = 5.0  # the interfaces plugin's default debounce
PATIENCE = 5.0  # seconds a long flow's conntrack entry may take to show [OFFLOAD]
WINDOW = 1.5  # seconds between the two samples of a running flow's forward count
STRAGGLERS = 10  # packets of an offloaded flow that may still take the normal path
SYNC_ALLOWANCE = 10.0  # seconds for the sync and nft under emulation, on top of the debounce
SCENARIOS = (
    "probe_detects_flowtable_support",
    "kernel_listing_shows_the_flowtable",
    "long_flow_is_offloaded",
    "short_flow_is_not_offloaded",
    "ipv6_long_flow_is_offloaded",
    "opted_out_service_is_never_offloaded",
    "added_veth_joins_the_flowtable",
    "deleted_veth_leaves_and_next_sync_succeeds",
    "threshold_zero_means_no_flowtable",
)


class Failed(AssertionError):
    pass


def check(cond, message, **details):
    if not cond:
        raise Failed(message + (f" ({json.dumps(details, default=str)})" if details else ""))


class Scenarios:
    def __init__(self, lab: FastpathLab):
        self.lab = lab
        self.cport = 40000
        self.new_veth = ("fpnew0", "fpnew1")

    def next_port(self) -> int:
        self.cport += 1
        return self.cport

    def kproxy_ready(self):
        lab = self.lab
        lab.start_kproxy("--fastpath-packet-threshold", str(THRESHOLD))
        pods = {lab.client.host_dev, lab.server.host_dev}
        wait_for(lambda: pods <= set(lab.flowtable_devices() or ()) or (lab.kproxy_proc.poll() is not None and
                 _raise(f"kproxy exited: {lab.log_text()[-2000:]}")), 120, "kproxy to program the flowtable")
        wait_for(lambda: f"{BULK} . tcp . 5201" in lab.offload_elements(4), 60, "the offload set")

    # -- scenarios ------------------------------------------------------------------------
    def probe_detects_flowtable_support(self):
        log = self.lab.log_text()
        check("fastpath disabled" not in log, "the probe wrongly disabled fastpath", log=log[-1500:])
        devices = self.lab.flowtable_devices()
        check(devices, "no flowtable devices although the node has veths", devices=devices)
        return {"flowtable_devices": devices}

    def kernel_listing_shows_the_flowtable(self):
        """What a full sync lists of a table in place (``NftCLI.list_objects``) has the
        flowtable with its devices (the host kernel has no flowtables to check this)."""
        lab = self.lab
        code = ("import json; from kproxy.nft import NftCLI; "
                "l = NftCLI().list_objects('inet', 'kproxy-fastpath'); "
                "print(json.dumps({'flowtables': {n: sorted(f.devices) for n, f in l.flowtables.items()}, "
                "'sets': sorted(l.sets)}))")
        listed = json.loads(lab.node.run([sys.executable, "-c", code]).stdout)
        d = {"listed": listed, "devices": lab.flowtable_devices()}
        check(d["devices"], "precondition: the flowtable has devices", **d)
        check(listed["flowtables"].get("fastpath") == d["devices"], "list_objects does not show the flowtable's devices", **d)
        check({"offload-v4", "offload-v6"} <= set(listed["sets"]), "list_objects misses the offload sets", **d)
        return d

    def _long_flow(self, dst, version, seconds=8):
        """An iperf3 stream to ``dst``; samples (while it runs) the conntrack entry and
        the flow's forward-hook count twice, WINDOW seconds apart."""
        lab = self.lab
        port = self.next_port()
        proc = lab.iperf(dst, port, seconds, *(["-6"] if version == 6 else []))
        wait_for(lambda: lab.flow_packets(port, version) > THRESHOLD or proc.poll() is not None, 60,
                 "the flow to pass the threshold")
        t_entry = time.monotonic()

        def entry_once_offloaded():  # as soon as it shows [OFFLOAD]; without it after PATIENCE s
            entry = lab.conntrack_entry(port, version)
            if entry and ("[OFFLOAD]" in entry or proc.poll() is not None or time.monotonic() - t_entry > PATIENCE):
                return entry
            return None

        entry = wait_for(entry_once_offloaded, 30, "the flow's conntrack entry")
        early = lab.flow_packets(port, version)
        time.sleep(WINDOW)  # the measurement window, while the flow runs
        late = lab.flow_packets(port, version)
        running = proc.poll() is None
        result = lab.iperf_result(proc)
        d = {"cport": port, "forward_packets_early": early, "forward_packets_late": late,
             "forward_packets_final": lab.flow_packets(port, version), "window_seconds": WINDOW,
             "bytes": result["end"]["sum_sent"]["bytes"],
             "mbit_s": round(result["end"]["sum_received"]["bits_per_second"] / 1e6, 1), "conntrack": entry}
        check(running, "the flow ended before the measurement window did (too slow a machine?)", **d)
        return d

    def long_flow_is_offloaded(self):
        d = self._long_flow(BULK, 4)
        check(d["conntrack"] and "[OFFLOAD]" in d["conntrack"], "conntrack does not show [OFFLOAD] for the flow", **d)
        self._check_stopped(d)
        return d

    @staticmethod
    def _check_stopped(d):
        # A few packets still take the normal path after offload (the flowtable hands
        # packets with FIN/RST, or that need a route or neighbour refresh, to the stack),
        # so "stops growing" allows a handful; a flow on the normal path grows by thousands.
        check(d["forward_packets_late"] - d["forward_packets_early"] <= STRAGGLERS,
              "the forward chain still counted packets of the flow after it should have been offloaded", **d)
        check(d["forward_packets_final"] <= THRESHOLD + 2 * STRAGGLERS,
              "far more packets than the threshold went through forward", **d)
        # at least 1000 segments of data (GSO packets are up to 64 KB, so count minimum-size ones)
        check(d["bytes"] > 64 * 1024 * 1000, "the flow was too small to tell", **d)

    def short_flow_is_not_offloaded(self):
        lab = self.lab
        results = lab.client.probe(ECHO, 80, "tcp", count=1, timeout=10)
        check(results[0].ok, "the short connection failed", outcome=results[0].outcome, error=results[0].error)
        sport = results[0].sport
        entry = wait_for(lambda: lab.conntrack_entry(sport), 30, "the conntrack entry")
        packets = lab.flow_packets(sport)
        d = {"sport": sport, "forward_packets": packets, "conntrack": entry}
        check("[OFFLOAD]" not in entry, "a connection shorter than the threshold was offloaded", **d)
        check(0 < packets <= THRESHOLD, "the short connection's packets did not all go through forward", **d)
        return d

    def ipv6_long_flow_is_offloaded(self):
        d = self._long_flow(BULK6, 6, seconds=6)
        check(d["conntrack"] and "[OFFLOAD]" in d["conntrack"], "conntrack does not show [OFFLOAD] for the IPv6 flow", **d)
        self._check_stopped(d)
        return d

    def opted_out_service_is_never_offloaded(self):
        lab = self.lab
        check(not any(e.startswith(OPTOUT) for e in lab.offload_elements(4)), "the opted-out Service is in the set",
              elements=sorted(lab.offload_elements(4)))
        d = self._long_flow(OPTOUT, 4, seconds=10)  # it waits PATIENCE s for an [OFFLOAD] that must not come
        check(d["conntrack"] and "[OFFLOAD]" not in d["conntrack"], "the opted-out Service's flow was offloaded", **d)
        check(d["forward_packets_late"] > d["forward_packets_early"] > 5 * THRESHOLD,
              "the opted-out flow did not keep going through forward", **d)
        return d

    def added_veth_joins_the_flowtable(self):
        lab = self.lab
        a, b = self.new_veth
        t0 = time.monotonic()
        lab.node.ip(f"link add {a} type veth peer name {b}", f"link set {a} up", f"link set {b} up")
        bound = MIN_INTERVAL + SYNC_ALLOWANCE
        wait_for(lambda: {a, b} <= set(lab.flowtable_devices() or ()), bound + 30, "the new veth in the flowtable")
        elapsed = time.monotonic() - t0
        d = {"seconds": round(elapsed, 2), "bound": bound, "devices": lab.flowtable_devices()}
        check(elapsed <= bound, "the new veth joined later than the debounce bound", **d)
        return d

    def deleted_veth_leaves_and_next_sync_succeeds(self):
        lab = self.lab
        a, b = self.new_veth
        check({a, b} <= set(lab.flowtable_devices() or ()), "the veth from the previous scenario is missing")
        errors_before = lab.log_text().count(" ERROR ")
        # delete it, and at once change the Services (a sync right after the deletion);
        # plus a few veths that appear and vanish again immediately, to race the listing
        late = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "late", "namespace": "demo"},
                "spec": {"clusterIP": "172.30.0.40", "ports": [{"name": "p", "protocol": "TCP", "port": 81}]}}
        lab.node.ip(f"link del {a}")
        lab.write_manifests(base_objects() + [late])
        for i in range(5):
            lab.node.ip(f"link add fpflap{i} type veth peer name fpflop{i}", f"link set fpflap{i} up",
                        f"link del fpflap{i}")
        t0 = time.monotonic()
        wait_for(lambda: "172.30.0.40 . tcp . 81" in lab.offload_elements(4), 60, "the next sync to program the new Service")
        wait_for(lambda: not ({a, b} & set(lab.flowtable_devices() or ())), 60, "the deleted veth to leave")
        # and the datapath still works, including offload
        ok = lab.client.probe(ECHO, 80, "tcp", count=3, timeout=10)
        time.sleep(MIN_INTERVAL + 1)  # let the debounced re-listing after the flapping happen
        d = {"seconds": round(time.monotonic() - t0, 2), "devices": lab.flowtable_devices(),
             "errors_in_log": lab.log_text().count(" ERROR ") - errors_before}
        check(all(r.ok for r in ok), "ClusterIP connections failed after the deletion", outcomes=[r.outcome for r in ok])
        check(d["errors_in_log"] == 0, "kproxy logged errors", log=lab.log_text()[-3000:])
        check(lab.kproxy_proc.poll() is None, "kproxy exited")
        check(sorted(d["devices"]) == sorted({lab.client.host_dev, lab.server.host_dev}), "unexpected devices", **d)
        return d

    def threshold_zero_means_no_flowtable(self):
        lab = self.lab
        t0 = time.monotonic()
        lab.stop_kproxy()
        t1 = time.monotonic()
        check(lab.flowtable_devices() is not None, "precondition: the flowtable from the running kproxy is there")
        proc = lab.kproxy_once("--fastpath-packet-threshold", "0")
        t2 = time.monotonic()
        check(proc.returncode == 0, "kproxy run --once --fastpath-packet-threshold 0 failed", stderr=proc.stderr[-2000:])
        flowtables = lab.flowtables()
        tables = lab.node.run(["nft", "list", "tables"]).stdout
        d = {"flowtables": flowtables.strip(), "tables": tables.split("\n"), "stop_seconds": round(t1 - t0, 1),
             "once_seconds": round(t2 - t1, 1)}
        check("flowtable" not in flowtables, "a flowtable exists with threshold 0", **d)
        check("kproxy-fastpath" not in tables, "the fastpath table exists with threshold 0", **d)
        ok = lab.client.probe(ECHO, 80, "tcp", count=3, timeout=10)
        check(all(r.ok for r in ok), "ClusterIP connections failed with threshold 0")
        return d


def _raise(message):
    raise RuntimeError(message)


def report(name, outcome, message="", seconds=0.0, details=None):
    print(MARK + " " + json.dumps({"name": name, "outcome": outcome, "message": message,
                                    "seconds": round(seconds, 2), "details": details or {}}, default=str), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="run only these scenarios (others are reported skipped)")
    args = p.parse_args(argv)
    wanted = set(args.only) if args.only else set(SCENARIOS)
    work = Path(tempfile.mkdtemp(prefix="fastpath-vm-"))
    t_setup = time.monotonic()
    try:
        lab = FastpathLab(work)
    except Exception as e:
        for name in SCENARIOS:
            report(name, "failed", f"lab setup failed: {type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    print(f"lab ready after {time.monotonic() - t_setup:.1f} s", flush=True)
    failed = 0
    try:
        sc = Scenarios(lab)
        try:
            sc.kproxy_ready()
            setup_error = None
        except Exception as e:
            setup_error = f"kproxy did not come up: {type(e).__name__}: {e}\n{lab.log_text()[-3000:]}"
        print(f"kproxy ready after {time.monotonic() - t_setup:.1f} s", flush=True)
        for name in SCENARIOS:
            if name not in wanted:
                report(name, "skipped", "not selected")
                continue
            if setup_error:
                report(name, "failed", setup_error)
                failed += 1
                continue
            t0 = time.monotonic()
            try:
                details = getattr(sc, name)()
                report(name, "passed", "", time.monotonic() - t0, details)
            except Exception as e:
                failed += 1
                msg = str(e) if isinstance(e, (Failed, TimeoutError)) else f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                report(name, "failed", msg, time.monotonic() - t0)
    finally:
        lab.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
