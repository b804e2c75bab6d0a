"""TransferQueue: the streaming data store between the RL tasks (AsyncFlow, 2025).

A controller holds the metadata only: per sample, which fields are written and which tasks
have consumed it; storage units hold the data, sharded by sample (id mod units). Producers
write fields straight into the units and then tell the controller which fields are ready;
consumers ask the controller for samples whose required fields are all ready and that this
task has not consumed yet, then read the data straight from the units: tensors never pass
through the controller.

    allocate(n)      ids for n new samples (blocks while the queue holds `capacity`
                     samples: backpressure on producers)
    put(ids, ...)    write fields of samples (any task, any order)
    get(task, ...)   a micro-batch of ready, unconsumed samples as soon as `min_n` are ready
                     (streaming: not when the whole global batch is), exactly once per task;
                     `whole_groups`: only groups whose every sample is ready (GRPO needs the
                     group to normalise advantages); `get_async` sends the claim and
                     reads later (a consumer asks for its next batch while it works);
                     `ack_later` lets the next claim carry the batch's done_reading
    clear            a sample consumed by every registered task is dropped from its unit and
                     frees its capacity; a partition (e.g. a global step) can be cleared whole

`QueueIndex` is the controller's bookkeeping, plain Python (tested without Ray);
`Controller` and `StorageUnit` are the Ray actors; `TransferQueue` is the client any actor
or the driver uses.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import ray


class QueueClosed(RuntimeError):
    pass


def shard(ids: Iterable[int], units: int) -> dict[int, list[int]]:
    """The samples of each storage unit (sample i lives in unit i mod units), in order."""
    out: dict[int, list[int]] = defaultdict(list)
    for i in ids:
        out[i % units].append(i)
    return out


@dataclass
class SampleMeta:
    id: int
    partition: int
    group: int
    group_size: int
    fields: set[str] = field(default_factory=set)
    consumed: set[str] = field(default_factory=set)
    reading: int = 0  # consumers that claimed it and are still reading its data


class QueueIndex:
    """Which samples exist, which of their fields are written, who consumed them."""

    def __init__(self, capacity: int, tasks: Iterable[str]):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.tasks = capacity, frozenset(tasks)
        if not self.tasks:
            raise ValueError("a TransferQueue needs at least one consuming task")
        self.samples: dict[int, SampleMeta] = {}
        self.groups: dict[int, list[int]] = defaultdict(list)
        self.next_id = 0
        self.next_group = 0
        self.cleared = 0
        self.cleared_partitions: set[int] = set()

    def free(self) -> int:
        return self.capacity - len(self.samples)

    def allocate(self, n: int, partition: int, group_size: int | None = None) -> list[int] | None:
        """Ids for n samples forming groups of `group_size` (default: one group of n), None
        when the queue has no room for them yet, [] when the partition is already cleared (a
        late duplicate: nobody would consume it)."""
        group_size = group_size or n
        if n < 1 or n % group_size:
            raise ValueError(f"allocate: {n} samples do not split into groups of {group_size}")
        if n > self.capacity:
            raise ValueError(f"allocate: {n} samples exceed the queue's capacity {self.capacity}")
        if partition in self.cleared_partitions:
            return []
        if n > self.free():
            return None
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        for j in range(0, n, group_size):
            g = self.next_group
            self.next_group += 1
            for i in ids[j:j + group_size]:
                self.samples[i] = SampleMeta(i, partition, g, group_size)
                self.groups[g].append(i)
        return ids

    def mark_ready(self, ids: Iterable[int], fields: Iterable[str]) -> list[int]:
        """Mark fields written; returns the ids that were cleared meanwhile (their data is
        dropped by the caller)."""
        fields, gone = set(fields), []
        for i in ids:
            meta = self.samples.get(i)
            if meta is None:
                if i >= self.next_id:
                    raise KeyError(f"sample {i} was never allocated")
                gone.append(i)  # cleared (e.g. its step is trained): a late write is dropped
                continue
            meta.fields |= fields
        return gone

    def _ready(self, meta: SampleMeta, task: str, needed: set[str]) -> bool:
        return task not in meta.consumed and needed <= meta.fields

    def pending(self, task: str, needed: set[str], partition: int | None = None) -> tuple[int, int]:
        """Samples `task` has not consumed: (ready for it, still missing some of `needed`)."""
        ready = coming = 0
        for meta in self.samples.values():
            if task in meta.consumed or (partition is not None and meta.partition != partition):
                continue
            if needed <= meta.fields:
                ready += 1
            else:
                coming += 1
        return ready, coming

    def _ready_groups(self, task: str, needed: set[str], partition: int | None = None) -> Iterator[list[int]]:
        """The members of every whole group (all group_size members allocated) whose members
        are all ready for `task`, oldest first."""
        seen: set[int] = set()
        for meta in self.samples.values():
            if meta.group in seen or (partition is not None and meta.partition != partition):
                continue
            seen.add(meta.group)
            members = self.groups[meta.group]
            if len(members) == meta.group_size and all(self._ready(self.samples[i], task, needed) for i in members):
                yield members

    def ready_in_groups(self, task: str, needed: set[str], partition: int | None = None) -> int:
        """Samples `task` could claim as whole groups now (every member of the group ready)."""
        return sum(len(members) for members in self._ready_groups(task, needed, partition))

    def head_coming(self, task: str, needed: set[str], partition: int | None = None) -> tuple[int, int]:
        """(samples ready for `task`, samples still coming in the oldest partition that has
        ready ones): a batch lingering for more of later partitions would hold up the
        consumer downstream waiting for the oldest one to finish."""
        ready, by_partition = 0, defaultdict(int)
        head = None
        for meta in self.samples.values():
            if task in meta.consumed or (partition is not None and meta.partition != partition):
                continue
            if needed <= meta.fields:
                ready += 1
                head = meta.partition if head is None else min(head, meta.partition)
            else:
                by_partition[meta.partition] += 1
        return ready, by_partition[head] if head is not None else 0

    def claim(self, task: str, fields: Iterable[str], max_n: int, whole_groups: bool = False,
              partition: int | None = None) -> list[int]:
        """Up to max_n ready samples not yet consumed by `task`, oldest first, now marked
        consumed by it (whole groups only: a group that does not fit in max_n waits)."""
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not registered with the queue (tasks: {sorted(self.tasks)})")
        needed = set(fields)
        out: list[int] = []
        if whole_groups:
            for members in self._ready_groups(task, needed, partition):
                if len(out) + len(members) <= max_n:
                    out += members
        else:
            for meta in self.samples.values():
                if len(out) >= max_n:
                    break
                if (partition is None or meta.partition == partition) and self._ready(meta, task, needed):
                    out.append(meta.id)
        for i in out:
            self.samples[i].consumed.add(task)
            self.samples[i].reading += 1
        return out

    def done_reading(self, ids: Iterable[int]) -> None:
        for i in ids:
            if i in self.samples:
                self.samples[i].reading -= 1

    def release(self) -> list[int]:
        """Drop samples every task has consumed and read; returns their ids (the units drop
        the data)."""
        done = [i for i, m in self.samples.items() if m.consumed >= self.tasks and m.reading == 0]
        self._drop(done)
        return done

    def clear_partition(self, partition: int) -> list[int]:
        ids = [i for i, m in self.samples.items() if m.partition == partition]
        self.cleared_partitions.add(partition)
        self._drop(ids)
        return ids

    def _drop(self, ids: list[int]) -> None:
        for i in ids:
            meta = self.samples.pop(i)
            members = self.groups.get(meta.group)
            if members is not None and all(j not in self.samples for j in members):
                del self.groups[meta.group]
        self.cleared += len(ids)

    def stats(self) -> dict[str, Any]:
        pending = defaultdict(int)
        for m in self.samples.values():
            for t in self.tasks - m.consumed:
                pending[t] += 1
        return {"held": len(self.samples), "capacity": self.capacity, "allocated": self.next_id,
                "cleared": self.cleared, "unconsumed": dict(pending)}


@ray.remote(num_cpus=0, enable_task_events=False)
class StorageUnit:
    """Holds the fields of the samples whose id falls to it."""

    def __init__(self):
        self.data: dict[int, dict[str, Any]] = {}

    def put(self, ids: list[int], fields: dict[str, list]) -> None:
        for j, i in enumerate(ids):
            row = self.data.setdefault(i, {})
            for name, values in fields.items():
                row[name] = values[j]

    def get(self, ids: list[int], fields: list[str]) -> dict[str, list]:
        return {name: [self.data[i][name] for i in ids] for name in fields}

    def drop(self, ids: list[int]) -> None:
        for i in ids:
            self.data.pop(i, None)

    def size(self) -> int:
        return len(self.data)


WAIT_THREADS = 64  # claims, and allocates, the controller serves at once each (a waiting call holds a thread)
UPDATE_THREADS = 8  # the calls that never wait for room or data: marks, releases, clears, stats


@ray.remote(num_cpus=0, enable_task_events=False, max_concurrency=WAIT_THREADS,
            concurrency_groups={"produce": WAIT_THREADS, "update": UPDATE_THREADS})
class Controller:
    """The metadata side: a threaded actor, so waiting producers and consumers do not block
    each other (a call costs about 0.5 ms of CPU here, against 0.85 ms in an asyncio actor);
    one lock (the condition) guards the index. Claims, allocates and the calls that wake
    waiters run in three thread groups: however many consumers wait for data, a producer's
    allocate and mark_ready are never queued behind them, nor a consumer's release behind
    producers waiting for room."""

    def __init__(self, capacity: int, tasks: list[str], units: list):
        self.index = QueueIndex(capacity, tasks)
        self.units = units
        self.changed = threading.Condition()
        self.closed = False

    @ray.method(concurrency_group="produce")
    def allocate(self, n: int, partition: int, group_size: int | None = None,
                 timeout: float | None = None) -> list[int] | None:
        out: list[int] | None = None

        def room() -> bool:
            nonlocal out
            if self.closed:
                raise QueueClosed("the queue is closed")
            out = self.index.allocate(n, partition, group_size)
            return out is not None

        with self.changed:
            self.changed.wait_for(room, timeout)
        return out

    @ray.method(concurrency_group="update")
    def mark_ready(self, ids: list[int], fields: list[str], writes: list | None = None) -> list[int]:
        """Mark fields written, once the units' `writes` (object refs of their puts) are done;
        the data of samples cleared meanwhile is dropped again."""
        if writes:
            ray.get(writes)
        with self.changed:
            gone = self.index.mark_ready(ids, fields)
            self.changed.notify_all()
        self._drop(gone)
        return gone

    def claim(self, task: str, fields: list[str], min_n: int, max_n: int, timeout: float | None = None,
              whole_groups: bool = False, partition: int | None = None, linger_s: float = 0.0,
              read: list[int] | None = None) -> list[int]:
        """Wait until min_n samples are ready for `task` (or the queue is closed), then (up to
        `linger_s` more, while more of the oldest ready samples' partition is on its way:
        allocated, not written yet) for max_n,
        and claim up to max_n of them; [] when the timeout passes with fewer than min_n ready
        (a sync consumer asking for the whole batch never gets part of it). `read`: samples
        this consumer claimed before and has read since (their done_reading, carried by this
        call instead of one of its own)."""
        if read:
            self.done_reading(read, wait=False)
        needed = set(fields)

        def ready() -> int:
            if whole_groups:
                return self.index.ready_in_groups(task, needed, partition)
            return self.index.pending(task, needed, partition)[0]

        def lingered() -> bool:
            now, coming = self.index.head_coming(task, needed, partition)
            return self.closed or now >= max_n or not coming

        with self.changed:
            if not self.changed.wait_for(lambda: self.closed or ready() >= min_n, timeout):
                return []
            if linger_s > 0:  # batch up: fewer, larger calls
                self.changed.wait_for(lingered, linger_s)
            return self.index.claim(task, fields, max_n, whole_groups, partition)

    @ray.method(concurrency_group="update")
    def done_reading(self, ids: list[int], wait: bool = True) -> None:
        """A consumer has read the samples it claimed: those every task has consumed go
        (`wait`: until the units have dropped their data)."""
        with self.changed:
            self.index.done_reading(ids)
            released = self.index.release()
            if released:
                self.changed.notify_all()  # room for producers
        drops = self._drop(released)
        if wait:
            ray.get(drops)

    @ray.method(concurrency_group="update")
    def clear_partition(self, partition: int) -> tuple[int, dict[str, Any]]:
        """The samples dropped, and the queue's statistics after."""
        with self.changed:
            ids = self.index.clear_partition(partition)
            self.changed.notify_all()
            stats = self._stats()
        ray.get(self._drop(ids))
        return len(ids), stats

    def _drop(self, ids: list[int]) -> list:
        return [self.units[u].drop.remote(v) for u, v in shard(ids, len(self.units)).items()]

    @ray.method(concurrency_group="update")
    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    @ray.method(concurrency_group="update")
    def is_closed(self) -> bool:
        return self.closed

    @ray.method(concurrency_group="update")
    def stats(self) -> dict[str, Any]:
        with self.changed:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        return {**self.index.stats(), "closed": self.closed}


