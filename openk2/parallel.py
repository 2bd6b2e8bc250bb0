"""Distributed training on torch.distributed, applied to the model from outside.

`model.py` knows nothing of ranks. This module takes a plain `K2ForCausalLM` and:

1. Expert parallelism (EP): every MoE layer's `RoutedExperts` is replaced by `ExpertParallelExperts`, which keeps
   E/ep whole experts on each rank of an EP group and exchanges tokens with two all-to-alls (dispatch, combine).
   The expert stacks become DTensors `Shard(0)` over the `ep` mesh dimension, so their *global* shape [E, I, H]
   is what a checkpoint sees (resume at another EP degree works).
2. FSDP2 (`fully_shard`): per decoder block and on the root. Dense parameters are sharded over every rank
   (the flattened dp×ep mesh: each rank reads its own data, so all ranks are data parallel for them); expert
   stacks are sharded over `dp` only (the ranks that hold the same experts).

The mesh is 2-D `(dp, ep)` with world = dp × ep; ranks of one EP group are adjacent (ep is the inner dim), so on
GPUs the all-to-all stays inside a node when ep ≤ GPUs per node.

Also here: `init_distributed` (process group with a collective timeout, the mesh, an exception hook that ends the
whole job), `set_gradient_sync` (gradient accumulation with one reduce-scatter per optimizer step),
`sync_router_load` (global expert load for the aux-loss-free bias update), `CollectiveCounter` (counts the c10d
collectives a piece of code issues), DCP checkpoints that resume at another world size (`save_distributed` /
`load_distributed`) and `consolidate` into one HF checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from openk2.checkpoint import publish_dir, restore_interrupted_publish
from openk2.model import use_grouped_mm

__all__ = [
    "DistContext",
    "init_distributed",
    "parallelize",
    "ExpertParallelExperts",
    "all_to_all_autograd",
    "sync_router_load",
    "clip_grad_norm_",
    "set_gradient_sync",
    "CollectiveCounter",
    "save_distributed",
    "load_distributed",
    "is_distributed_checkpoint",
    "consolidate",
    "main_consolidate",
]


# ----------------------------------------------------------------------------------------------------------------
# Process group, mesh and context
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DistContext:
    """Where this process sits in the job. A single-process run has world_size 1 and no mesh."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp_size: int = 1
    ep_size: int = 1
    mesh: Any = None  # DeviceMesh (dp, ep) when distributed
    flat_mesh: Any = None  # 1-D DeviceMesh over all ranks (the dp×ep mesh flattened), when distributed
    backend: str | None = None
    timeout_s: float = 300.0
    host_group: Any = None  # gloo group for long host-side waits under NCCL (None: the default group is gloo)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    # With EP × DP every rank reads its own data shard: EP ranks hold different experts but different tokens too.
    @property
    def data_rank(self) -> int:
        return self.rank

    @property
    def data_world(self) -> int:
        return self.world_size

    def _reduce(self, value, op) -> Any:
        is_tensor = isinstance(value, torch.Tensor)
        t = value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
        if self.is_distributed:
            original_device = t.device
            t = t.to(self.device)
            if op in ("mean", "sum"):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                if op == "mean":
                    t = t / self.world_size
            else:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            t = t.to(original_device)
        return t if is_tensor else float(t)

    def all_reduce_mean(self, value):
        """Mean over all ranks; returns a new tensor (or a float for a float), input untouched."""
        return self._reduce(value, "mean")

    def all_reduce_sum(self, value):
        """Sum over all ranks; returns a new tensor (or a float for a float), input untouched."""
        return self._reduce(value, "sum")

    def all_reduce_max(self, value):
        """Max over all ranks; returns a new tensor (or a float for a float), input untouched."""
        return self._reduce(value, "max")

    def barrier(self, timeout_s: float | None = None) -> None:
        """Wait for every rank. `timeout_s` replaces the collective timeout for this wait: for host-side work that
        may legitimately take longer, e.g. rank 0 preparing the data while the others wait."""
        if not self.is_distributed:
            return
        if timeout_s is None:
            dist.barrier()
            return
        # NCCL's barrier is a device all-reduce bound to the process-group timeout; a gloo barrier takes its own.
        options = dist.BarrierOptions()
        options.timeout = datetime.timedelta(seconds=float(timeout_s))
        group = self.host_group if self.host_group is not None else dist.group.WORLD
        group.barrier(options).wait()

    def destroy(self) -> None:
        """End the process group on the normal path, after a barrier: no rank tears down its connections while a
        peer may still be sending to it (a gloo rank that left early was seen to abort in C++ at teardown). After
        an exception, do not call this: the exception hook aborts the group instead, and a barrier would wait for
        ranks that are not coming."""
        if dist.is_available() and dist.is_initialized():
            if self.is_distributed:
                self.barrier()
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def init_distributed(*, ep: int = 1, backend: str | None = None, timeout_s: float = 300) -> DistContext:
    """Start the process group under torchrun (env RANK / WORLD_SIZE); a single-process context otherwise.

    gloo on CPU, nccl on GPU unless `backend` says otherwise. Collectives time out after `timeout_s` seconds, and
    an exception hook prints `[rank N] <traceback>` and aborts the process group, so one failing rank ends the job
    instead of leaving the others waiting in a collective.
    """
    if ep < 1:
        raise ValueError(f"init_distributed: ep must be >= 1, got {ep}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("init_distributed: backend='nccl' needs CUDA, and torch.cuda.is_available() is False; "
                         "use backend='gloo' (or None) on CPU")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    if world_size == 1 or "RANK" not in os.environ:
        if ep != 1:
            raise ValueError(
                f"init_distributed: ep={ep} needs {ep} processes (launch with torchrun --nproc_per_node {ep} ...); "
                "this is a single-process run"
            )
        return DistContext(device=device, timeout_s=float(timeout_s))

    if world_size % ep != 0:
        raise ValueError(
            f"init_distributed: world size {world_size} is not divisible by ep={ep}; "
            f"world = dp x ep, so choose ep among the divisors of {world_size}"
        )
    backend = backend or ("nccl" if use_cuda else "gloo")
    timeout = datetime.timedelta(seconds=float(timeout_s))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if use_cuda else None,
        )
    backend = dist.get_backend()  # the group's real backend, also when the caller initialized it
    _install_exception_hook(rank)
    host_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)

    from torch.distributed.device_mesh import init_device_mesh

    dp = world_size // ep
    mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    # 1-D view over all ranks for the dense (non-expert) parameters
    flat_mesh = mesh["dp"] if ep == 1 else mesh["dp", "ep"]._flatten("dp_ep")
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        dp_size=dp,
        ep_size=ep,
        mesh=mesh,
        flat_mesh=flat_mesh,
        backend=backend,
        timeout_s=float(timeout_s),
        host_group=host_group,
    )


