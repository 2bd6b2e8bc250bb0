"""Trainer script for tests/test_parallel.py: gradient accumulation and validation through the real `Trainer`,
launched by torchrun (2 processes) or plain python (1 process).

Each run in --runs (`adamw`, `muonclip`: accumulate_without_sync=True, the default; `adamw_per_micro`: False)
starts from the same seed and reads the same global batches at any world size (`PretrainBatches`: rank r reads the
r-th block of every global batch), fp32, `count_collectives` on, and records:
  val_before   `Trainer.validate()` on the freshly initialized weights (identical at every world size), over the
               whole val split, whose last global batch is short (padding rows on some ranks)
  per step     loss, grad norm and collective counts over --steps steps of grad_accum=--grad-accum micro-batches
  val_after    the same validation after training
Rank 0 writes the result JSON (--result) and each run's weight update, final - initial (--updates, a torch file
{run: {parameter name: tensor}}).
Also recorded: the number of FSDP units and the reduce-scatter input size a step must have if every parameter's
gradient is reduce-scattered exactly once (FSDP2 pads dim 0 of each parameter to a multiple of the mesh size).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from openk2 import parallel
from openk2.config import K2Config
from openk2.model import K2ForCausalLM
from openk2.train import PretrainBatches, TrainConfig, Trainer


def full_weights(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


def fsdp_layout(model, ctx) -> dict:
    """FSDP units holding parameters, and the reduce-scatter elements of one reduction of every gradient."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not ctx.is_distributed:
        return {"units": 0, "padded_param_elements": 0}
    units = sum(1 for m in model.modules() if isinstance(m, FSDPModule))
    padded = 0
    for p in model.parameters():
        assert isinstance(p, DTensor), "every parameter is FSDP-sharded before the first forward"
        shards = p.device_mesh.size()
        padded += math.ceil(p.shape[0] / shards) * shards * (p.numel() // p.shape[0])
    return {"units": units, "padded_param_elements": padded}


def run(ctx, args, out_dir: Path, *, optimizer: str, accumulate_without_sync: bool) -> tuple[dict, dict]:
    cfg = TrainConfig(preset="tiny", out=str(out_dir), steps=args.steps, batch_size=args.global_batch // ctx.data_world,
                      seq_len=args.seq_len, grad_accum=args.grad_accum, dtype="fp32", lr=args.lr, warmup_steps=1,
                      optimizer=optimizer,
                      val_batches=1000, progress=False, plots=False, count_collectives=True,
                      accumulate_without_sync=accumulate_without_sync).validated()
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.preset("tiny"))
    parallel.parallelize(model, ctx)
    trainer = Trainer(cfg, model, PretrainBatches(Path(args.data), cfg, ctx.data_rank, ctx.data_world), ctx=ctx)
    record = fsdp_layout(model, ctx)  # before any forward: the root's parameters stay gathered after one
    record["val_before"] = trainer.validate()
    start = full_weights(model)
    steps = [trainer.train_step() for _ in range(args.steps)]
    record.update(loss=[r["loss"] for r in steps], grad_norm=[r["grad_norm"] for r in steps],
                  collectives=[r["collectives"] for r in steps], val_after=trainer.validate())
    end = full_weights(model)
    return record, {name: end[name] - start[name] for name in end}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--updates", required=True)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--runs", default="adamw,muonclip", help="comma-separated: adamw, muonclip, adamw_per_micro")
    args = ap.parse_args()

    torch.set_num_threads(1)
    ctx = parallel.init_distributed(ep=args.ep)
    result = {"world_size": ctx.world_size, "ep": ctx.ep_size}
    updates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            optimizer, _, variant = name.partition("_")
            result[name], updates[name] = run(ctx, args, Path(tmp) / name, optimizer=optimizer,
                                              accumulate_without_sync=variant != "per_micro")
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(result, indent=1))
        torch.save(updates, args.updates)
    ctx.destroy()


if __name__ == "__main__":
    main()
