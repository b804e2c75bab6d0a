"""`pliant data prepare`: JSONL / JSONL.gz / Parquet corpora -> Megatron indexed dataset.

Corpora arrive as JSON lines or Parquet with one document's text per record; training
wants token ids in Megatron's format (`pliant.runtime.indexed`). runtime/corpus.py streams
the records with pyarrow (a block of a file at a time, never a whole file in memory); this
module tokenizes them in large batches with the model directory's own fast tokenizer, appends
EOS to every document, and streams the ids into an `IndexedTokensWriter`, so the output
appears only when the whole run succeeded.

The tokenizer is the cost; the rest must not be. Reading runs in a thread (pyarrow parses
outside the GIL) ahead of tokenization; `encode_batch` runs in Rust threads outside the
GIL; ids become one numpy buffer per batch without per-token Python work. With
workers > 1, batches go to worker processes (each with its own copy of the tokenizer)
and come back in order.

Errors name the file and the place: a line that is not JSON (1-based line number), a
record without the text key (and the keys it has), a Parquet file without the column (and
the columns it has), a non-string text (line or row), a tokenizer larger than the model's
embedding (config.json's vocab_size).
"""
from __future__ import annotations

import collections
import json
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from pliant.runtime.corpus import TextBatch, check_inputs, iter_text_batches
from pliant.runtime.indexed import DataError, IndexedTokensWriter, bin_path, idx_path, optimal_dtype
from pliant.io import strict_dumps

DEFAULT_BATCH = 1024  # documents per encode_batch call: large enough to keep the Rust threads busy
TASK_CHARS = 1 << 20  # characters per worker task (workers > 1)


@dataclass
class PrepareSummary:
    """What a prepare run produced; written beside the output as PREFIX.summary.json."""

    output: str
    inputs: list[str]
    tokenizer: str
    text_key: str
    dtype: str
    vocab_size: int
    eos_id: int
    workers: int
    batch_size: int
    documents: int = 0
    tokens: int = 0
    empty_skipped: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    doc_len_median: float = 0.0
    doc_len_p99: float = 0.0
    doc_len_max: int = 0
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- reading ahead


def _prefetch(it: Iterator[TextBatch], depth: int = 4) -> Iterator[TextBatch]:
    """Run `it` in a thread, `depth` batches ahead (pyarrow parses outside the GIL, so
    reading overlaps tokenization); its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def run() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    t = threading.Thread(target=run, name="prepare-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)


# ---------------------------------------------------------------- tokenizing


def encode_documents(backend, texts: list[str], eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, flat ids) of `texts`, each document's ids followed by EOS.

    The ids leave Rust as one Python list per document (the tokenizers API); from there it
    is one `np.fromiter` over all of them and one vectorised EOS insertion."""
    encodings = backend.encode_batch(texts, add_special_tokens=True)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    n = int(lengths.sum())
    body = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=n)
    if n and (body.min() < 0 or body.max() > np.iinfo(dtype).max):
        raise DataError(f"token id {int(body.max())} does not fit the output dtype {dtype.name}")
    flat = np.insert(body.astype(dtype), np.cumsum(lengths), np.array(eos_id, dtype=dtype))
    return lengths + 1, flat


_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer_json: str, eos_id: int, dtype: str, threads: int) -> None:
    import os

    # the tokenizer's Rust thread pool starts on first use and sizes itself from this; workers share the cores
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    from tokenizers import Tokenizer

    _WORKER.update(backend=Tokenizer.from_str(tokenizer_json), eos_id=eos_id, dtype=np.dtype(dtype))


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(_WORKER["backend"], texts, _WORKER["eos_id"], _WORKER["dtype"])


