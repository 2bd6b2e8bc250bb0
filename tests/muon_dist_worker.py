"""torchrun worker for tests/test_muon_distributed.py (gloo, CPU).

Every rank builds the same tiny openk2 model twice: a single-process reference, and a copy sharded with FSDP2
`fully_shard` (DTensor Shard(0)) trained by MuonClip on this rank's half of the global batch. The reference sees the
same global batch as one process would with gradient accumulation over the two halves: grad = (g0 + g1) / 2 and
the max logit of each head = the max over both halves. That is bit for bit what FSDP's SUM-then-divide reduction
and MuonClip's MAX all-reduce produce (two-operand fp32 sums are commutative; halving is exact), so any weight
difference after N steps comes from the distributed optimizer itself. After N steps rank 0 writes the largest
weight difference (and the stats of both) to a JSON file. A second, odd-sized model checks uneven shards
(17 rows over 2 ranks -> 9 + 8).

Why not compare against one full-batch backward: its gradient differs from the sharded one in the last fp32 bits
(summation order). Newton-Schulz runs in bf16 and amplifies the smallest singular directions by up to ~500x, so
on rank-deficient gradients (an expert that saw one token) a single flipped bf16 rounding changes the update
visibly; that is Muon's own sensitivity, not a property of the distributed scheme.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from openk2.config import K2Config
from openk2.model import K2ForCausalLM
from openk2.optim import MuonClip

STEPS = 4
LR = 2e-2
TAU = 0.06  # the tiny model starts near 0.05: the clip fires on some heads from the first steps


def _gloo_sum(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)  # gloo has no AVG; FSDP divides after the SUM


def _reference_step(model: nn.Module, opt: MuonClip, halves: list[torch.Tensor], loss_fn) -> None:
    """One single-process step over the global batch as gradient accumulation over its halves (see above)."""
    opt.zero_grad()
    signals = []
    for half in halves:
        loss_fn(model, half).backward()
        signals.append([t.module.max_logits for t in opt.attention_targets])
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(len(halves))
    for i, t in enumerate(opt.attention_targets):
        t.module.max_logits = torch.stack([per_half[i] for per_half in signals]).amax(dim=0)
    opt.step()


def _k2_loss(model, batch):
    return model(batch, labels=batch).loss


def _max_diff(ref: nn.Module, sharded: nn.Module) -> float:
    """Largest |w_sharded - w_ref| over all parameters."""
    diff = 0.0
    for (name, p_ref), (_, p_sh) in zip(ref.named_parameters(), sharded.named_parameters()):
        full = p_sh.full_tensor() if hasattr(p_sh, "full_tensor") else p_sh
        diff = max(diff, (full.detach() - p_ref.detach()).abs().max().item())
    return diff


def run_k2(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    cfg = K2Config.preset("tiny")
    ref = K2ForCausalLM(cfg)
    init = copy.deepcopy(ref)
    sharded = copy.deepcopy(ref)
    for block in sharded.model.layers:
        fully_shard(block)
    fully_shard(sharded)
    _gloo_sum(sharded)
    opt_ref = MuonClip(ref, lr=LR, qk_clip_tau=TAU)
    opt_sh = MuonClip(sharded, lr=LR, qk_clip_tau=TAU)
    assert opt_ref.muon_param_names() == opt_sh.muon_param_names()
    gen = torch.Generator().manual_seed(1)
    stats = []
    for _ in range(STEPS):
        ids = torch.randint(0, cfg.vocab_size, (2 * world, 16), generator=gen)  # the same global batch everywhere
        halves = list(ids.chunk(world))
        _reference_step(ref, opt_ref, halves, _k2_loss)
        opt_sh.zero_grad()
        _k2_loss(sharded, halves[rank]).backward()
        opt_sh.step()
        stats.append({"ref": opt_ref.last_stats, "sharded": opt_sh.last_stats})
    moved = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(ref.parameters(), init.parameters()))
    placements = {n: str(p.placements) for n, p in sharded.named_parameters() if "experts.gate_proj" in n}
    return {"max_diff": _max_diff(ref, sharded), "moved": moved, "stats": stats, "expert_placements": placements}


def _mse_loss(model, x):
    return F.mse_loss(model(x), x.flip(-1))


def run_uneven(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(33, 17, bias=False), nn.Tanh(), nn.Linear(17, 33))
    sharded = copy.deepcopy(ref)
    fully_shard(sharded)
    _gloo_sum(sharded)
    opt_ref = MuonClip(ref, lr=LR, qk_clip_tau=None)
    opt_sh = MuonClip(sharded, lr=LR, qk_clip_tau=None)
    gen = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        x = torch.randn(4 * world, 33, generator=gen)
        halves = list(x.chunk(world))
        _reference_step(ref, opt_ref, halves, _mse_loss)
        opt_sh.zero_grad()
        _mse_loss(sharded, halves[rank]).backward()
        opt_sh.step()
    local_rows = sharded[0].weight.to_local().shape[0]
    return {"max_diff": _max_diff(ref, sharded), "local_rows": local_rows,
            "update_rms": [opt_ref.last_stats["update_rms"], opt_sh.last_stats["update_rms"]]}


def run_expert_parallel(rank: int, world: int) -> dict:
    """openk2.parallel's layout (expert parallelism ep=world, then FSDP2): the expert stacks are DTensors on the
    (dp, ep) mesh. The reference gets exactly the sharded run's gradients (full_tensor) and max-logit signal, so
    this isolates the optimizer: the same gradient must give the same weights."""
    from openk2.parallel import init_distributed, parallelize

    ctx = init_distributed(ep=world, backend="gloo")
    torch.manual_seed(0)
    cfg = K2Config.preset("tiny")
    ref = K2ForCausalLM(cfg)
    sharded = parallelize(copy.deepcopy(ref), ctx)
    opt_ref = MuonClip(ref, lr=LR, qk_clip_tau=TAU)
    opt_sh = MuonClip(sharded, lr=LR, qk_clip_tau=TAU)
    ref_params, sh_params = dict(ref.named_parameters()), dict(sharded.named_parameters())
    gen = torch.Generator().manual_seed(3)
    clipped = 0
    for _ in range(STEPS):
        ids = torch.randint(0, cfg.vocab_size, (2 * world, 16), generator=gen).chunk(world)[rank]
        opt_sh.zero_grad()
        _k2_loss(sharded, ids).backward()
        for name, p in ref_params.items():
            p.grad = sh_params[name].grad.full_tensor()
        for t_ref, t_sh in zip(opt_ref.attention_targets, opt_sh.attention_targets):
            signal = t_sh.module.max_logits.clone()
            dist.all_reduce(signal, op=dist.ReduceOp.MAX)
            t_ref.module.max_logits = signal
        opt_ref.step()
        opt_sh.step()
        clipped += opt_sh.last_stats["clipped_heads"]
        assert opt_sh.last_stats["clipped_heads"] == opt_ref.last_stats["clipped_heads"]
    diff = max((sh_params[n].full_tensor() - p).abs().max().item() for n, p in ref_params.items())
    placements = {n: str(p.placements) for n, p in sh_params.items() if "experts.gate_proj" in n}
    return {"max_diff": diff, "clipped_heads": clipped, "expert_placements": placements}


def run_other_placements(rank: int, world: int) -> dict:
    """Layouts the owner-computes path does not cover (column-sharded matrix, expert stack sharded inside the
    matrices) take the gather-everything fallback: still the single-process update."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from openk2.optim import Muon

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(4)
    inits = [torch.randn(12, 10, generator=gen), torch.randn(4, 6, 10, generator=gen)]
    placements = [[Shard(1)], [Shard(2)]]
    ref = [nn.Parameter(w.clone()) for w in inits]
    sharded = [nn.Parameter(distribute_tensor(w.clone(), mesh, pl)) for w, pl in zip(inits, placements)]
    opt_ref, opt_sh = Muon(ref, lr=LR), Muon(sharded, lr=LR)
    for _ in range(STEPS):
        grads = [torch.randn(w.shape, generator=gen) for w in inits]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        for p, g, pl in zip(sharded, grads, placements):
            p.grad = distribute_tensor(g.clone(), mesh, pl)
        opt_ref.step()
        opt_sh.step()
    return {"max_diff": max((s.full_tensor() - r).abs().max().item() for s, r in zip(sharded, ref)),
            "moved": max((r - w).abs().max().item() for r, w in zip(ref, inits))}


def main() -> None:
    out_path = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world": world, "k2": run_k2(rank, world), "uneven": run_uneven(rank, world),
              "expert_parallel": run_expert_parallel(rank, world), "other": run_other_placements(rank, world)}
    rows = [None] * world
    dist.all_gather_object(rows, result["uneven"]["local_rows"])
    result["uneven"]["local_rows"] = rows
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
