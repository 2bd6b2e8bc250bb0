"""Per-head QK-Clip (Kimi K2 §2.1, Alg. 1; shared/k2-spec.md §2.2).

After the optimizer step, every head h whose recorded max pre-softmax logit S_h exceeds tau gets
gamma_h = tau / S_h, and its query/key weights are rescaled so that head's logits shrink by exactly gamma_h.
Heads at or below tau are not touched (bit-identical). The current step's forward/backward are unaffected.

MLA (`clip_mla_`): q_nope rows of q_b_proj (or q_proj) x sqrt(gamma), q_rope rows x gamma, k_nope rows of
kv_b_proj x sqrt(gamma). Untouched: V rows of kv_b_proj, kv_a_proj_with_mqa (the rotary key k_rope is shared by
all heads, so scaling it would clip every head), q_a_proj.

MHA / GQA (`clip_mha_`): separate q and k projections. With GQA one K head serves a group of Q heads with
different gammas. Rule used here: scale the shared K head by s_k = sqrt(max_{h in group} gamma_h) and each Q head
by gamma_h / s_k. Then every head's logits scale by exactly gamma_h (no head below tau is ever over-clipped, and
heads below tau keep their Q rows untouched, because s_k = 1 whenever any head of the group is at or below tau);
when every head of a group is clipped, the clip is shared between Q and K as evenly as the group allows, and
with one Q head per K head (plain MHA) it is the paper's sqrt(gamma) / sqrt(gamma) split. The alternative
"scale K by the group's min gamma" shrinks the logits of the other heads of the group below what they need.

Distributed: the recorded max logits are all-reduced (MAX) across ranks first, so every replica clips
identically. Weights may be FSDP2 DTensors sharded on dim 0 (rows): each rank scales its own rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def clip_gamma(max_logits: Tensor, tau: float) -> Tensor:
    """gamma_h = tau / S_h for heads above tau, exactly 1.0 elsewhere (fp32 [H])."""
    s = max_logits.float()
    return torch.where(s > tau, tau / s, torch.ones_like(s))


# ----------------------------------------------------------------------------------------------------------------
# Row scaling that works on plain tensors and on Shard(0) DTensors


@torch.no_grad()
def scale_rows_(weight: Tensor, row_scale: Tensor) -> None:
    """weight[r, ...] *= row_scale[r] in place (row_scale: fp32 [rows]). A factor of exactly 1 leaves a row
    bit-identical. DTensor sharded on dim 0 (FSDP2): each rank scales only its own rows, no communication;
    other DTensor layouts: the expanded scale is split like the weight (every rank holds the same scale)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    row_scale = row_scale.to(weight.device)
    if weight.shape[0] != row_scale.shape[0]:
        raise ValueError(f"qk_clip.scale_rows_: weight has {weight.shape[0]} rows, scale has {row_scale.shape[0]}")
    per_row = (-1,) + (1,) * (weight.ndim - 1)
    if not isinstance(weight, DTensor):
        _mul_rows_(weight, row_scale.view(per_row))
        return
    mesh, placements, local = weight.device_mesh, weight.placements, weight.to_local()
    if mesh.ndim == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0:
        chunks = torch.chunk(row_scale, mesh.size())  # DTensor's Shard(0) split; may have fewer than size chunks
        rank = mesh.get_local_rank()
        _mul_rows_(local, (chunks[rank] if rank < len(chunks) else row_scale[:0]).view(per_row))
    else:
        full = row_scale.view(per_row).expand(weight.shape).contiguous()
        _mul_rows_(local, distribute_tensor(full, mesh, placements, src_data_rank=None).to_local())


def _mul_rows_(weight: Tensor, scale: Tensor) -> None:
    if weight.numel() == 0:
        return
    weight.copy_((weight.float() * scale).to(weight.dtype))


# ----------------------------------------------------------------------------------------------------------------
# The two clip rules


@torch.no_grad()
def clip_mla_(
    q_weight: Tensor, kv_b_weight: Tensor, max_logits: Tensor, tau: float, *, num_heads: int,
    qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
) -> Tensor:
    """QK-Clip for one MLA layer. q_weight: q_b_proj.weight (or q_proj.weight) [H*(nope+rope), in];
    kv_b_weight: kv_b_proj.weight [H*(nope+v), kv_lora_rank]. Returns the bool mask of clipped heads [H]."""
    H = num_heads
    gamma = clip_gamma(max_logits, tau)
    if gamma.shape != (H,):
        raise ValueError(f"clip_mla_: max_logits has shape {tuple(max_logits.shape)}, expected [{H}]")
    clipped = gamma < 1
    if not clipped.any():
        return clipped
    q_rows = torch.cat([gamma.sqrt()[:, None].expand(H, qk_nope_head_dim),  # q_nope: sqrt(gamma)
                        gamma[:, None].expand(H, qk_rope_head_dim)], dim=1)  # q_rope: gamma (k_rope is shared)
    kv_rows = torch.cat([gamma.sqrt()[:, None].expand(H, qk_nope_head_dim),  # k_nope: sqrt(gamma)
                         torch.ones(H, v_head_dim, device=gamma.device)], dim=1)  # V untouched
    scale_rows_(q_weight, q_rows.reshape(-1))
    scale_rows_(kv_b_weight, kv_rows.reshape(-1))
    return clipped