def _install_exception_hook(rank: int) -> None:
    """An uncaught exception on any rank: print it tagged with the rank, abort the process group, exit 1.

    Exiting at once matters: torchrun notices a dead worker and stops the others; without a launcher the
    other ranks fail their next collective after the timeout instead of waiting forever.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if exc_type is KeyboardInterrupt:
            previous(exc_type, exc, tb)
            return
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        lines = [f"[rank {rank}] uncaught {exc_type.__name__}: this rank ends the job"]
        lines += [f"[rank {rank}] {line}" for line in text.rstrip().splitlines()]
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
        try:
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None and dist.is_initialized():
                abort()
        except Exception as abort_error:  # the job is ending anyway; say why the abort failed
            sys.stderr.write(f"[rank {rank}] process-group abort failed: {abort_error!r}\n")
        finally:
            sys.stdout.flush()  # os._exit skips the flush at exit (torchrun workers are unbuffered; not every launcher)
            sys.stderr.flush()
            os._exit(1)

    sys.excepthook = hook


# ----------------------------------------------------------------------------------------------------------------
# Expert parallelism
# ----------------------------------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_autograd(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable `all_to_all_single` along dim 0 (rows `input_splits[r]` go to rank r of `group`)."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


_EXPERT_STACKS = ("gate_proj", "up_proj", "down_proj")


def _is_routed_experts(module: nn.Module) -> bool:
    if type(module).__name__ == "RoutedExperts":
        return True
    params = dict(module.named_parameters(recurse=False))
    return all(name in params and params[name].dim() == 3 for name in _EXPERT_STACKS)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class ExpertParallelExperts(nn.Module):
    """Drop-in for `RoutedExperts` that holds only this rank's E/ep experts and exchanges tokens by all-to-all.

    Forward contract is the model's: `(x [N, H], topk_idx [N, k], topk_weight [N, k]) -> [N, H]`.
    Dispatch: the N·k (token, expert) pairs are sorted by expert, so they are grouped by owner rank (owner of
    expert e is e // (E/ep)); per-expert counts are exchanged first so each rank knows how many rows of each of
    its local experts arrive from every source. Combine: the reverse all-to-all, then the weighted sum per token.
    Parameters keep the names gate_proj [E, I, H], up_proj [E, I, H], down_proj [E, H, I] as DTensors with
    Shard(0) on the ep mesh, so state dicts carry the global shape.
    """

    def __init__(self, experts: nn.Module, ep_mesh, *, layer_name: str = "") -> None:
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard

        self.ep_mesh = ep_mesh
        self.ep_group = ep_mesh.get_group()
        self.ep_size = ep_mesh.size()
        self.ep_rank = ep_mesh.get_local_rank()
        gate = getattr(experts, "gate_proj")
        self.num_experts = int(gate.shape[0])
        if self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"{layer_name or 'RoutedExperts'}: n_routed_experts={self.num_experts} is not divisible by "
                f"ep={self.ep_size}; every EP rank must hold the same number of whole experts"
            )
        self.num_local = self.num_experts // self.ep_size
        self.layer_name = layer_name
        first = self.ep_rank * self.num_local
        for name in _EXPERT_STACKS:
            full = getattr(experts, name)
            if isinstance(full, DTensor):
                raise ValueError(f"{layer_name}.{name} is already a DTensor; apply parallelize() once, before FSDP")
            local = full.detach()[first : first + self.num_local].clone()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            self.register_parameter(name, nn.Parameter(dt, requires_grad=full.requires_grad))
        # openk2's experts are SwiGLU (SiLU gate); a module that names its activation (act_fn / act) keeps it.
        self.act = getattr(experts, "act_fn", None) or getattr(experts, "act", None) or nn.functional.silu

    def _expert_mlp(self, rows: torch.Tensor, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        """SwiGLU of each local expert on its contiguous block of rows (blocks in local-expert order).

        Every local expert takes part even with zero rows, so its weights get a zero gradient (not None) and
        FSDP's gradient reduction is the same on every rank."""
        gate_w, up_w, down_w = (_local(getattr(self, n)).to(dtype) for n in _EXPERT_STACKS)
        # One kernel for all local experts where the model's RoutedExperts uses one too (not, e.g., under
        # torch.compile in fp32, whose shape rules for _grouped_mm accept bf16 only).
        if use_grouped_mm(rows.device.type, dtype):
            offsets = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
            gate = torch._grouped_mm(rows, gate_w.transpose(-2, -1), offs=offsets)
            up = torch._grouped_mm(rows, up_w.transpose(-2, -1), offs=offsets)
            return torch._grouped_mm(self.act(gate) * up, down_w.transpose(-2, -1), offs=offsets)
        outputs = []
        start = 0
        for e, n in enumerate(counts):
            block = rows[start : start + n]
            start += n
            hidden = self.act(block @ gate_w[e].t()) * (block @ up_w[e].t())
            outputs.append(hidden @ down_w[e].t())
        return torch.cat(outputs, dim=0)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        num_tokens, hidden = x.shape
        top_k = topk_idx.shape[1]
        flat_expert = topk_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)  # groups pairs by expert, hence by owner rank
        token_of_pair = order // top_k

        counts_per_expert = torch.bincount(flat_expert, minlength=self.num_experts).to(torch.long)
        # recv_counts[s, j]: rows for my local expert j that rank s sends me
        recv_counts = torch.empty_like(counts_per_expert)
        dist.all_to_all_single(recv_counts, counts_per_expert, group=self.ep_group)
        recv_counts = recv_counts.view(self.ep_size, self.num_local)
        send_splits = counts_per_expert.view(self.ep_size, self.num_local).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()

        # Same compute dtype as the model's RoutedExperts: the autocast dtype if on (bf16 tokens on the wire too).
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else _local(
            self.gate_proj).dtype
        dispatched = all_to_all_autograd(x[token_of_pair].to(dtype), recv_splits, send_splits, self.ep_group)
        # Received rows are ordered (source rank, local expert); regroup them by local expert for the matmuls.
        local_expert_of_row = torch.arange(self.num_local, device=x.device).repeat(self.ep_size)
        local_expert_of_row = torch.repeat_interleave(local_expert_of_row, recv_counts.reshape(-1))
        by_expert = torch.argsort(local_expert_of_row, stable=True)
        expert_out = self._expert_mlp(dispatched[by_expert], recv_counts.sum(0).tolist(), dtype)
        expert_out = torch.empty_like(expert_out).index_copy(0, by_expert, expert_out)

        combined = all_to_all_autograd(expert_out, send_splits, recv_splits, self.ep_group)
        # Weighted sum over each token's k experts, accumulated in fp32. The model's RoutedExperts weights and
        # index-adds in its compute dtype instead (bf16 under autocast: each weighted row and each add rounded to
        # bf16); that is the model's own numerics, left alone here. So the two paths agree to summation order in
        # fp32 but only to a few bf16 roundings under bf16 autocast, which the 2e-2 bf16 tolerance of the EP checks
        # (tests/dist/collectives_check.py, judged in tests/test_parallel.py) allows for.
        weights = topk_weight.reshape(-1)[order].unsqueeze(1).float()
        out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
        out.index_add_(0, token_of_pair, combined.float() * weights)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, local={self.num_local}, ep_rank={self.ep_rank}/{self.ep_size}"


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None:
        raise ValueError(
            f"parallelize: {type(model).__name__} has no `model.layers`; expected the K2ForCausalLM layout "
            "(docs/architecture.md)"
        )
    return list(layers) + list(getattr(model, "mtp", []))  # MTP modules are decoder blocks too (own FSDP units)


