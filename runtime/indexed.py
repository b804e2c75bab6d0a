"""Megatron's indexed dataset format, read and written with numpy alone.

Most long-context corpora are already tokenized in this format (Megatron-LM's
`preprocess_data.py`, NeMo, GPT-NeoX, OLMo), so pliant reads it as it is and writes it
when it tokenizes corpora itself; megatron-core is only the test oracle, never imported
here. A dataset is two files beside a prefix:

* `PREFIX.bin`: every sequence's tokens, back to back, in one integer dtype;
* `PREFIX.idx`: the header `MMIDIDX\\x00\\x00`, version 1 (`<Q`), the dtype code (`<B`),
  the sequence count S (`<Q`) and the document-index count D (`<Q`), then S int32
  sequence lengths (tokens), S int64 sequence byte pointers into the .bin, and D int64
  document indices: document k is sequences [doc_idx[k], doc_idx[k+1]), so doc_idx starts
  at 0 and ends at S. Multimodal datasets append S int8 sequence modes; pliant reads text.

A pliant document (what the planner places and attention never crosses) is a Megatron
document. It is usually one sequence; datasets split into sentences hold several, which
pliant concatenates.
"""
from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import numpy as np

from pliant.planner.errors import InputError
from pliant.io import fsync_dir


class DataError(InputError):
    """Data that cannot be used; the message says which file and what is wrong.

    Defined in this lowest data module (it imports only the planner's file helpers);
    `pliant.runtime.data` re-exports it as the one error class of the data layer."""


MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count: 34 bytes

# Megatron's DType codes (megatron.core.datasets.indexed_dataset.DType)
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<u1"), 2: np.dtype("<i1"), 3: np.dtype("<i2"), 4: np.dtype("<i4"), 5: np.dtype("<i8"),
    6: np.dtype("<f8"), 7: np.dtype("<f4"), 8: np.dtype("<u2"),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
_MAX_SEQUENCE = np.iinfo(np.int32).max  # lengths are int32 in the index


def bin_path(prefix: str | Path) -> Path:
    """PREFIX.bin: appended, as Megatron does, so prefixes with dots keep them."""
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def optimal_dtype(vocab_size: int | None) -> np.dtype:
    """Megatron's `DType.optimal_dtype`: uint16 below 65500 token ids, else int32."""
    return np.dtype("<u2") if vocab_size is not None and vocab_size < 65500 else np.dtype("<i4")


def _token_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype).newbyteorder("<")
    if dt not in _CODE_OF or dt.kind not in "iu":
        raise DataError(f"token dtype {np.dtype(dtype)} is not one of Megatron's integer dtypes "
                        f"(uint8, int8, int16, int32, int64, uint16)")
    return dt


