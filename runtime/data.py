"""Variable-length token data: sources of documents and the global batcher.

A `DocumentSource` knows every document's length cheaply and returns a document's tokens
on demand, so every rank can compute the same global batch (from lengths alone) and read
only the documents its plan gives it. Two real sources:

* `SyntheticTask`: documents with learnable structure, generated from (seed, index) on
  demand; lengths from the planner's length distributions or a length file;
* `IndexedTokens`: pre-tokenized data in Megatron's indexed dataset format (`PREFIX.bin` +
  `PREFIX.idx`, memory-mapped; see `pliant.runtime.indexed`), the format most long-context
  corpora already come in and the one `pliant data prepare` writes (`write_indexed`).

`GlobalBatcher` cuts a seeded shuffle of the documents into global batches by a token
budget, truncating documents to max_len, and can save and restore its position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pliant.planner.lengths import LengthSource
from pliant.runtime.indexed import DataError, IndexedTokens, IndexedTokensWriter, write_indexed

__all__ = ["BatchState", "DataError", "DocumentSource", "GlobalBatcher", "IndexedTokens", "IndexedTokensWriter",
           "SyntheticTask", "write_indexed"]


class DocumentSource(Protocol):
    vocab_size: int | None  # None: ids not checked (an indexed dataset opened without a model)

    def __len__(self) -> int: ...

    def lengths(self) -> np.ndarray: ...

    def document(self, index: int) -> np.ndarray: ...


@dataclass
class SyntheticTask:
    """Documents a small model can learn: each is a walk on a sparse random bigram graph
    (every token has `branching` likely successors), whose opening segment is then repeated
    (a copy a model can learn with attention). Loss falls from ln(vocab) towards the
    walk's entropy, ln(branching), and lower where the copy is predictable."""

    vocab_size: int
    doc_lengths: np.ndarray
    seed: int = 0
    branching: int = 4
    copy_segment: int = 16

    def __post_init__(self) -> None:
        if self.vocab_size < 2 * self.branching:
            raise DataError(f"synthetic task: vocab_size {self.vocab_size} is too small for branching {self.branching}")
        self.doc_lengths = np.asarray(self.doc_lengths, dtype=np.int64)
        if (self.doc_lengths <= 0).any():
            raise DataError("synthetic task: document lengths must be positive")
        rng = np.random.default_rng(self.seed)
        self._next = rng.integers(0, self.vocab_size, size=(self.vocab_size, self.branching))

    @classmethod
    def from_distribution(cls, vocab_size: int, source: LengthSource, n_docs: int, seed: int, max_len: int | None
                          ) -> "SyntheticTask":
        lengths = source.sample(n_docs, np.random.default_rng(seed + 1))
        if max_len is not None:
            lengths = np.minimum(lengths, max_len)
        return cls(vocab_size, np.maximum(lengths, 2), seed)

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def lengths(self) -> np.ndarray:
        return self.doc_lengths

    def document(self, index: int) -> np.ndarray:
        L = int(self.doc_lengths[index])
        rng = np.random.default_rng([self.seed, index])
        seg = min(self.copy_segment, L)
        walk = np.empty(seg, dtype=np.int64)
        walk[0] = rng.integers(0, self.vocab_size)
        choice = rng.integers(0, self.branching, size=seg)
        for t in range(1, seg):
            walk[t] = self._next[walk[t - 1], choice[t]]
        reps = -(-L // seg)
        return np.tile(walk, reps)[:L]


@dataclass
class BatchState:
    """Where the batcher is: resumable exactly."""

    epoch: int = 0
    cursor: int = 0  # next position in this epoch's shuffled order


class GlobalBatcher:
    """Global batches of whole documents by token budget, from a seeded per-epoch shuffle.

    Each batch is a list of document ids and their (truncated) lengths; every rank computes
    the same batches from the lengths alone.
    """

    def __init__(self, source: DocumentSource, batch_tokens: int, max_len: int | None, seed: int):
        if batch_tokens <= 0:
            raise DataError(f"batch_tokens must be positive, got {batch_tokens}")
        if len(source) == 0:
            raise DataError("the data source holds no documents")
        self.source, self.batch_tokens, self.max_len, self.seed = source, batch_tokens, max_len, seed
        self._lengths = np.asarray(source.lengths(), dtype=np.int64)
        if max_len is not None:
            self._lengths = np.minimum(self._lengths, max_len)
        self.state = BatchState()
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self._lengths))
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(document ids, lengths) of the next global batch; a document that would overflow
        the budget starts the next batch."""
        ids: list[int] = []
        total = 0
        while True:
            order = self._epoch_order(self.state.epoch)
            if self.state.cursor >= len(order):
                self.state = BatchState(self.state.epoch + 1, 0)
                continue
            doc = int(order[self.state.cursor])
            L = int(self._lengths[doc])
            if ids and total + L > self.batch_tokens:
                break
            ids.append(doc)
            total += L
            self.state = BatchState(self.state.epoch, self.state.cursor + 1)
        arr = np.array(ids, dtype=np.int64)
        return arr, self._lengths[arr]

    def read(self, doc_ids) -> list[np.ndarray]:
        """The tokens of these documents (truncated like their lengths): what a rank's group needs."""
        out = []
        for i in doc_ids:
            doc = self.source.document(int(i))
            out.append(doc[: self.max_len] if self.max_len is not None else doc)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "cursor": self.state.cursor, "seed": self.seed,
                "batch_tokens": self.batch_tokens, "max_len": self.max_len, "documents": len(self._lengths)}

    def load_state_dict(self, d: dict) -> None:
        for key in ("seed", "batch_tokens", "max_len", "documents"):
            mine = self.state_dict()[key]
            if d.get(key) != mine:
                raise DataError(f"data position was saved with {key}={d.get(key)}, this run has {key}={mine}")
        self.state = BatchState(int(d["epoch"]), int(d["cursor"]))
