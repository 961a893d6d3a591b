"""Tests of the qemu VM harness (tests/vm/run_in_vm.py).

The unit tests run everywhere.  The VM test boots once and is skipped, with the
reason, when the VM is not available (run tests/vm/setup.sh as root first).
"""

import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_in_vm as vm  # noqa: E402

# --------------------------------------------------------------------------
# unit tests (no VM)


def _script(command, env=None, workdir="/work/some repo"):
    return vm.guest_init_script(
        command,
        workdir,
        "6.1.0-99-amd64",
        "/var/cache/kproxy-vm/kernel/lib/modules/6.1.0-99-amd64",
        env=env,
    )


def test_repo_root_is_found_relative_to_the_file():
    assert (vm.REPO_ROOT / "tests" / "vm" / "run_in_vm.py").resolve() == Path(vm.__file__).resolve()


def test_guest_init_script_sets_up_and_runs_command():
    s = _script(["nft", "list", "ruleset"], env={"FOO": "a b'c"})
    assert s.startswith("#!/bin/sh\n")
    # mounts and module folder
    assert "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp" in s
    assert "MODDIR=/var/cache/kproxy-vm/kernel/lib/modules/6.1.0-99-amd64\n" in s
    assert "KMODS=/lib/modules/6.1.0-99-amd64\n" in s
    assert 'mount --bind "$MODDIR" "$KMODS"' in s
    # the modules are bound before /tmp is hidden by a tmpfs (the cache may be under /tmp)
    assert s.index('mount --bind "$MODDIR"') < s.index("tmpfs /tmp")
    for m in ("nf_flow_table", "nft_flow_offload", "nf_flow_table_inet"):
        assert m in s
    assert 'modprobe "$m"' in s and "FAIL: modprobe" in s
    assert "ip link set lo up" in s
    # the work share is mounted at the same path, quoted, and the command runs there
    assert "WORKDIR='/work/some repo'" in s
    assert 'mount -t 9p -o ' in s and ' work "$WORKDIR"' in s
    assert 'cd "$WORKDIR"' in s
    assert "export FOO='a b'\"'\"'c'" in s
    assert "export PATH=" in s and "/usr/sbin" in s
    # command output on the virtio console, exit status to the control share, power off
    assert "nft list ruleset </dev/null >/dev/hvc0 2>&1\n_kpvm_rc=$?" in s
    assert 'echo "$_kpvm_rc" >/run/kproxy-vm/status.tmp && mv /run/kproxy-vm/status.tmp /run/kproxy-vm/status' in s
    assert "echo b >/proc/sysrq-trigger" in s
    assert s.index("ip link set lo up") < s.index("nft list ruleset") < s.index('echo "$_kpvm_rc"')


def test_guest_init_script_string_command_runs_through_sh():
    s = _script("echo 'x y' | wc -c; exit 3")
    assert "/bin/sh -c " + shlex.quote("echo 'x y' | wc -c; exit 3") + " </dev/null >/dev/hvc0" in s


@pytest.mark.skipif(not shutil.which("sh"), reason="no /bin/sh")
@pytest.mark.parametrize("command", [["a b", "$HOME", "`x`", "'"], "echo $(uname -r) && exit 2"])
def test_guest_init_script_is_valid_shell(command):
    s = _script(command, env={"X": "$(reboot)", "Y": "\n;`"})
    subprocess.run(["sh", "-n"], input=s, text=True, check=True)
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=s, text=True, check=True)


def test_guest_init_script_rejects_bad_env_names_and_empty_argv():
    with pytest.raises(ValueError):
        _script(["true"], env={"A-B": "x"})
    with pytest.raises(ValueError):
        _script(["true"], env={"X; reboot": "x"})
    with pytest.raises(ValueError):
        _script([])