class IndexedTokens:
    """A Megatron indexed dataset, memory-mapped, as a pliant `DocumentSource`.

    `open` checks the whole index against the .bin once (vectorised), so that a corrupt or
    mismatched pair fails at start-up with the file and the reason, not hours into a run
    with a wrong slice. Token ids are checked against `vocab_size` per document read, where
    the data is touched anyway; `vocab_size=None` skips that check."""

    def __init__(self, prefix: Path, vocab_size: int | None, dtype: np.dtype, tokens: np.ndarray,
                 sequence_lengths: np.ndarray, sequence_pointers: np.ndarray, document_indices: np.ndarray,
                 doc_lengths: np.ndarray, contiguous: bool):
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.tokens = tokens  # the .bin, memory-mapped, in the file's dtype
        self.sequence_lengths = sequence_lengths  # views into the memory-mapped .idx
        self.sequence_pointers = sequence_pointers
        self.document_indices = document_indices
        self._doc_lengths = doc_lengths
        self._contiguous = contiguous  # sequences back to back from byte 0: a document is one slice

    @classmethod
    def open(cls, prefix: str | Path, vocab_size: int | None = None) -> "IndexedTokens":
        prefix = Path(prefix)
        b_path, i_path = bin_path(prefix), idx_path(prefix)
        for p in (i_path, b_path):
            if not p.is_file():
                hint = " (give the prefix, without .bin/.idx)" if prefix.suffix in (".bin", ".idx") else ""
                raise DataError(f"indexed dataset file {p} does not exist{hint}")
        if vocab_size is not None and vocab_size <= 0:
            raise DataError(f"vocab_size must be positive, got {vocab_size}")
        dtype, n_seq, n_doc_idx = _read_header(i_path)
        raw = np.memmap(i_path, dtype=np.uint8, mode="r")
        off = _HEADER.size
        seq_lengths = np.frombuffer(raw, dtype="<i4", count=n_seq, offset=off)
        seq_pointers = np.frombuffer(raw, dtype="<i8", count=n_seq, offset=off + 4 * n_seq)
        doc_idx = np.frombuffer(raw, dtype="<i8", count=n_doc_idx, offset=off + 12 * n_seq)
        _check_document_indices(i_path, doc_idx, n_seq)
        contiguous = _check_sequences(i_path, b_path, dtype, seq_lengths, seq_pointers)
        doc_lengths = _document_lengths(i_path, seq_lengths, doc_idx)
        tokens = np.memmap(b_path, dtype=dtype, mode="r") if b_path.stat().st_size else np.zeros(0, dtype=dtype)
        return cls(prefix, vocab_size, dtype, tokens, seq_lengths, seq_pointers, doc_idx, doc_lengths, contiguous)

    def __len__(self) -> int:
        return len(self._doc_lengths)

    def check_token_ids(self, chunk: int = 1 << 24) -> None:
        """Every token id of the .bin within [0, vocab_size), read in chunks of `chunk` ids (the
        job's driver runs it once before launching; documents are checked again as they are
        read). Raises DataError naming the file, the first bad id, its position and document."""
        if self.vocab_size is None or not len(self.tokens):
            return
        for start in range(0, len(self.tokens), chunk):
            part = self.tokens[start:start + chunk]
            if int(part.min()) >= 0 and int(part.max()) < self.vocab_size:
                continue
            at = start + int(np.flatnonzero((part < 0) | (part >= self.vocab_size))[0])
            byte = at * self.dtype.itemsize
            seq = int(np.searchsorted(self.sequence_pointers, byte, side="right")) - 1
            doc = int(np.searchsorted(self.document_indices, seq, side="right")) - 1
            raise DataError(f"{bin_path(self.prefix)}: token id {int(self.tokens[at])} at position {at} (document "
                            f"{doc}) is outside the model's vocabulary [0, {self.vocab_size}): the data was "
                            f"tokenized for another vocabulary")

    @property
    def n_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def lengths(self) -> np.ndarray:
        """Tokens per document (int64)."""
        return self._doc_lengths

    def document(self, index: int) -> np.ndarray:
        """Document `index`'s tokens as int64 (a copy, concatenated over its sequences)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.prefix}: document {index} out of range ({n} documents)")
        index %= n
        first, last = int(self.document_indices[index]), int(self.document_indices[index + 1])
        item = self.dtype.itemsize
        if self._contiguous or last - first == 1:
            start = int(self.sequence_pointers[first]) // item
            doc = np.array(self.tokens[start:start + int(self._doc_lengths[index])], dtype=np.int64)
        else:
            doc = np.concatenate([self.tokens[int(p) // item:int(p) // item + int(L)] for p, L in
                                  zip(self.sequence_pointers[first:last], self.sequence_lengths[first:last])]
                                 ).astype(np.int64)
        if self.vocab_size is not None and (doc.min() < 0 or doc.max() >= self.vocab_size):
            bad = int(doc[(doc < 0) | (doc >= self.vocab_size)][0])
            raise DataError(f"{bin_path(self.prefix)}: document {index} has token id {bad} outside the vocabulary "
                            f"[0, {self.vocab_size}): the data was tokenized for a bigger vocabulary than the model's")
        return doc


def _read_header(i_path: Path) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence count, document-index count), after checking the header and
    that the counts account for the file's size exactly."""
    idx_size = i_path.stat().st_size
    if idx_size < _HEADER.size:
        raise DataError(f"{i_path}: {idx_size} bytes is too short for the {_HEADER.size}-byte header of a "
                        f"Megatron indexed dataset")
    with open(i_path, "rb") as f:
        magic, version, code, n_seq, n_doc_idx = _HEADER.unpack(f.read(_HEADER.size))
    if magic != MAGIC:
        raise DataError(f"{i_path}: not a Megatron indexed dataset index: it starts with {magic!r}, expected "
                        f"{MAGIC!r}")
    if version != VERSION:
        raise DataError(f"{i_path}: index version {version}; pliant reads version {VERSION}")
    if code not in DTYPE_CODES:
        raise DataError(f"{i_path}: unknown dtype code {code}; Megatron's codes are "
                        + ", ".join(f"{c} {dt.name}" for c, dt in DTYPE_CODES.items()))
    dtype = DTYPE_CODES[code]
    if dtype.kind == "f":
        raise DataError(f"{i_path}: dtype code {code} is {dtype.name}; token ids must be integers")
    expected = _HEADER.size + 12 * n_seq + 8 * n_doc_idx
    if idx_size == expected + n_seq and n_seq > 0:
        raise DataError(f"{i_path}: the index carries per-sequence modes (a multimodal dataset); pliant reads "
                        f"text-only datasets")
    if idx_size != expected:
        raise DataError(f"{i_path}: the header counts {n_seq} sequences and {n_doc_idx} document indices, "
                        f"which take {expected} bytes, but the file has {idx_size} bytes")
    if n_doc_idx < 1:
        raise DataError(f"{i_path}: no document indices (even an empty dataset has the leading 0)")
    return dtype, n_seq, n_doc_idx


