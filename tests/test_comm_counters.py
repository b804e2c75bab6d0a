"""The comm counters against the analytic volume of each operator, per rank."""
from __future__ import annotations

import pytest

from pliant.bench.comm_bench import analytic_bytes

from comm_check import check
from dist_pool import DistPool


@pytest.fixture(scope="module")
def pool():
    p = DistPool(4)
    yield p
    p.close()


def _sent(counters: dict, prefix: str) -> int:
    return sum(v["bytes_sent"] for k, v in counters.items() if k.startswith(prefix))


@pytest.mark.parametrize("method, heads, kv_heads", [
    ("lasp2", 2, 2), ("ring", 2, 2), ("ulysses", 4, 4), ("ulysses", 4, 2), ("ulysses", 4, 1), ("lasp2h", 4, 2),
    ("lasp2h", 3, 1),
])
def test_counted_bytes_match_the_analytic_volume(pool, method, heads, kv_heads):
    L, d = 37, 3
    ranks = check(pool, method, [L], 0, 4, heads=heads, kv_heads=kv_heads, dk=d, dv=d)
    expect = analytic_bytes(method, [L], 4, heads, kv_heads, d, elem=8)
    sent = [_sent(r[5], method) for r in ranks]
    if method == "ring":
        assert sent == [expect / 2, expect, expect, expect / 2]  # the ends send in one direction only
    else:
        assert sent == [expect] * 4
    assert all(set(k.split("@")[1] for k in r[5]) == {"0-3"} for r in ranks)  # recorded against the group


def test_a_pack_moves_one_state_per_sequence(pool):
    one = check(pool, "lasp2", [20], 0, 4, heads=2, dk=3, dv=3)
    three = check(pool, "lasp2", [20, 5, 41], 0, 4, heads=2, dk=3, dv=3)
    assert _sent(three[0][5], "lasp2") == 3 * _sent(one[0][5], "lasp2")
