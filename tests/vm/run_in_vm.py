#!/usr/bin/env python3
"""Run a command inside a qemu (TCG) VM booting Debian's stock 6.1 kernel.

The host kernel lacks nftables flowtables; Debian's stock kernel has them.  The
VM boots the kernel unpacked by ``tests/vm/setup.sh`` (cache folder
``$KPROXY_VM_CACHE``, default ``/var/cache/kproxy-vm``) with the host's ``/``
shared read-only over 9p under a tmpfs overlay, so every host tool (nft, ip,
conntrack, python, the project's .venv) runs unchanged in the guest.  The
working folder (default: the repository root) is shared read-write and mounted
at the same path in the guest, so files written there come back to the host.

Library::

    from run_in_vm import run_in_vm, vm_available
    ok, reason = vm_available()
    rc, out = run_in_vm(["nft", "list", "ruleset"])
    rc, out = run_in_vm("uname -r && nft -v", timeout=300)   # str: via /bin/sh -c

CLI::

    python tests/vm/run_in_vm.py [--timeout S] [--cwd DIR] [-e K=V] [-v] -- CMD ARGS...

prints the guest output while it runs and exits with the guest command's status
(124 on timeout, 125 if the VM itself failed).  A single CMD argument is run by
``/bin/sh -c``, several are run as an argv.
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import dataclasses
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "REPO_ROOT",
    "VMError",
    "VMTimeout",
    "VMResult",
    "cache_dir",
    "vm_available",
    "guest_init_script",
    "qemu_command",
    "run_in_vm",
    "run_in_vm_ex",
    "main",
]

log = logging.getLogger("kproxy.vm")

#: Repository root, found relative to this file (tests/vm/run_in_vm.py).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Where the control share (init script, exit status, logs) is mounted in the guest.
GUEST_CTL = "/run/kproxy-vm"

#: Modules loaded in the guest before the command runs.
GUEST_MODULES = ("nf_flow_table", "nft_flow_offload", "nf_flow_table_inet")

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_ENV = {
    "PATH": GUEST_PATH,
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/sh",
    "TERM": "dumb",
    "LANG": "C.UTF-8",
    "KPROXY_IN_VM": "1",
}

DEFAULT_CACHE = "/var/cache/kproxy-vm"
QEMU = "qemu-system-x86_64"
MEMORY_MIB = 2048
VCPUS = 2
MSIZE = 512000
#: 9p cache mode of the read-write work share.  "loose" makes Python start from
#: the .venv about twice as fast as "none"; the price is that changes the HOST
#: makes to the folder while the guest runs may not be seen by the guest.
#: Override with KPROXY_VM_WORK_CACHE=none|mmap|loose.
DEFAULT_WORK_CACHE = "loose"

Command = Union[str, Sequence[str]]


class VMError(RuntimeError):
    """The VM could not run the command (boot failure, no exit status, ...)."""

    def __init__(self, message: str, output: str = "", diagnostics: str = ""):
        super().__init__(message + (f"\n{diagnostics}" if diagnostics else ""))
        self.output = output
        self.diagnostics = diagnostics


class VMTimeout(VMError, TimeoutError):
    """The command did not finish within the timeout; qemu was killed."""


@dataclasses.dataclass
class VMResult:
    returncode: int
    output: str
    #: host seconds from starting qemu until the guest started the command
    boot_seconds: Optional[float]
    #: host seconds from starting qemu until qemu exited
    total_seconds: float
    #: guest-side setup messages (module loading, mounts), one per line
    setup_log: str
    kernel_version: str


# --------------------------------------------------------------------------
# cache / availability


def cache_dir() -> Path:
    return Path(os.environ.get("KPROXY_VM_CACHE") or DEFAULT_CACHE)


def _qemu_binary() -> Optional[str]:
    return shutil.which(os.environ.get("KPROXY_VM_QEMU") or QEMU)


def _read_cache(cache: Path) -> Tuple[str, Path]:
    """Return (kernel version, modules folder) of a ready cache or raise VMError."""
    ready = cache / "ready"
    if not ready.is_file():
        raise VMError(f"VM cache {cache} is not built (no {ready}); run tests/vm/setup.sh as root")
    kver = ready.read_text().splitlines()[0].strip()
    for name in ("vmlinux", "initramfs.cpio", "modules-dir"):
        if not (cache / name).is_file():
            raise VMError(f"VM cache {cache} is incomplete ({name} missing); re-run tests/vm/setup.sh")
    moddir = Path((cache / "modules-dir").read_text().strip())
    if not moddir.is_dir():
        raise VMError(f"VM cache {cache}: modules folder {moddir} missing; re-run tests/vm/setup.sh")
    return kver, moddir


def vm_available() -> Tuple[bool, str]:
    """Tell whether run_in_vm() can work here: (True, description) or (False, reason)."""
    if sys.platform != "linux":
        return False, "the test VM needs a Linux host"
    if os.environ.get("KPROXY_IN_VM"):
        return False, "already running inside the test VM (KPROXY_IN_VM is set)"
    qemu = _qemu_binary()
    if not qemu:
        return False, f"{QEMU} not found (run tests/vm/setup.sh as root)"
    cache = cache_dir()
    try:
        kver, _ = _read_cache(cache)
    except VMError as e:
        return False, str(e)
    return True, f"kernel {kver} from {cache}, {qemu} (TCG)"


# --------------------------------------------------------------------------
# guest script / qemu command line


def _command_line(command: Command) -> str:
    if isinstance(command, str):
        return "/bin/sh -c " + shlex.quote(command)
    argv = list(command)
    if not argv:
        raise ValueError("empty command")
    return shlex.join(str(a) for a in argv)


def guest_init_script(
    command: Command,
    workdir: Union[str, Path],
    kernel_version: str,
    modules_dir: Union[str, Path],
    env: Optional[Mapping[str, str]] = None,
    modules: Sequence[str] = GUEST_MODULES,
    work_mount_options: Optional[str] = None,
) -> str:
    """Stage-2 init (run by the host's /bin/sh as PID 1 after switch_root).

    Sets up the guest, runs *command* in *workdir* with its output on the virtio
    console (/dev/hvc0), writes its exit status to $GUEST_CTL/status and powers off.
    """
    q = shlex.quote
    workdir = str(workdir)
    full_env = dict(BASE_ENV)
    full_env.update(env or {})
    for key in full_env:
        if not key or not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
            raise ValueError(f"invalid environment variable name: {key!r}")
    exports = "\n".join(f"export {k}={q(str(v))}" for k, v in full_env.items())
    if work_mount_options is None:
        work_mount_options = "cache=" + (os.environ.get("KPROXY_VM_WORK_CACHE") or DEFAULT_WORK_CACHE)
    work_opts = f"trans=virtio,version=9p2000.L,msize={MSIZE}" + (
        f",{work_mount_options}" if work_mount_options else ""
    )
    mods = " ".join(q(m) for m in modules)
    return f"""#!/bin/sh
# Stage-2 init of the kproxy test VM, generated by tests/vm/run_in_vm.py.
# Internal paths are literals: the command's environment (exported below) must
# not be able to redirect them.
PATH={GUEST_PATH}
export PATH
note() {{ echo "$*" >>{GUEST_CTL}/setup.log; }}
finish() {{
    sync
    echo b >/proc/sysrq-trigger    # qemu runs with -no-reboot: reset ends it
    sleep 30
}}
exec </dev/null >>{GUEST_CTL}/setup.log 2>&1
note "stage2 start uptime=$(cut -d' ' -f1 /proc/uptime)"

# The unpacked kernel's modules as /lib/modules/VERSION.  A bind mount rather
# than a symlink, and before /tmp is replaced, so a cache under /tmp works too.
MODDIR={q(str(modules_dir))}
KMODS=/lib/modules/{q(kernel_version)}
if [ -d "$MODDIR" ]; then
    mkdir -p "$KMODS" && mount --bind "$MODDIR" "$KMODS" || note "FAIL: bind $MODDIR on $KMODS"
else
    note "FAIL: no modules folder $MODDIR in the guest"
fi
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp || note "FAIL: mount /tmp"

mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts || note "FAIL: mount /dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm || note "FAIL: mount /dev/shm"
ln -sfn /proc/self/fd /dev/fd 2>/dev/null
ln -sfn /proc/self/fd/0 /dev/stdin 2>/dev/null
ln -sfn /proc/self/fd/1 /dev/stdout 2>/dev/null
ln -sfn /proc/self/fd/2 /dev/stderr 2>/dev/null
hostname kproxy-vm 2>/dev/null

for m in {mods}; do
    if modprobe "$m"; then note "modprobe $m: ok"; else note "FAIL: modprobe $m"; fi
done
ip link set lo up || note "FAIL: ip link set lo up"

WORKDIR={q(workdir)}
mkdir -p "$WORKDIR"
if ! mount -t 9p -o {q(work_opts)} work "$WORKDIR"; then
    note "FAIL: mount the work share on $WORKDIR"
    echo setup-failed >{GUEST_CTL}/status
    finish
fi
cd "$WORKDIR" || {{ note "FAIL: cd $WORKDIR"; echo setup-failed >{GUEST_CTL}/status; finish; }}

{exports}

note "command start uptime=$(cut -d' ' -f1 /proc/uptime)"
: >{GUEST_CTL}/started
{_command_line(command)} </dev/null >/dev/hvc0 2>&1
_kpvm_rc=$?
note "command exit $_kpvm_rc uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /
sync
echo "$_kpvm_rc" >{GUEST_CTL}/status.tmp && mv {GUEST_CTL}/status.tmp {GUEST_CTL}/status
finish
"""


def qemu_command(
    ctl: Union[str, Path],
    workdir: Union[str, Path],
    cache: Optional[Path] = None,
    qemu: str = QEMU,
    memory_mib: int = MEMORY_MIB,
    vcpus: int = VCPUS,
    extra_append: str = "",
) -> list:
    cache = cache or cache_dir()
    ctl = str(ctl)
    append = " ".join(
        x
        for x in (
            "console=ttyS0",
            "quiet",
            "loglevel=4",
            "random.trust_cpu=on",
            "panic=-1",
            "oops=panic",
            "rdinit=/init",
            "tsc=reliable",
            "no_timer_check",
            extra_append,
        )
        if x
    )
    return [
        qemu,
        "-accel", "tcg,thread=multi",
        "-cpu", "max",
        "-machine", "q35",
        "-smp", str(vcpus),
        "-m", str(memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-monitor", "none",
        "-nic", "none",
        "-no-reboot",
        "-kernel", str(cache / "vmlinux"),
        "-initrd", str(cache / "initramfs.cpio"),
        "-append", append,
        "-serial", f"file:{ctl}/serial.log",
        "-fsdev", "local,id=hostroot,path=/,readonly=on,security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=work,path={workdir},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=work,mount_tag=work",
        "-fsdev", f"local,id=kpctl,path={ctl},security_model=none",
        "-device", "virtio-9p-pci,fsdev=kpctl,mount_tag=kpctl",
        "-device", "virtio-serial-pci",
        "-chardev", f"file,id=out,path={ctl}/console.out",
        "-device", "virtconsole,chardev=out",
    ]


# --------------------------------------------------------------------------
# running


class _Streamer:
    """Reads the growing console file, decodes it and forwards it to a stream."""

    def __init__(self, path: Path, stream: Optional[IO[str]]):
        self.path = path
        self.stream = stream
        self.pos = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.parts: list = []
        self.pending_cr = ""

    def poll(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self.pos += len(data)
        text = self.pending_cr + self.decoder.decode(data, final=final)
        self.pending_cr = ""
        if text.endswith("\r") and not final:
            text, self.pending_cr = text[:-1], "\r"
        text = text.replace("\r\n", "\n")  # the guest tty turns \n into \r\n
        if text:
            self.parts.append(text)
            if self.stream is not None:
                self.stream.write(text)
                self.stream.flush()

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _die_with_parent() -> None:
    """preexec_fn: qemu gets SIGKILL if the process that started it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: Path, lines: int = 40) -> str:
    try:
        content = path.read_text(errors="replace").replace("\r\n", "\n").splitlines()
    except FileNotFoundError:
        return f"({path.name}: missing)"
    return "\n".join(content[-lines:])