def _apply_expert_parallel(model: nn.Module, ctx: DistContext) -> list[nn.Module]:
    ep_mesh = ctx.mesh["ep"]
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if _is_routed_experts(child):
                full_name = f"{parent_name}.{child_name}" if parent_name else child_name
                ep_module = ExpertParallelExperts(child, ep_mesh, layer_name=full_name)
                setattr(parent, child_name, ep_module)
                replaced.append(ep_module)
    if not replaced:
        raise ValueError("parallelize: ep > 1 but the model has no RoutedExperts module (no MoE layers?)")
    return replaced


def parallelize(model: nn.Module, ctx: DistContext, *, reshard_after_forward: bool = True) -> nn.Module:
    """Apply expert parallelism, then FSDP2, in place; returns the model. No-op in a single-process run."""
    if not ctx.is_distributed:
        return model.to(ctx.device)
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model.to(ctx.device)
    expert_modules = _apply_expert_parallel(model, ctx) if ctx.ep_size > 1 else []
    dense_mesh = ctx.flat_mesh  # dense params: data parallel over every rank
    for expert_module in expert_modules:
        fully_shard(expert_module, mesh=ctx.mesh["dp"], reshard_after_forward=reshard_after_forward)
        # Each expert's gradient already sums the contributions of all ranks of its EP group (the all-to-all
        # backward brings them home); dividing by the whole world (not dp) makes it the global-mean gradient.
        expert_module.set_gradient_divide_factor(float(ctx.world_size))
    for block in _decoder_blocks(model):
        fully_shard(block, mesh=dense_mesh, reshard_after_forward=reshard_after_forward)
    # The root (embeddings, final norm, lm_head) is needed again right at the start of backward: keep it gathered.
    fully_shard(model, mesh=dense_mesh, reshard_after_forward=False)
    if ctx.backend == "gloo":
        # gloo has no AVG / PREMUL_SUM reductions: reduce with SUM, then divide.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
        if ctx.dp_size == 1:
            # A size-1 FSDP group skips the collective and divides by the custom factor itself; forcing SUM there
            # would divide a second time (torch 2.13), halving the expert gradients.
            for expert_module in expert_modules:
                expert_module.set_force_sum_reduction_for_comms(False)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> bool:
    """Turn FSDP2's gradient reduction on or off for every FSDP unit of `model`; True if `model` is FSDP-sharded.

    Gradient accumulation without communication: with sync off, a backward leaves each unit's *unsharded*
    gradient in place (the next backward adds to it) instead of reduce-scattering it; the first backward with sync
    on reduce-scatters the accumulated sum once. Cost: every rank holds full-size gradients of all sharded
    parameters until then. A model that is not FSDP-sharded (one process) is left alone: its gradients accumulate
    locally anyway."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return False
    model.set_requires_gradient_sync(enabled, recurse=True)
    return True


_COLLECTIVE_KINDS = {  # c10d op -> (kind, index of the argument holding the full-size tensor(s))
    "_reduce_scatter_base_": ("reduce_scatter", 1), "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "_allgather_base_": ("all_gather", 0), "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
    "alltoall_base_": ("all_to_all", 1), "alltoall_": ("all_to_all", 1),
    "broadcast_": ("broadcast", 0), "reduce_": ("reduce", 0), "gather_": ("gather", 1), "scatter_": ("scatter", 0),
    "barrier": ("barrier", None), "monitored_barrier": ("barrier", None),
}


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return sum(_numel(item) for item in x)
    return 0


class CollectiveCounter:
    """Counts the c10d collectives this process issues while active, by kind: `calls` and `elements` (of the
    full-size tensor: a reduce-scatter's input, an all-gather's output, an all-reduce's buffer, an all-to-all's
    input). Every collective enters the dispatcher as a `c10d::` op, so FSDP2's reduce-scatters and all-gathers,
    expert parallelism's all-to-alls and the optimizer's exchanges are all seen, also those issued from backward
    hooks; nothing is patched. A TorchDispatchMode sees every op, so it costs Python time per op: for
    measurements and tests (`TrainConfig.count_collectives`), not for production runs.

        counter = CollectiveCounter()
        with counter:
            train_step()
        counter.calls["reduce_scatter"], counter.elements["reduce_scatter"]
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.calls: dict[str, int] = {}
        self.elements: dict[str, int] = {}
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "c10d":
                    counter._count(func.__name__.split(".")[0], args)
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def _count(self, op_name: str, args) -> None:
        kind, tensor_arg = _COLLECTIVE_KINDS.get(op_name, (f"other:{op_name}", None))
        self.calls[kind] = self.calls.get(kind, 0) + 1
        n = _numel(args[tensor_arg]) if tensor_arg is not None and tensor_arg < len(args) else 0
        self.elements[kind] = self.elements.get(kind, 0) + n

    def reset(self) -> None:
        self.calls.clear()
        self.elements.clear()

    def summary(self) -> dict[str, dict[str, int]]:
        """{kind: {"calls": n, "elements": m}}, kinds sorted (JSON-friendly)."""
        return {kind: {"calls": self.calls[kind], "elements": self.elements[kind]} for kind in sorted(self.calls)}

    def __enter__(self) -> "CollectiveCounter":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, ctx: DistContext | None = None) -> torch.Tensor:
    """Global gradient-norm clipping that works on a parallelized model.

    `torch.nn.utils.clip_grad_norm_` cannot mix DTensors from different meshes (expert stacks live on the 2-D
    (dp, ep) mesh, dense params on the flat one). Here each rank sums the squares of its local gradient shards,
    dividing by the replication factor of any Replicate placement (and by the world size for plain tensors, which
    every rank holds whole), then one all-reduce gives the global squared norm. Returns the total norm (fp32).
    """
    from torch.distributed.tensor import DTensor, Replicate

    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    distributed = ctx.is_distributed if ctx is not None else (dist.is_available() and dist.is_initialized())
    if not distributed:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    world = dist.get_world_size()
    device = ctx.device if ctx is not None else grads[0].device if grads else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        if isinstance(g, DTensor):
            replicas = 1
            for mesh_dim, placement in enumerate(g.placements):
                if isinstance(placement, Replicate):
                    replicas *= g.device_mesh.size(mesh_dim)
            local, share = g.to_local(), 1.0 / replicas
        else:
            local, share = g, 1.0 / world
        total_sq += local.detach().float().pow(2).sum().to(device) * share
    dist.all_reduce(total_sq, op=dist.ReduceOp.SUM)
    total = total_sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        local.mul_(coef.to(local.device, local.dtype))
    return total


