"""Load-balancing policies: deterministic, seeded tests of octoproxy.core._balancer."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from octoproxy.core._balancer import (
    BALANCERS,
    Balancer,
    Endpoint,
    LeastRequest,
    RoundRobin,
    WeightedRandom,
    make_balancer,
)


def eps(**weights: int) -> list[Endpoint]:
    return [Endpoint(f"{name}:1", weight=w) for name, w in weights.items()]


def names(balancer: Balancer, endpoints: list[Endpoint], n: int) -> str:
    out = []
    for _ in range(n):
        ep = balancer.pick(endpoints)
        assert ep is not None
        out.append(ep.address.split(":")[0])
    return " ".join(out)


def all_policies(seed: int = 0) -> list[Balancer]:
    return [make_balancer(name, rng=random.Random(seed)) for name in BALANCERS]


# ---------------------------------------------------------------- endpoint


def test_endpoint_defaults_and_identity() -> None:
    a, b = Endpoint("h:1"), Endpoint("h:1")
    assert (a.weight, a.region, a.idc, a.tags, a.healthy, a.active) == (100, "", "", {}, True, 0)
    assert a != b  # eq=False: compared by identity
    assert a.tags is not b.tags
    with pytest.raises(AttributeError):
        a.extra = 1  # type: ignore[attr-defined]  # slots


# ---------------------------------------------------------------- common rules


@pytest.mark.parametrize("index", range(len(BALANCERS)))
def test_empty_gives_none(index: int) -> None:
    assert all_policies()[index].pick([]) is None


@pytest.mark.parametrize("index", range(len(BALANCERS)))
def test_nothing_eligible_gives_none(index: int) -> None:
    endpoints = eps(a=0, b=100, c=0)
    endpoints[1].healthy = False
    assert all_policies()[index].pick(endpoints) is None


@pytest.mark.parametrize("index", range(len(BALANCERS)))
def test_unhealthy_and_zero_weight_skipped(index: int) -> None:
    policy = all_policies(seed=7)[index]
    a, b, c, d = eps(a=100, b=0, c=100, d=100)
    c.healthy = False
    picked = {policy.pick([a, b, c, d]) for _ in range(200)}
    assert picked == {a, d}


@pytest.mark.parametrize("index", range(len(BALANCERS)))
def test_single_endpoint(index: int) -> None:
    (a,) = eps(a=3)
    policy = all_policies()[index]
    assert all(policy.pick([a]) is a for _ in range(10))


# ---------------------------------------------------------------- round robin


def test_round_robin_equal_weights_rotate() -> None:
    assert names(RoundRobin(), eps(a=100, b=100, c=100), 7) == "a b c a b c a"


def test_round_robin_smooth_weighted_sequence() -> None:
    # The nginx smooth WRR sequence: interleaved, not "a a a a a b c".
    endpoints = eps(a=5, b=1, c=1)
    rr = RoundRobin()
    assert names(rr, endpoints, 7) == "a a b a c a a"
    assert names(rr, endpoints, 7) == "a a b a c a a"  # and it repeats exactly


def test_round_robin_weights_respected_over_window() -> None:
    endpoints = eps(a=3, b=2, c=7, d=1)
    rr = RoundRobin()
    counts = Counter(names(rr, endpoints, 13 * 10).split())
    assert counts == {"a": 30, "b": 20, "c": 70, "d": 10}


def test_round_robin_list_changes_between_picks() -> None:
    a, b, c = eps(a=1, b=1, c=1)
    rr = RoundRobin()
    assert rr.pick([a, b, c]) is a
    # A rebuilt list (new objects, same addresses, new order) keeps the rotation:
    # a has had its turn, so b and c come next (in list order on a tie).
    a2, b2, c2 = eps(a=1, b=1, c=1)
    assert [rr.pick([c2, a2, b2]) for _ in range(2)] == [c2, b2]
    assert {rr.pick([c2, a2, b2]) for _ in range(3)} == {a2, b2, c2}
    # c disappears: the rotation carries on over what is left and never returns c.
    assert {rr.pick([a, b]) for _ in range(4)} == {a, b}
    # A new endpoint joins and gets its turn.
    d = Endpoint("d:1", weight=1)
    assert d in {rr.pick([a, b, d]) for _ in range(3)}


def test_round_robin_endpoint_goes_unhealthy_and_back() -> None:
    a, b = eps(a=1, b=1)
    rr = RoundRobin()
    b.healthy = False
    assert [rr.pick([a, b]) for _ in range(3)] == [a, a, a]
    b.healthy = True
    assert Counter(rr.pick([a, b]) for _ in range(10)) == {a: 5, b: 5}


def test_round_robin_duplicate_address_counted_once() -> None:
    a, b = eps(a=1, b=1)
    a_dup = Endpoint("a:1", weight=1)
    rr = RoundRobin()
    assert Counter(rr.pick([a, a_dup, b]) for _ in range(10)) == {a: 5, b: 5}


# ---------------------------------------------------------------- weighted random


def test_weighted_random_is_deterministic_for_a_seed() -> None:
    endpoints = eps(a=1, b=2, c=3)
    first = names(WeightedRandom(random.Random(42)), endpoints, 50)
    assert names(WeightedRandom(random.Random(42)), endpoints, 50) == first


def test_weighted_random_distribution() -> None:
    endpoints = eps(a=100, b=300, c=600)
    wr = WeightedRandom(random.Random(1234))
    counts = Counter(names(wr, endpoints, 10_000).split())
    for name, share in {"a": 0.1, "b": 0.3, "c": 0.6}.items():
        assert abs(counts[name] / 10_000 - share) < 0.02, counts


# ---------------------------------------------------------------- least request


def test_least_request_prefers_less_loaded() -> None:
    a, b = eps(a=100, b=100)
    a.active = 10
    lr = LeastRequest(random.Random(3))
    # With two endpoints both are always sampled: the idle one always wins.
    assert all(lr.pick([a, b]) is b for _ in range(100))


def test_least_request_load_is_relative_to_weight() -> None:
    a, b = eps(a=100, b=400)
    a.active, b.active = 2, 4  # 0.02 vs 0.01 per unit of weight
    lr = LeastRequest(random.Random(3))
    assert all(lr.pick([a, b]) is b for _ in range(100))


def test_least_request_tie_goes_to_first_sampled() -> None:
    a, b = eps(a=100, b=100)
    seed = 11
    lr = LeastRequest(random.Random(seed))
    # Replay the policy's first draw (weighted, total 200) to know who came first.
    first = [a, b][0 if random.Random(seed).randrange(200) < 100 else 1]
    assert lr.pick([a, b]) is first


def test_least_request_samples_two_distinct() -> None:
    # Among many endpoints, the single most loaded one can never win a P2C
    # comparison, because the two samples are always distinct.
    endpoints = [Endpoint(f"h{i}:1") for i in range(10)]
    endpoints[0].active = 1000
    lr = LeastRequest(random.Random(5))
    picks = Counter(lr.pick(endpoints) for _ in range(2000))
    assert endpoints[0] not in picks
    assert len(picks) == 9


def test_least_request_balances_as_load_builds() -> None:
    endpoints = eps(a=100, b=100, c=100, d=100)
    lr = LeastRequest(random.Random(9))
    for _ in range(400):  # never released: in-flight counts stay close
        ep = lr.pick(endpoints)
        assert ep is not None
        ep.active += 1
    loads = [ep.active for ep in endpoints]
    assert max(loads) - min(loads) <= 3, loads


def test_least_request_choices_must_be_positive() -> None:
    with pytest.raises(ValueError, match="choices"):
        LeastRequest(random.Random(0), choices=0)


def test_least_request_one_choice_is_weighted_random() -> None:
    endpoints = eps(a=1, b=3)
    endpoints[1].active = 10**6  # load is irrelevant with one choice
    counts = Counter(names(LeastRequest(random.Random(8), choices=1), endpoints, 4000).split())
    assert abs(counts["b"] / 4000 - 0.75) < 0.03, counts


# ---------------------------------------------------------------- factory


def test_make_balancer() -> None:
    assert BALANCERS == ("round_robin", "random", "least_request")
    assert isinstance(make_balancer("round_robin"), RoundRobin)
    assert isinstance(make_balancer("random"), WeightedRandom)
    assert isinstance(make_balancer("least_request", rng=random.Random(1)), LeastRequest)
    assert make_balancer("round_robin") is not make_balancer("round_robin")


def test_make_balancer_unknown_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="round_robin, random, least_request"):
        make_balancer("fastest")
