"""When to sync: kube-proxy's bounded-frequency runner, as a pure decision.

- Requests between syncs are coalesced; two syncs start at least ``min_interval``
  (minSyncPeriod) after the end of the previous one.
- After a failed sync the next one (a full one) runs no later than ``retry_interval``
  (syncPeriod) after it.
- Without any request a full sync runs every ``full_interval`` (one hour).

``Schedule.decide(now)`` says what to do; the caller sleeps or syncs and reports back
with ``done()``. Keeping the clock outside makes the timing testable with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL_SYNC_INTERVAL = 3600.0


@dataclass
class Decision:
    run: bool
    full: bool = False
    wait: float = 0.0  # seconds to wait before deciding again (when not run)


class Schedule:
    def __init__(self, min_interval: float, retry_interval: float, full_interval: float = FULL_SYNC_INTERVAL):
        self.min_interval = min_interval
        self.retry_interval = retry_interval
        self.full_interval = full_interval
        self.pending = False
        self.pending_full = True  # the first sync is a full one
        self.failed = False
        self.last_end: float | None = None
        self.last_full_end: float | None = None

    def request(self, full: bool = False) -> None:
        self.pending = True
        self.pending_full = self.pending_full or full

    def decide(self, now: float) -> Decision:
        if self.last_end is None:
            return Decision(True, True) if self.pending else Decision(False, wait=self.retry_interval)
        due = []
        if self.pending:
            due.append(self.last_end + self.min_interval)
        if self.failed:
            due.append(self.last_end + self.retry_interval)
        full_due_at = (self.last_full_end if self.last_full_end is not None else self.last_end) + self.full_interval
        due.append(max(full_due_at, self.last_end + self.min_interval))
        at = min(due)
        if now < at:
            return Decision(False, wait=at - now)
        full = self.pending_full or self.failed or now >= full_due_at
        return Decision(True, full)

    def started(self) -> None:
        """A sync begins: the requests so far are taken by it."""
        self.pending = False
        self.pending_full = False

    def done(self, now: float, ok: bool, full: bool) -> None:
        self.last_end = now
        self.failed = not ok
        if ok and full:
            self.last_full_end = now
