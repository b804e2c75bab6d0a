"""Token data: the synthetic task, Megatron indexed datasets as a document source, and the
global batcher. The indexed format itself (Megatron interop, bad files) is pinned in
test_indexed.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pliant.planner import get_distribution
from pliant.runtime.data import DataError, GlobalBatcher, IndexedTokens, SyntheticTask, write_indexed


def test_synthetic_documents_are_deterministic_and_structured():
    task = SyntheticTask.from_distribution(64, get_distribution("wikipedia-synth"), 200, seed=5, max_len=2048)
    again = SyntheticTask.from_distribution(64, get_distribution("wikipedia-synth"), 200, seed=5, max_len=2048)
    assert np.array_equal(task.lengths(), again.lengths()) and task.lengths().max() <= 2048
    for i in (0, 17, 199):
        doc = task.document(i)
        assert len(doc) == task.lengths()[i] and np.array_equal(doc, again.document(i))
        assert doc.min() >= 0 and doc.max() < 64
        seg = doc[:16]
        # every step of the opening walk follows the sparse bigram graph; the rest repeats it
        assert all(b in task._next[a] for a, b in zip(seg[:-1], seg[1:]))
        assert np.array_equal(doc[16:32], seg[: len(doc[16:32])])
    assert not np.array_equal(task.document(1), task.document(2))


def test_indexed_round_trip(tmp_path):
    docs = [np.array([1, 2, 3]), np.array([7]), np.arange(40) % 30]
    prefix = write_indexed(tmp_path / "corpus", docs, vocab_size=30)
    assert (tmp_path / "corpus.bin").stat().st_size == 44 * 2  # uint16 below 65500 ids
    src = IndexedTokens.open(prefix, vocab_size=30)
    assert len(src) == 3 and src.lengths().tolist() == [3, 1, 40] and src.vocab_size == 30
    for i, d in enumerate(docs):
        assert np.array_equal(src.document(i), d) and src.document(i).dtype == np.int64
    assert isinstance(src.tokens, np.memmap)
    big = IndexedTokens.open(write_indexed(tmp_path / "big", docs, vocab_size=70_000))
    assert big.dtype == np.dtype("<i4") and np.array_equal(big.document(2), docs[2])


def test_indexed_source_feeds_the_batcher(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, size=n) for n in (5, 900, 40, 3000, 12)]
    src = IndexedTokens.open(write_indexed(tmp_path / "c", docs, vocab_size=100), vocab_size=100)
    batcher = GlobalBatcher(src, 4096, max_len=2048, seed=0)
    ids, lengths = batcher.next_batch()
    for i, doc in zip(ids, batcher.read(ids)):
        assert np.array_equal(doc, docs[i][:2048])


def test_out_of_vocab_tokens_are_named(tmp_path):
    prefix = write_indexed(tmp_path / "v", [np.array([1, 2]), np.array([1, 99])], vocab_size=100)
    src = IndexedTokens.open(prefix, vocab_size=50)
    assert np.array_equal(src.document(0), [1, 2])
    with pytest.raises(DataError, match=r"v.bin: document 1 has token id 99 outside the vocabulary \[0, 50\)"):
        src.document(1)
    assert IndexedTokens.open(prefix, vocab_size=None).document(1).tolist() == [1, 99]


def test_batcher_budget_determinism_and_resume():
    task = SyntheticTask(32, np.array([5, 900, 40, 3000, 12, 700, 64, 2048, 100] * 20), seed=1)
    a = GlobalBatcher(task, 4096, max_len=2048, seed=9)
    batches = [a.next_batch() for _ in range(12)]
    for ids, lengths in batches:
        assert lengths.sum() <= 4096 and lengths.max() <= 2048
        assert np.array_equal(lengths, np.minimum(task.lengths()[ids], 2048))
    # every document exactly once per epoch, epochs in a different order
    more = [a.next_batch()[0] for _ in range(80)]
    seen = np.concatenate([ids for ids, _ in batches] + more)
    assert len(seen) > 2 * len(task)
    assert sorted(seen[:len(task)].tolist()) == list(range(len(task)))
    assert sorted(seen[len(task):2 * len(task)].tolist()) == list(range(len(task)))
    assert not np.array_equal(seen[:len(task)], seen[len(task):2 * len(task)])
    # resume from a saved position gives the same next batches
    b = GlobalBatcher(task, 4096, max_len=2048, seed=9)
    for _ in range(5):
        b.next_batch()
    saved = b.state_dict()
    c = GlobalBatcher(task, 4096, max_len=2048, seed=9)
    c.load_state_dict(json.loads(json.dumps(saved)))
    for ids, _ in batches[5:]:
        assert np.array_equal(c.next_batch()[0], ids)
    docs = c.read([3, 7])
    assert [len(d) for d in docs] == [2048, 2048]
    with pytest.raises(DataError, match="batch_tokens=4096, this run has batch_tokens=8192"):
        GlobalBatcher(task, 8192, max_len=2048, seed=9).load_state_dict(saved)