def run_in_vm_ex(
    command: Command,
    cwd: Union[str, Path, None] = None,
    timeout: float = 600,
    env: Optional[Mapping[str, str]] = None,
    stream: Optional[IO[str]] = None,
    keep_ctl: bool = False,
) -> VMResult:
    """Like run_in_vm() but returns a VMResult with timings and the guest setup log.

    *stream*: if given, the guest output is written to it while the guest runs.
    """
    qemu = _qemu_binary()
    if not qemu:
        raise VMError(f"{QEMU} not found (run tests/vm/setup.sh as root)")
    cache = cache_dir()
    kver, moddir = _read_cache(cache)
    workdir = Path(cwd if cwd is not None else REPO_ROOT).resolve()
    if not workdir.is_dir():
        raise VMError(f"working folder {workdir} does not exist")
    if "," in str(workdir):
        raise VMError(f"working folder {workdir}: qemu -fsdev paths cannot contain ','")

    ctl = Path(tempfile.mkdtemp(prefix="kproxy-vm-"))
    try:
        (ctl / "init.sh").write_text(guest_init_script(command, workdir, kver, moddir, env))
        (ctl / "init.sh").chmod(0o755)
        cmd = qemu_command(ctl, workdir, cache, qemu)
        log.debug("qemu: %s", shlex.join(cmd))
        streamer = _Streamer(ctl / "console.out", stream)
        start = time.monotonic()
        deadline = start + timeout
        boot_seconds = None
        with open(ctl / "qemu.log", "wb") as qlog:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=qlog,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        log.debug("qemu pid %d, control folder %s", proc.pid, ctl)
        timed_out = False
        try:
            while True:
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if boot_seconds is None and (ctl / "started").exists():
                    boot_seconds = time.monotonic() - start
                streamer.poll()
                if time.monotonic() > deadline:
                    timed_out = True
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        total = time.monotonic() - start
        streamer.poll(final=True)
        if boot_seconds is None and (ctl / "started").exists():
            boot_seconds = total
        setup_log = (ctl / "setup.log").read_text(errors="replace") if (ctl / "setup.log").exists() else ""
        for line in setup_log.splitlines():
            (log.warning if line.startswith("FAIL") else log.debug)("guest: %s", line)

        def diagnostics() -> str:
            return (
                f"--- guest setup log ---\n{setup_log.rstrip()}\n"
                f"--- kernel console (tail) ---\n{_tail(ctl / 'serial.log')}\n"
                f"--- qemu (exit {proc.returncode}) ---\n{_tail(ctl / 'qemu.log')}"
            )

        if timed_out:
            raise VMTimeout(f"VM command timed out after {timeout:g} s", streamer.text, diagnostics())
        status_file = ctl / "status"
        if not status_file.exists():
            raise VMError("the VM exited without reporting an exit status", streamer.text, diagnostics())
        status = status_file.read_text().strip()
        if status == "setup-failed":
            raise VMError("the guest setup failed before the command ran", streamer.text, diagnostics())
        try:
            rc = int(status)
        except ValueError:
            raise VMError(f"bad exit status {status!r}", streamer.text, diagnostics()) from None
        return VMResult(rc, streamer.text, boot_seconds, total, setup_log, kver)
    finally:
        if keep_ctl:
            log.info("control folder kept: %s", ctl)
        else:
            shutil.rmtree(ctl, ignore_errors=True)