def _encoded(batches: Iterator[TextBatch], backend, eos_id: int, dtype: np.dtype, workers: int
             ) -> Iterator[tuple[TextBatch, np.ndarray, np.ndarray]]:
    """(batch, lengths, flat) in input order; in this process or in `workers` processes."""
    empty = np.zeros(0, np.int64), np.zeros(0, dtype)
    if workers <= 1:
        for b in batches:
            yield (b, *(encode_documents(backend, b.texts, eos_id, dtype) if b.texts else empty))
        return
    import multiprocessing as mp
    import os

    # spawn: the parent holds threads (the reader, pyarrow's, Rust's) that fork would copy mid-flight;
    # the workers import only numpy and tokenizers, and each runs the Rust encoder on its share of the cores
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    pending: collections.deque = collections.deque()
    with ctx.Pool(workers, initializer=_worker_init, initargs=(backend.to_str(), eos_id, dtype.str, threads)) as pool:
        try:
            for b in batches:
                # tasks of about TASK_CHARS: long-tailed documents would otherwise leave a worker idle
                tasks = [pool.apply_async(_worker_encode, (part,)) for part in _split_by_chars(b.texts, TASK_CHARS)]
                pending.append((b, tasks))
                while sum(len(t) for _, t in pending) > 4 * workers:  # bounded: input never piles up in memory
                    yield _collect(pending.popleft(), empty)
            while pending:
                yield _collect(pending.popleft(), empty)
        finally:
            pool.terminate()