@dataclass
class Batch:
    ids: list[int]
    data: dict[str, list]

    def __len__(self) -> int:
        return len(self.ids)


class TransferQueue:
    """The client: create once (`TransferQueue.create`), pass to actors (it pickles as
    handles; each actor holds its own copy)."""

    def __init__(self, controller, units: list):
        self.controller, self.units = controller, units
        self.unacked: dict[str, list[int]] = {}  # task -> samples read, their done_reading not sent yet

    def __reduce__(self):
        return TransferQueue, (self.controller, self.units)

    @classmethod
    def create(cls, capacity: int, tasks: list[str], units: int = 2) -> "TransferQueue":
        if units < 1:
            raise ValueError(f"a TransferQueue needs at least one storage unit, got {units}")
        handles = [StorageUnit.remote() for _ in range(units)]
        return cls(Controller.remote(capacity, list(tasks), handles), handles)

    def allocate(self, n: int, partition: int = 0, group_size: int | None = None,
                 timeout: float | None = None, wait: bool = True):
        """Ids for n new samples (None at the timeout); `wait=False`: a reference to them at
        once, for a producer that asks ahead."""
        ref = self.controller.allocate.remote(n, partition, group_size, timeout)
        return ray.get(ref) if wait else ref

    def put(self, ids: list[int], fields: dict[str, list], wait: bool = True):
        """Write fields of samples into their units, then mark them ready. `wait=False`
        returns at once (a producer goes on while the data travels; the controller marks
        the fields ready when the units have them) with a reference to wait on or check."""
        for name, values in fields.items():
            if len(values) != len(ids):
                raise ValueError(f"put: field {name!r} has {len(values)} values for {len(ids)} samples")
        pos = {i: j for j, i in enumerate(ids)}
        writes = [self.units[u].put.remote(sub, {k: [v[pos[i]] for i in sub] for k, v in fields.items()})
                  for u, sub in shard(ids, len(self.units)).items()]
        done = self.controller.mark_ready.remote(list(ids), list(fields), writes)
        if wait:
            ray.get(done)
            return None
        return done

    def get(self, task: str, fields: list[str], min_n: int = 1, max_n: int | None = None,
            timeout: float | None = None, whole_groups: bool = False, partition: int | None = None,
            linger_s: float = 0.0, ack_later: bool = False) -> "Batch":
        """A micro-batch of ready samples `task` has not consumed (see Controller.claim).
        `linger_s`: once min_n are ready, wait up to this long for max_n (fewer calls per
        sample for a consumer that keeps up, at that much added latency). `ack_later`: the
        batch's done_reading travels with this task's next claim instead of a call of its own
        (for a consumer that keeps claiming; `ack` sends what is left)."""
        return self.get_async(task, fields, min_n, max_n, timeout, whole_groups, partition, linger_s,
                              ack_later).result()

    def get_async(self, task: str, fields: list[str], min_n: int = 1, max_n: int | None = None,
                  timeout: float | None = None, whole_groups: bool = False, partition: int | None = None,
                  linger_s: float = 0.0, ack_later: bool = False) -> "PendingBatch":
        """`get`, with the claim sent now and the batch read by `.result()`: a consumer asks
        for its next batch before it works on the current one."""
        read = self.unacked.pop(task, [])
        ref = self.controller.claim.remote(task, list(fields), min_n, max_n or min_n, timeout, whole_groups,
                                           partition, linger_s, read)
        return PendingBatch(self, task, list(fields), ref, ack_later)

    def read(self, task: str, ids: list[int], fields: list[str], ack_later: bool = False) -> "Batch":
        """The data of samples `task` has claimed, straight from their units."""
        if not ids:
            return Batch([], {f: [] for f in fields})
        units = shard(ids, len(self.units))
        parts = {u: self.units[u].get.remote(sub, fields) for u, sub in units.items()}
        got = dict(zip(parts, ray.get(list(parts.values()))))
        if ack_later:
            self.unacked.setdefault(task, []).extend(ids)
        else:
            self.controller.done_reading.remote(ids, False)
        where = {i: (u, j) for u, sub in units.items() for j, i in enumerate(sub)}
        return Batch(ids, {f: [got[where[i][0]][f][where[i][1]] for i in ids] for f in fields})

    def ack(self, task: str) -> None:
        """Send the done_reading of `task`'s batches read with `ack_later` (and wait for it)."""
        read = self.unacked.pop(task, [])
        if read:
            ray.get(self.controller.done_reading.remote(read))

    def clear_partition(self, partition: int, wait: bool = True):
        """Drop a partition's samples: how many (`wait=False`: a reference to (how many, the
        queue's statistics after), for a caller that goes on)."""
        ref = self.controller.clear_partition.remote(partition)
        return ray.get(ref)[0] if wait else ref

    def close(self) -> None:
        ray.get(self.controller.close.remote())

    def is_closed(self) -> bool:
        return ray.get(self.controller.is_closed.remote())

    def stats(self) -> dict[str, Any]:
        return ray.get(self.controller.stats.remote())


@dataclass
class PendingBatch:
    """A claim on its way (TransferQueue.get_async)."""

    queue: TransferQueue
    task: str
    fields: list[str]
    claim: Any  # ObjectRef of the claimed ids
    ack_later: bool

    def result(self) -> Batch:
        return self.queue.read(self.task, ray.get(self.claim), self.fields, self.ack_later)
