"""The agent's collective recorder on real gloo ranks: every collective, with the same
sequence numbers on every member of a group, bytes, signatures and times; async ones exit
when waited; a bounded ring; the torch.distributed functions restored afterwards."""
from __future__ import annotations


def test_recorder_sees_every_collective_with_matching_sequence_numbers(pools):
    out = pools[4].run("dist_jobs:record_collectives", 64)
    world = (0, 1, 2, 3)
    for rank, r in enumerate(out):
        assert r["restored"] and r["step"] == 7 and r["inflight_after"] == 0
        assert r["inflight_async"] == 1  # the async all_reduce is in flight until waited on
        ev = r["events"]
        assert all(done for *_, done in ev), "every event has an exit time after its enter time"
        on_world = [(seq, op, nbytes, dtype, shape) for group, seq, op, nbytes, dtype, shape, _, _ in ev
                    if group == world]
        assert on_world == [(0, "all_reduce", 32, "float32", (8,)), (1, "all_to_all_single", 64, "float32", (16,)),
                            (2, "all_reduce", 24, "float64", (3,)), (3, "barrier", 0, "", ())]
        pair = [(seq, op) for group, seq, op, *_ in ev if group == (0, 1)]
        if rank == 0:
            assert pair == [(0, "all_reduce"), (0, "send")]
            assert [e[6] for e in ev if e[2] == "send"] == [1]
        elif rank == 1:
            assert pair == [(0, "all_reduce"), (0, "recv")]
            assert [e[6] for e in ev if e[2] == "recv"] == [0]
        else:
            assert pair == []


def test_recorder_ring_is_bounded(pools):
    out = pools[4].run("dist_jobs:record_collectives", 2)
    assert all(len(r["events"]) == 2 and r["events"][-1][2] == "barrier" for r in out)