def test_qemu_command_line(tmp_path):
    cmd = vm.qemu_command(tmp_path / "ctl", "/work/main", cache=Path("/c"), qemu="qemu-system-x86_64")
    joined = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64"
    assert "-accel tcg,thread=multi -cpu max -machine q35" in joined
    assert cmd[cmd.index("-smp") + 1] == "2" and cmd[cmd.index("-m") + 1] == "2048"
    assert "-no-reboot" in cmd
    assert cmd[cmd.index("-kernel") + 1] == "/c/vmlinux"
    assert cmd[cmd.index("-initrd") + 1] == "/c/initramfs.cpio"
    append = cmd[cmd.index("-append") + 1]
    assert "random.trust_cpu=on" in append.split() and "panic=-1" in append.split()
    fsdevs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-fsdev"]
    assert any(f.startswith("local,id=hostroot,path=/,readonly=on") for f in fsdevs)
    work = [f for f in fsdevs if "id=work" in f]
    assert work and "path=/work/main," in work[0] and "readonly" not in work[0]
    assert "virtio-9p-pci,fsdev=work,mount_tag=work" in cmd
    assert "virtconsole,chardev=out" in cmd


def test_vm_available_reports_missing_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KPROXY_VM_CACHE", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("KPROXY_IN_VM", raising=False)
    ok, reason = vm.vm_available()
    assert not ok
    assert reason  # e.g. "qemu-system-x86_64 not found" or "VM cache ... is not built"
    if shutil.which("qemu-system-x86_64"):
        assert "setup.sh" in reason and str(tmp_path) in reason
    assert vm.main(["--", "true"]) == 125


def test_vm_available_refuses_nesting(monkeypatch):
    monkeypatch.setenv("KPROXY_IN_VM", "1")
    ok, reason = vm.vm_available()
    assert not ok and "inside the test VM" in reason


def test_streamer_normalizes_tty_newlines(tmp_path):
    import io

    path = tmp_path / "console.out"
    out = io.StringIO()
    st = vm._Streamer(path, out)
    st.poll()  # file missing: nothing
    with open(path, "wb") as f:
        f.write("a\r\nb\r".encode())
    st.poll()
    with open(path, "ab") as f:
        f.write("\n\xe2\x82".encode("latin-1"))  # an incomplete UTF-8 sequence ...
    st.poll()
    with open(path, "ab") as f:
        f.write(b"\xac\r\n")  # ... completed: the euro sign
    st.poll(final=True)
    assert st.text == "a\nb\n\u20ac\n"
    assert out.getvalue() == st.text


# --------------------------------------------------------------------------
# in the VM (one boot)

_available, _reason = vm.vm_available()


@pytest.mark.skipif(not _available, reason=f"test VM not available: {_reason}")
def test_in_vm_kernel_flowtable_and_shared_folder():
    token = uuid.uuid4().hex
    marker = vm.REPO_ROOT / f".vm-harness-{token}.tmp"
    script = f"""
echo "KERNEL=$(uname -r)"
echo "PWD=$(pwd)"
if nft add table inet t && nft add flowtable inet t f {{ hook ingress priority filter \\; devices = {{ lo }} \\; }}
then echo FLOWTABLE=ok; nft list flowtables
else echo FLOWTABLE=failed
fi
echo {token} > {shlex.quote(marker.name)} && echo WROTE=ok
echo "ENV=$KPROXY_HARNESS_TEST"
exit 42
"""
    try:
        # CTL and rc: the guest's own bookkeeping must not depend on such names
        env = {"KPROXY_HARNESS_TEST": "x y", "CTL": "/nonexistent", "rc": "9"}
        r = vm.run_in_vm_ex(script, timeout=600, env=env)
        print(r.output)
        print(f"boot-to-command {r.boot_seconds:.1f} s, total {r.total_seconds:.1f} s")
        lines = dict(line.split("=", 1) for line in r.output.splitlines() if "=" in line and line[:1].isupper())
        assert r.returncode == 42, r.output
        assert lines.get("KERNEL", "").startswith("6.1."), r.output
        assert lines.get("PWD") == str(vm.REPO_ROOT), r.output
        assert lines.get("FLOWTABLE") == "ok", r.output + "\n" + r.setup_log
        assert "flowtable f" in r.output
        assert lines.get("WROTE") == "ok", r.output
        assert lines.get("ENV") == "x y", r.output
        # written in the guest, visible on the host
        assert marker.read_text().strip() == token
    finally:
        if marker.exists():
            marker.unlink()