def _check_document_indices(i_path: Path, doc_idx: np.ndarray, n_seq: int) -> None:
    if doc_idx[0] != 0:
        raise DataError(f"{i_path}: document indices start at {int(doc_idx[0])}, not 0")
    steps = np.diff(doc_idx)
    if (steps < 0).any():
        k = int(np.argmax(steps < 0))
        raise DataError(f"{i_path}: document indices decrease at document {k} ({int(doc_idx[k])} -> "
                        f"{int(doc_idx[k + 1])})")
    if doc_idx[-1] != n_seq:
        raise DataError(f"{i_path}: document indices end at sequence {int(doc_idx[-1])}, but the index holds "
                        f"{n_seq} sequences")


def _check_sequences(i_path: Path, b_path: Path, dtype: np.dtype, lengths: np.ndarray, pointers: np.ndarray
                     ) -> bool:
    """Every sequence lies within the .bin and the last one ends where the .bin does.
    Returns whether the sequences lie back to back from byte 0 (then a document is one slice)."""
    item = dtype.itemsize
    bin_size = b_path.stat().st_size
    if bin_size % item:
        raise DataError(f"{b_path}: {bin_size} bytes is not a whole number of {dtype.name} tokens")
    lengths64 = lengths.astype(np.int64)
    if (lengths64 < 0).any():
        k = int(np.argmax(lengths64 < 0))
        raise DataError(f"{i_path}: sequence {k} has negative length {int(lengths64[k])}")
    ends = pointers + lengths64 * item
    bad = (pointers < 0) | (pointers % item != 0) | (ends > bin_size)
    if bad.any():
        k = int(np.argmax(bad))
        raise DataError(f"{i_path}: sequence {k} (byte pointer {int(pointers[k])}, {int(lengths64[k])} tokens of "
                        f"{item} bytes) does not lie within {b_path}, which has {bin_size} bytes: the index "
                        f"disagrees with the .bin file's length")
    data_end = int(ends.max()) if len(ends) else 0
    if data_end != bin_size:
        raise DataError(f"{i_path}: the sequences end at byte {data_end}, but {b_path} has {bin_size} bytes: the "
                        f"index disagrees with the .bin file's length")
    return bool(len(ends) == 0 or (pointers[0] == 0 and np.array_equal(pointers[1:], ends[:-1])))


def _document_lengths(i_path: Path, seq_lengths: np.ndarray, doc_idx: np.ndarray) -> np.ndarray:
    """Tokens per document (int64); an error naming the first empty document."""
    n_docs = len(doc_idx) - 1
    if n_docs == 0:
        return np.zeros(0, dtype=np.int64)
    # a trailing 0 keeps every start index in range (documents at the end may be empty)
    doc_lengths = np.add.reduceat(np.append(seq_lengths.astype(np.int64), 0), doc_idx[:-1])
    doc_lengths[np.diff(doc_idx) == 0] = 0  # reduceat gives the next element for an empty range
    if (doc_lengths == 0).any():
        k = int(np.argmax(doc_lengths == 0))
        raise DataError(f"{i_path}: document {k} is empty (sequences {int(doc_idx[k])}..{int(doc_idx[k + 1])} "
                        f"hold no tokens)")
    return doc_lengths


