"""`pliant bench prepare`: is `pliant data prepare` as fast as the tokenizer itself?

Tokenizing a corpus is the tokenizer's work; everything prepare adds around it (reading
JSONL with pyarrow, dropping empty documents, appending EOS, turning id lists into one
numpy buffer, writing the Megatron .bin/.idx) should cost little. The benchmark measures
both on the same texts:

(a) `encode_batch`: the tokenizer's own batched encode of the texts, already in memory
    (the ids read out of every encoding, as any user of the tokens must);
(b) `pliant data prepare` end to end: read the JSONL + tokenize + write, at workers 1 and 2;

and reports tokens/s (medians over repeats) and the ratio prepare / encode_batch (target
>= 0.8). The corpus is generated, never downloaded: documents are built from the
paragraphs of Python's standard-library docstrings (real English, read from the source
files, nothing imported), with a seeded long-tailed length distribution
(lognormal body + Pareto tail, like real corpora). A byte-level BPE of ~8k tokens is
trained on a sample with `train_bpe_tokenizer`.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

from pliant.io import strict_dumps


_TRIPLE = re.compile(r'(?s)"""(.+?)"""|\'\'\'(.+?)\'\'\'')


def stdlib_paragraphs(limit_files: int | None = None) -> list[str]:
    """Prose paragraphs of the standard library's docstrings (and other triple-quoted
    text), found in the source files with a regular expression: nothing is imported
    (importing arbitrary stdlib modules has side effects) and it is much faster than
    parsing every file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "test", "tests"} & set(p.parts))
    paragraphs: list[str] = []
    for path in files[:limit_files]:
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for m in _TRIPLE.finditer(source):
            for para in re.split(r"\n\s*\n", m.group(1) or m.group(2)):
                para = " ".join(para.split())
                letters = sum(c.isalpha() or c == " " for c in para)
                if len(para) >= 40 and letters >= 0.85 * len(para):  # prose, not code or tables
                    paragraphs.append(para)
    return paragraphs


def document_chars(n: int, rng: np.random.Generator, median: float = 1500.0, sigma: float = 1.1,
                   tail_frac: float = 0.03, alpha: float = 1.6, cap: int = 2_000_000) -> np.ndarray:
    """Characters per document: a lognormal body and a Pareto tail (a few long documents
    hold a large share of the text, as in Wikipedia, books and code)."""
    body = rng.lognormal(np.log(median), sigma, size=n)
    tail = median * 4 * (1 + rng.pareto(alpha, size=n))
    chars = np.where(rng.random(n) < tail_frac, tail, body)
    return np.clip(chars, 20, cap).astype(np.int64)


