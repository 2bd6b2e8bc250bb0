"""Unit checks of openk2.parallel's collectives for tests/test_parallel.py, launched by torchrun with 2 processes.

  expert parallelism  `ExpertParallelExperts` (ep=2) against the model's `RoutedExperts` holding all experts, on
                      each rank's own tokens: output, input / routing-weight gradients, and every expert gradient
                      (the EP owner's gradient must be the sum of all ranks' contributions). Three routings:
                      skewed (every token picks experts of rank 0, so rank 1 receives no rows at all), random, and
                      random under bf16 autocast (bf16 tokens on the wire).
  long barrier        `ctx.barrier(timeout_s=...)` outlasts its group's collective timeout (1 s) while rank 0 is
                      busy for 2 s, as when it prepares the data for the others. The group is a separate gloo
                      group (the host group NCCL jobs wait on), so the other checks keep a safe timeout.
  reductions          `all_reduce_mean` / `all_reduce_max` of tensors and floats.
Rank 0 writes the measured relative differences (max over ranks) to --result (JSON); the test judges them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from openk2 import parallel
from openk2.model import RoutedExperts

EXPERTS, HIDDEN, INTERMEDIATE, TOKENS, TOP_K = 8, 16, 8, 6, 2


def _rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Max abs difference relative to the reference's largest entry (absolute where the reference is all zero,
    e.g. the gradient of experts that received no rows)."""
    err, scale = (value.float() - reference.float()).abs().max(), reference.float().abs().max()
    return float(err / scale) if scale > 0 else float(err)


def check_expert_parallel(ctx: parallel.DistContext) -> dict:
    torch.manual_seed(0)  # the same full expert stacks on every rank
    reference = RoutedExperts(EXPERTS, HIDDEN, INTERMEDIATE)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.2)
    experts = parallel.ExpertParallelExperts(reference, ctx.mesh["ep"], layer_name="check")
    per_rank = EXPERTS // ctx.ep_size
    mine = slice(ctx.ep_rank * per_rank, (ctx.ep_rank + 1) * per_rank)
    generator = torch.Generator().manual_seed(100 + ctx.rank)  # every rank routes its own tokens
    results = {}
    for case in ("skewed", "random", "bf16"):
        pool = per_rank if case == "skewed" else EXPERTS
        topk_idx = torch.stack([torch.randperm(pool, generator=generator)[:TOP_K] for _ in range(TOKENS)])
        x = torch.randn(TOKENS, HIDDEN, generator=generator, requires_grad=True)
        topk_weight = torch.rand(TOKENS, TOP_K, generator=generator, requires_grad=True)
        upstream = torch.randn(TOKENS, HIDDEN, generator=generator)
        grads = {}
        for name, module in (("ep", experts), ("ref", reference)):
            x.grad = topk_weight.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16"):
                out = module(x, topk_idx, topk_weight)
            (out * upstream).sum().backward()
            grads[name] = (out.detach(), x.grad.clone(), topk_weight.grad.clone())
        diff = {"out": _rel_err(grads["ep"][0], grads["ref"][0]), "x_grad": _rel_err(grads["ep"][1], grads["ref"][1]),
                "weight_grad": _rel_err(grads["ep"][2], grads["ref"][2])}
        for stack in ("gate_proj", "up_proj", "down_proj"):
            summed = getattr(reference, stack).grad.clone()
            dist.all_reduce(summed)  # every rank's contribution to each expert
            diff[stack] = _rel_err(getattr(experts, stack).grad.to_local(), summed[mine])
            getattr(experts, stack).grad = getattr(reference, stack).grad = None
        worst = torch.tensor(list(diff.values()))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the worst rank's difference
        results[case] = dict(zip(diff, worst.tolist()))
        rows = torch.bincount(topk_idx.reshape(-1), minlength=EXPERTS).view(ctx.ep_size, per_rank).sum(1)
        dist.all_reduce(rows)
        results[case]["rows_per_owner"] = rows.tolist()  # rows each EP rank's experts receive in all
    return results


def check_long_barrier(ctx: parallel.DistContext, group_timeout_s: float = 1.0, busy_s: float = 2.0) -> dict:
    short = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=group_timeout_s))
    waiting = dataclasses.replace(ctx, host_group=short)
    if ctx.rank == 0:
        time.sleep(busy_s)  # longer than the group's collective timeout
    start = time.monotonic()
    waiting.barrier(timeout_s=busy_s + 30)
    return {"group_timeout_s": group_timeout_s, "waited_s": ctx.all_reduce_max(time.monotonic() - start)}


def check_reductions(ctx: parallel.DistContext) -> dict:
    value = torch.tensor([1.0, 2.0]) * (ctx.rank + 1)
    mean, high = ctx.all_reduce_mean(value), ctx.all_reduce_max(value)
    return {"mean": mean.tolist(), "max": high.tolist(), "float_mean": ctx.all_reduce_mean(float(ctx.rank)),
            "float_max": ctx.all_reduce_max(float(ctx.rank)), "input_untouched": value.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--result", required=True)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = parallel.init_distributed(ep=2, timeout_s=args.timeout)
    result = {"expert_parallel": check_expert_parallel(ctx),
              "long_barrier": check_long_barrier(ctx),
              "reductions": check_reductions(ctx)}
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(result, indent=1))
    ctx.destroy()


if __name__ == "__main__":
    main()
