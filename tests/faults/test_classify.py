"""The master's rules on hand-made agent reports (the real JobPicture, no job)."""
from pliant.comm.monitor.classify import JobPicture
from pliant.comm.monitor.spec import FaultSpec

GROUP = [0, 1, 2, 3]


def report(picture: JobPicture, rank: int, op: str, now: float) -> None:
    """Rank `rank` says it is inside collective 7 of the world group, calling `op`."""
    row = [GROUP, 7, op, now, None, 8, "float32", [2], None, 5, True, False]
    picture.ingest({"rank": rank, "pid": 100 + rank, "host": "h", "slot": rank, "type": "summary", "step": 5,
                    "in_checkpoint": False, "inflight": [row], "events": []}, now)


def test_a_desync_blames_the_odd_rank_only_once_a_majority_shows_it():
    picture = JobPicture(FaultSpec(), world=4)
    report(picture, 1, "all_reduce", 1.0)  # the desynced rank reports first
    report(picture, 3, "broadcast_object_list", 1.1)
    assert [i for i in picture.check(1.2) if i.kind == "desync"] == []  # one against one: not yet known which
    report(picture, 0, "broadcast_object_list", 1.3)
    found = [i for i in picture.check(1.4) if i.kind == "desync"]
    assert len(found) == 1 and found[0].ranks == [1] and found[0].exclude == [1]


def test_a_desync_in_a_group_that_has_all_reported_is_decided_even_on_a_tie():
    picture = JobPicture(FaultSpec(), world=4)
    for rank, op in ((1, "all_reduce"), (3, "broadcast_object_list"), (0, "all_reduce"), (2, "broadcast_object_list")):
        report(picture, rank, op, 1.0)
    found = [i for i in picture.check(1.1) if i.kind == "desync"]
    assert len(found) == 1 and len(found[0].ranks) == 2