def make_corpus(out: Path, mb: float, seed: int = 0) -> dict[str, Any]:
    """Write about `mb` MB of JSONL ({"text": ...} per line, a few empty documents among
    them, as real dumps have) and return its statistics."""
    rng = np.random.default_rng(seed)
    paragraphs = stdlib_paragraphs()
    if not paragraphs:
        raise RuntimeError("found no docstrings in the standard library to build a corpus from")
    para_len = np.array([len(p) + 2 for p in paragraphs])
    target = int(mb * 1e6)
    written = docs = empty = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            for n_chars in document_chars(1000, rng):
                if rng.random() < 0.005:
                    text = "" if rng.random() < 0.5 else "  \n "
                    empty += 1
                else:
                    # paragraphs in random order until the length is reached
                    picks = rng.integers(0, len(paragraphs), size=max(1, int(n_chars // para_len.mean()) + 1))
                    keep = np.searchsorted(np.cumsum(para_len[picks]), n_chars) + 1
                    text = "\n\n".join(paragraphs[i] for i in picks[:keep])
                line = json.dumps({"id": docs, "text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                docs += 1
                if written >= target:
                    break
    os.replace(tmp, out)
    return {"path": str(out), "bytes": written, "documents": docs, "empty_documents": empty,
            "source_paragraphs": len(paragraphs)}


def _read_texts(path: Path) -> list[str]:
    """The corpus's non-empty texts, in memory, for the encode_batch baseline."""
    import pyarrow as pa
    import pyarrow.json as pj

    parse = pj.ParseOptions(explicit_schema=pa.schema([("text", pa.string())]), unexpected_field_behavior="ignore")
    table = pj.read_json(str(path), read_options=pj.ReadOptions(block_size=32 << 20), parse_options=parse)
    return [t for t in table.column("text").to_pylist() if t and not t.isspace()]


def encode_batch_rate(backend, texts: list[str], batch_size: int) -> tuple[int, float]:
    """(tokens, seconds) of the tokenizer's own batched encode over `texts`, ids read out."""
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch_size):
        for enc in backend.encode_batch(texts[i:i + batch_size], add_special_tokens=True):
            tokens += len(enc.ids)
    return tokens, time.perf_counter() - t0


def run(out: Path, mb: float = 50.0, workers: tuple[int, ...] = (1, 2), repeats: int = 3, vocab_size: int = 8192,
        batch_size: int | None = None, work_dir: Path | None = None, seed: int = 0, console=None) -> dict[str, Any]:
    """Generate the corpus, train the tokenizer, time encode_batch and prepare round-robin
    (so a noisy neighbour slows every mode alike), write JSON and print a table."""
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from pliant.io import atomic_write_text
    from pliant.runtime.prepare import DEFAULT_BATCH, prepare
    from pliant.runtime.tokenizer import load_tokenizer, train_bpe_tokenizer

    console = console or Console()
    batch_size = batch_size or DEFAULT_BATCH
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="pliant-bench-prepare-") as tmp:
        tmp_dir = Path(tmp)
        corpus_path = tmp_dir / "corpus.jsonl"
        with console.status(f"generating a {mb:g} MB JSONL corpus"):
            corpus = make_corpus(corpus_path, mb, seed)
        texts = _read_texts(corpus_path)
        rng = np.random.default_rng(seed)
        sample = [texts[i] for i in rng.choice(len(texts), size=min(len(texts), 2000), replace=False)]
        with console.status(f"training a {vocab_size}-token byte-level BPE on {len(sample)} documents"):
            t0 = time.perf_counter()
            train_bpe_tokenizer(sample, vocab_size, tmp_dir / "tokenizer")
            train_s = time.perf_counter() - t0
        backend = load_tokenizer(tmp_dir / "tokenizer").backend_tokenizer
        encode_batch_rate(backend, texts[:200], batch_size)  # warm up (thread pool, caches)

        runs: dict[str, list[dict[str, float]]] = {"encode_batch": [], **{f"prepare_w{w}": [] for w in workers}}
        expected_tokens = None
        for r in range(repeats):
            with console.status(f"repeat {r + 1}/{repeats}: encode_batch"):
                tokens, secs = encode_batch_rate(backend, texts, batch_size)
            runs["encode_batch"].append({"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs})
            for w in workers:
                with console.status(f"repeat {r + 1}/{repeats}: pliant data prepare --workers {w}"):
                    t0 = time.perf_counter()  # end to end: tokenizer loading and worker start-up included
                    s = prepare([corpus_path], tmp_dir / "tokenizer", tmp_dir / f"out-w{w}", workers=w,
                                batch_size=batch_size, show_progress=False)
                    secs = time.perf_counter() - t0
                # prepare's tokens include one EOS per document; the baseline's do not
                if expected_tokens is None:
                    expected_tokens = s["tokens"]
                if s["tokens"] != expected_tokens or s["tokens"] - s["documents"] != tokens:
                    raise RuntimeError(f"prepare (workers {w}) produced {s['tokens']} tokens, expected "
                                       f"{expected_tokens} ({tokens} + one EOS per document)")
                # rates count the tokenizer's tokens (EOS left out) so both sides count the same work
                runs[f"prepare_w{w}"].append({"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
                                              "tokens_with_eos": s["tokens"]})
        last = s

    medians = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
    base = medians["encode_batch"]
    result = {
        "benchmark": "prepare", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                            "python": platform.python_version()},
        "corpus": {**corpus, "path": None, "chars": int(sum(map(len, texts))), "tokens": last["tokens"],
                   "doc_len_median": last["doc_len_median"], "doc_len_p99": last["doc_len_p99"],
                   "doc_len_max": last["doc_len_max"]},
        "tokenizer": {"vocab_size": last["vocab_size"], "train_seconds": train_s, "trained_on_documents": len(sample)},
        "batch_size": batch_size, "repeats": repeats, "runs": runs,
        "median_tokens_per_s": medians,
        "ratio_to_encode_batch": {k: medians[k] / base for k in medians if k != "encode_batch"},
        "target_ratio": 0.8,
    }
    atomic_write_text(out, strict_dumps(result, indent=2) + "\n")

    table = Table(title=f"pliant data prepare vs the tokenizer's encode_batch ({corpus['bytes'] / 1e6:.0f} MB JSONL, "
                        f"{last['tokens']:,} tokens, median of {repeats})")
    for col in ("mode", "tokens/s", "seconds", "x encode_batch"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for k, v in runs.items():
        secs = statistics.median(x["seconds"] for x in v)
        ratio = "1.00" if k == "encode_batch" else f"{medians[k] / base:.2f}"
        name = "encode_batch (in memory)" if k == "encode_batch" else f"prepare, workers {k.rsplit('w', 1)[1]}"
        table.add_row(name, f"{medians[k]:,.0f}", f"{secs:.2f}", ratio)
    console.print(table)
    return result
