"""Variable-length token data: sources of documents and the global batcher.

A `DocumentSource` knows every document's length cheaply and returns a document's tokens
on demand, so every rank can compute the same global batch (from lengths alone) and read
only the documents its plan gives it. Two real sources:

* `SyntheticTask`: documents with learnable structure, generated from (seed, index) on
  demand; lengths from the planner's length distributions or a length file;
* `TokenFile`: pre-tokenized data as Megatron-style datasets lay it out: a flat token file
  (`PREFIX.bin`) and document offsets (`PREFIX.idx`), memory-mapped.

`GlobalBatcher` cuts a seeded shuffle of the documents into global batches by a token
budget, truncating documents to max_len, and can save and restore its position.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pliant.planner.io import atomic_write_bytes
from pliant.planner.lengths import LengthSource


class DataError(ValueError):
    """Data that cannot be used; the message says which file and what is wrong."""


class DocumentSource(Protocol):
    vocab_size: int

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
class TokenFile:
    """Memory-mapped pre-tokenized documents: PREFIX.bin (flat tokens) + PREFIX.idx (JSON
    header line, then n+1 little-endian int64 document offsets into the flat tokens)."""

    prefix: Path
    vocab_size: int
    tokens: np.ndarray  # memmap
    offsets: np.ndarray

    @classmethod
    def open(cls, prefix: str | Path) -> "TokenFile":
        prefix = Path(prefix)
        bin_path, idx_path = prefix.with_suffix(".bin"), prefix.with_suffix(".idx")
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise DataError(f"token file {p} does not exist")
        raw = idx_path.read_bytes()
        try:
            head_end = raw.index(b"\n")
            header = json.loads(raw[:head_end])
            dtype = np.dtype(header["dtype"])
            n_docs, vocab = int(header["documents"]), int(header["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{idx_path}: unreadable header ({e}); expected a JSON line with dtype, documents, "
                            f"vocab_size") from None
        offsets = np.frombuffer(raw[head_end + 1:], dtype="<i8")
        if len(offsets) != n_docs + 1:
            raise DataError(f"{idx_path}: header says {n_docs} documents but holds {len(offsets)} offsets "
                            f"(expected {n_docs + 1})")
        n_tokens = bin_path.stat().st_size // dtype.itemsize
        if bin_path.stat().st_size % dtype.itemsize:
            raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes is not a whole number of {dtype} tokens")
        if offsets[0] != 0 or (np.diff(offsets) <= 0).any():
            raise DataError(f"{idx_path}: offsets must start at 0 and increase (every document non-empty)")
        if offsets[-1] != n_tokens:
            raise DataError(f"{idx_path}: offsets end at token {int(offsets[-1])}, but {bin_path} holds {n_tokens} "
                            f"tokens: the offsets disagree with the token file's length")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        return cls(prefix, vocab, tokens, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, index: int) -> np.ndarray:
        doc = np.asarray(self.tokens[self.offsets[index]:self.offsets[index + 1]], dtype=np.int64)
        if len(doc) and (doc.max() >= self.vocab_size or doc.min() < 0):
            raise DataError(f"{self.prefix}: document {index} has token ids outside [0, {self.vocab_size})")
        return doc


def write_token_file(prefix: str | Path, documents: list[np.ndarray], vocab_size: int) -> Path:
    """Write documents as PREFIX.bin + PREFIX.idx (atomically, .bin first)."""
    prefix = Path(prefix)
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")
    flat = np.concatenate([np.asarray(d) for d in documents]).astype(dtype)
    offsets = np.zeros(len(documents) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([len(d) for d in documents])
    atomic_write_bytes(prefix.with_suffix(".bin"), flat.tobytes())
    header = json.dumps({"dtype": dtype.str, "documents": len(documents), "vocab_size": vocab_size}).encode()
    atomic_write_bytes(prefix.with_suffix(".idx"), header + b"\n" + offsets.tobytes())
    return prefix


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
