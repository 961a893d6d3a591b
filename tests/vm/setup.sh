#!/bin/bash
# Prepare everything tests/vm/run_in_vm.py needs to boot Debian's stock kernel
# (which has nftables flowtables) under qemu TCG.  Idempotent: re-running it
# skips every step that is already done.  Run as root (apt-get).
#
#   KPROXY_VM_CACHE   cache folder (default /var/cache/kproxy-vm)
#   KPROXY_VM_NO_APT  if non-empty, do not apt-get install anything
#
# Cache layout (everything the guest needs, read by run_in_vm.py):
#   $CACHE/kernel/            the kernel package unpacked with dpkg -x
#   $CACHE/vmlinux            decompressed ELF kernel (booted via its PVH entry)
#   $CACHE/initramfs.cpio     busybox-static + 9p/virtio/overlay modules + /init
#   $CACHE/kernel-version     e.g. 6.1.0-56-amd64
#   $CACHE/modules-dir        the modules folder to link to /lib/modules/VERSION
#   $CACHE/ready              written last; run_in_vm.vm_available() checks it
set -euo pipefail

CACHE=${KPROXY_VM_CACHE:-/var/cache/kproxy-vm}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export DEBIAN_FRONTEND=noninteractive

log() { printf '[vm-setup] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Modules the initramfs needs before the 9p root is mounted; dependencies are
# resolved (in load order) by kmod's modprobe against the unpacked tree.
INITRD_MODS=(virtio_pci virtio_console 9pnet_virtio 9p overlay)
# The initramfs is rebuilt whenever its /init, its module list or this
# script's revision of the layout changes.
INITRAMFS_LAYOUT=1
INITRAMFS_REV=$( { echo "$INITRAMFS_LAYOUT ${INITRD_MODS[*]}"; cat "$HERE/initramfs-init.sh"; } |
                 sha256sum | cut -c1-16)

# --- 1. host packages -------------------------------------------------------
PKGS=(qemu-system-x86 busybox-static kmod xz-utils cpio
      nftables conntrack iproute2 iperf3)
apt_updated=
apt_update() {
    if [ -z "$apt_updated" ]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    [ -z "${KPROXY_VM_NO_APT:-}" ] || die "missing packages: ${missing[*]}"
    apt_update
    log "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "packages already installed"
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found"
[ -x /bin/busybox ] || die "/bin/busybox (busybox-static) not found"

mkdir -p "$CACHE"

if [ -f "$CACHE/ready" ] && [ "$(sed -n 2p "$CACHE/ready")" = "initramfs-rev=$INITRAMFS_REV" ]; then
    log "cache $CACHE is ready ($(head -n1 "$CACHE/ready"))"
    exit 0
fi
rm -f "$CACHE/ready"

# --- 2. kernel package: download + dpkg -x (never dpkg -i) -------------------
if [ -f "$CACHE/kernel-version" ] && [ -d "$CACHE/kernel" ] && [ -f "$CACHE/kernel/.unpacked" ]; then
    KVER=$(cat "$CACHE/kernel-version")
    log "kernel $KVER already unpacked"
else
    resolve_kpkg() {
        apt-cache depends linux-image-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1
    }
    KPKG=$(resolve_kpkg || true)
    if [ -z "$KPKG" ]; then apt_update; KPKG=$(resolve_kpkg || true); fi
    [ -n "$KPKG" ] || die "cannot resolve the versioned package behind linux-image-amd64"
    KVER=${KPKG#linux-image-}
    log "kernel package $KPKG"
    mkdir -p "$CACHE/debs"
    deb=$(ls "$CACHE/debs/${KPKG}_"*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        log "apt-get download $KPKG"
        ( cd "$CACHE/debs" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG" ) ||
            { apt_update; ( cd "$CACHE/debs" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG" ); }
        deb=$(ls "$CACHE/debs/${KPKG}_"*.deb | head -n1)
    fi
    log "dpkg -x $(basename "$deb")"
    rm -rf "$CACHE/kernel.tmp"
    dpkg -x "$deb" "$CACHE/kernel.tmp"
    touch "$CACHE/kernel.tmp/.unpacked"
    rm -rf "$CACHE/kernel"
    mv "$CACHE/kernel.tmp" "$CACHE/kernel"
    echo "$KVER" >"$CACHE/kernel-version"
    rm -f "$CACHE/vmlinux" "$CACHE/initramfs.cpio"
fi

KROOT=$CACHE/kernel
if [ -d "$KROOT/lib/modules/$KVER" ]; then
    MODDIR=$KROOT/lib/modules/$KVER
elif [ -d "$KROOT/usr/lib/modules/$KVER" ]; then
    MODDIR=$KROOT/usr/lib/modules/$KVER
    # depmod -b / modprobe -d expect BASE/lib/modules
    [ -e "$KROOT/lib" ] || ln -s usr/lib "$KROOT/lib"
else
    die "no modules folder for $KVER in $KROOT"
fi
echo "$MODDIR" >"$CACHE/modules-dir"

# --- 3. depmod ----------------------------------------------------------------
if [ -s "$MODDIR/modules.dep" ] && [ -f "$MODDIR/.depmod-done" ]; then
    log "depmod already done"
else
    log "depmod -b $KROOT $KVER"
    depmod -b "$KROOT" "$KVER"
    touch "$MODDIR/.depmod-done"
fi

# --- 4. vmlinux (decompressed ELF, booted through its PVH entry point) --------
if [ -s "$CACHE/vmlinux" ] && [ "$(head -c4 "$CACHE/vmlinux" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
    log "vmlinux already extracted"
else
    vmlinuz=$KROOT/boot/vmlinuz-$KVER
    [ -f "$vmlinuz" ] || die "$vmlinuz not found"
    log "extracting vmlinux from $(basename "$vmlinuz")"
    ok=
    # Try every xz magic (FD 37 7A 58 5A 00) until one decompresses to an ELF.
    for off in $(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$vmlinuz" | cut -d: -f1); do
        tail -c +$((off + 1)) "$vmlinuz" | xz -dc --single-stream >"$CACHE/vmlinux.tmp" 2>/dev/null || true
        if [ -s "$CACHE/vmlinux.tmp" ] &&
           [ "$(head -c4 "$CACHE/vmlinux.tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
            ok=1; break
        fi
    done
    [ -n "$ok" ] || die "could not find an xz-compressed ELF in $vmlinuz"
    mv "$CACHE/vmlinux.tmp" "$CACHE/vmlinux"
fi

# --- 5. initramfs -------------------------------------------------------------
if [ -s "$CACHE/initramfs.cpio" ] && [ -f "$CACHE/initramfs.rev" ] &&
   [ "$(cat "$CACHE/initramfs.rev")" = "$INITRAMFS_REV" ]; then
    log "initramfs already built"
else
    log "building initramfs"
    work=$(mktemp -d "$CACHE/initramfs.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    ir=$work/root
    mkdir -p "$ir"/{bin,dev,proc,sys,newroot,modules}
    cp /bin/busybox "$ir/bin/busybox"
    for applet in sh mount umount mkdir insmod switch_root cat echo sleep ls mknod grep sed; do
        ln -s busybox "$ir/bin/$applet"
    done
    : >"$ir/modules/order"
    for m in "${INITRD_MODS[@]}"; do
        modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" >"$work/deps" ||
            die "modprobe --show-depends $m failed"
        while read -r kind path _; do
            [ "$kind" = insmod ] || continue      # "builtin NAME" needs nothing
            name=$(basename "$path")
            name=${name%.xz}; name=${name%.zst}; name=${name%.gz}
            grep -qxF "$name" "$ir/modules/order" && continue
            case "$path" in
                *.xz)  xz -dc "$path" >"$ir/modules/$name" ;;
                *.zst) zstd -qdc "$path" >"$ir/modules/$name" ;;
                *.gz)  gzip -dc "$path" >"$ir/modules/$name" ;;
                *)     cp "$path" "$ir/modules/$name" ;;
            esac
            echo "$name" >>"$ir/modules/order"
        done <"$work/deps"
    done
    log "initramfs modules: $(tr '\n' ' ' <"$ir/modules/order")"
    install -m 0755 "$HERE/initramfs-init.sh" "$ir/init"
    ( cd "$ir" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --quiet ) >"$work/initramfs.cpio"
    mv "$work/initramfs.cpio" "$CACHE/initramfs.cpio"
    echo "$INITRAMFS_REV" >"$CACHE/initramfs.rev"
    rm -rf "$work"
    trap - EXIT
fi

printf '%s\ninitramfs-rev=%s\n' "$KVER" "$INITRAMFS_REV" >"$CACHE/ready"
log "ready: kernel $KVER in $CACHE"
