"""Muon and MuonClip: Newton-Schulz orthogonalized momentum for hidden-layer matrices, AdamW for the rest,
and per-head QK-Clip after every step (Kimi K2 report §2.1, Moonlight §2; facts in shared/k2-spec.md §2).

Reading order:
  zeropower_via_newtonschulz   the orthogonalization (quintic Newton-Schulz, bf16, batched over leading dims)
  _gram_newton_schulz          the same iteration run on X X^T (fewer FLOPs; opt-in: unsafe on low-rank input)
  orthogonalize_many           many updates batched by shape (standard NS; Gram for stacks only on request)
  muon_update / adamw_update   one parameter's update, written as formulas
  Muon                         a torch.optim.Optimizer over 2-D / 3-D parameters
  MuonClip                     one optimizer object: grouping rule + Muon groups + AdamW groups + QK-Clip

Conventions chosen to match torch.optim.Muon exactly (so the two agree bit for bit on 2-D weights):
  * momentum is kept as an EMA, buf <- lerp(buf, g, 1 - mu); Nesterov feeds lerp(g, buf, mu) to NS.
    This equals the spec's M_t = mu*M_{t-1} + G_t (and G_t + mu*M_t) times the constant (1 - mu), which the
    Frobenius normalization inside NS removes, so the update is the same.
  * NS pre-normalization divides by max(||X||_F, eps), eps = 1e-7, in bf16.
  * weight decay is decoupled and uses the group lr: p *= 1 - lr*wd; then p -= lr*scale(A,B)*NS(update).

Distributed (FSDP2 / DTensor): see `_orthogonalize_sharded` and docs/muonclip.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.adamw import adamw as functional_adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
RMS_SCALES = ("moonlight", "original")


# ----------------------------------------------------------------------------------------------------------------
# Newton-Schulz


NS_METHODS = ("standard", "gram", "auto")
GRAM_RESTART_AFTER = 3  # Gram NS recomputes X and its Gram matrix after this many iterations (bf16 stability)
GRAM_MIN_ASPECT = 1.5  # "auto" uses Gram NS when long side / short side >= this ...
GRAM_MIN_SIDE = 128  # ... and the short side is at least this (below it the saving is lost in call overhead)


def gram_pays(shape: torch.Size | tuple[int, ...], steps: int = 5) -> bool:
    """The "auto" rule: Gram Newton-Schulz for matrices [..., A, B] whose aspect ratio makes it cheaper.
    FLOPs per matrix (m = short side, n = long side, 5 steps, restart after 3): standard 20 m^2 n + 10 m^3,
    Gram 8 m^2 n + 28 m^3; equal at n/m = 1.5, Gram 1.14x fewer at n/m = 2 and 1.43x fewer at 3.5 (K2's experts)."""
    m, n = min(shape[-2:]), max(shape[-2:])
    return steps > GRAM_RESTART_AFTER and m >= GRAM_MIN_SIDE and n >= GRAM_MIN_ASPECT * m


def zeropower_via_newtonschulz(G: Tensor, steps: int = 5, eps: float = NS_EPS, method: str = "standard", *,
                               overwrite_input: bool = False) -> Tensor:
    """Approximately orthogonalize G (U S V^T -> U S' V^T, S' in ~[0.5, 1.5]) with a quintic Newton-Schulz
    iteration in bf16. G is [..., A, B]; leading dims are a batch (a 3-D expert stack [E, A, B] is E independent
    orthogonalizations done in one batched call). Returns bf16 of G's shape.

    method: "standard" iterates on X (torch.optim.Muon's algorithm; its results to the bit on 2-D weights);
    "gram" iterates on the small Gram matrix X X^T (same polynomial, fewer FLOPs for wide matrices, equal to
    the standard iteration within bf16 rounding; see `_gram_newton_schulz`); "auto" picks by `gram_pays`.
    overwrite_input: G is a bf16 tensor the caller no longer needs; the standard iteration starts in it (no copy)."""
    if G.ndim < 2:
        raise ValueError(f"zeropower_via_newtonschulz: need a [..., A, B] tensor, got shape {tuple(G.shape)}")
    if method not in NS_METHODS:
        raise ValueError(f"zeropower_via_newtonschulz: method must be one of {NS_METHODS}, got {method!r}")
    use_gram = method == "gram" or (method == "auto" and gram_pays(G.shape, steps))
    tall = G.size(-2) > G.size(-1)
    if use_gram:  # the Frobenius normalization happens on X X^T (no pass over X)
        wide = G.bfloat16().mT if tall else G.bfloat16()  # a transposed view: bmm reads either layout
        X = _gram_newton_schulz(wide.reshape(-1, *wide.shape[-2:]), steps, eps).view(wide.shape)
        return X.mT if tall else X
    a, b, c = NS_COEFFICIENTS
    X = G if overwrite_input and G.dtype == torch.bfloat16 else G.to(torch.bfloat16, copy=True)  # normalized in place
    if tall:  # iterate on the wide orientation: X X^T is the smaller product
        X = X.mT
    X.div_(X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    batch_shape = X.shape[:-2]
    if X.ndim > 3:
        X = X.reshape(-1, X.size(-2), X.size(-1))
    fused_mm = torch.addmm if X.ndim == 2 else torch.baddbmm  # beta*input + alpha*(m1 @ m2) in one kernel
    mm = torch.mm if X.ndim == 2 else torch.bmm
    # Every step writes into the same few buffers (the kernels are those of the textbook loop, results to the bit):
    # a fresh multi-MB tensor per product costs page faults on CPU, up to a third of the call when the allocator
    # returns memory to the OS between steps (docs/benchmarks.md).
    A = X.new_empty(*X.shape[:-1], X.size(-2))
    B = torch.empty_like(A)
    X_buffers = (X.new_empty(X.shape), X if X.is_contiguous() else X.new_empty(X.shape))  # used in turn
    for k in range(steps):
        mm(X, X.mT, out=A)
        fused_mm(A, A, A, beta=b, alpha=c, out=B)  # b*A + c*A@A
        X = fused_mm(X, B, X, beta=a, out=X_buffers[k % 2])  # a*X + B@X
    X = X.reshape(*batch_shape, X.size(-2), X.size(-1))
    return X.mT if tall else X


def _gram_newton_schulz(X0: Tensor, steps: int, eps: float = NS_EPS) -> Tensor:
    """The NS iteration X <- P(S) X, P(S) = aI + bS + cS^2, S = X X^T, run on m x m matrices (X0 is [N, m, n],
    wide, bf16, *not* normalized). Every iterate is X_k = Q_k X_0 with Q_k a polynomial in R = X_0 X_0^T, so we
    keep S_k = X_k X_k^T and Q_k (m x m) instead of X_k (m x n): S_{k+1} = P S P (P and S commute),
    Q_{k+1} = P Q_k, and apply Q to X once at the end. The Frobenius normalization is done on the Gram matrix,
    ||X_0||_F^2 = trace(R), and folded into Q, so no pass over the large X is spent on it.

    **Not safe as a default (measured in training):** on low-rank expert momentum (one dominant direction, a
    condition number ~1e3 — common for rarely routed experts) the bf16 noise below still reaches a negative
    eigenvalue of ~-0.3 within the first 3 steps, Q amplifies that direction ~60x, X_3 gets a singular value
    above the NS convergence range and the second phase explodes it (sigma_max 159 measured on one matrix;
    `openk2 pretrain` with Gram for the expert stacks spiked 22 times). Optimizers therefore use the standard
    iteration for stacks; this path stays available for experiments (`method="gram"`).

    Stability: in bf16, S's small eigenvalues carry absolute rounding noise of ~1e-3 of the largest; the
    iteration multiplies eigenvalues near 0 by ~a^2 = 12 per step, and a noise eigenvalue below 0 (impossible
    for a true Gram matrix) grows without bound. So after GRAM_RESTART_AFTER steps we form X = Q X_0 explicitly
    and restart from its fresh Gram matrix: each phase is short enough that the noise stays harmless (tested:
    singular values stay in the standard iteration's band, entries within ~0.03 of it; docs/muonclip.md).

    FLOPs (m short, n long, L steps in a phase): X X^T and Q X cost 2 m^2 n each; the steps cost (4L - 3)
    m x m products of 2 m^3 (S^2 inside P every step; P Q from step 2; S P P except on the last step)."""
    a, b, c = NS_COEFFICIENTS
    S = torch.bmm(X0, X0.mT)
    inv_norm = S.diagonal(dim1=-2, dim2=-1).float().sum(-1).clamp(min=eps * eps).rsqrt()  # 1 / ||X_0||_F
    S.mul_(inv_norm.square().to(S.dtype)[:, None, None])
    X = X0
    first = min(GRAM_RESTART_AFTER, steps)
    for phase, phase_steps in enumerate((first, steps - first)):
        if phase_steps == 0:
            continue
        if phase > 0:
            S = torch.bmm(X, X.mT)
        Q = None
        for k in range(phase_steps):
            P = torch.baddbmm(S, S, S, beta=b, alpha=c)  # b*S + c*S@S ...
            P.diagonal(dim1=-2, dim2=-1).add_(a)  # ... + a*I
            Q = P if Q is None else torch.bmm(P, Q)
            if k < phase_steps - 1:
                S = torch.bmm(torch.bmm(S, P), P)  # = X_{k+1} X_{k+1}^T
        if phase == 0:
            Q = Q * inv_norm.to(Q.dtype)[:, None, None]  # X_0 enters unnormalized
        X = torch.bmm(Q, X)
    return X


MAX_NS_BATCH = 16  # matrices per batched Newton-Schulz call; larger batches stopped paying off on this CPU


def _matrix_shape(u: Tensor) -> tuple[int, int]:
    """Per-matrix shape in the wide orientation (what NS iterates on)."""
    return (min(u.shape[-2:]), max(u.shape[-2:]))


def _from_wide_batch(o: Tensor, like: Tensor) -> Tensor:
    tall = like.size(-2) > like.size(-1)
    o = o.reshape(*like.shape[:-2], *_matrix_shape(like)) if tall else o.reshape(like.shape)
    return o.mT if tall else o


def orthogonalize_many(updates: list[Tensor], steps: int = 5, stack_method: str = "standard") -> list[Tensor]:
    """NS of many matrices / stacks, batched by shape: tensors whose matrices have the same shape (tall ones
    transposed to wide) are concatenated into calls of at most MAX_NS_BATCH matrices (a tensor larger than that
    goes alone), and the results are split back (bf16, each input's shape). Same values as calling
    zeropower_via_newtonschulz on each; on CPU it saves per-call overhead and elementwise passes.

    2-D matrices always take the standard iteration (torch.optim.Muon's results); 3-D+ stacks (expert weights,
    which torch.optim.Muon rejects) take `stack_method`: "standard" by default, because Gram NS ("gram", or
    "auto" = Gram where `gram_pays`) is not safe on real momentum (see `_gram_newton_schulz`)."""
    if stack_method not in NS_METHODS:
        raise ValueError(f"orthogonalize_many: stack_method must be one of {NS_METHODS}, got {stack_method!r}")
    methods = [stack_method if u.ndim >= 3 else "standard" for u in updates]
    batches: list[list[int]] = []
    open_batch: dict[tuple, tuple[list[int], int]] = {}  # (shape, method) -> (indices, matrices so far)
    for i, u in enumerate(updates):
        key, n = (_matrix_shape(u), methods[i]), u[..., 0, 0].numel()
        indices, count = open_batch.get(key, ([], 0))
        if indices and count + n > MAX_NS_BATCH:
            batches.append(indices)
            indices, count = [], 0
        open_batch[key] = (indices + [i], count + n)
    batches += [indices for indices, _ in open_batch.values()]
    results: list[Tensor] = [updates[0]] * len(updates)
    for batch in batches:
        method = methods[batch[0]]
        if len(batch) == 1:  # nothing to concatenate
            results[batch[0]] = zeropower_via_newtonschulz(updates[batch[0]], steps, method=method)
            continue
        counts = [updates[j][..., 0, 0].numel() for j in batch]
        wide = torch.empty(sum(counts), *_matrix_shape(updates[batch[0]]), dtype=torch.bfloat16,
                           device=updates[batch[0]].device)
        for j, w in zip(batch, wide.split(counts)):  # cast + transpose + concatenate in one pass
            u = updates[j].reshape(-1, *updates[j].shape[-2:])
            w.copy_(u.mT if u.size(-2) > u.size(-1) else u)
        ortho = zeropower_via_newtonschulz(wide, steps, method=method, overwrite_input=True)
        for j, o in zip(batch, ortho.split(counts)):
            results[j] = _from_wide_batch(o, updates[j])
    return results


def update_scale(shape: torch.Size | tuple[int, ...], rms_scale: str) -> float:
    """Multiplier on lr for an orthogonalized update of a matrix [A, B] (the last two dims).
    "moonlight": 0.2*sqrt(max(A, B)) gives an update RMS of about 0.2, like AdamW's, so AdamW's lr and wd
    can be reused (Moonlight §2.2; K2). "original": sqrt(max(1, A/B)) (Keller Jordan; torch.optim.Muon's default).
    """
    A, B = shape[-2], shape[-1]
    if rms_scale == "moonlight":
        return 0.2 * math.sqrt(max(A, B))
    if rms_scale == "original":
        return math.sqrt(max(1.0, A / B))
    raise ValueError(f"rms_scale must be one of {RMS_SCALES}, got {rms_scale!r}")


# ----------------------------------------------------------------------------------------------------------------
# Per-parameter updates (local tensors; DTensors are unwrapped by the callers)


def nesterov_momentum_(grad: Tensor, buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """Update the momentum buffer in place and return the tensor to orthogonalize."""
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum) if nesterov else buf


def apply_muon_update_(param: Tensor, ortho: Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """Decoupled weight decay, then the scaled orthogonalized step (ortho may be bf16)."""
    param.mul_(1 - lr * weight_decay)
    param.add_(ortho, alpha=-lr * scale)  # bf16 ortho promoted inside the kernel, no fp32 copy


def adamw_step_(
    params: list[Tensor], grads: list[Tensor], states: list[dict], lr: float, weight_decay: float,
    betas: tuple[float, float], eps: float,
) -> None:
    """torch's AdamW update on a list of tensors (its functional API, so the math is torch.optim.AdamW's), through
    the fused kernel where there is one (CPU, CUDA: ~6x the per-tensor loop on CPU)."""
    if not params:
        return
    for p, state in zip(params, states):
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    steps = [state["step"] for state in states]
    if fused:  # the fused kernel wants its step counters on the parameters' device
        steps = [step if step.device == p.device else step.to(p.device) for step, p in zip(steps, params)]
        for state, step in zip(states, steps):
            state["step"] = step
    functional_adamw(
        params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], steps,
        foreach=False if not fused else None, fused=fused or None, amsgrad=False, beta1=betas[0], beta2=betas[1],
        lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)


# ----------------------------------------------------------------------------------------------------------------
# DTensor helpers (FSDP2 shards parameters as DTensor with Shard(0) on a 1-D mesh)


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _nonfinite_flags(grads: list[Tensor], any_dtensor: bool) -> list[bool]:
    """One flag per gradient: does it hold a NaN/inf? One sync for all; under DTensor the flags are OR-reduced
    across ranks so every rank skips the same parameters (a shard's NaN must stop the whole matrix)."""
    if not grads:
        return []
    # a norm is NaN/inf iff an entry is (or the norm overflows fp32, which deserves skipping too): one fused pass
    norms = torch._foreach_norm([_local(g) for g in grads])
    bad = (~torch.isfinite(torch.stack(norms))).to(torch.int32)
    if any_dtensor and _dist_ready():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return [bool(x) for x in bad.tolist()]


def _holds_whole_matrices(p: Tensor) -> bool:
    """A 3-D DTensor whose every placement shards dim 0 (the expert dim) or replicates: each rank's local piece
    is a set of whole expert matrices (FSDP2 Shard(0), expert parallelism, or both on a 2-D mesh), so per-expert
    Newton-Schulz on the local piece is exactly the single-process result and needs no communication."""
    from torch.distributed.tensor import Replicate

    return p.ndim >= 3 and all(isinstance(pl, Replicate) or getattr(pl, "dim", None) == 0 for pl in p.placements)


def _shard0_layout(p: Tensor) -> tuple[Any, int, int] | None:
    """(process group, rank in it, world) when p is a DTensor sharded as Shard(0) on a 1-D mesh, else None."""
    from torch.distributed.tensor import Shard

    if not _is_dtensor(p):
        return None
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        return None
    return mesh.get_group(), mesh.get_local_rank(), mesh.size()


@dataclass
class _ShardedMatrix:
    """A Shard(0)-sharded 2-D matrix waiting for orthogonalization by its owner rank."""

    param: Tensor  # DTensor
    update_local: Tensor  # this rank's rows of the momentum-updated gradient
    lr: float
    weight_decay: float
    scale: float
    owner: int


def _orthogonalize_sharded(jobs: list[_ShardedMatrix], ns_steps: int) -> tuple[float, int]:
    """Owner-computes scheme for Shard(0) 2-D matrices (Moonlight's distributed Muon, without redundant NS):
    matrix i is owned by rank i % world; every rank sends its rows (bf16, padded to equal chunk size) to the owner
    (gather), the owner runs NS on the whole matrix, and scatters each rank's rows back. Bytes moved per matrix of
    N elements: 2*(world-1)/world*N*2 (bf16 gather + bf16 scatter), versus (world-1)*N*2 for an all-gather.
    All gathers are issued asynchronously first, then the owner computes, then the scatters are issued.
    Returns (sum of squares of the scaled updates this rank computed, their element count) for stats."""
    sq_sum, count = 0.0, 0
    if not jobs:
        return sq_sum, count
    gathers = []
    for job in jobs:
        group, rank, world = _shard0_layout(job.param)
        rows = job.param.shape[0]
        chunk = -(-rows // world)
        padded = job.update_local.new_zeros(chunk, *job.param.shape[1:], dtype=torch.bfloat16)
        padded[: job.update_local.shape[0]] = job.update_local
        owner_global = dist.get_global_rank(group, job.owner)
        gather_list = [torch.empty_like(padded) for _ in range(world)] if rank == job.owner else None
        work = dist.gather(padded, gather_list, dst=owner_global, group=group, async_op=True)
        gathers.append((job, group, rank, world, chunk, gather_list, work, owner_global))
    scatters = []
    for job, group, rank, world, chunk, gather_list, work, owner_global in gathers:
        work.wait()
        out = job.update_local.new_empty(chunk, *job.param.shape[1:], dtype=torch.bfloat16)
        scatter_list = None
        if rank == job.owner:
            full = torch.cat(gather_list)[: job.param.shape[0]]
            ortho = zeropower_via_newtonschulz(full, ns_steps)
            sq_sum += float(torch.linalg.vector_norm(ortho, dtype=torch.float32)) ** 2 * job.scale**2
            count += ortho.numel()
            ortho = torch.cat([ortho, ortho.new_zeros(chunk * world - ortho.shape[0], *ortho.shape[1:])])
            scatter_list = list(ortho.split(chunk))
        w = dist.scatter(out, scatter_list, src=owner_global, group=group, async_op=True)
        scatters.append((job, out, w))
    for job, out, w in scatters:
        w.wait()
        local = job.param.to_local()
        apply_muon_update_(local, out[: local.shape[0]], job.lr, job.weight_decay, job.scale)
    return sq_sum, count


def _muon_step_group(
    group: dict, params: list[Tensor], grads: list[Tensor], state: dict, stats: "_StepTally"
) -> None:
    """Muon for one param group's (already finite-checked) params. Plain tensors and DTensors whose shards hold
    whole matrices (3-D expert stacks sharded on the expert dim) are orthogonalized locally; 2-D Shard(0) DTensors
    go through the owner-computes exchange; anything else is gathered whole with full_tensor()."""
    lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
    nesterov, ns_steps, rms_scale = group["nesterov"], group["ns_steps"], group["rms_scale"]
    sharded_jobs: list[_ShardedMatrix] = []
    local_jobs: list[tuple[Tensor, Tensor, float]] = []  # (local param, update, scale): NS batched by shape
    for p, g in zip(params, grads):
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
        buf = st["momentum_buffer"]
        scale = update_scale(p.shape, rms_scale)
        update = nesterov_momentum_(_local(g), _local(buf), mu, nesterov)
        layout = _shard0_layout(p) if _is_dtensor(p) else None
        if not _is_dtensor(p) or _holds_whole_matrices(p):
            local_jobs.append((_local(p), update, scale))
        elif layout is not None:
            sharded_jobs.append(_ShardedMatrix(p, update, lr, wd, scale, owner=stats.next_owner(layout[2])))
        else:  # other placements (e.g. a 2-D matrix on a 2-D mesh): correct, not communication-optimal
            from torch.distributed.tensor import DTensor, distribute_tensor

            full = DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape,
                                      stride=p.stride()).full_tensor()
            ortho = orthogonalize_many([full], ns_steps)[0]  # identical on every rank and to 1 process
            stats.add_update(ortho, scale, counted=dist.get_rank() == 0)
            ortho_local = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local()
            apply_muon_update_(p.to_local(), ortho_local, lr, wd, scale)
    orthos = orthogonalize_many([u for _, u, _ in local_jobs], ns_steps) if local_jobs else []
    for (p_local, _, scale), ortho in zip(local_jobs, orthos):
        stats.add_update(ortho, scale)
        apply_muon_update_(p_local, ortho, lr, wd, scale)
    sq, n = _orthogonalize_sharded(sharded_jobs, ns_steps)
    stats.update_sq_sum += sq
    stats.update_count += n


@dataclass
class _StepTally:
    """Counters gathered during one step, turned into `last_stats`."""

    nonfinite_skipped: int = 0
    skipped_names: list[str] = field(default_factory=list)
    update_sq_sum: float = 0.0
    update_count: int = 0
    any_dtensor: bool = False
    device: torch.device | None = None  # where collectives run (NCCL needs the accelerator)
    _owner_cursor: int = 0

    def add_update(self, ortho: Tensor, scale: float, counted: bool = True) -> None:
        if counted:
            self.update_sq_sum += float(torch.linalg.vector_norm(ortho, dtype=torch.float32)) ** 2 * scale**2
            self.update_count += ortho.numel()

    def next_owner(self, world: int) -> int:
        owner = self._owner_cursor % world
        self._owner_cursor += 1
        return owner

    def update_rms(self) -> float:
        totals = torch.tensor([self.update_sq_sum, float(self.update_count)], dtype=torch.float64,
                              device=self.device)
        if self.any_dtensor and _dist_ready():
            dist.all_reduce(totals)
        return math.sqrt(totals[0].item() / totals[1].item()) if totals[1] > 0 else 0.0


def _collect_grads(group: dict, names: dict[Tensor, str] | None, tally: _StepTally) -> tuple[list, list]:
    """Params with gradients in this group minus those with NaN/inf gradients (reported, left untouched)."""
    params = [p for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    tally.any_dtensor |= any(_is_dtensor(p) for p in params)
    if params and tally.device is None:
        tally.device = _local(params[0]).device
    flags = _nonfinite_flags(grads, tally.any_dtensor)
    keep_p, keep_g = [], []
    for p, g, bad in zip(params, grads, flags):
        if bad:
            name = names.get(p, f"<param {tuple(p.shape)}>") if names else f"<param {tuple(p.shape)}>"
            tally.nonfinite_skipped += 1
            tally.skipped_names.append(name)
            continue
        if g.is_sparse:
            raise RuntimeError(f"muon.py: sparse gradient for {names.get(p) if names else tuple(p.shape)} "
                               "is not supported")
        keep_p.append(p)
        keep_g.append(g)
    return keep_p, keep_g


def _warn_skipped(tally: _StepTally, where: str) -> None:
    if tally.nonfinite_skipped:
        shown = ", ".join(tally.skipped_names[:5]) + (" ..." if len(tally.skipped_names) > 5 else "")
        warnings.warn(f"{where}: {tally.nonfinite_skipped} parameter(s) had NaN/inf gradients and were not "
                      f"updated this step: {shown}", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# Muon


def _evaluate_closure(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """torch.optim's closure convention: re-evaluate the loss with grad enabled inside a no_grad step."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights and 3-D stacks of matrices (one orthogonalization per leading index).

    update = NS(Nesterov momentum) * scale(A, B), with decoupled weight decay: p *= 1 - lr*wd; p -= lr*scale*O.
    `rms_scale="moonlight"`: scale = 0.2*sqrt(max(A,B)) (default); `"original"`: sqrt(max(1, A/B)).
    A NaN/inf gradient is reported (warning; `last_stats["nonfinite_skipped"]`) and that parameter is skipped.
    """

    def __init__(
        self, params: Iterable, lr: float = 2e-4, weight_decay: float = 0.1, momentum: float = 0.95,
        nesterov: bool = True, ns_steps: int = 5, rms_scale: str = "moonlight",
    ) -> None:
        _check_hparams(lr, weight_decay, momentum, rms_scale)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, rms_scale=rms_scale, use_muon=True)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if not _muon_can_handle(p):
                    raise ValueError(f"Muon: parameter of shape {tuple(p.shape)} is not a non-empty 2-D or 3-D "
                                     "matrix; give it to AdamW (MuonClip does this automatically)")
        self.last_stats: dict[str, Any] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _evaluate_closure(closure)
        tally = _StepTally()
        for group in self.param_groups:
            params, grads = _collect_grads(group, None, tally)
            _muon_step_group(group, params, grads, self.state, tally)
        _warn_skipped(tally, "Muon.step")
        self.last_stats = {"nonfinite_skipped": tally.nonfinite_skipped, "update_rms": tally.update_rms()}
        return loss


def _check_hparams(lr: float, weight_decay: float, momentum: float, rms_scale: str) -> None:
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if rms_scale not in RMS_SCALES:
        raise ValueError(f"rms_scale must be one of {RMS_SCALES}, got {rms_scale!r}")


def _muon_can_handle(p: Tensor) -> bool:
    return p.ndim in (2, 3) and p.numel() > 0 and not torch.is_complex(p)


# ----------------------------------------------------------------------------------------------------------------
# Grouping rule


def _embedding_and_head_params(model: nn.Module) -> set[int]:
    """ids of parameters that are embeddings or output heads (including a head tied to an embedding)."""
    ids: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            ids.update(id(p) for p in module.parameters(recurse=False))
        last = name.rsplit(".", 1)[-1]
        if last in ("lm_head", "output", "head", "classifier", "score") and isinstance(module, nn.Linear):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def default_muon_filter(name: str, param: Tensor, *, embedding_or_head: bool = False) -> bool:
    """The default rule: Muon for the >= 2-D weights of hidden layers (attention projections, dense MLP, shared
    experts, routed expert stacks [E, I, H]); AdamW for embeddings, the output head, norm gains, biases, the
    router's e_score_correction_bias and the router gate `*.gate.weight` [E, H].

    Why the router gate goes to AdamW: it is a small classifier whose rows are per-expert score vectors read by
    a sigmoid + top-k, like lm_head's per-token rows. Orthogonalizing its update gives every expert's row an
    update of the same size whether the expert received many tokens or none, which amplifies noise on rarely
    chosen experts; AdamW's per-coordinate steps keep rarely-routed rows quiet. It is tiny, so cost is moot.
    """
    if embedding_or_head or not _muon_can_handle(param):
        return False
    parts = name.split(".")
    if "e_score_correction_bias" in parts or parts[-1] == "bias":
        return False
    if len(parts) >= 2 and parts[-2] == "gate" and parts[-1] == "weight":  # MoE router (dense MLP uses gate_proj)
        return False
    if any(k in name for k in ("embed_tokens", "wte", "wpe", "lm_head")):
        return False
    return True


def split_params_for_muonclip(
    model_or_params: nn.Module | Iterable, muon_filter: Callable[[str, Tensor], bool] | None = None
) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """(muon, adamw) lists of (name, param). Accepts a module, an iterable of params, or of (name, param) pairs.
    A user filter that picks a parameter Muon cannot handle (1-D, 4-D+, empty) is overruled (warning) to AdamW."""
    head_ids: set[int] = set()
    if isinstance(model_or_params, nn.Module):
        named = list(model_or_params.named_parameters())
        head_ids = _embedding_and_head_params(model_or_params)
    else:
        items = list(model_or_params)
        if items and isinstance(items[0], dict):
            raise TypeError("MuonClip: pass a model, params or (name, param) pairs; param-group dicts are built "
                            "by MuonClip itself (use muon_filter to choose the groups)")
        named = [it if isinstance(it, tuple) else (f"param{i}", it) for i, it in enumerate(items)]
    muon, adamw, seen = [], [], set()
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if muon_filter is not None:
            wants_muon = bool(muon_filter(name, p))
            if wants_muon and not _muon_can_handle(p):
                warnings.warn(f"MuonClip: muon_filter chose {name} {tuple(p.shape)}, which Muon cannot "
                              "orthogonalize (needs a non-empty 2-D/3-D matrix); using AdamW for it", stacklevel=3)
                wants_muon = False
        else:
            wants_muon = default_muon_filter(name, p, embedding_or_head=id(p) in head_ids)
        (muon if wants_muon else adamw).append((name, p))
    return muon, adamw


# ----------------------------------------------------------------------------------------------------------------
# MuonClip


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW + per-head QK-Clip in one optimizer (Kimi K2 §2.1).

        opt = MuonClip(model, lr=2e-4, weight_decay=0.1, qk_clip_tau=100.0)
        loss.backward(); opt.step(); opt.zero_grad()

    Groups: param_groups[i]["use_muon"] says which update a group gets; all groups share lr and weight decay
    (K2 reuses AdamW's lr/wd thanks to the moonlight RMS scaling). `adamw_lr` gives the AdamW group its own lr
    instead (not the K2 recipe; Keller Jordan's Muon does this). Measured at toy scale
    (docs/muonclip_experiments.md §1b): that group wants an lr at least as high as Muon's; sharing was within 0.03
    nats of the best split, and AdamW's own optimum lr there cost 0.25 nats. Every group's "lr" is the real learning rate,
    so torch LR schedulers (LambdaLR stores "initial_lr" and rewrites "lr") and openk2.optim.schedule drive it.

    QK-Clip (qk_clip_tau not None): the model must be passed as a module; MuonClip turns `record_max_logits` on
    in its attention modules (openk2 MLA, or any module qk_clip.find_attention_modules recognises), and after each
    step reads the recorded per-head max logits, all-reduces them (MAX) across ranks, and rescales the query/key
    weights of heads above tau. `last_stats` after a step:
        max_logit_per_layer [L floats], max_logit, clipped_heads, nonfinite_skipped, update_rms (Muon, without lr)
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable,
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        qk_clip_tau: float | None = 100.0,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        rms_scale: str = "moonlight",
        muon_filter: Callable[[str, Tensor], bool] | None = None,
        ns_steps: int = 5,
        adamw_lr: float | None = None,
    ) -> None:
        _check_hparams(lr, weight_decay, momentum, rms_scale)
        if adamw_lr is not None and not adamw_lr > 0:
            raise ValueError(f"adamw_lr must be > 0 or None (share lr), got {adamw_lr}")
        if qk_clip_tau is not None and qk_clip_tau <= 0:
            raise ValueError(f"qk_clip_tau must be > 0 or None, got {qk_clip_tau}")
        muon_named, adamw_named = split_params_for_muonclip(model_or_params, muon_filter)
        if not muon_named and not adamw_named:
            raise ValueError("MuonClip: no trainable parameters were given")
        common = dict(lr=lr, weight_decay=weight_decay)
        groups = []
        if muon_named:
            groups.append(dict(params=[p for _, p in muon_named], use_muon=True, momentum=momentum,
                               nesterov=nesterov, ns_steps=ns_steps, rms_scale=rms_scale, **common))
        if adamw_named:
            groups.append(dict(params=[p for _, p in adamw_named], use_muon=False, betas=adamw_betas,
                               eps=adamw_eps, **{**common, "lr": lr if adamw_lr is None else adamw_lr}))
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        rms_scale=rms_scale, betas=adamw_betas, eps=adamw_eps, use_muon=False)
        super().__init__(groups, defaults)
        self.param_names: dict[Tensor, str] = {p: n for n, p in muon_named + adamw_named}
        self.qk_clip_tau = qk_clip_tau
        self.attention_targets: list = []
        if qk_clip_tau is not None:
            from openk2.optim.qk_clip import find_attention_modules, track_max_logits

            if not isinstance(model_or_params, nn.Module):
                raise ValueError("MuonClip: QK-Clip needs the model (an nn.Module) to find its attention modules; "
                                 "pass the model, or qk_clip_tau=None for plain Muon + AdamW")
            self.attention_targets = find_attention_modules(model_or_params)
            if not self.attention_targets:
                raise ValueError(
                    "MuonClip: qk_clip_tau is set but no attention module with a recorded max-logit signal was "
                    "found (openk2 MLA, or a module with q_proj/k_proj, num_heads and record_max_logits; see "
                    "docs/muonclip.md). Pass qk_clip_tau=None to train without QK-Clip.")
            for target in self.attention_targets:
                target.module.record_max_logits = True
            self._hooks = track_max_logits(self.attention_targets)
        self.last_stats: dict[str, Any] = {}

    def muon_param_names(self) -> list[str]:
        return [self.param_names[p] for g in self.param_groups if g["use_muon"] for p in g["params"]]

    def adamw_param_names(self) -> list[str]:
        return [self.param_names[p] for g in self.param_groups if not g["use_muon"] for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _evaluate_closure(closure)
        tally = _StepTally()
        for group in self.param_groups:
            params, grads = _collect_grads(group, self.param_names, tally)
            if group["use_muon"]:
                _muon_step_group(group, params, grads, self.state, tally)
            else:
                adamw_step_([_local(p) for p in params], [_local(g) for g in grads], [self.state[p] for p in params],
                            group["lr"], group["weight_decay"], group["betas"], group["eps"])
        _warn_skipped(tally, "MuonClip.step")
        stats: dict[str, Any] = {"nonfinite_skipped": tally.nonfinite_skipped, "update_rms": tally.update_rms()}
        if self.qk_clip_tau is not None:
            from openk2.optim.qk_clip import apply_qk_clip

            stats.update(apply_qk_clip(self.attention_targets, self.qk_clip_tau))
        self.last_stats = stats
        return loss