@torch.no_grad()
def gqa_scales(gamma: Tensor, num_kv_heads: int) -> tuple[Tensor, Tensor]:
    """(q_scale [H], k_scale [H_kv]) with q_scale[h] * k_scale[kv(h)] == gamma[h] (see the module docstring)."""
    H = gamma.shape[0]
    if H % num_kv_heads:
        raise ValueError(f"gqa_scales: num_heads={H} is not a multiple of num_kv_heads={num_kv_heads}")
    group = H // num_kv_heads
    k_scale = gamma.view(num_kv_heads, group).amax(dim=1).sqrt()
    q_scale = gamma / k_scale.repeat_interleave(group)
    q_scale = torch.where(gamma < 1, q_scale, torch.ones_like(q_scale))  # unclipped Q heads: exactly 1
    return q_scale, k_scale


@torch.no_grad()
def clip_mha_(
    q_weight: Tensor, k_weight: Tensor, max_logits: Tensor, tau: float, *, num_heads: int, num_kv_heads: int,
    head_dim: int, q_bias: Tensor | None = None, k_bias: Tensor | None = None,
) -> Tensor:
    """QK-Clip for multi-head / grouped-query attention with separate projections.
    q_weight [num_heads*head_dim, in], k_weight [num_kv_heads*head_dim, in] (nn.Linear layout; head-major rows),
    optional biases. Returns the bool mask of clipped heads [num_heads]."""
    gamma = clip_gamma(max_logits, tau)
    if gamma.shape != (num_heads,):
        raise ValueError(f"clip_mha_: max_logits has shape {tuple(max_logits.shape)}, expected [{num_heads}]")
    clipped = gamma < 1
    if not clipped.any():
        return clipped
    q_scale, k_scale = gqa_scales(gamma, num_kv_heads)
    q_rows = q_scale.repeat_interleave(head_dim)
    k_rows = k_scale.repeat_interleave(head_dim)
    scale_rows_(q_weight, q_rows)
    scale_rows_(k_weight, k_rows)
    if q_bias is not None:
        scale_rows_(q_bias, q_rows)
    if k_bias is not None:
        scale_rows_(k_bias, k_rows)
    return clipped


# ----------------------------------------------------------------------------------------------------------------
# Finding attention modules in a model and clipping them all


def _attr(module: nn.Module, *names: str) -> Any:
    """First attribute found on the module or on its `config` (K2Config / HF config field names)."""
    for holder in (module, getattr(module, "config", None)):
        if holder is None:
            continue
        for n in names:
            v = getattr(holder, n, None)
            if v is not None:
                return v
    return None


@dataclass
class AttentionTarget:
    """One attention module QK-Clip acts on. kind: "mla", "mha" or "custom" (module.apply_qk_clip_(gamma))."""

    name: str
    module: nn.Module
    kind: str
    num_heads: int
    last_signal: Tensor | None = None  # the max_logits tensor already clipped on (never clip twice on one signal)
    running_max: Tensor | None = None  # max over the training forwards since the last clip (gradient accumulation)
    _seen: Tensor | None = None

    def observe(self) -> None:
        """Fold the module's latest recorded signal into running_max (called by a forward hook)."""
        signal = getattr(self.module, "max_logits", None)
        if signal is None or signal is self._seen or signal is self.last_signal:
            return
        self._seen = signal
        signal = signal.detach().float()
        self.running_max = signal.clone() if self.running_max is None else torch.maximum(self.running_max, signal)

    def take_signal(self) -> Tensor | None:
        """The signal to clip on now: the running max over this step's training forwards, or else a recorded
        max_logits not clipped on yet (e.g. set by hand); None when there is nothing new."""
        signal = self.running_max
        if signal is None:
            current = getattr(self.module, "max_logits", None)
            if current is not None and current is not self.last_signal:
                signal = current
        self.running_max = None
        self.last_signal = getattr(self.module, "max_logits", None)
        return signal


