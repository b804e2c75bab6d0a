"""Token data: the synthetic task, Megatron-style token files, and the global batcher."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pliant.planner import get_distribution
from pliant.runtime.data import DataError, GlobalBatcher, SyntheticTask, TokenFile, write_token_file


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


def test_token_file_round_trip(tmp_path):
    docs = [np.array([1, 2, 3]), np.array([7]), np.arange(40) % 30]
    prefix = write_token_file(tmp_path / "corpus", docs, vocab_size=30)
    tf = TokenFile.open(prefix)
    assert len(tf) == 3 and tf.lengths().tolist() == [3, 1, 40]
    for i, d in enumerate(docs):
        assert np.array_equal(tf.document(i), d)
    assert isinstance(tf.tokens, np.memmap)


def _corrupt(tmp_path, header=None, offsets=None, extra_tokens=0):
    prefix = write_token_file(tmp_path / "c", [np.array([1, 2, 3]), np.array([4, 5])], vocab_size=10)
    idx = prefix.with_suffix(".idx")
    head = {"dtype": "<u2", "documents": 2, "vocab_size": 10, **(header or {})}
    off = np.array(offsets if offsets is not None else [0, 3, 5], dtype="<i8")
    idx.write_bytes(json.dumps(head).encode() + b"\n" + off.tobytes())
    if extra_tokens:
        with open(prefix.with_suffix(".bin"), "ab") as f:
            f.write(np.zeros(extra_tokens, dtype="<u2").tobytes())
    return prefix


@pytest.mark.parametrize("kwargs, match", [
    ({"extra_tokens": 4}, "offsets end at token 5, but .* holds 9 tokens"),
    ({"offsets": [0, 3, 7]}, "offsets end at token 7"),
    ({"offsets": [0, 3]}, "header says 2 documents but holds 2 offsets"),
    ({"offsets": [0, 3, 3, 5], "header": {"documents": 3}}, "increase"),
    ({"header": {"dtype": "bogus"}}, "unreadable header"),
])
def test_bad_token_files(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        TokenFile.open(_corrupt(tmp_path, **kwargs))


def test_out_of_vocab_tokens_are_named(tmp_path):
    tf = TokenFile.open(write_token_file(tmp_path / "v", [np.array([1, 99])], vocab_size=100))
    tf.vocab_size = 50
    with pytest.raises(DataError, match="document 0 has token ids outside"):
        tf.document(0)


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