def _split_by_chars(texts: list[str], max_chars: int) -> list[list[str]]:
    if not texts:
        return []
    ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
    cuts = np.searchsorted(ends, np.arange(max_chars, int(ends[-1]), max_chars), side="right")
    bounds = [0, *sorted(set(int(c) for c in cuts if 0 < c < len(texts))), len(texts)]
    return [texts[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _collect(item, empty) -> tuple[TextBatch, np.ndarray, np.ndarray]:
    b, tasks = item
    if not tasks:
        return (b, *empty)
    parts = [t.get() for t in tasks]
    return b, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------- the run


def check_vocab(directory: Path, tokenizer) -> int:
    """len(tokenizer); an error if the directory's model config has a smaller embedding
    (ids the model cannot look up would reach training)."""
    size = len(tokenizer)
    cfg = directory / "config.json"
    if cfg.is_file():
        try:
            model_vocab = json.loads(cfg.read_text()).get("vocab_size")
        except (json.JSONDecodeError, AttributeError) as e:
            raise DataError(f"{cfg}: unreadable ({e})") from None
        if isinstance(model_vocab, int) and model_vocab < size:
            raise DataError(f"{directory}: the tokenizer has {size} tokens but config.json's vocab_size is "
                            f"{model_vocab}: token ids {model_vocab}..{size - 1} have no embedding")
    return size


def _describe(lengths: np.ndarray) -> tuple[float, float, int]:
    if not len(lengths):
        return 0.0, 0.0, 0
    return float(np.median(lengths)), float(np.percentile(lengths, 99)), int(lengths.max())


def prepare(inputs: Sequence[str | Path], tokenizer_dir: str | Path, out_prefix: str | Path, *,
            text_key: str = "text", workers: int = 1, batch_size: int = DEFAULT_BATCH,
            show_progress: bool | None = None,
            on_progress: Callable[[float, int, int], None] | None = None) -> dict[str, Any]:
    """Tokenize `inputs` with the tokenizer in `tokenizer_dir` into `out_prefix`.bin/.idx
    (Megatron's indexed format) and `out_prefix`.summary.json; returns the summary.

    Atomic: on any error (or interrupt) no output and no temporary file is left.
    `show_progress`: True a progress bar on stderr, False nothing, None (default) the bar
    when stderr is a terminal and otherwise a log line every ~10% of the input."""
    from pliant.io import atomic_write_text
    from pliant.runtime.tokenizer import load_tokenizer

    if workers < 1 or batch_size < 1:
        raise DataError(f"--workers and --batch-size must be >= 1, got {workers} and {batch_size}")
    if not text_key:
        raise DataError("--text-key must not be empty")
    paths = check_inputs(inputs)
    tokenizer_dir, out_prefix = Path(tokenizer_dir), Path(out_prefix)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = check_vocab(tokenizer_dir, tokenizer)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"{tokenizer_dir}: the tokenizer has no EOS token; prepare ends every document with it")
    dtype = optimal_dtype(vocab)
    summary = PrepareSummary(output=str(out_prefix), inputs=[str(p) for p in paths], tokenizer=str(tokenizer_dir),
                             text_key=text_key, dtype=dtype.name, vocab_size=vocab, eos_id=int(eos_id),
                             workers=workers, batch_size=batch_size)
    summary_path = Path(f"{out_prefix}.summary.json")

    t0 = time.perf_counter()
    batches = _prefetch(iter_text_batches(paths, text_key, batch_size))
    encoded = _encoded(batches, tokenizer.backend_tokenizer, int(eos_id), dtype, workers)
    with _progress_reporter(show_progress, on_progress) as report, IndexedTokensWriter(out_prefix, dtype) as writer, \
            closing(batches), closing(encoded):  # on an error: stop the reader thread and the workers now
        for b, lengths, flat in encoded:
            if len(lengths):
                writer.add_documents(lengths, flat)
            stats = summary.per_file.setdefault(str(b.path), {"documents": 0, "tokens": 0, "empty_skipped": 0})
            stats["documents"] += len(lengths)
            stats["tokens"] += len(flat)
            stats["empty_skipped"] += b.empty
            summary.empty_skipped += b.empty
            report(b.progress, writer.n_documents, writer.n_tokens)
        if writer.n_documents == 0:
            raise DataError(f"no non-empty documents in {', '.join(map(str, paths))} ({summary.empty_skipped} empty "
                            f"records skipped): nothing to write")
        summary.documents, summary.tokens = writer.n_documents, writer.n_tokens
        summary.seconds = time.perf_counter() - t0
        summary.tokens_per_s = summary.tokens / max(summary.seconds, 1e-9)
        summary.doc_len_median, summary.doc_len_p99, summary.doc_len_max = _describe(writer.document_lengths())
    # the .bin/.idx are in place; the summary follows, and if it cannot be written neither stays
    try:
        atomic_write_text(summary_path, strict_dumps(summary.to_dict(), indent=2) + "\n")
    except BaseException:
        for p in (idx_path(out_prefix), bin_path(out_prefix)):
            p.unlink(missing_ok=True)
        raise
    return summary.to_dict()


class _progress_reporter:
    """A rich progress bar (show True, or None on a terminal), a log line every ~10% of the
    input (None elsewhere), or nothing (False)."""

    def __init__(self, show: bool | None, callback: Callable[[float, int, int], None] | None):
        self.show_bar = sys.stderr.isatty() if show is None else show
        self.log_lines = show is None and not self.show_bar
        self.callback = callback
        self._bar = self._task = None
        self._next_log = 0.1
        self._t0 = time.perf_counter()

    def __enter__(self) -> Callable[[float, int, int], None]:
        if self.show_bar:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("tokenizing"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                                 TextColumn("{task.fields[docs]} docs, {task.fields[tokens]} tokens"),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task("prepare", total=1.0, docs=0, tokens=0)
        return self.report

    def report(self, fraction: float, docs: int, tokens: int) -> None:
        if self.callback is not None:
            self.callback(fraction, docs, tokens)
        if self._bar is not None:
            self._bar.update(self._task, completed=fraction, docs=f"{docs:,}", tokens=f"{tokens:,}")
        elif self.log_lines and fraction >= self._next_log:
            rate = tokens / max(time.perf_counter() - self._t0, 1e-9)
            print(f"pliant data prepare: {fraction:5.1%} of the input, {docs:,} documents, {tokens:,} tokens "
                  f"({rate:,.0f} tokens/s)", file=sys.stderr, flush=True)
            self._next_log = math.floor(fraction * 10 + 1) / 10

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def print_summary(summary: dict[str, Any], console=None) -> None:
    """The summary as a short table (people); the JSON beside the output is for machines."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"pliant data prepare -> {summary['output']}.bin/.idx", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    rows = [("documents", f"{summary['documents']:,}"), ("tokens", f"{summary['tokens']:,}"),
            ("empty documents skipped", f"{summary['empty_skipped']:,}"),
            ("seconds", f"{summary['seconds']:.2f}"), ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
            ("document length median", f"{summary['doc_len_median']:,.0f}"),
            ("document length p99", f"{summary['doc_len_p99']:,.0f}"),
            ("document length max", f"{summary['doc_len_max']:,}"),
            ("dtype / vocabulary", f"{summary['dtype']} / {summary['vocab_size']:,}"),
            ("workers", str(summary["workers"]))]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
