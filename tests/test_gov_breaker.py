"""Circuit breakers: limits, OVERLOADED with the limit named, release pairing, live limit changes."""

from __future__ import annotations

import pytest

from octoproxy.protocol._protocol import Status
from octoproxy.governance import CONTINUE, BreakerError, BreakerLimits, CircuitBreaker, Kind, Resource


def test_envoy_defaults() -> None:
    assert BreakerLimits() == BreakerLimits(1024, 1024, 1024, 3)


@pytest.mark.parametrize(
    ("resource", "name", "limit"),
    [(Resource.CONNECTIONS, "max_connections", 2), (Resource.PENDING, "max_pending", 3),
     (Resource.REQUESTS, "max_requests", 4), (Resource.RETRIES, "max_retries", 1)],
)
def test_each_limit_overflows_with_its_name(resource: Resource, name: str, limit: int) -> None:
    b = CircuitBreaker("pay", BreakerLimits(2, 3, 4, 1))
    for _ in range(limit):
        assert b.acquire(resource) is CONTINUE
    assert b.is_open(resource)
    v = b.acquire(resource)
    assert v.kind is Kind.ANSWER and v.status is Status.OVERLOADED
    assert name in v.reason and "'pay'" in v.reason and f"({limit})" in v.reason
    assert b.acquire(resource) is v  # prebuilt: no allocation per refusal
    assert b.in_use(resource) == limit and b.overflows(resource) == 2
    b.release(resource)
    assert b.acquire(resource) is CONTINUE
    # other resources are independent
    for other in Resource:
        if other is not resource:
            assert b.in_use(other) == 0


def test_request_fast_path_matches_generic() -> None:
    b = CircuitBreaker("c", BreakerLimits(max_requests=2))
    assert b.acquire_request() is CONTINUE and b.acquire(Resource.REQUESTS) is CONTINUE
    assert b.acquire_request().status is Status.OVERLOADED
    b.release_request()
    assert b.in_use(Resource.REQUESTS) == 1


@pytest.mark.parametrize("resource", list(Resource))
def test_release_without_acquire_is_a_bug(resource: Resource) -> None:
    b = CircuitBreaker("c", BreakerLimits())
    with pytest.raises(BreakerError):
        b.release(resource)
    with pytest.raises(BreakerError):
        b.release_request()


def test_lower_limit_applies_to_new_acquires_only() -> None:
    b = CircuitBreaker("c", BreakerLimits(max_requests=10))
    for _ in range(5):
        b.acquire_request()
    b.set_limits(BreakerLimits(max_requests=3))
    assert b.acquire_request().status is Status.OVERLOADED
    assert "(3)" in b.acquire_request().reason
    for _ in range(3):
        b.release_request()
    assert b.acquire_request() is CONTINUE  # 2 held < 3
    assert b.acquire_request().status is Status.OVERLOADED  # 3 held: full
    b.release_request()
    assert b.acquire_request() is CONTINUE


def test_zero_limit_refuses_everything() -> None:
    b = CircuitBreaker("c", BreakerLimits(max_retries=0))
    assert b.acquire(Resource.RETRIES).status is Status.OVERLOADED


def test_hold_pending_holds_until_max_pending() -> None:
    from octoproxy.governance import Kind

    b = CircuitBreaker("pay", BreakerLimits(max_pending=2))
    h1, h2, over = b.hold_pending(), b.hold_pending(), b.hold_pending()
    assert h1.kind is Kind.HOLD and h1 is h2 and "'pay'" in h1.reason
    assert over.kind is Kind.ANSWER and over.status is Status.OVERLOADED and "max_pending" in over.reason
    assert b.in_use(Resource.PENDING) == 2
    b.release(Resource.PENDING)
    assert b.hold_pending().kind is Kind.HOLD
