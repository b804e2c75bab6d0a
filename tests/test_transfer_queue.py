"""TransferQueue semantics: readiness per field, exactly once per task, whole groups,
streaming micro-batches, backpressure, clearing; the bookkeeping on its own, then the Ray
actors with concurrent producers and consumers (a real local Ray cluster)."""
from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from pliant.rl.transfer_queue import WAIT_THREADS, QueueIndex, TransferQueue

pytestmark = pytest.mark.timeout(120)


# ----- the controller's bookkeeping -----
def test_a_sample_is_ready_for_a_task_when_all_its_fields_are():
    q = QueueIndex(8, ["reward", "trainer"])
    ids = q.allocate(3, partition=0, group_size=1)
    q.mark_ready(ids, ["prompt", "response"])
    q.mark_ready(ids[:1], ["reward"])
    assert q.claim("trainer", ["response", "reward"], 10) == ids[:1]
    assert q.claim("reward", ["prompt", "response"], 2) == ids[:2]  # another task: its own cursor
    assert q.claim("reward", ["prompt", "response"], 10) == ids[2:]


def test_each_task_consumes_a_sample_exactly_once():
    q = QueueIndex(8, ["a", "b"])
    ids = q.allocate(4, 0, 1)
    q.mark_ready(ids, ["x"])
    first = q.claim("a", ["x"], 3)
    assert first == ids[:3] and q.claim("a", ["x"], 3) == ids[3:] and q.claim("a", ["x"], 3) == []
    assert q.claim("b", ["x"], 10) == ids


def test_whole_groups_only():
    q = QueueIndex(16, ["t"])
    ids = q.allocate(8, 0, group_size=4)
    q.mark_ready(ids[:3] + ids[4:], ["x"])  # group 0 lacks one sample
    assert q.claim("t", ["x"], 8, whole_groups=True) == ids[4:]
    q.mark_ready(ids[3:4], ["x"])
    assert q.claim("t", ["x"], 3, whole_groups=True) == []  # a group of 4 does not fit in 3
    assert q.claim("t", ["x"], 4, whole_groups=True) == ids[:4]


def test_ready_in_groups_counts_only_whole_ready_groups():
    q = QueueIndex(16, ["t"])
    ids = q.allocate(8, 0, group_size=4)
    other = q.allocate(4, 1, group_size=4)
    q.mark_ready(ids[:3] + ids[4:] + other, ["x"])
    assert q.ready_in_groups("t", {"x"}) == 8 and q.ready_in_groups("t", {"x"}, partition=0) == 4
    assert q.pending("t", {"x"}, partition=0) == (7, 1)
    q.claim("t", ["x"], 4, whole_groups=True)
    assert q.ready_in_groups("t", {"x"}, partition=0) == 0


def test_capacity_and_release_after_every_task_has_read():
    q = QueueIndex(4, ["a", "b"])
    ids = q.allocate(4, 0, 2)
    assert q.allocate(2, 0, 2) is None  # full: the producer waits
    q.mark_ready(ids, ["x"])
    q.claim("a", ["x"], 4)
    q.done_reading(ids)
    assert q.release() == []  # b has not consumed them
    q.claim("b", ["x"], 2)
    assert q.release() == []  # b is still reading
    q.done_reading(ids[:2])
    assert q.release() == ids[:2]
    assert q.allocate(2, 1, 2) == [4, 5]
    assert q.stats()["held"] == 4 and q.stats()["cleared"] == 2


def test_clear_partition():
    q = QueueIndex(8, ["t"])
    a = q.allocate(2, partition=0, group_size=1)
    b = q.allocate(2, partition=1, group_size=1)
    q.mark_ready(a + b, ["x"])
    assert q.claim("t", ["x"], 10, partition=1) == b
    assert q.clear_partition(0) == a
    assert sorted(q.samples) == b


def test_bad_calls_name_the_problem():
    q = QueueIndex(4, ["t"])
    with pytest.raises(KeyError, match="task 'x' is not registered"):
        q.claim("x", ["f"], 1)
    with pytest.raises(ValueError, match="exceed the queue's capacity 4"):
        q.allocate(6, 0, 2)
    with pytest.raises(ValueError, match="do not split into groups of 2"):
        q.allocate(3, 0, 2)
    with pytest.raises(KeyError, match="sample 99 was never allocated"):
        q.mark_ready([99], ["f"])


