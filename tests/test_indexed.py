"""Megatron's indexed dataset format: pliant reads what megatron-core writes and megatron-core
reads what pliant writes, token for token; every malformed file is refused with the file and
the reason; a write that does not finish leaves nothing a reader would load."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pliant.runtime.indexed import MAGIC, IndexedTokensWriter, bin_path, idx_path, optimal_dtype
from pliant.runtime.data import DataError, IndexedTokens, write_indexed

import torch

from megatron_oracle import mcore, needs_megatron


def _random_docs(n: int, vocab: int, seed: int = 0, max_len: int = 300) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]


# ------------------------------------------------------------------ interop with megatron-core


@needs_megatron
@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 50_000), (np.int32, 200_000)])
def test_reads_what_megatron_writes(tmp_path, dtype, vocab):
    docs = _random_docs(40, vocab, seed=1)
    prefix = str(tmp_path / "mcore")
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")

    src = IndexedTokens.open(prefix, vocab_size=vocab)
    assert src.dtype == np.dtype(dtype) and len(src) == len(docs)
    assert src.lengths().tolist() == [len(d) for d in docs]
    for i, d in enumerate(docs):
        assert np.array_equal(src.document(i), d)


@needs_megatron
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # megatron's numpy.array(tensor)
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_documents_of_several_sequences_are_concatenated(tmp_path, dtype):
    """Megatron's sentence-split datasets: a document is several sequences."""
    rng = np.random.default_rng(2)
    prefix = str(tmp_path / "sentences")
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    docs, seq_lengths = [], []
    for n_seq in (1, 3, 2, 5, 1):
        seqs = [rng.integers(0, 1000, size=int(rng.integers(1, 20))) for _ in range(n_seq)]
        builder.add_document(torch.from_numpy(np.concatenate(seqs)), [len(s) for s in seqs])
        docs.append(np.concatenate(seqs))
        seq_lengths += [len(s) for s in seqs]
    builder.finalize(prefix + ".idx")

    src = IndexedTokens.open(prefix, vocab_size=1000)
    assert len(src) == 5 and src.n_sequences == 12 and src.sequence_lengths.tolist() == seq_lengths
    assert src.lengths().tolist() == [len(d) for d in docs]
    for i, d in enumerate(docs):
        assert np.array_equal(src.document(i), d)


@needs_megatron
def test_non_contiguous_sequences_are_read_by_their_pointers(tmp_path):
    """The format allows any pointers; pliant follows them rather than assuming packing."""
    prefix = tmp_path / "holes"
    data = np.arange(10, dtype="<u2")  # sequences at tokens [6, 9), [0, 4), [4, 6) and token 9 unused
    bin_path(prefix).write_bytes(data.tobytes())
    _write_idx(prefix, 8, lengths=[3, 4, 2, 1], pointers=[12, 0, 8, 18], doc_idx=[0, 2, 4])
    src = IndexedTokens.open(prefix, vocab_size=10)
    assert src.document(0).tolist() == [6, 7, 8, 0, 1, 2, 3] and src.document(1).tolist() == [4, 5, 9]
    ds = mcore.IndexedDataset(str(prefix))
    assert np.concatenate([ds[0], ds[1]]).tolist() == src.document(0).tolist()


@needs_megatron
@pytest.mark.parametrize("vocab", [32_000, 150_000])
def test_megatron_reads_what_pliant_writes(tmp_path, vocab):
    docs = _random_docs(50, vocab, seed=3)
    prefix = write_indexed(tmp_path / "pliant", docs, vocab_size=vocab)
    ds = mcore.IndexedDataset(str(prefix))
    assert ds.index.dtype == optimal_dtype(vocab).type == mcore.DType.optimal_dtype(vocab)
    assert len(ds) == len(docs)
    assert ds.sequence_lengths.tolist() == [len(d) for d in docs]
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
    assert np.array_equal(ds.get(7, offset=1, length=3), docs[7][1:4])