def run_in_vm(
    command: Command,
    cwd: Union[str, Path, None] = None,
    timeout: float = 600,
    env: Optional[Mapping[str, str]] = None,
    stream: Optional[IO[str]] = None,
) -> Tuple[int, str]:
    """Run *command* in the VM and return (exit status, output).

    *command*: an argv list, or a string run by ``/bin/sh -c``.
    *cwd*: host folder shared read-write and mounted at the same path in the
    guest; the command runs there.  Default: the repository root.
    *env*: extra environment variables (the guest starts from a clean
    environment: PATH, HOME=/root, TERM=dumb, LANG=C.UTF-8, KPROXY_IN_VM=1).
    stdout and stderr are merged.  Raises VMTimeout or VMError if the VM fails.
    """
    r = run_in_vm_ex(command, cwd=cwd, timeout=timeout, env=env, stream=stream)
    return r.returncode, r.output


# --------------------------------------------------------------------------
# CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description="Run a command in a qemu VM with Debian's stock kernel (nftables flowtables).",
        usage="%(prog)s [--timeout S] [--cwd DIR] [-e K=V] [-v] -- CMD [ARGS...]",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds (default 600)")
    p.add_argument("--cwd", default=None, help="folder shared read-write (default: repository root)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="guest environment variable")
    p.add_argument("-v", "--verbose", action="store_true", help="print the guest setup log and timings")
    p.add_argument("--keep", action="store_true", help="keep the control folder (logs) for debugging")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        p.error("no command given (use: -- CMD ARGS...)")
    env = {}
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep:
            p.error(f"-e expects K=V, got {item!r}")
        env[k] = v
    # SIGTERM/SIGHUP: unwind normally, so qemu is killed and the control folder removed.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="[vm] %(message)s")
    ok, reason = vm_available()
    if not ok:
        print(f"run_in_vm: VM not available: {reason}", file=sys.stderr)
        return 125
    cmd: Command = command[0] if len(command) == 1 else command
    try:
        r = run_in_vm_ex(cmd, cwd=args.cwd, timeout=args.timeout, env=env, stream=sys.stdout, keep_ctl=args.keep)
    except KeyboardInterrupt:
        print("run_in_vm: interrupted", file=sys.stderr)
        return 130
    except VMTimeout as e:
        print(f"run_in_vm: {e}", file=sys.stderr)
        return 124
    except VMError as e:
        print(f"run_in_vm: {e}", file=sys.stderr)
        return 125
    if args.verbose:
        boot = f"{r.boot_seconds:.1f} s" if r.boot_seconds is not None else "?"
        print(
            f"[vm] kernel {r.kernel_version}: boot-to-command {boot}, "
            f"total {r.total_seconds:.1f} s, exit {r.returncode}",
            file=sys.stderr,
        )
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