def test_a_cleared_partition_takes_no_late_writes():
    q = QueueIndex(8, ["t"])
    ids = q.allocate(2, partition=0, group_size=2)
    q.clear_partition(0)
    assert q.mark_ready(ids, ["f"]) == ids  # cleared meanwhile: dropped, not an error
    assert q.allocate(2, partition=0, group_size=2) == []  # a late duplicate of a trained step
    assert q.allocate(2, partition=1, group_size=2) == [2, 3] and q.stats()["held"] == 2
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        QueueIndex(0, ["t"])


# ----- on Ray -----
def test_tensors_round_trip_through_the_units(ray_cluster):
    tq = TransferQueue.create(capacity=8, tasks=["trainer"], units=3)
    ids = tq.allocate(5, group_size=1)
    tq.put(ids, {"tokens": [torch.arange(i + 1) for i in range(5)], "version": list(range(5))})
    batch = tq.get("trainer", ["tokens", "version"], min_n=5, max_n=5, timeout=10)
    assert batch.ids == ids
    for i, t in enumerate(batch.data["tokens"]):
        assert torch.equal(t, torch.arange(i + 1))
    assert batch.data["version"] == list(range(5))


def test_streaming_a_consumer_gets_a_micro_batch_before_the_batch_is_done(ray_cluster):
    tq = TransferQueue.create(capacity=16, tasks=["trainer"])
    ids = tq.allocate(8, group_size=2)
    tq.put(ids[:2], {"x": [1, 2]})  # one group of the 8 samples is ready
    batch = tq.get("trainer", ["x"], min_n=2, max_n=8, timeout=10, whole_groups=True)
    assert batch.ids == ids[:2]
    assert tq.get("trainer", ["x"], min_n=1, max_n=8, timeout=0.3).ids == []  # nothing else ready: timeout
    tq.put(ids[2:3], {"x": [3]})  # half a group: a whole-group claim goes on waiting for the rest
    threading.Timer(0.3, lambda: tq.put(ids[3:4], {"x": [4]})).start()
    assert tq.get("trainer", ["x"], min_n=2, max_n=8, timeout=10, whole_groups=True).ids == ids[2:4]


@ray.remote(num_cpus=0)
def produce(tq: TransferQueue, n: int, tag: int) -> list[int]:
    made = []
    for k in range(n):
        ids = tq.allocate(2, partition=k, group_size=2, timeout=30)
        tq.put(ids, {"payload": [torch.full((3,), float(tag)), torch.full((3,), float(tag))]})
        made += ids
    return made


@ray.remote(num_cpus=0)
def consume(tq: TransferQueue, task: str) -> list[int]:
    got = []
    while True:
        batch = tq.get(task, ["payload"], min_n=1, max_n=3, timeout=2.0)
        if not batch.ids:
            if tq.is_closed():
                return got
            continue
        got += batch.ids
        time.sleep(0.01)