class IndexedTokensWriter:
    """Writes a Megatron indexed dataset (one sequence per document), atomically.

    Tokens stream into a hidden temporary .bin beside the prefix as they come (no per-token
    Python work: each call writes one numpy buffer); only the int32 lengths stay in memory.
    On success the .bin is renamed into place first and the .idx last (after removing any
    old .idx), so a crash at any point leaves no PREFIX.bin/.idx pair a reader would load;
    on an exception both temporary files are removed.

        with IndexedTokensWriter(prefix, np.uint16) as w:
            w.add_document(tokens)
            w.add_documents(lengths, flat)  # many documents in one call
    """

    def __init__(self, prefix: str | Path, dtype=np.int32):
        self.prefix = Path(prefix)
        self.dtype = _token_dtype(dtype)
        self._lengths: list[np.ndarray] = []
        self.n_documents = 0
        self.n_tokens = 0
        self._bin = None
        self._tmp: list[Path] = []
        self._made_dirs: list[Path] = []
        self.closed = False

    def __enter__(self) -> "IndexedTokensWriter":
        self._open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        if self._bin is not None or self.closed:
            return
        parent = self.prefix.parent
        self._made_dirs = [d for d in (parent, *parent.parents) if not d.exists()]  # removed again on abort
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{self.prefix.name}.bin.", suffix=".tmp")
        self._tmp.append(Path(tmp))
        self._bin = os.fdopen(fd, "wb", buffering=1 << 22)

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        self.add_documents(np.array([arr.size], dtype=np.int64), arr.reshape(-1))

    def add_documents(self, lengths, flat) -> None:
        """Append len(lengths) documents whose tokens lie back to back in `flat`."""
        if self.closed:
            raise DataError(f"{self.prefix}: the writer is already closed")
        self._open()
        lengths = np.asarray(lengths)
        flat = np.asarray(flat)
        if lengths.ndim != 1 or flat.ndim != 1:
            raise DataError(f"{self.prefix}: lengths and tokens must be 1-d arrays")
        if len(lengths) == 0:
            return
        if flat.size and flat.dtype.kind not in "iu":
            raise DataError(f"{self.prefix}: token ids must be integers, got {flat.dtype}")
        if lengths.min() <= 0:
            raise DataError(f"{self.prefix}: document {self.n_documents + int(np.argmax(lengths <= 0))} is empty; "
                            f"every document needs at least one token")
        if lengths.max() > _MAX_SEQUENCE:
            raise DataError(f"{self.prefix}: a document of {int(lengths.max())} tokens exceeds the format's int32 "
                            f"sequence length")
        if int(lengths.sum()) != flat.size:
            raise DataError(f"{self.prefix}: the lengths add up to {int(lengths.sum())} tokens but {flat.size} "
                            f"were given")
        if flat.dtype.newbyteorder("<") != self.dtype:
            info = np.iinfo(self.dtype)
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi > info.max:
                raise DataError(f"{self.prefix}: token id {lo if lo < 0 else hi} does not fit {self.dtype.name} "
                                f"(token ids must lie in [0, {info.max}])")
            flat = flat.astype(self.dtype)
        self._bin.write(memoryview(np.ascontiguousarray(flat)).cast("B"))
        self._lengths.append(lengths.astype("<i4"))
        self.n_documents += len(lengths)
        self.n_tokens += flat.size

    def document_lengths(self) -> np.ndarray:
        """Tokens per document written so far (int32, as the index stores them)."""
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype="<i4")

    def close(self) -> Path:
        """Finish: write the index and move both files into place. Returns the prefix."""
        if self.closed:
            return self.prefix
        self._open()
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            lengths = self.document_lengths()
            pointers = np.zeros(len(lengths), dtype="<i8")
            np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
            pointers *= self.dtype.itemsize
            doc_idx = np.arange(len(lengths) + 1, dtype="<i8")
            fd, tmp = tempfile.mkstemp(dir=self.prefix.parent, prefix=f".{self.prefix.name}.idx.", suffix=".tmp")
            self._tmp.append(Path(tmp))
            with os.fdopen(fd, "wb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], len(lengths), len(doc_idx)))
                for arr in (lengths, pointers, doc_idx):
                    f.write(memoryview(arr).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            # a stale .idx must never pair with the new .bin, even for the instant between the renames
            idx_path(self.prefix).unlink(missing_ok=True)
            os.replace(self._tmp[0], bin_path(self.prefix))
            os.replace(self._tmp[1], idx_path(self.prefix))
            self._tmp.clear()
            fsync_dir(self.prefix.parent)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        return self.prefix

    def abort(self) -> None:
        """Drop everything written so far: no output, no temporary files."""
        if self._bin is not None and not self._bin.closed:
            self._bin.close()
        for p in self._tmp:
            p.unlink(missing_ok=True)
        self._tmp.clear()
        for d in self._made_dirs:  # innermost first; only while empty
            try:
                d.rmdir()
            except OSError:
                break
        self._made_dirs = []
        self.closed = True


def write_indexed(prefix: str | Path, documents: Iterable, vocab_size: int | None) -> Path:
    """Write token documents as PREFIX.bin + PREFIX.idx (uint16 below 65500 ids, else int32,
    as Megatron chooses); every token must lie in [0, vocab_size). Returns the prefix."""
    with IndexedTokensWriter(prefix, optimal_dtype(vocab_size)) as w:
        for k, doc in enumerate(documents):
            doc = np.asarray(doc).reshape(-1)
            if vocab_size is not None and doc.size and (doc.min() < 0 or doc.max() >= vocab_size):
                raise DataError(f"{prefix}: document {k} has token ids outside [0, {vocab_size})")
            w.add_document(doc)
    return Path(prefix)