# ----------------------------------------------------------------------------------------------------------------
# Router load
# ----------------------------------------------------------------------------------------------------------------


def _router_gates(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "load", None), torch.Tensor)
            and hasattr(m, "e_score_correction_bias")]


@torch.no_grad()
def sync_router_load(model: nn.Module, ctx: DistContext) -> torch.Tensor | None:
    """Sum every router's per-expert token counts over all ranks, in place; returns the global load [L, E].

    Call before `model.update_router_bias(gamma)`: with the global load every replica moves the bias the same way
    (the bias is a buffer FSDP does not touch, so it must stay identical by construction).
    """
    gates = _router_gates(model)
    if not gates:
        return None
    flat = torch.stack([g.load.detach().float() for g in gates])
    if ctx.is_distributed:
        flat = flat.to(ctx.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for gate, row in zip(gates, flat):
        gate.load.copy_(row.to(gate.load.device, gate.load.dtype))
    return flat


# ----------------------------------------------------------------------------------------------------------------
# Distributed checkpoints (torch.distributed.checkpoint)
# ----------------------------------------------------------------------------------------------------------------

_META_FILE = "openk2_dist.json"  # written last: its presence marks a complete checkpoint
_DCP_SUBDIR = "dcp"  # the torch.distributed.checkpoint files (.metadata, __<rank>_0.distcp)


def is_distributed_checkpoint(path) -> bool:
    """True for a directory written by `save_distributed`."""
    return (Path(path) / _META_FILE).is_file() and (Path(path) / _DCP_SUBDIR).is_dir()


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    inner = getattr(optimizer, "optimizers", None)
    if inner is not None:
        return list(inner)
    raise TypeError(
        f"save/load_distributed: {type(optimizer).__name__} is neither a torch.optim.Optimizer nor exposes "
        "`.optimizers`; DCP needs torch optimizers to map their state to parameter names"
    )


def _optimizer_state_as_dtensors(optimizers: list[torch.optim.Optimizer]) -> None:
    """Present plain per-rank optimizer state (an AdamW moment kept as the *local shard* of a DTensor parameter)
    as a DTensor with the parameter's layout, sharing storage, so DCP saves / loads it by global offsets and a
    different world size can resume it. `_optimizer_state_as_local` undoes it before the optimizer steps again."""
    from torch.distributed.tensor import DTensor

    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            if not isinstance(param, DTensor):
                continue
            local_shape = param.to_local().shape
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim() > 0 \
                        and value.shape == local_shape:
                    state[key] = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                                    shape=param.shape, stride=param.stride())


