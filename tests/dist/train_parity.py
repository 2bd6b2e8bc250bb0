"""Training-loop script for tests/test_parallel.py, launched by torchrun (2 processes) or plain python (1 process).

One launch does, in order:
  fresh   train the `tiny` preset for --steps steps (MuonClip, fp32) from seed 0, saving a DCP checkpoint after
          --save-at steps; records the global loss, the global gradient norm and the router bias per step.
  resume  (for each --resume-from CKPT) build a differently seeded model, load CKPT (written at any world size /
          EP degree), skip the data already consumed and train steps save_at+1 .. steps (or --resume-steps steps);
          records the same.
  consolidate (with --consolidate-to DIR, single process only) write CKPT --resume-from[0] as an HF checkpoint.
Rank 0 writes everything to --result (JSON).

The global batch is the same at every world size: the token loader hands rank r the r-th block of each global
batch, so rank batch = global batch / world and the mean of the per-rank mean losses is the global mean loss.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from openk2 import parallel
from openk2.config import K2Config
from openk2.data import TokenLoader
from openk2.model import K2ForCausalLM
from openk2.optim import MuonClip

ROUTER_GAMMA = 1e-3


def build(ctx: parallel.DistContext, seed: int, lr: float):
    torch.manual_seed(seed)
    model = K2ForCausalLM(K2Config.preset("tiny"))
    parallel.parallelize(model, ctx)
    optimizer = MuonClip(model, lr=lr, weight_decay=0.1, qk_clip_tau=100.0)
    return model, optimizer


def router_bias(model) -> list[float]:
    return [float(v) for v in model.model.layers[1].mlp.gate.e_score_correction_bias]


def train(ctx, model, optimizer, loader, first_step: int, last_step: int, *, fail_at: int | None = None,
          fail_rank: int = 1, hang: bool = False, micro_batches: int = 1, save_at: int | None = None, ckpt: Path | None = None) -> dict:
    record = {"loss": [], "grad_norm": [], "router_bias": None}
    model.train()
    for step in range(first_step, last_step + 1):
        input_ids, labels = loader.next_batch()
        step_loss = torch.zeros(())
        # micro_batches > 1 splits the rank's batch and accumulates gradients: the same math as data parallelism
        # in one process, only the floating-point summation order differs (the tests' reference for noise).
        for ids, lab in zip(input_ids.chunk(micro_batches), labels.chunk(micro_batches)):
            out = model(ids.to(ctx.device), labels=lab.to(ctx.device))
            if fail_at == step and ctx.rank == fail_rank:
                if hang:
                    time.sleep(3600)  # a stuck rank: the others must hit the collective timeout, never wait forever
                raise RuntimeError(f"deliberate failure on rank {ctx.rank} at step {step}")
            (out.loss / micro_batches).backward()
            step_loss += out.loss.detach().cpu() / micro_batches
        grad_norm = parallel.clip_grad_norm_(model.parameters(), 1.0, ctx)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_load = parallel.sync_router_load(model, ctx)
        if step == first_step:  # routing of the first step is identical at any world size: exact counts
            record["first_global_load"] = global_load.tolist()
        model.update_router_bias(ROUTER_GAMMA)
        record["loss"].append(float(ctx.all_reduce_mean(step_loss)))
        record["grad_norm"].append(float(grad_norm))
        if save_at == step:
            parallel.save_distributed(ckpt, model, optimizer, {"step": step, "loader": loader.state_dict()})
    record["router_bias"] = router_bias(model)
    # Every replica must hold the same router bias (a buffer FSDP never syncs): max == min across ranks.
    biases = torch.cat([m.mlp.gate.e_score_correction_bias for m in model.model.layers if hasattr(m.mlp, "gate")])
    record["bias_replicas_equal"] = bool(torch.equal(ctx.all_reduce_max(biases), -ctx.all_reduce_max(-biases)))
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-at", type=int, default=10)
    ap.add_argument("--ckpt", default=None, help="where the fresh run saves after --save-at steps")
    ap.add_argument("--resume-from", action="append", default=[])
    ap.add_argument("--resume-steps", type=int, default=None, help="steps after each resume (default: up to --steps)")
    ap.add_argument("--consolidate-to", default=None)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--fail-at", type=int, default=None)
    ap.add_argument("--hang", action="store_true")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()

    torch.set_num_threads(1)
    ctx = parallel.init_distributed(ep=args.ep, timeout_s=args.timeout)
    if args.global_batch % ctx.data_world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {ctx.data_world} ranks")

    def loader():
        return TokenLoader(args.data, batch_size=args.global_batch // ctx.data_world, seq_len=args.seq_len,
                           rank=ctx.data_rank, world_size=ctx.data_world, seed=0)

    result = {"world_size": ctx.world_size, "ep": ctx.ep_size}
    model, optimizer = build(ctx, seed=0, lr=args.lr)
    result["fresh"] = train(ctx, model, optimizer, loader(), 1, args.steps, fail_at=args.fail_at, hang=args.hang,
                            micro_batches=args.micro_batches,
                            save_at=args.save_at if args.ckpt else None, ckpt=Path(args.ckpt) if args.ckpt else None)
    result["resumed"] = {}
    for ckpt in args.resume_from:
        model, optimizer = build(ctx, seed=123, lr=args.lr)  # other weights: only the checkpoint can make it match
        extra = parallel.load_distributed(ckpt, model, optimizer)
        data = loader()
        data.load_state_dict(extra["loader"])  # any world size with the same global batch
        last = args.steps if args.resume_steps is None else extra["step"] + args.resume_steps
        result["resumed"][ckpt] = train(ctx, model, optimizer, data, extra["step"] + 1, last)
    if args.consolidate_to and ctx.is_main:
        parallel.consolidate(args.resume_from[0], args.consolidate_to)
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(result, indent=1))
    ctx.destroy()


if __name__ == "__main__":
    main()
