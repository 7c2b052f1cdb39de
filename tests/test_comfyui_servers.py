"""Server health bookkeeping: benching with capped exponential backoff, order, the status."""

from __future__ import annotations

import pytest

from dreamd.backends.comfyui.servers import ServerPool
from dreamd.errors import TransientBackendError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(*urls: str, clock: Clock) -> ServerPool:
    return ServerPool(urls, bench_base=2.0, bench_cap=10.0, clock=clock, wall=lambda: clock.now + 1e9)


def test_a_failing_server_is_benched_longer_each_time_up_to_the_cap():
    clock = Clock()
    p = pool("http://a", "http://b", clock=clock)
    assert [p.mark_failed("http://a", "refused") for _ in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert p.candidates() == ["http://b"]
    clock.now += 10.0
    assert p.candidates() == ["http://a", "http://b"]  # bench over: one more chance, in order
    p.mark_ok("http://a")
    assert p.mark_failed("http://a", "refused") == 2.0  # success resets the backoff


def test_every_server_down_names_each_with_its_error():
    clock = Clock()
    p = pool("http://a/", "http://b", clock=clock)
    p.mark_failed("http://a", "connection refused")
    p.mark_failed("http://b", "HTTP 500")
    with pytest.raises(TransientBackendError, match=r"every ComfyUI server is down: http://a \(connection "
                                                    r"refused, benched 2s more\); http://b \(HTTP 500"):
        p.candidates()


def test_health_for_the_status():
    clock = Clock()
    p = pool("http://a", "http://b", clock=clock)
    p.mark_ok("http://b")
    p.mark_failed("http://a", "reset")
    a, b = p.health()
    assert (a.url, a.healthy, a.last_error, a.failures, a.last_ok) == ("http://a", False, "reset", 1, None)
    assert a.benched_until == pytest.approx(clock.now + 1e9 + 2.0)
    assert (b.healthy, b.benched_until, b.last_ok) == (True, None, clock.now + 1e9)


def test_urls_must_be_given_once():
    with pytest.raises(ValueError):
        ServerPool([])
    with pytest.raises(ValueError, match="duplicate"):
        ServerPool(["http://a", "http://a/"])
