"""Programs and maintains the fastpath table, in transactions of its own.

Nothing here runs inside the main sync's transaction, and nothing here can make a main
sync fail: every nft error is caught, logged, counted, and retried later. All methods
run on the sync thread (from hooks).
"""

from __future__ import annotations

import logging
from collections import Counter

from kproxy.nft import NftError, Table, Transaction

from . import ruleset as R
from .devices import eligible_devices
from .metrics import metrics_for

log = logging.getLogger("kproxy.fastpath")


class Fastpath:
    """The fastpath of one ``App``."""

    def __init__(self, app, threshold: int, mode: str, list_links):
        self.app = app
        self.threshold = threshold
        self.mode = mode
        self.list_links = list_links  # () -> links, a fresh netlink listing
        self.metrics = metrics_for(app.metrics)
        self.enabled = threshold > 0
        self.supported = False  # the kernel probe succeeded
        self.programmed = False  # our table is in the kernel as we built it
        self.devices: tuple[str, ...] = ()  # the flowtable's devices, as last programmed
        self.devices_dirty = True  # reconcile devices after the next sync
        self.last_links: tuple = ()  # the last announced links (fallback if listing fails)
        self.per_service: dict[tuple, frozenset] = {}  # Service key -> its (version, element)s
        self.refs: Counter = Counter()  # (version, element) -> number of Services wanting it
        self.in_kernel: set = set()  # elements our sets hold
        self.dirty_keys: set = set()  # elements whose wanted/in-kernel status may differ
        self.have_state = False

    @property
    def active(self) -> bool:
        return self.enabled and self.supported

    # -- start ---------------------------------------------------------------------------
    def start(self) -> None:
        """Probe the kernel, or (threshold 0) remove a fastpath table left from earlier."""
        self.metrics.active.set(0)
        self.metrics.devices.set(0)
        if not self.enabled:
            log.info("fastpath: packet threshold 0: offload disabled, no flowtable")
            self._remove_leftover()
            return
        self.supported = self._probe()

    def _remove_leftover(self) -> None:
        try:
            if (R.FAMILY, R.TABLE_NAME) in set(self.app.backend.list_tables()):
                self.app.backend.apply(Transaction().delete(Table(R.FAMILY, R.TABLE_NAME)))
                log.info("fastpath: removed the table %s %s left from an earlier run", R.FAMILY, R.TABLE_NAME)
        except NftError as e:
            log.warning("fastpath: could not remove the old table %s %s: %s", R.FAMILY, R.TABLE_NAME, e)

    def _probe(self) -> bool:
        try:
            self.app.backend.apply(R.probe_transaction())
            return True
        except NftError as e:
            feature = R.PROBE_FEATURES.get(e.line, R.PROBE_FEATURES[2])
            log.warning("fastpath disabled: this kernel has no %s (nft: %s). Services are proxied normally, "
                        "without offload.", feature, e.message)
            return False

    # -- hooks ---------------------------------------------------------------------------
    def interfaces_changed(self, links) -> None:
        self.last_links = tuple(links)
        self.devices_dirty = True

    def after_sync(self, ctx, result) -> None:
        """Bring the table in step with a finished main sync."""
        if not self.active:
            return
        if result.ok:
            self._update_keys(ctx)
        if not self.have_state:
            return  # no successful sync yet: nothing to offload
        try:
            if not self.programmed:
                self._build()
            else:
                if self.devices_dirty or ctx.full:
                    self._reconcile_devices()
                if self.programmed:
                    self._apply_elements()
        finally:
            self.metrics.active.set(1 if self.programmed else 0)

    # -- elements --------------------------------------------------------------------------
    def _update_keys(self, ctx) -> None:
        services = ctx.state.services
        if ctx.full or ctx.changed is None or not self.have_state:
            touched = set(self.per_service) | set(services)
        else:
            touched = set(ctx.changed)
        for key in touched:
            svc = services.get(key)
            new = R.service_keys(svc, self.mode) if svc is not None else frozenset()
            old = self.per_service.get(key, frozenset())
            if new == old:
                continue
            for e in old - new:
                self.refs[e] -= 1
                if self.refs[e] <= 0:
                    del self.refs[e]
            for e in new - old:
                self.refs[e] += 1
            self.dirty_keys |= old ^ new
            if new:
                self.per_service[key] = new
            else:
                self.per_service.pop(key, None)
        self.have_state = True

    def _apply_elements(self) -> None:
        add = {e for e in self.dirty_keys if e in self.refs and e not in self.in_kernel}
        remove = {e for e in self.dirty_keys if e not in self.refs and e in self.in_kernel}
        if add or remove:
            try:
                self.app.backend.apply(R.elements_delta(add, remove))
            except NftError as e:
                log.warning("fastpath: updating the offload sets failed (%s); re-creating the fastpath table", e)
                self.programmed = False
                self._build()
                return
            self.in_kernel |= add
            self.in_kernel -= remove
        self.dirty_keys.clear()

    # -- devices ---------------------------------------------------------------------------
    def _wanted_devices(self) -> tuple[str, ...]:
        """The eligible devices among the announced links (whichever plugin announces
        them), pruned against a fresh link listing right before programming: whatever
        vanished since the announcement is left out. Without any announcement yet, the
        eligible devices of the fresh listing."""
        try:
            links = self.list_links()
        except Exception as e:  # netlink trouble: use what was announced
            log.warning("fastpath: cannot list network interfaces (%s); using the last announced ones", e)
            links = self.last_links
        if not self.last_links:
            return eligible_devices(links)
        live = {link.name for link in links}
        return tuple(d for d in eligible_devices(self.last_links) if d in live)

    def _kernel_devices(self) -> set | None:
        """The flowtable's devices as the kernel has them (the kernel drops deleted links
        by itself), or None when our table is gone."""
        lister = getattr(self.app.backend, "list_objects", None)
        if lister is None:
            return set(self.devices)
        try:
            ft = lister(R.FAMILY, R.TABLE_NAME).flowtables.get(R.FLOWTABLE)
        except NftError:
            return None
        return None if ft is None else set(ft.devices)

    def _set_devices(self, devices) -> None:
        self.devices = tuple(sorted(devices))
        self.metrics.devices.set(len(self.devices))
        self.devices_dirty = False

    def _build(self) -> None:
        """(Re-)create the whole table; a device problem is retried once with a fresh
        listing, then the table is created without devices (they follow later)."""
        keys = set(self.refs)
        error = None
        for attempt in (1, 2):
            devices = self._wanted_devices()
            try:
                self.app.backend.apply(R.build(self.threshold, devices, keys))
            except NftError as e:
                error = e
                log.info("fastpath: creating the table failed (%s)%s", e, "; re-listing links and retrying" if attempt == 1 else "")
                continue
            self._built(keys, devices)
            if devices:
                self.metrics.updates.inc()
            log.info("fastpath: offloading connections to %d Service ports after %d packets; flowtable devices: %s",
                     len(keys), self.threshold, ", ".join(devices) or "(none)")
            return
        try:
            self.app.backend.apply(R.build(self.threshold, (), keys))
        except NftError as e:
            self.programmed = False
            log.error("fastpath: cannot create the table %s %s (%s); retrying after the next sync", R.FAMILY, R.TABLE_NAME, e)
            return
        self._built(keys, ())
        self.devices_dirty = True
        self.metrics.failures.inc()
        log.warning("fastpath: the flowtable was created without devices because nft rejected them (%s); "
                    "retrying at the next interface change or sync", error)

    def _built(self, keys, devices) -> None:
        self.programmed = True
        self.in_kernel = set(keys)
        self.dirty_keys.clear()
        self._set_devices(devices)

    def _reconcile_devices(self) -> None:
        """Diff the wanted devices against the flowtable's and apply the difference: new
        ones are added; removing any means re-creating the flowtable. A rejected update
        (a device vanished in between) is retried once after a fresh listing."""
        error = None
        for attempt in (1, 2):
            current = self._kernel_devices()
            if current is None:
                log.warning("fastpath: the table %s %s is gone; re-creating it", R.FAMILY, R.TABLE_NAME)
                self.programmed = False
                self._build()
                return
            wanted = set(self._wanted_devices())
            add, remove = wanted - current, current - wanted
            if not add and not remove:
                self._set_devices(wanted)
                return
            txn = R.rebuild_flowtable(self.threshold, wanted) if remove else R.add_devices(add)
            try:
                self.app.backend.apply(txn)
            except NftError as e:
                error = e
                log.info("fastpath: flowtable device update rejected (%s)%s", e,
                         "; re-listing links and retrying" if attempt == 1 else "")
                continue
            self._set_devices(wanted)
            self.metrics.updates.inc()
            log.info("fastpath: flowtable devices now %s (added: %s; removed: %s)", ", ".join(sorted(wanted)) or "(none)",
                     ", ".join(sorted(add)) or "-", ", ".join(sorted(remove)) or "-")
            return
        self.devices_dirty = True
        self.metrics.failures.inc()
        log.warning("fastpath: could not update the flowtable's devices (%s); it keeps the devices it has, "
                    "retrying at the next interface change or sync", error)
