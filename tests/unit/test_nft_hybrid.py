"""HybridNft: element-only transactions in-process, everything else through nft."""

import os
import subprocess
import uuid

import pytest

from kproxy.nft import Chain, Elements, Transaction
from kproxy.nft.lib import _elements_only


def test_only_element_transactions_qualify():
    els = Elements("ip", "t", "s", (("1.2.3.4", None, None),))
    assert _elements_only(Transaction().add(els).delete(els))
    assert not _elements_only(Transaction().add(els).add(Chain("ip", "t", "c")))


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    name = f"kpt-hybrid-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True)


def run_in(netns, code):
    return subprocess.run(["ip", "netns", "exec", netns, os.sys.executable, "-c", code],
                          capture_output=True, text=True)


def test_hybrid_backend_applies_and_reports_errors_with_the_line(netns):
    code = """
from kproxy.nft import Elements, NftError, Set, Table, Transaction
from kproxy.nft.lib import HybridNft
b = HybridNft()
assert b.lib is not None
b.apply(Transaction().add(Table("ip", "t")).add(Set("ip", "t", "s", "ipv4_addr")))
b.apply(Transaction().add(Elements("ip", "t", "s", (("10.0.0.1", None, None), ("10.0.0.2", None, None)))))
b.apply(Transaction().delete(Elements("ip", "t", "s", (("10.0.0.1", None, None),))))
print(b.list_ruleset("ip", "t"))
try:
    b.apply(Transaction().add(Elements("ip", "t", "absent", (("10.0.0.3", None, None),))))
except NftError as e:
    print("ERROR", e.line, e)
"""
    proc = run_in(netns, code)
    assert proc.returncode == 0, proc.stderr
    assert "10.0.0.2" in proc.stdout and "10.0.0.1" not in proc.stdout
    assert "ERROR 1 No such file or directory" in proc.stdout and "absent" in proc.stdout
