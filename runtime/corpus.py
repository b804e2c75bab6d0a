"""Corpus files as pliant reads them: JSON lines (optionally gzip, bz2 or zstd compressed) and
Parquet, one record per document or prompt.

`pliant data prepare` (runtime/prepare.py) streams the texts of one key in batches
(`iter_text_batches`); pyarrow parses a block of a file at a time, never a whole file in memory.
RL prompt datasets (rl/prompts.py) check and open the same files (`check_inputs`,
`split_suffix`, `open_text_lines`) and keep their rows.

Errors name the file and the place: a line that is not JSON (1-based line number), a record
without the key (and the keys it has), a Parquet file without the column (and the columns it
has), a non-string text (line or row).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pliant.runtime.indexed import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
JSON_BLOCK = 8 << 20  # pyarrow JSON block; a longer record gets 4x larger blocks, up to JSON_BLOCK_MAX
JSON_BLOCK_MAX = 1 << 30


@dataclass
class TextBatch:
    """Texts of consecutive records of one file (empty ones already dropped)."""

    path: Path
    texts: list[str]
    empty: int  # records of this batch skipped as empty or whitespace-only
    progress: float  # fraction of all input bytes read so far (approximate)


def split_suffix(path: Path) -> tuple[str, str | None]:
    """(format, compression) from the file name: x.jsonl.gz -> ("json", "gzip")."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSION.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSON_SUFFIXES:
        return "json", compression
    if last == ".parquet" and compression is None:
        return "parquet", None
    raise DataError(f"{path}: unknown input format; pliant data prepare reads {', '.join(JSON_SUFFIXES)} "
                    f"(optionally {', '.join(COMPRESSION)}) and .parquet files")


def check_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """`paths` as Paths, each an existing file of a format this module reads (else a DataError)."""
    if not paths:
        raise DataError("no input files given")
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"input file {p} does not exist")
        split_suffix(p)
        out.append(p)
    return out


def open_text_lines(path: Path, compression: str | None):
    """A JSONL file's text, line by line, decompressed (`compression` as `split_suffix` gives it)."""
    import io

    import pyarrow as pa

    raw = pa.OSFile(str(path), "rb")
    stream = pa.CompressedInputStream(raw, compression) if compression else raw
    return io.TextIOWrapper(io.BufferedReader(stream, buffer_size=1 << 20), encoding="utf-8", errors="replace")


def diagnose_jsonl(path: Path, text_key: str, compression: str | None) -> str | None:
    """The first line of a JSONL file that prepare cannot use, described; None if all are
    fine. Used on the error path only: pyarrow reports rows within a block, not lines."""
    with open_text_lines(path, compression) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.strip())
            except json.JSONDecodeError as e:
                return f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(record, dict):
                return f"{path}: line {lineno} is a JSON {type(record).__name__}, not an object with a {text_key!r} key"
            if text_key not in record:
                keys = ", ".join(map(repr, record)) or "none"
                return f"{path}: line {lineno}: the record has no key {text_key!r} (its keys: {keys})"
            if not isinstance(record[text_key], str):
                kind = "null" if record[text_key] is None else type(record[text_key]).__name__
                return f"{path}: line {lineno}: {text_key!r} is {kind}, not a string"
    return None


class _Progress:
    """Input bytes consumed, over all files, for the progress bar."""

    def __init__(self, paths: Sequence[Path]):
        self.sizes = [p.stat().st_size for p in paths]
        self.total = max(1, sum(self.sizes))

    def fraction(self, file_index: int, within: float) -> float:
        return min(1.0, (sum(self.sizes[:file_index]) + self.sizes[file_index] * min(1.0, within)) / self.total)


def _non_empty(texts: list[str]) -> tuple[list[str], int]:
    kept = [t for t in texts if t and not t.isspace()]
    return kept, len(texts) - len(kept)


def _uncompressed_size(path: Path, compression: str | None) -> int:
    """The bytes pyarrow will parse, for progress: the file size, gzip's size trailer (the
    size modulo 4 GiB, so only trusted when plausible), else a guess."""
    size = path.stat().st_size
    if compression is None:
        return size
    if compression == "gzip" and size >= 18:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")
        if isize >= size:
            return isize
    return 4 * size