def _optimizer_state_as_local(optimizers: list[torch.optim.Optimizer], originally_local: set) -> None:
    from torch.distributed.tensor import DTensor

    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, DTensor) and (id(param), key) in originally_local:
                    state[key] = value.to_local()


def _plain_state_keys(optimizers: list[torch.optim.Optimizer]) -> set:
    from torch.distributed.tensor import DTensor

    return {(id(p), k) for o in optimizers for p, st in o.state.items() for k, v in st.items()
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and not isinstance(v, DTensor)}


def _state_dicts(model: nn.Module, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict

    optimizers = _torch_optimizers(optimizer)
    if not optimizers:
        return get_model_state_dict(model), {}
    model_sd, optim_sd = get_state_dict(model, optimizers if len(optimizers) > 1 else optimizers[0])
    return model_sd, optim_sd


def _create_optimizer_state(model: nn.Module, optimizer, optimizers: list[torch.optim.Optimizer]) -> None:
    """DCP saves / loads the optimizer state through existing tensors; `get_state_dict` creates them for an optimizer
    that has not stepped yet, by a zero-lr step on zero gradients. Made safe here:
    - it skips that step when any parameter holds a gradient (the state stays empty, and a load silently drops the
      moments), so gradients are set aside for it;
    - it must not change training: QK-Clip (which rescales weights whatever the lr) is off for it, and the step
      counters it advanced are reset, so the new state acts exactly as a fresh optimizer's."""
    fresh = [o for o in optimizers if not o.state]
    if not fresh:
        return
    params = [p for o in optimizers for group in o.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    clip_taus = {o: o.qk_clip_tau for o in optimizers if getattr(o, "qk_clip_tau", None) is not None}
    for p in params:
        p.grad = None
    for o in clip_taus:
        o.qk_clip_tau = None
    try:
        _state_dicts(model, optimizer)
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        for o, tau in clip_taus.items():
            o.qk_clip_tau = tau
    for o in fresh:
        for state in o.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_distributed(path, model: nn.Module, optimizer, extra_state: dict | None = None, tokenizer=None) -> Path:
    """Write a DCP checkpoint at `path`, atomically: every rank writes into the hidden sibling `.tmp-<name>`, rank 0
    renames it to `path` after a barrier. A crash mid-save leaves only that temporary directory (which the next
    save, or a trainer resume, removes); a previous checkpoint at `path` is replaced only once the new one is whole
    (`openk2.checkpoint.publish_dir`, which fsyncs every file first; a crash in the middle of that leaves it in
    `.old-<name>`, which `load_distributed`, the next save and a trainer resume rename back).

    Saved: the model and optimizer state (DTensor shards, expert stacks in their global shape, so any world size
    / EP degree can resume), the model config (for `consolidate`), `extra_state` per rank (`extra_rank{r}.pt`;
    rank-local things like a data loader position belong there) and `tokenizer` if given (so the checkpoint
    serves, fine-tunes and consolidates on its own, like a single-process one).
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    # Hidden names, like the single-process trainer's `.tmp-step_N`: a `step_*` listing never mistakes them for
    # checkpoints.
    tmp = path.with_name(f".tmp-{path.name}")
    rank, world = _rank_world()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    optimizers = _torch_optimizers(optimizer)
    _create_optimizer_state(model, optimizer, optimizers)
    plain = _plain_state_keys(optimizers)
    _optimizer_state_as_dtensors(optimizers)
    try:
        model_sd, optim_sd = _state_dicts(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / _DCP_SUBDIR), no_dist=world == 1)
    finally:
        _optimizer_state_as_local(optimizers, plain)
    torch.save(dict(extra_state or {}), tmp / f"extra_rank{rank}.pt")
    _barrier()
    if rank == 0:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        ep = next((m.ep_size for m in model.modules() if isinstance(m, ExpertParallelExperts)), 1)
        meta = {"format": "openk2-dcp-1", "world_size": world, "ep": ep, "has_optimizer": bool(optim_sd)}
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2))
        publish_dir(tmp, path)
    _barrier()
    return path


def load_distributed(path, model: nn.Module, optimizer) -> dict:
    """Load a checkpoint written by `save_distributed` into an already parallelized model (any world size / EP)
    and its optimizer; returns the saved `extra_state` (this rank's if the world size matches, else rank 0's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict, set_model_state_dict

    path = Path(path)
    restore_interrupted_publish(path)
    meta_file = path / _META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"load_distributed: {meta_file} missing; {path} is not a complete openk2 DCP checkpoint")
    meta = json.loads(meta_file.read_text())
    rank, world = _rank_world()
    optimizers = _torch_optimizers(optimizer)
    if optimizers and not meta.get("has_optimizer", True):
        raise ValueError(f"load_distributed: {path} was saved without optimizer state")
    _create_optimizer_state(model, optimizer, optimizers)
    plain = _plain_state_keys(optimizers)
    _optimizer_state_as_dtensors(optimizers)
    try:
        model_sd, optim_sd = _state_dicts(model, optimizer)
        state = {"model": model_sd}
        if optimizers:
            state["optim"] = optim_sd
        dcp.load(state, checkpoint_id=str(path / _DCP_SUBDIR), no_dist=world == 1)
        if optimizers:
            set_state_dict(model, optimizers if len(optimizers) > 1 else optimizers[0],
                           model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_model_state_dict(model, state["model"])
    finally:
        _optimizer_state_as_local(optimizers, plain)
    extra_file = path / f"extra_rank{rank}.pt"
    if meta.get("world_size") != world or not extra_file.is_file():
        extra_file = path / "extra_rank0.pt"
    return torch.load(extra_file, weights_only=False) if extra_file.is_file() else {}


def load_distributed_weights(model: nn.Module, dcp_dir) -> None:
    """One process, no process group: load the model weights of a DCP checkpoint (any world size / EP) into a
    plain, unsharded model, in place, cast to the model's dtypes. Tensors the model lacks (e.g. MTP modules of a
    model built without them) are not read."""
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(Path(dcp_dir) / _DCP_SUBDIR), no_dist=True)
    model.load_state_dict(state["model"])


def consolidate(dcp_dir, hf_out_dir, **save_kwargs) -> Path:
    """One process: read a DCP checkpoint (any world size / EP) into a plain model and write the single
    HF-layout checkpoint with `openk2.checkpoint.save_pretrained` (extra kwargs go to it), with the checkpoint's
    tokenizer when it holds one."""
    from openk2.checkpoint import save_pretrained
    from openk2.config import K2Config
    from openk2.model import K2ForCausalLM
    from openk2.tokenizer import K2Tokenizer, TOKENIZER_CONFIG_JSON

    dcp_dir = Path(dcp_dir)
    config_file = dcp_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"consolidate: {config_file} missing; was {dcp_dir} written by save_distributed?")
    model = K2ForCausalLM(K2Config.from_dict(json.loads(config_file.read_text())))
    load_distributed_weights(model, dcp_dir)
    tokenizer = K2Tokenizer.load(dcp_dir) if (dcp_dir / TOKENIZER_CONFIG_JSON).is_file() else None
    return save_pretrained(model, hf_out_dir, tokenizer=tokenizer, **save_kwargs)  # published with the weights


def main_consolidate(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="openk2 consolidate",
        description="Turn a distributed (DCP) checkpoint of any world size into one HF-layout checkpoint.",
    )
    parser.add_argument("dcp_dir", help="directory written by save_distributed (holds openk2_dist.json)")
    parser.add_argument("out_dir", help="where to write config.json + safetensors")
    parser.add_argument("--fp8", action="store_true", help="store Linear weights as block-FP8")
    parser.add_argument("--max-shard-size", default=None, help="e.g. 5GB")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {}
    if args.fp8:
        kwargs["fp8"] = True
    if args.max_shard_size:
        kwargs["max_shard_size"] = args.max_shard_size
    from openk2.checkpoint import CheckpointError

    try:
        out = consolidate(args.dcp_dir, args.out_dir, **kwargs)
    except (CheckpointError, FileNotFoundError) as error:
        print(f"openk2 consolidate: {error}", file=sys.stderr)
        return 1
    print(f"consolidated {args.dcp_dir} -> {out}")
    return 0