@needs_megatron
def test_batched_writes_equal_one_by_one(tmp_path):
    docs = _random_docs(30, 5000, seed=4)
    with IndexedTokensWriter(tmp_path / "batched", np.uint16) as w:
        w.add_documents([len(d) for d in docs[:10]], np.concatenate(docs[:10]))
        w.add_document(docs[10])
        w.add_documents(np.array([len(d) for d in docs[11:]]), np.concatenate(docs[11:]).astype(np.int32))
    write_indexed(tmp_path / "single", docs, vocab_size=5000)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"batched{suffix}").read_bytes() == (tmp_path / f"single{suffix}").read_bytes()
    ds = mcore.IndexedDataset(str(tmp_path / "batched"))
    assert all(np.array_equal(ds[i], d) for i, d in enumerate(docs))


@needs_megatron
def test_multimodal_indexes_are_refused(tmp_path):
    prefix = str(tmp_path / "mm")
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16, multimodal=True)
    builder.add_item(torch.tensor([1, 2, 3]), mode=1)
    builder.end_document()
    builder.finalize(prefix + ".idx")
    with pytest.raises(DataError, match=r"mm.idx: .*per-sequence modes \(a multimodal dataset\)"):
        IndexedTokens.open(prefix)


# ------------------------------------------------------------------ malformed files


def _write_idx(prefix, code, lengths, pointers, doc_idx, *, magic=MAGIC, version=1, n_seq=None, n_doc=None,
               extra=b""):
    head = struct.pack("<9sQBQQ", magic, version, code, len(lengths) if n_seq is None else n_seq,
                       len(doc_idx) if n_doc is None else n_doc)
    body = (np.asarray(lengths, "<i4").tobytes() + np.asarray(pointers, "<i8").tobytes()
            + np.asarray(doc_idx, "<i8").tobytes())
    idx_path(prefix).write_bytes(head + body + extra)


def _good(tmp_path):
    """Two documents, [1, 2, 3] and [4, 5], as uint16 (code 8)."""
    prefix = tmp_path / "c"
    bin_path(prefix).write_bytes(np.array([1, 2, 3, 4, 5], "<u2").tobytes())
    _write_idx(prefix, 8, [3, 2], [0, 6], [0, 1, 2])
    return prefix


