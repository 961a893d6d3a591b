"""fastpath in a real kernel: every scenario of fastpath_scenarios.py, in ONE VM boot.

The VM (tests/vm/run_in_vm.py: Debian's stock 6.1 kernel under qemu, which has
nftables flowtables) runs ``tests/vm/fastpath_scenarios.py``; each scenario's result
line becomes one pytest result here. Skipped, with the reason, where the VM cannot run
(run tests/vm/setup.sh as root to set it up). Takes about 2-3 minutes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_in_vm as vm  # noqa: E402
from fastpath_scenarios import MARK, SCENARIOS  # noqa: E402

pytestmark = pytest.mark.vm
TIMEOUT = 600


def parse(output: str) -> dict[str, dict]:
    results = {}
    for line in output.splitlines():
        if line.startswith(MARK):
            item = json.loads(line[len(MARK):])
            results[item["name"]] = item
    return results


@pytest.fixture(scope="module")
def vm_results():
    ok, reason = vm.vm_available()
    if not ok:
        pytest.skip(f"the flowtable VM is not available: {reason}")
    try:
        rc, output = vm.run_in_vm(".venv/bin/python tests/vm/fastpath_scenarios.py", timeout=TIMEOUT)
    except vm.VMError as e:  # boot failure or timeout: every scenario fails with the diagnostics
        return {"__error__": f"{e}\n--- guest output ---\n{e.output[-4000:]}"}
    results = parse(output)
    results["__output__"] = output
    return results


@pytest.mark.parametrize("name", SCENARIOS)
def test_fastpath_scenario_in_vm(vm_results, name):
    if "__error__" in vm_results:
        pytest.fail(f"the VM run failed: {vm_results['__error__']}")
    item = vm_results.get(name)
    if item is None:
        pytest.fail(f"scenario {name} reported nothing; guest output:\n{vm_results['__output__'][-4000:]}")
    print(json.dumps(item["details"], indent=1))  # measured figures, shown with -s or on failure
    if item["outcome"] == "skipped":
        pytest.skip(item["message"])
    assert item["outcome"] == "passed", item["message"]


def test_result_parsing():
    out = "noise\n" + MARK + ' {"name": "a", "outcome": "passed", "message": "", "seconds": 1, "details": {}}\nmore\n'
    assert parse(out) == {"a": {"name": "a", "outcome": "passed", "message": "", "seconds": 1, "details": {}}}
