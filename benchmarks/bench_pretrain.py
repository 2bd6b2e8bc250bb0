"""`openk2 pretrain` throughput: tokens/s and MFU of the real training loop, MuonClip vs AdamW, same process.

Prepares the default corpus once (tokenizer + shards; the preparation throughput in MB/s is reported too), then
runs the Trainer for a few steps with each optimizer on the same model shape, data and seed, and prints the
median step figures and their ratio. MFU = model FLOPs/s ÷ the matmul peak of the run's dtype measured in this
process (openk2/perf.py; FLOPs from openk2.config.flops_per_token).

    python benchmarks/bench_pretrain.py                 # small preset, bf16, 12 timed steps per optimizer
    python benchmarks/bench_pretrain.py --quick         # tiny preset, 4 steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=14, help="steps per optimizer; the first 2 are warm-up")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--work", type=Path, default=None, help="reuse a prepared run dir (tokenizer + data)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.preset, args.steps, args.batch_size, args.seq_len = "tiny", 4, 2, 64

    from openk2.data import default_corpus
    from openk2.train import PretrainBatches, TrainConfig, Trainer, build_model, prepare_pretraining_data

    work = args.work or Path(tempfile.mkdtemp(prefix="openk2-bench-pretrain-"))
    base = dict(preset=args.preset, out=str(work), batch_size=args.batch_size, seq_len=args.seq_len,
                dtype=args.dtype, progress=False, plots=False, ckpt_every=10**9, val_every=10**9,
                steps=args.steps, warmup_steps=1)
    corpus_bytes = sum(f.stat().st_size for f in default_corpus())
    t0 = time.perf_counter()
    cfg0 = TrainConfig(**base).validated()
    model = build_model(cfg0, torch.device("cpu"))
    _, data_dir = prepare_pretraining_data(cfg0, model.config.vocab_size)
    prep_s = time.perf_counter() - t0
    print(f"data preparation (BPE training + tokenization, or reuse): {prep_s:.1f} s for "
          f"{corpus_bytes / 1e6:.1f} MB -> {corpus_bytes / 1e6 / prep_s:.2f} MB/s end to end")

    results = {}
    for optimizer in ("muonclip", "adamw"):
        cfg = TrainConfig(**base, optimizer=optimizer).validated()
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        trainer = Trainer(cfg, model, PretrainBatches(data_dir, cfg))
        tps, mfus, step_s = [], [], []
        for step in range(cfg.steps):
            t = time.perf_counter()
            rec = trainer.train_step()
            dt = time.perf_counter() - t
            if step >= 2:
                tok = cfg.batch_size * cfg.seq_len
                tps.append(tok / dt)
                mfus.append(tok / dt * trainer.flops_per_token / trainer.peak_flops)
                step_s.append(dt)
        results[optimizer] = {"tokens_per_s": statistics.median(tps), "mfu": statistics.median(mfus),
                              "step_s": statistics.median(step_s), "final_loss": rec["loss"],
                              "peak_gflops": trainer.peak_flops / 1e9}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{args.preset} ({n_params / 1e6:.1f}M params), {args.dtype}, batch {args.batch_size} x seq {args.seq_len}"
          f" = {args.batch_size * args.seq_len} tokens/step, median of {args.steps - 2} steps")
    print(f"{'optimizer':<10} {'step s':>8} {'tokens/s':>10} {'MFU':>7} {'peak GFLOP/s':>13}")
    for name, r in results.items():
        print(f"{name:<10} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} {100 * r['mfu']:>6.1f}% "
              f"{r['peak_gflops']:>13.0f}")
    ratio = results["muonclip"]["tokens_per_s"] / results["adamw"]["tokens_per_s"]
    print(f"muonclip / adamw tokens/s: {ratio:.2f}x")
    print(json.dumps({"preset": args.preset, "dtype": args.dtype, "prep_mb_per_s": corpus_bytes / 1e6 / prep_s,
                      "results": results}))


if __name__ == "__main__":
    main()