def test_concurrent_producers_and_consumers_exactly_once(ray_cluster):
    tq = TransferQueue.create(capacity=6, tasks=["reward", "trainer"], units=2)  # small: producers wait
    producers = [produce.remote(tq, 10, tag) for tag in range(3)]
    consumers = {task: [consume.remote(tq, task) for _ in range(2)] for task in ("reward", "trainer")}
    made = sorted(sum(ray.get(producers), []))
    tq.close()
    assert made == list(range(60))
    for task, refs in consumers.items():
        got = sum(ray.get(refs), [])
        assert sorted(got) == made, f"{task}: lost or duplicated samples"
    deadline = time.monotonic() + 5
    while tq.stats()["held"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = tq.stats()
    assert stats["held"] == 0 and stats["cleared"] == 60
    assert sum(ray.get([u.size.remote() for u in tq.units])) == 0  # the data left the units too


def test_backpressure_blocks_the_producer_until_consumption_frees_room(ray_cluster):
    tq = TransferQueue.create(capacity=4, tasks=["trainer"])
    tq.put(tq.allocate(4, group_size=2), {"x": [0, 1, 2, 3]})
    assert tq.allocate(2, group_size=2, timeout=0.3) is None  # full
    got: list = []
    t = threading.Thread(target=lambda: got.append(tq.allocate(2, group_size=2, timeout=20)))
    t.start()
    time.sleep(0.3)
    assert not got  # still waiting
    tq.get("trainer", ["x"], min_n=2, max_n=2, timeout=5)
    t.join(10)
    assert got and got[0] == [4, 5]


def test_clear_partition_drops_the_data(ray_cluster):
    tq = TransferQueue.create(capacity=8, tasks=["trainer"], units=2)
    a = tq.allocate(4, partition=7, group_size=1)
    tq.put(a, {"x": [torch.zeros(2)] * 4})
    assert tq.clear_partition(7) == 4
    assert sum(ray.get([u.size.remote() for u in tq.units])) == 0
    assert tq.stats()["held"] == 0


def test_linger_batches_up_to_max_n_without_waiting_longer(ray_cluster):
    tq = TransferQueue.create(capacity=8, tasks=["reward"])
    ids = tq.allocate(4, group_size=1)
    tq.put(ids[:1], {"x": [0]})
    assert tq.get("reward", ["x"], min_n=1, max_n=4, timeout=5).ids == ids[:1]  # no linger: what is ready
    tq.put(ids[1:2], {"x": [1]})
    later = threading.Timer(0.3, lambda: tq.put(ids[2:], {"x": [2, 3]}))
    later.start()
    t = time.monotonic()
    batch = tq.get("reward", ["x"], min_n=1, max_n=3, timeout=5, linger_s=5.0)
    waited = time.monotonic() - t
    later.join()
    assert batch.ids == ids[1:4]  # the late ones joined the batch
    assert 0.2 < waited < 4.0, f"waited {waited:.2f} s: it must return once max_n are ready, not at the linger"
    ids = tq.allocate(2, group_size=1)
    tq.put(ids[:1], {"x": [4]})
    t = time.monotonic()
    assert tq.get("reward", ["x"], min_n=1, max_n=2, timeout=5, linger_s=0.3).ids == ids[:1]  # linger ran out
    assert time.monotonic() - t >= 0.3


def test_linger_ends_at_once_when_nothing_more_is_on_its_way(ray_cluster):
    # (a sync step's last groups: waiting for a fuller batch would only delay the trainer)
    tq = TransferQueue.create(capacity=8, tasks=["reward"])
    ids = tq.allocate(2, group_size=1)
    tq.put(ids, {"x": [0, 1]})
    t = time.monotonic()
    assert tq.get("reward", ["x"], min_n=1, max_n=4, timeout=5, linger_s=5.0).ids == ids
    assert time.monotonic() - t < 2.0


def test_linger_ends_when_the_oldest_partition_is_complete_though_later_ones_are_coming(ray_cluster):
    # (async: step b's last group must not wait for step b+1's groups, already under way,
    # while the trainer waits for step b)
    tq = TransferQueue.create(capacity=8, tasks=["reward"])
    last = tq.allocate(2, partition=3, group_size=2)
    tq.allocate(4, partition=4, group_size=2)  # the next step's groups, decoding
    tq.put(last, {"x": [0, 1]})
    t = time.monotonic()
    assert tq.get("reward", ["x"], min_n=1, max_n=4, timeout=5, linger_s=5.0).ids == last
    assert time.monotonic() - t < 2.0
    more = tq.allocate(2, partition=5, group_size=2)
    first = tq.allocate(2, partition=5, group_size=2)
    tq.put(first, {"x": [2, 3]})  # partition 5 has more coming: the linger waits for it
    threading.Timer(0.3, lambda: tq.put(more, {"x": [4, 5]})).start()
    assert sorted(tq.get("reward", ["x"], min_n=1, max_n=4, timeout=5, linger_s=5.0).ids) == sorted(first + more)


def test_more_waiting_consumers_than_threads_do_not_starve_producers(ray_cluster):
    # the controller is a threaded actor: waiting claims hold its claim threads, but
    # producers allocate and mark in thread groups of their own
    tq = TransferQueue.create(capacity=256, tasks=["t"])
    n = WAIT_THREADS + 6
    claims = [tq.controller.claim.remote("t", ["x"], 1, 1, 30.0) for _ in range(n)]
    time.sleep(0.5)  # every claim thread is waiting, and 6 claims queue behind them
    t = time.monotonic()
    tq.put(tq.allocate(n, group_size=1, timeout=20), {"x": list(range(n))})
    got = ray.get(claims, timeout=25)
    assert time.monotonic() - t < 20, "producers waited for the claims' timeouts"
    assert sorted(i for ids in got for i in ids) == list(range(n))


def test_reads_acknowledged_later_free_room_with_the_next_claim_or_ack(ray_cluster):
    tq = TransferQueue.create(capacity=2, tasks=["t"])
    tq.put(tq.allocate(2, group_size=1), {"x": [0, 1]})
    assert len(tq.get("t", ["x"], 1, 1, timeout=5, ack_later=True)) == 1
    assert tq.stats()["held"] == 2  # read, not yet acknowledged: still held
    tq.get("t", ["x"], 1, 1, timeout=5, ack_later=True)  # this claim carries the first one's done_reading
    assert tq.stats()["held"] == 1
    tq.ack("t")
    assert tq.stats()["held"] == 0