def _iter_json(path: Path, text_key: str, compression: str | None, batch_size: int
               ) -> Iterator[tuple[list[str], float]]:
    """Texts in batches, with the fraction of the file consumed. pyarrow parses the file in
    blocks and a record may not straddle two: a longer record restarts the file with 4x
    larger blocks, skipping the records already handed out."""
    import pyarrow as pa
    import pyarrow.json as pj

    parse = pj.ParseOptions(explicit_schema=pa.schema([(text_key, pa.string())]), unexpected_field_behavior="ignore")
    total = max(1, _uncompressed_size(path, compression))
    block, done = JSON_BLOCK, 0  # records of this file already yielded

    def fail(e: Exception | None) -> DataError:
        found = diagnose_jsonl(path, text_key, compression)
        return DataError(found or f"{path}: cannot read it as JSON lines ({e})")

    while True:
        raw = pa.OSFile(str(path), "rb")
        stream = pa.CompressedInputStream(raw, compression) if compression else raw
        read = pj.ReadOptions(block_size=block, use_threads=True)
        try:
            if hasattr(pj, "open_json"):  # streaming reader (recent pyarrow, apache/arrow#45084); older: whole file
                reader: Any = pj.open_json(stream, read_options=read, parse_options=parse)
            else:
                reader = pj.read_json(stream, read_options=read, parse_options=parse).to_batches()
            seen = 0  # records of this pass
            for k, batch in enumerate(reader):  # one record batch per block
                skip = min(max(done - seen, 0), batch.num_rows)
                seen += batch.num_rows
                col = batch.column(0).slice(skip)
                if col.null_count:
                    raise fail(None)
                texts = col.to_pylist()
                for i in range(0, len(texts), batch_size):
                    part = texts[i:i + batch_size]
                    done += len(part)
                    # pyarrow reads ahead, so the file position says little; blocks consumed do
                    span = min(block, max(total - k * block, 0))
                    yield part, min(0.999, (k * block + span * (i + len(part)) / len(texts)) / total)
            return
        except pa.ArrowInvalid as e:
            if "straddl" in str(e) and block < JSON_BLOCK_MAX:
                block *= 4
                continue
            raise (DataError(f"{path}: a record is longer than {JSON_BLOCK_MAX >> 20} MB, the longest pliant "
                             f"reads") if "straddl" in str(e) else fail(e)) from None
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read it ({e})") from None
        finally:
            raw.close()


def _iter_parquet(path: Path, text_key: str, batch_size: int) -> Iterator[tuple[list[str], float]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read it as Parquet ({e})") from None
    names = pf.schema_arrow.names
    if text_key not in names:
        raise DataError(f"{path}: no column {text_key!r} (its columns: {', '.join(map(repr, names)) or 'none'})")
    kind = pf.schema_arrow.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DataError(f"{path}: column {text_key!r} holds {kind}, not strings")
    rows = max(1, pf.metadata.num_rows)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=max(batch_size, 1024), columns=[text_key]):
            col = batch.column(0)
            if col.null_count:
                first = int(np.argmax(np.asarray(col.is_null())))
                raise DataError(f"{path}: row {row + first + 1}: {text_key!r} is null, not a string")
            texts = col.to_pylist()
            row += len(texts)
            for i in range(0, len(texts), batch_size):
                yield texts[i:i + batch_size], row / rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read it as Parquet ({e})") from None


def iter_text_batches(paths: Sequence[Path], text_key: str, batch_size: int) -> Iterator[TextBatch]:
    """Every file's texts, in order, in batches of up to `batch_size` non-empty documents."""
    progress = _Progress(paths)
    for k, path in enumerate(paths):
        fmt, compression = split_suffix(path)
        source = _iter_json(path, text_key, compression, batch_size) if fmt == "json" else \
            _iter_parquet(path, text_key, batch_size)
        for texts, within in source:
            kept, empty = _non_empty(texts)
            yield TextBatch(path, kept, empty, progress.fraction(k, within))
        yield TextBatch(path, [], 0, progress.fraction(k, 1.0))  # the file is done: its share is complete
