"""The policy's weights on their way from the learner to the rollout workers.

    learner rank 0 (WeightPublisher)              weight store (actor)      rollout worker
    publish(version): returns at once
      a thread, per bucket of whole tensors:
        copy them into one byte array
        ray.put it                       ---->    publish(generation,
      store.publish(..., Published)                version, Published)  ---> latest() -> Published
    before_update(): waits for the copies                                    ray.get(its buckets)
      (the optimizer step is about to                                        load_weights: each tensor
      change the weights)                                                    from its bucket

The copies run while the next step's forward and backward read the same weights (nothing but
the optimizer step writes them), so the learner waits only when a copy is still going when
its optimizer step comes. Buckets (`BUCKET_BYTES`, whole tensors each, as verl and AReaL move
multi-GB policies) keep each copy and object-store put bounded and let the object store hold
them as separate objects; every byte is copied twice on the way out (into the bucket, into
the object store) and once on the way in, so the time grows linearly with the bytes
(`pliant bench weights` measures it against model size).
"""
from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

ALIGN = 8  # bytes: every tensor starts at a multiple, so its bytes view as its dtype
BUCKET_BYTES = 64 << 20  # bytes a bucket holds at most (a larger tensor gets a bucket of its own)


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def buckets_of(tensors: Sequence, bucket_bytes: int = BUCKET_BYTES) -> list[range]:
    """Consecutive tensors grouped into buckets of at most `bucket_bytes` (padded), in order;
    a tensor larger than that is a bucket of its own."""
    out: list[range] = []
    start, size = 0, 0
    for i, t in enumerate(tensors):
        n = _padded(_nbytes(t))
        if i > start and size + n > bucket_bytes:
            out.append(range(start, i))
            start, size = i, 0
        size += n
    if len(tensors) > start:
        out.append(range(start, len(tensors)))
    return out


def pack_tensors(tensors: Sequence) -> np.ndarray:
    """Tensors (any device and dtype) as one byte array: each one's bytes, padded to ALIGN."""
    import torch  # here: the dispatcher's and the weight store's actors never import torch (4 s of CPU each)

    total = sum(_padded(_nbytes(t)) for t in tensors)
    buf = np.zeros(total, dtype=np.uint8)
    flat = torch.from_numpy(buf)
    off = 0
    for t in tensors:
        n = _nbytes(t)
        flat[off:off + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        off += _padded(n)
    return buf


def pack_state(state: dict) -> np.ndarray:
    """A state dict (in a model's state_dict order) as one byte array."""
    return pack_tensors(list(state.values()))


def pack_weights(model) -> np.ndarray:
    """The model's state (parameters and buffers, in state_dict order) as one byte array."""
    return pack_state(model.state_dict())


def load_weights(model, packed: np.ndarray | Sequence[np.ndarray]) -> None:
    """Copy packed weights into `model`, on its device: one byte array (pack_weights) or the
    buckets of one (WeightPublisher), each tensor taken from the bucket it was packed into."""
    import torch

    parts = [packed] if isinstance(packed, np.ndarray) else list(packed)
    state = list(model.state_dict().values())
    need = sum(_padded(_nbytes(t)) for t in state)
    have = sum(p.size for p in parts)
    if need != have:
        raise ValueError(f"packed weights have {have} bytes in {len(parts)} bucket(s), the model's state needs {need}")
    with warnings.catch_warnings():  # the object store's arrays are read-only: they are only read here
        warnings.simplefilter("ignore", UserWarning)
        data = [torch.from_numpy(p) for p in parts]
    k, off = 0, 0
    with torch.no_grad():
        for t in state:
            n = _nbytes(t)
            while off + n > data[k].numel():  # this tensor is in the next bucket
                if off != data[k].numel():
                    raise ValueError(f"bucket {k} ends inside a tensor of {n} bytes at byte {off}: the buckets do not "
                                     f"split the model's state at its tensors")
                k, off = k + 1, 0
            t.copy_(data[k][off:off + n].view(t.dtype).view(t.shape))
            off += _padded(n)


@dataclass(frozen=True)
class Published:
    """One version's weights in the object store: its buckets' references (held inside this
    object, so Ray hands them on as references, not values), when the learner published it
    (wall clock), and its bytes."""

    refs: list
    published_at: float
    nbytes: int


@ray.remote(num_cpus=0, enable_task_events=False)
class WeightStore:
    def __init__(self):
        self.key = (-1, -1)  # (generation, version) of the newest weights
        self.published: Published | None = None
        self.changed = asyncio.Condition()

    async def publish(self, generation: int, version: int, published: Published) -> None:
        """Newer weights: a higher version, or any version of a newer learner generation (a
        restarted learner publishes its checkpoint's version, below what the lost one had)."""
        async with self.changed:
            if (generation, version) > self.key:  # the learner does not wait for a publish: they may overtake
                self.key, self.published = (generation, version), published
                self.changed.notify_all()

    async def latest(self, newer_than: tuple[int, int] = (-1, -1), timeout: float | None = None
                     ) -> tuple[tuple[int, int], Published | None]:
        """((generation, version), Published) once weights newer than `newer_than` exist (or
        at the timeout: whatever is there)."""
        newer_than = tuple(newer_than)
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.key > newer_than), timeout)
            except asyncio.TimeoutError:
                pass
            return self.key, self.published


