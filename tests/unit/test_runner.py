"""The bounded-frequency schedule (kube-proxy's runner semantics) with a fake clock."""

from kproxy.runner import Schedule


def run_until_idle(s: Schedule, now: float, ok=True):
    """Decide at ``now``; if it says run, record a sync that ends instantly."""
    d = s.decide(now)
    if d.run:
        s.started()
        s.done(now, ok, d.full)
    return d


def test_first_sync_is_full_and_waits_for_a_request():
    s = Schedule(min_interval=1, retry_interval=30)
    assert not s.decide(0).run
    s.request()
    d = s.decide(0)
    assert d.run and d.full


def test_requests_are_coalesced_and_spaced_by_min_interval():
    s = Schedule(min_interval=1, retry_interval=30)
    s.request()
    run_until_idle(s, 0.0)
    for t in (0.1, 0.2, 0.3):
        s.request()
        d = s.decide(t)
        assert not d.run and abs(d.wait - (1.0 - t)) < 1e-9  # min gap from the END of the last sync
    d = run_until_idle(s, 1.0)
    assert d.run and not d.full  # three requests, one partial sync
    assert not s.decide(1.5).run  # nothing pending any more


def test_min_interval_counts_from_the_end_of_the_previous_sync():
    s = Schedule(min_interval=1, retry_interval=30)
    s.request()
    s.decide(0)
    s.started()
    s.done(5.0, True, True)  # a sync that took 5 s
    s.request()
    assert s.decide(5.5).wait == 0.5
    assert s.decide(6.0).run


def test_failure_retries_after_sync_period_as_a_full_sync():
    s = Schedule(min_interval=1, retry_interval=30)
    s.request()
    run_until_idle(s, 0.0, ok=False)
    d = s.decide(10)
    assert not d.run and d.wait == 20
    d = s.decide(30)
    assert d.run and d.full


def test_a_request_after_a_failure_runs_early_and_full():
    s = Schedule(min_interval=1, retry_interval=30)
    s.request()
    run_until_idle(s, 0.0, ok=False)
    s.request()
    d = s.decide(1.0)
    assert d.run and d.full


def test_periodic_full_sync_without_requests():
    s = Schedule(min_interval=1, retry_interval=30, full_interval=3600)
    s.request()
    run_until_idle(s, 0.0)
    s.request()
    run_until_idle(s, 100.0)  # a partial sync in between
    d = s.decide(1000)
    assert not d.run and d.wait == 2600
    d = s.decide(3600)
    assert d.run and d.full


def test_full_request_is_kept_until_it_runs():
    s = Schedule(min_interval=1, retry_interval=30)
    s.request()
    run_until_idle(s, 0.0)
    s.request(full=True)
    s.request()
    d = s.decide(2.0)
    assert d.run and d.full