BAD_INDEXES = {
    "magic": (dict(magic=b"NOTANIDX\x00"), r"c.idx: not a Megatron indexed dataset index: it starts with "
                                           r"b'NOTANIDX\\x00', expected b'MMIDIDX\\x00\\x00'"),
    "version": (dict(version=2), r"c.idx: index version 2; pliant reads version 1"),
    "dtype code": (dict(code=9), r"c.idx: unknown dtype code 9; Megatron's codes are 1 uint8, .* 8 uint16"),
    "float dtype": (dict(code=7), r"c.idx: dtype code 7 is float32; token ids must be integers"),
    "sequence count": (dict(n_seq=3), r"c.idx: the header counts 3 sequences and 3 document indices, which take "
                                      r"94 bytes, but the file has 82 bytes"),
    "document count": (dict(n_doc=2), r"c.idx: the header counts 2 sequences and 2 document indices, which take "
                                      r"74 bytes, but the file has 82 bytes"),
    "trailing bytes": (dict(extra=b"\x00" * 5), r"which take 82 bytes, but the file has 87 bytes"),
    "no document indices": (dict(lengths=[], pointers=[], doc_idx=[]), r"c.idx: no document indices"),
    "doc start": (dict(doc_idx=[1, 1, 2]), r"c.idx: document indices start at 1, not 0"),
    "doc decrease": (dict(doc_idx=[0, 2, 1]), r"c.idx: document indices decrease at document 1 \(2 -> 1\)"),
    "doc end": (dict(doc_idx=[0, 1, 1]), r"c.idx: document indices end at sequence 1, but the index holds 2 "
                                         r"sequences"),
    "empty doc (no sequences)": (dict(lengths=[3, 2], pointers=[0, 6], doc_idx=[0, 0, 2]),
                                 r"c.idx: document 0 is empty \(sequences 0..0 hold no tokens\)"),
    "empty doc at the end": (dict(doc_idx=[0, 2, 2]), r"c.idx: document 1 is empty \(sequences 2..2 hold no tokens\)"),
    "negative length": (dict(lengths=[3, -2]), r"c.idx: sequence 1 has negative length -2"),
    "pointer past the end": (dict(pointers=[0, 8]), r"c.idx: sequence 1 \(byte pointer 8, 2 tokens of 2 bytes\) "
                                                    r"does not lie within .*c.bin, which has 10 bytes"),
    "length past the end": (dict(lengths=[3, 3]), r"sequence 1 .* does not lie within .*: the index disagrees with "
                                                  r"the .bin file's length"),
    "odd pointer": (dict(pointers=[0, 5]), r"sequence 1 \(byte pointer 5"),
    "short of the end": (dict(lengths=[3, 1]), r"c.idx: the sequences end at byte 8, but .*c.bin has 10 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_malformed_indexes_are_refused(tmp_path, case):
    prefix = _good(tmp_path)
    assert IndexedTokens.open(prefix).lengths().tolist() == [3, 2]
    args = dict(code=8, lengths=[3, 2], pointers=[0, 6], doc_idx=[0, 1, 2])
    kwargs, match = BAD_INDEXES[case]
    args.update(kwargs)
    _write_idx(prefix, args.pop("code"), args.pop("lengths"), args.pop("pointers"), args.pop("doc_idx"), **args)
    with pytest.raises(DataError, match=match):
        IndexedTokens.open(prefix)


def test_empty_sequences_make_an_empty_document(tmp_path):
    prefix = _good(tmp_path)
    bin_path(prefix).write_bytes(np.array([1, 2, 3], "<u2").tobytes())
    _write_idx(prefix, 8, [3, 0], [0, 6], [0, 1, 2])
    with pytest.raises(DataError, match=r"document 1 is empty \(sequences 1..2 hold no tokens\)"):
        IndexedTokens.open(prefix)


def test_bin_file_mismatches_are_refused(tmp_path):
    prefix = _good(tmp_path)
    with open(bin_path(prefix), "ab") as f:
        f.write(np.zeros(4, "<u2").tobytes())
    with pytest.raises(DataError, match=r"the sequences end at byte 10, but .*c.bin has 18 bytes: the index "
                                        r"disagrees with the .bin file's length"):
        IndexedTokens.open(prefix)
    bin_path(prefix).write_bytes(np.array([1, 2, 3, 4], "<u2").tobytes())
    with pytest.raises(DataError, match=r"sequence 1 .*does not lie within .*c.bin, which has 8 bytes"):
        IndexedTokens.open(prefix)
    bin_path(prefix).write_bytes(b"\x01" * 11)
    with pytest.raises(DataError, match=r"c.bin: 11 bytes is not a whole number of uint16 tokens"):
        IndexedTokens.open(prefix)


def test_missing_and_short_files_are_named(tmp_path):
    prefix = _good(tmp_path)
    with pytest.raises(DataError, match=r"indexed dataset file .*nope.idx does not exist"):
        IndexedTokens.open(tmp_path / "nope")
    with pytest.raises(DataError, match=r"c.bin.idx does not exist \(give the prefix, without .bin/.idx\)"):
        IndexedTokens.open(tmp_path / "c.bin")
    bin_path(prefix).unlink()
    with pytest.raises(DataError, match=r"indexed dataset file .*c.bin does not exist"):
        IndexedTokens.open(prefix)
    prefix = _good(tmp_path)
    idx_path(prefix).write_bytes(MAGIC + b"\x01")
    with pytest.raises(DataError, match=r"c.idx: 10 bytes is too short for the 34-byte header"):
        IndexedTokens.open(prefix)


def test_out_of_vocabulary_tokens_name_the_document(tmp_path):
    prefix = write_indexed(tmp_path / "v", [np.array([1, 2]), np.array([3, 4, 1000])], vocab_size=2000)
    src = IndexedTokens.open(prefix, vocab_size=1000)
    src.document(0)
    with pytest.raises(DataError, match=r"v.bin: document 1 has token id 1000 outside the vocabulary \[0, 1000\)"):
        src.document(1)
    with pytest.raises(IndexError):
        src.document(2)


def test_prefixes_keep_their_dots(tmp_path):
    prefix = write_indexed(tmp_path / "wiki.en_text_document", [np.array([1, 2])], vocab_size=10)
    assert (tmp_path / "wiki.en_text_document.bin").is_file() and (tmp_path / "wiki.en_text_document.idx").is_file()
    assert IndexedTokens.open(prefix).document(0).tolist() == [1, 2]


def test_empty_dataset_round_trips(tmp_path):
    prefix = write_indexed(tmp_path / "none", [], vocab_size=10)
    assert len(IndexedTokens.open(prefix)) == 0


# ------------------------------------------------------------------ the writer's contract


@pytest.mark.parametrize("call, match", [
    (lambda w: w.add_document(np.array([], dtype=np.int64)),
     r"w: document 1 is empty; every document needs at least one token"),
    (lambda w: w.add_document(np.array([1, -1])), r"token id -1 does not fit uint16"),
    (lambda w: w.add_document(np.array([1, 70_000])), r"token id 70000 does not fit uint16"),
    (lambda w: w.add_document(np.array([1.5])), r"token ids must be integers"),
    (lambda w: w.add_documents([2, 2], np.arange(3)), r"the lengths add up to 4 tokens but 3 were given"),
])
def test_writer_refuses_bad_documents_and_leaves_nothing(tmp_path, call, match):
    with pytest.raises(DataError, match=match):
        with IndexedTokensWriter(tmp_path / "w", np.uint16) as w:
            w.add_document([1, 2, 3])
            call(w)
    assert os.listdir(tmp_path) == []


def test_writer_dtype_must_be_megatron_integer(tmp_path):
    with pytest.raises(DataError, match="token dtype float32 is not one of Megatron's integer dtypes"):
        IndexedTokensWriter(tmp_path / "w", np.float32)
    with pytest.raises(DataError, match="uint32 is not one of"):
        IndexedTokensWriter(tmp_path / "w", np.uint32)


def test_write_indexed_checks_the_vocabulary(tmp_path):
    with pytest.raises(DataError, match=r"document 1 has token ids outside \[0, 10\)"):
        write_indexed(tmp_path / "x", [np.array([1]), np.array([10])], vocab_size=10)
    assert os.listdir(tmp_path) == []


def test_exception_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with IndexedTokensWriter(tmp_path / "k", np.int32) as w:
            w.add_document(np.arange(1000))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_crash_mid_write_leaves_nothing_loadable(tmp_path):
    """A process killed while writing leaves only hidden temporary files, never PREFIX.bin/.idx."""
    script = textwrap.dedent(f"""
        import os, numpy as np
        from pliant.runtime.indexed import IndexedTokensWriter
        w = IndexedTokensWriter({str(tmp_path / 'crash')!r}, np.uint16).__enter__()
        for _ in range(100):
            w.add_document(np.arange(1000) % 500)
        w._bin.flush()
        os._exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    left = os.listdir(tmp_path)
    assert left and all(name.startswith(".crash.") and name.endswith(".tmp") for name in left)
    with pytest.raises(DataError, match="does not exist"):
        IndexedTokens.open(tmp_path / "crash")


def test_failure_between_the_renames_never_pairs_old_and_new(tmp_path, monkeypatch):
    """Overwriting a dataset: if the new .idx never lands, the old .idx must not pair with the new .bin."""
    prefix = write_indexed(tmp_path / "d", [np.array([1, 2, 3])], vocab_size=10)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_indexed(prefix, [np.array([4, 5]), np.array([6])], vocab_size=10)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(DataError, match=r"d.idx does not exist"):
        IndexedTokens.open(prefix)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