def fetch(published: Published) -> list[np.ndarray]:
    """A published version's buckets, from the object store."""
    return ray.get(published.refs)


class WeightPublisher:
    """Learner rank 0's side: `publish(version)` hands the model's weights to the store in
    buckets, copied by a background thread (`background=False`: on the caller's thread, as
    one bucket, the way it was done before buckets: the baseline `pliant bench weights`
    measures against); `before_update()` waits for the copies before the weights change and
    returns how long it waited."""

    def __init__(self, model, store, generation: int, bucket_bytes: int = BUCKET_BYTES, background: bool = True):
        self.model, self.store, self.generation = model, store, generation
        self.bucket_bytes, self.background = bucket_bytes, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last: Any = None  # the store's answer to the newest publish (ray.get it to wait for the store)
        self.copy_s: list[float] = []  # each publish's copies (bucket and object store), seconds

    def publish(self, version: int) -> float:
        """Start publishing `version`; returns the seconds the caller spent (waiting for an
        earlier publish's copies, if still running, and starting this one)."""
        t0 = time.perf_counter()
        self.before_update()
        at = time.time()
        if self.background:
            self._thread = threading.Thread(target=self._copy, args=(version, at), name="weight-publisher",
                                            daemon=True)
            self._thread.start()
        else:
            self._copy(version, at, bucket_bytes=None)
        return time.perf_counter() - t0

    def _copy(self, version: int, at: float, bucket_bytes: int | None = -1) -> None:
        try:
            t0 = time.perf_counter()
            tensors = list(self.model.state_dict().values())
            size = self.bucket_bytes if bucket_bytes == -1 else bucket_bytes
            groups = buckets_of(tensors, size) if size else [range(len(tensors))]
            refs, nbytes = [], 0
            for idx in groups:
                buf = pack_tensors([tensors[i] for i in idx])
                nbytes += buf.size
                refs.append(ray.put(buf))
                del buf
            self.copy_s.append(time.perf_counter() - t0)
            self.last = self.store.publish.remote(self.generation, version, Published(refs, at, nbytes))
        except BaseException as e:  # noqa: BLE001 (raised on the learner's thread by before_update)
            self._error = e

    def before_update(self) -> float:
        """Wait for the copies of the last publish (the weights are about to change); raises
        what the copying thread raised. Returns the seconds waited."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"publishing the policy's weights failed: {type(error).__name__}: {error}") from error
        return time.perf_counter() - t0
