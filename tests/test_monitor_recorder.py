"""The agent's collective recorder on real gloo ranks: every collective, with the same
sequence numbers on every member of a group, bytes, signatures and times; async ones exit
when waited; bounded columns; the torch.distributed functions restored afterwards."""
from __future__ import annotations


def test_recorder_sees_every_collective_with_matching_sequence_numbers(pools):
    out = pools[4].run("dist_jobs:record_collectives", 64)
    world = (0, 1, 2, 3)
    for rank, r in enumerate(out):
        assert r["restored"] and r["step"] == 7 and r["inflight_after"] == 0
        assert r["inflight_async"] == 1  # the async all_reduce is in flight until waited on
        done = r["done"]
        assert all(ok for rows in done.values() for *_, ok in rows), "every exit time is after its enter time"
        # completed collectives: sequence number, signature (shape only where members pass equal
        # shapes), step, finiteness of the input (None: not floating point), checkpoint flag
        assert done[world] == [(0, ("all_reduce", "float32", (8,)), 0, True, False, True),
                               (1, ("all_to_all_single", "float32", None), 0, True, False, True),
                               (2, ("all_reduce", "float64", (3,)), 0, True, False, True),
                               (3, ("barrier", "", ()), 7, None, False, True)]
        transfers = [(group, seq, op, nbytes, dtype, shape, peer, ok) for group, seq, op, nbytes, dtype, shape, peer, ok
                     in r["events"]]
        if rank == 0:
            assert done[(0, 1)] == [(0, ("all_reduce", "float32", (2,)), 0, True, False, True)]
            assert transfers == [((0, 1), 0, "send", 20, "float32", (5,), 1, True)]
        elif rank == 1:
            assert done[(0, 1)] == [(0, ("all_reduce", "float32", (2,)), 0, True, False, True)]
            assert transfers == [((0, 1), 0, "recv", 20, "float32", (5,), 0, True)]  # (its input is not checked)
        else:
            assert (0, 1) not in done and transfers == []


def test_recorder_queue_is_bounded(pools):
    """With no snapshot taken, a rank keeps its newest 4 x `capacity` ended collectives."""
    out = pools[4].run("dist_jobs:record_collectives", 1)
    for r in out:
        kept = sum(len(rows) for rows in r["done"].values())
        assert kept == 4  # of 4 on ranks 2 and 3 and 5 on ranks 0 and 1 (their pair's all_reduce)
        assert r["done"][(0, 1, 2, 3)][-1][0] == 3  # the newest, the barrier, is kept
