"""`pliant data prepare`: JSONL, JSONL.gz and Parquet corpora become exactly the tokenizer's
ids + EOS per non-empty document, in Megatron's format (read back by pliant and by
megatron-core), the same with worker processes; every bad input is refused with the file
and the place, and leaves no output and no temporary file behind."""
from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pliant.runtime.data import DataError, IndexedTokens
from pliant.runtime.prepare import prepare
from pliant.runtime.tokenizer import load_tokenizer, train_bpe_tokenizer

from megatron_oracle import mcore

WORDS = ("the planner splits every global batch into groups of different sizes and assigns each sequence to one "
         "attention never crosses a document boundary loss is normalised by the number of real tokens "
         "über naïve café 漢字 emoji 🙂 tabs\tand\nnewlines").split(" ")


def make_texts(n: int, seed: int) -> list[str]:
    """Documents of 1..200 words with a few empty and whitespace-only ones among them."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        if i % 17 == 5:
            texts.append("" if i % 2 else "  \n\t ")
            continue
        words = rng.choice(WORDS, size=int(rng.integers(1, 200)))
        texts.append(" ".join(words).capitalize() + ".")
    return texts


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(make_texts(200, seed=0), 400, d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def expected_docs(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts if t.strip()]


def write_jsonl(path, texts, key="text", gz=False):
    lines = "".join(json.dumps({"id": i, key: t, "meta": {"n": i}}, ensure_ascii=False) + "\n"
                    for i, t in enumerate(texts))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def write_parquet(path, texts, column="text"):
    pq.write_table(pa.table({"id": list(range(len(texts))), column: texts}), path, row_group_size=37)
    return path


def read_back(prefix) -> list[list[int]]:
    src = IndexedTokens.open(prefix)
    return [src.document(i).tolist() for i in range(len(src))]


def leftovers(out_dir) -> list[str] | None:
    """What a run left in its output directory; None when the directory is not there."""
    return sorted(os.listdir(out_dir)) if out_dir.exists() else None


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet"])
def test_prepare_gives_the_tokenizers_ids_plus_eos(tmp_path, tok_dir, tok, fmt):
    texts = make_texts(150, seed=1)
    path = tmp_path / f"corpus.{fmt}"
    write_parquet(path, texts) if fmt == "parquet" else write_jsonl(path, texts, gz=fmt.endswith(".gz"))
    out = tmp_path / "out" / "corpus_text_document"
    summary = prepare([path], tok_dir, out, batch_size=16, show_progress=False)

    expected = expected_docs(tok, texts)
    assert read_back(out) == expected
    n_empty = sum(1 for t in texts if not t.strip())
    assert summary["documents"] == len(expected) and summary["empty_skipped"] == n_empty > 0
    assert summary["tokens"] == sum(map(len, expected)) and summary["doc_len_max"] == max(map(len, expected))
    assert summary["dtype"] == "uint16" and summary["eos_id"] == tok.eos_token_id
    assert json.loads((tmp_path / "out" / "corpus_text_document.summary.json").read_text()) == summary
    assert leftovers(tmp_path / "out") == ["corpus_text_document.bin", "corpus_text_document.idx",
                                           "corpus_text_document.summary.json"]
    ds = mcore.IndexedDataset(str(out))  # megatron-core, a test dependency, reads it too
    assert ds.document_indices.tolist() == list(range(len(expected) + 1))
    assert [ds[i].tolist() for i in range(len(ds))] == expected


def test_several_files_in_order_and_workers_change_nothing(tmp_path, tok_dir, tok):
    a, b = make_texts(90, seed=2), make_texts(60, seed=3)
    inputs = [write_jsonl(tmp_path / "a.jsonl", a), write_parquet(tmp_path / "b.parquet", b, column="body"),
              write_jsonl(tmp_path / "c.jsonl.gz", b, key="body", gz=True)]
    one = prepare(inputs[:1], tok_dir, tmp_path / "w1", batch_size=8, show_progress=False)
    s1 = prepare(inputs[1:], tok_dir, tmp_path / "w1b", text_key="body", batch_size=8, show_progress=False)
    s2 = prepare(inputs[1:], tok_dir, tmp_path / "w2b", text_key="body", workers=2, batch_size=8,
                 show_progress=False)
    assert read_back(tmp_path / "w1") == expected_docs(tok, a)
    assert read_back(tmp_path / "w1b") == expected_docs(tok, b) * 2
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1b{suffix}").read_bytes() == (tmp_path / f"w2b{suffix}").read_bytes()
    assert {k: v for k, v in s1.items() if k not in ("seconds", "tokens_per_s", "workers", "output")} == \
        {k: v for k, v in s2.items() if k not in ("seconds", "tokens_per_s", "workers", "output")}
    assert list(s1["per_file"]) == [str(p) for p in inputs[1:]] and one["documents"] == len(expected_docs(tok, a))


def test_records_longer_than_a_block_are_read(tmp_path, tok_dir, tok, monkeypatch):
    """pyarrow parses JSON in blocks a record may not straddle; a longer one restarts the
    file with larger blocks and skips what was already handed out: nothing twice, nothing lost."""
    import pliant.runtime.corpus as prep

    texts = make_texts(60, seed=8)
    texts[40] = " ".join(texts[:30])  # ~10x longer than the others
    corpus = write_jsonl(tmp_path / "long.jsonl", texts)
    monkeypatch.setattr(prep, "JSON_BLOCK", 4096)
    prepare([corpus], tok_dir, tmp_path / "out", batch_size=4, show_progress=False)
    assert read_back(tmp_path / "out") == expected_docs(tok, texts)
    monkeypatch.setattr(prep, "JSON_BLOCK_MAX", 4096)
    _fails(tmp_path, [corpus], tok_dir, r"long.jsonl: a record is longer than 0 MB, the longest pliant reads")


def test_progress_reaches_the_end(tmp_path, tok_dir):
    seen = []
    corpus = [write_jsonl(tmp_path / "a.jsonl", make_texts(50, seed=9)),
              write_parquet(tmp_path / "b.parquet", make_texts(50, seed=10)),
              write_jsonl(tmp_path / "c.jsonl.gz", make_texts(50, seed=11), gz=True)]
    prepare(corpus, tok_dir, tmp_path / "out", batch_size=8, show_progress=False,
            on_progress=lambda frac, docs, tokens: seen.append(frac))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(set(seen)) > 5


def test_trained_tokenizer_directory(tmp_path, tok_dir, tok):
    from transformers import AutoTokenizer

    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(tok_dir))
    auto = AutoTokenizer.from_pretrained(tok_dir)
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<s>", "</s>", "<pad>")
    assert [auto.bos_token_id, auto.eos_token_id, auto.pad_token_id] == [0, 1, 2] and len(auto) <= 400
    text = "Über naïve café 漢字 🙂 tabs\tand\nnewlines, never seen: zqxj"
    ids = auto(text)["input_ids"]
    assert ids[0] == auto.bos_token_id and auto.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless
    assert tok.backend_tokenizer.encode_batch([text], add_special_tokens=True)[0].ids == ids


# ------------------------------------------------------------------ bad inputs


def _fails(tmp_path, inputs, tok_dir, match, **kw):
    out_dir = tmp_path / "out"
    with pytest.raises(DataError, match=match):
        prepare(inputs, tok_dir, out_dir / "corpus", show_progress=False, batch_size=4, **kw)
    assert leftovers(out_dir) is None  # no PREFIX.bin/.idx/.summary.json, no temporary file, not even the directory


@pytest.mark.parametrize("workers", [1, 2])
def test_a_line_that_is_not_json_names_file_and_line(tmp_path, tok_dir, workers):
    good = [json.dumps({"text": t}) for t in make_texts(30, seed=4)]
    lines = good[:12] + [""] + good[12:20] + ['{"text": "unterminated'] + good[20:]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _fails(tmp_path, [path], tok_dir, r"bad.jsonl: line 22 is not valid JSON \(Unterminated string", workers=workers)
    gz = tmp_path / "bad.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    _fails(tmp_path, [gz], tok_dir, r"bad.jsonl.gz: line 22 is not valid JSON", workers=workers)


def test_a_record_without_the_text_key_names_its_keys(tmp_path, tok_dir):
    path = tmp_path / "nokey.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n\n{"content": "x", "id": 3}\n{"text": "z"}\n')
    _fails(tmp_path, [path], tok_dir, r"nokey.jsonl: line 4: the record has no key 'text' \(its keys: 'content', "
                                      r"'id'\)")


def test_non_string_texts_name_the_line_or_row(tmp_path, tok_dir):
    path = tmp_path / "num.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 12}\n')
    _fails(tmp_path, [path], tok_dir, r"num.jsonl: line 2: 'text' is int, not a string")
    path.write_text('{"text": "fine"}\n{"text": null}\n')
    _fails(tmp_path, [path], tok_dir, r"num.jsonl: line 2: 'text' is null, not a string")
    path.write_text('{"text": "fine"}\n["text"]\n')
    _fails(tmp_path, [path], tok_dir, r"num.jsonl: line 2 is a JSON list, not an object")
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), tmp_path / "null.parquet", row_group_size=2)
    _fails(tmp_path, [tmp_path / "null.parquet"], tok_dir, r"null.parquet: row 3: 'text' is null, not a string")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    _fails(tmp_path, [tmp_path / "ints.parquet"], tok_dir, r"ints.parquet: column 'text' holds int64, not strings")


def test_a_parquet_file_without_the_column_names_its_columns(tmp_path, tok_dir):
    path = write_parquet(tmp_path / "nocol.parquet", ["a b c", "d e"], column="content")
    _fails(tmp_path, [path], tok_dir, r"nocol.parquet: no column 'text' \(its columns: 'id', 'content'\)")


def test_an_error_in_a_later_file_leaves_nothing(tmp_path, tok_dir):
    good = write_jsonl(tmp_path / "good.jsonl", make_texts(40, seed=5))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{oops}\n')
    _fails(tmp_path, [good, bad], tok_dir, r"bad.jsonl: line 2 is not valid JSON")
    _fails(tmp_path, [good, tmp_path / "missing.jsonl"], tok_dir, r"input file .*missing.jsonl does not exist")
    (tmp_path / "x.csv").write_text("text\nhello\n")
    _fails(tmp_path, [tmp_path / "x.csv"], tok_dir, r"x.csv: unknown input format")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    _fails(tmp_path, [empty], tok_dir, r"no non-empty documents in .*empty.jsonl \(2 empty records skipped\)")


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, tok_dir, tok):
    model_dir = tmp_path / "model"
    shutil.copytree(tok_dir, model_dir)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 300}))
    corpus = write_jsonl(tmp_path / "c.jsonl", make_texts(10, seed=6))
    _fails(tmp_path, [corpus], model_dir, rf"model: the tokenizer has {len(tok)} tokens but config.json's "
                                          rf"vocab_size is 300")
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(tok)}))
    assert prepare([corpus], model_dir, tmp_path / "ok", show_progress=False)["vocab_size"] == len(tok)


def test_a_directory_without_a_tokenizer_is_named(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["hello"])
    (tmp_path / "empty_dir").mkdir()
    _fails(tmp_path, [corpus], tmp_path / "empty_dir", r"empty_dir holds no tokenizer files")
    _fails(tmp_path, [corpus], tmp_path / "no_dir", r"tokenizer directory .*no_dir does not exist")


def test_a_tokenizer_without_eos_is_refused(tmp_path, tok_dir):
    no_eos = tmp_path / "no_eos"
    shutil.copytree(tok_dir, no_eos)
    cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (no_eos / "tokenizer_config.json").write_text(json.dumps(cfg))
    (no_eos / "special_tokens_map.json").unlink()
    if load_tokenizer(no_eos).eos_token_id is not None:
        pytest.skip("this transformers version restores the EOS token from elsewhere")
    _fails(tmp_path, [write_jsonl(tmp_path / "c.jsonl", ["hello"])], no_eos, r"no_eos: the tokenizer has no EOS token")


# ------------------------------------------------------------------ the command


def test_the_command_prints_a_summary_and_errors_cleanly(tmp_path, tok_dir, tok, capsys):
    from pliant.launch.cli import main as cli

    texts = make_texts(40, seed=7)
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    args = ["data", "prepare", "--input", str(corpus), "--tokenizer", str(tok_dir),
            "--out", str(tmp_path / "data" / "c")]
    assert cli(args) == 0
    out = capsys.readouterr()
    assert "documents" in out.out and "tokens/s" in out.out and "empty documents skipped" in out.out
    assert "p99" in out.out and "wrote" in out.out
    assert "100.0% of the input" in out.err  # progress as log lines when stderr is not a terminal
    assert read_back(tmp_path / "data" / "c") == expected_docs(tok, texts)
    corpus.write_text('{"text": "a"}\nnot json\n')
    assert cli(args + ["--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "pliant: error:" in err and "c.jsonl: line 2 is not valid JSON" in err and "Traceback" not in err
    assert read_back(tmp_path / "data" / "c") == expected_docs(tok, texts)  # the failed run left the old output


def test_sample_corpus_and_the_benchmark_smoke(tmp_path, tok_dir, tok):
    """`pliant data sample-corpus` writes prose JSONL that prepare reads; `bench prepare` runs
    end to end on a tiny corpus and checks prepare's tokens against encode_batch's."""
    from pliant.bench.prepare_bench import run
    from pliant.launch.cli import main as cli

    assert cli(["data", "sample-corpus", "--out", str(tmp_path / "s.jsonl"), "--mb", "0.2"]) == 0
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    texts = [json.loads(x)["text"] for x in lines]
    assert 30 < len(texts) and sum(map(len, texts)) > 150_000 and any(len(t) > 3000 for t in texts)
    prepare([tmp_path / "s.jsonl"], tok_dir, tmp_path / "s", show_progress=False)
    assert read_back(tmp_path / "s")[:20] == expected_docs(tok, texts)[:20]

    result = run(tmp_path / "bench.json", mb=0.2, workers=(1, 2), repeats=1, vocab_size=600, work_dir=tmp_path)
    assert set(result["ratio_to_encode_batch"]) == {"prepare_w1", "prepare_w2"}
    assert json.loads((tmp_path / "bench.json").read_text())["median_tokens_per_s"]["encode_batch"] > 0
