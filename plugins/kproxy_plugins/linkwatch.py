"""Following the node's links through netlink (RTMGRP_LINK), debounced.

``LinkWatcher`` runs one dedicated thread that creates, uses and closes its own netlink
socket subscribed to RTMGRP_LINK. Link events only mark the link list dirty (their
content is not needed, so the socket is a plain one, drained completely each time:
pyroute2 0.9's ``IPRoute.get()`` behind ``select`` returns one message per call and
leaves the rest of a burst in an internal queue that only grows — measured: 200 veth
pairs, 200 ``get()`` calls, 200 messages left queued); the list itself always comes from a
full listing, at most once per ``min_interval`` (a burst of events costs one listing),
and at least once per ``resync_interval`` (so a lost event, e.g. after ENOBUFS when the
socket overflowed, is repaired within that time). When a listing differs from the last
one reported, ``on_change(links)`` is called with the complete current set (from the
watcher's thread).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time

log = logging.getLogger("kproxy.interfaces")

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RCVBUF = 1 << 20
POLL = 0.5  # seconds: how quickly stop() is noticed


class Debouncer:
    """When to list: after an event, but at most once per ``min_interval``; and at
    least once per ``resync_interval``. Pure logic, driven by the caller's clock."""

    def __init__(self, min_interval: float, resync_interval: float):
        self.min_interval = min_interval
        self.resync_interval = resync_interval
        self.dirty = True  # the first listing is due at once
        self.last_list = float("-inf")

    def event(self) -> None:
        self.dirty = True

    def due(self, now: float) -> bool:
        if self.dirty and now - self.last_list >= self.min_interval:
            return True
        return now - self.last_list >= self.resync_interval

    def listed(self, now: float) -> None:
        self.dirty = False
        self.last_list = now

    def wait_time(self, now: float) -> float:
        """Seconds until a listing may become due (without new events)."""
        until = self.last_list + self.resync_interval
        if self.dirty:
            until = min(until, self.last_list + self.min_interval)
        return max(0.0, until - now)


class LinkWatcher:
    def __init__(self, list_links, on_change, min_interval: float = 5.0, resync_interval: float = 60.0,
                 clock=time.monotonic):
        self.list_links = list_links
        self.on_change = on_change
        self.debouncer = Debouncer(min_interval, resync_interval)
        self.clock = clock
        self.last = None  # the last set reported (or given to start)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, current=None) -> "LinkWatcher":
        self.last = current
        self._thread = threading.Thread(target=self._run, name="kproxy-linkwatch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():  # (re)subscribe after any failure
            try:
                self._watch()
            except Exception as e:  # ENOBUFS (events lost), socket trouble, listing trouble
                log.info("link monitoring interrupted (%s: %s); re-subscribing and re-listing", type(e).__name__, e)
                self.debouncer.event()
                self._stop.wait(1.0)

    def _watch(self) -> None:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, RTMGRP_LINK))
            sock.setblocking(False)
            self.debouncer.event()  # events before the subscription were missed: re-list
            while not self._stop.is_set():
                now = self.clock()
                if self.debouncer.due(now):
                    self._relist(now)
                    continue
                timeout = min(POLL, self.debouncer.wait_time(now))
                readable, _, _ = select.select([sock], [], [], timeout)
                if readable and self._drain(sock):
                    self.debouncer.event()

    @staticmethod
    def _drain(sock) -> bool:
        """Read every queued event; True if there was any (or some were lost)."""
        got = False
        while True:
            try:
                if not sock.recv(65536):
                    return got
                got = True
            except BlockingIOError:
                return got
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                log.debug("link events were lost (ENOBUFS); re-listing")
                got = True

    def _relist(self, now: float) -> None:
        links = tuple(self.list_links())
        self.debouncer.listed(now)
        if links != self.last:
            self.last = links
            self.on_change(links)