def track_max_logits(targets: list[AttentionTarget]) -> list:
    """Forward hooks that keep each target's running max over all grad-enabled forwards between two clips, so
    with gradient accumulation the clip sees the max over the whole step's batch, not the last micro-batch.
    Forwards under no_grad (validation) are ignored. Returns the hook handles."""

    def make_hook(target: AttentionTarget):
        def hook(module, args, output):
            if torch.is_grad_enabled():
                target.observe()

        return hook

    return [t.module.register_forward_hook(make_hook(t)) for t in targets]


def find_attention_modules(model: nn.Module) -> list[AttentionTarget]:
    """Attention modules that record per-head max logits (`record_max_logits` attribute), in model order:
    - openk2 MLA (has kv_b_proj and q_b_proj or q_proj);
    - MHA/GQA with q_proj and k_proj Linear layers and num_heads (num_kv_heads / head_dim optional);
    - anything defining apply_qk_clip_(gamma [H]) (custom layouts)."""
    targets = []
    for name, m in model.named_modules():
        if not hasattr(m, "record_max_logits"):
            continue
        heads = _attr(m, "num_heads", "num_attention_heads", "n_heads", "n_head")
        if heads is None:
            raise ValueError(f"qk_clip: attention module {name} ({type(m).__name__}) records max logits but has no "
                             "num_heads / num_attention_heads attribute")
        if hasattr(m, "apply_qk_clip_"):
            kind = "custom"
        elif hasattr(m, "kv_b_proj") and (getattr(m, "q_b_proj", None) is not None or hasattr(m, "q_proj")):
            kind = "mla"
        elif hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            kind = "mha"
        else:
            raise ValueError(f"qk_clip: don't know how to clip {name} ({type(m).__name__}); give it q_proj/k_proj, "
                             "the MLA projections, or an apply_qk_clip_(gamma) method")
        targets.append(AttentionTarget(name, m, kind, int(heads)))
    return targets


def _clip_one(t: AttentionTarget, max_logits: Tensor, tau: float) -> Tensor:
    m = t.module
    if t.kind == "custom":
        gamma = clip_gamma(max_logits, tau)
        if (gamma < 1).any():
            m.apply_qk_clip_(gamma)
        return gamma < 1
    if t.kind == "mla":
        q = m.q_b_proj if getattr(m, "q_b_proj", None) is not None else m.q_proj
        return clip_mla_(q.weight, m.kv_b_proj.weight, max_logits, tau, num_heads=t.num_heads,
                         qk_nope_head_dim=int(_attr(m, "qk_nope_head_dim", "nope_dim")),
                         qk_rope_head_dim=int(_attr(m, "qk_rope_head_dim", "rope_dim")),
                         v_head_dim=int(_attr(m, "v_head_dim", "v_dim")))
    kv_heads = int(_attr(m, "num_kv_heads", "num_key_value_heads", "n_kv_heads") or t.num_heads)
    head_dim = int(_attr(m, "head_dim") or m.q_proj.weight.shape[0] // t.num_heads)
    return clip_mha_(m.q_proj.weight, m.k_proj.weight, max_logits, tau, num_heads=t.num_heads,
                     num_kv_heads=kv_heads, head_dim=head_dim,
                     q_bias=getattr(m.q_proj, "bias", None), k_bias=getattr(m.k_proj, "bias", None))


@torch.no_grad()
def apply_qk_clip(targets: list[AttentionTarget], tau: float) -> dict[str, Any]:
    """Take every target's signal (the running max of this step's forwards, see track_max_logits, or its recorded
    `max_logits` [H]), all-reduce (MAX) across ranks, clip, and return stats:
    max_logit_per_layer (list, NaN for a layer with no fresh signal), max_logit, clipped_heads."""
    per_layer = {t.name: float("nan") for t in targets}
    clipped_heads = 0
    taken = [(t, t.take_signal()) for t in targets]
    fresh = [(t, s) for t, s in taken if s is not None]
    if fresh:
        flat = torch.cat([s.detach().float().reshape(-1) for _, s in fresh])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.MAX)  # every replica clips identically
        for (t, s), logits in zip(fresh, flat.split([s.numel() for _, s in fresh])):
            if logits.numel() != t.num_heads:
                raise ValueError(f"qk_clip: {t.name}.max_logits has {logits.numel()} entries, expected "
                                 f"{t.num_heads} heads")
            clipped_heads += int(_clip_one(t, logits, tau).sum())
            per_layer[t.name] = float(logits.max())
    values = [v for v in per_layer.values() if not math.isnan(v)]
    return {"max_logit_per_layer": list(per_layer.values()), "max_logit": max(values) if values else float("nan"),
            "clipped_heads": clipped_heads}
