"""The Kimi K2 model: DeepSeek-V3 architecture (MLA attention + MoE), readable top to bottom.

    embed -> [RMSNorm -> MLA -> +residual -> RMSNorm -> (dense SwiGLU | MoE) -> +residual] x L -> RMSNorm -> lm_head

Optionally (config.num_nextn_predict_layers = D > 0) D multi-token-prediction modules (`MTPLayer`, at the bottom of
this file) train alongside: module k predicts token t+k+1 from the previous depth's hidden state and the embedding
of token t+k, through one more MoE block and the shared lm_head. They only run in a training forward with labels;
generation ignores them.

Parameter names equal the released Hugging Face names, except the routed experts, which are stacked 3-D parameters
(`mlp.experts.gate_proj` [E, I, H], `.up_proj` [E, I, H], `.down_proj` [E, H, I]); `openk2.checkpoint` maps them.
Contracts other modules rely on are in docs/architecture.md ("Model contract").

Two attention paths:
- training / full-sequence path: q, k, v are materialized per head and run through `causal_attention`: on CPU,
  explicit attention in query blocks that skip the masked key blocks (faster than CPU SDPA at these head sizes,
  and the per-head max logit for QK-Clip comes free from its scores); elsewhere SDPA plus a blockwise max pass;
- decode path (`cache=`): only the normalized latent c_kv and the rotated shared k_rope are cached per token;
  the k half of kv_b_proj is folded into the query and the v half into the output ("weight absorption").
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from openk2.config import K2Config, flops_per_token

__all__ = [
    "K2Config", "CausalLMOutput", "RMSNorm", "RotaryEmbedding", "MLA", "MLP", "Router", "RoutedExperts", "MoE",
    "DecoderLayer", "K2Model", "K2ForCausalLM", "MLACache", "MTPLayer", "causal_lm_loss", "flops_per_token",
]

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    # Mean over the MTP depths of their cross-entropies (unweighted, so it reads like `loss`); `loss` includes
    # config.mtp_loss_weight * mtp_loss. None unless MTP modules ran (training forward with labels).
    mtp_loss: torch.Tensor | None = None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype active for this device type, or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Norm and rotary embedding
class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and _decode_layout(x):  # decode-sized: one call, not nine
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Written out rather than F.rms_norm: on CPU the fused kernel is several times slower at training sizes.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (self.weight.float() * y).to(x.dtype)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(cfg: K2Config) -> tuple[torch.Tensor, float, float]:
    """(inv_freq [rope_dim/2] fp32, cos/sin attention factor, softmax scale), following transformers' DeepseekV3.

    YaRN blends interpolated (1/(factor*theta^(2i/d))) and extrapolated frequencies with a linear ramp between the
    correction dims of beta_fast / beta_slow rotations; cos/sin are multiplied by the attention factor
    mscale(factor, mscale)/mscale(factor, mscale_all_dim); the softmax scale gets mscale(factor, mscale_all_dim)^2.
    """
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    softmax_scale = cfg.qk_head_dim ** -0.5
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    pos_freqs = base ** exponents
    scaling = cfg.rope_scaling
    if scaling is None:
        return 1.0 / pos_freqs, 1.0, softmax_scale

    factor = float(scaling["factor"])
    original_max = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    if mscale_all_dim:
        softmax_scale *= _yarn_mscale(factor, mscale_all_dim) ** 2
    return inv_freq, float(attention_factor), softmax_scale


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. inv_freq is a plain tensor (not a buffer), so meta-device construction
    followed by `to_empty` cannot leave it uninitialized; it is moved to the positions' device on use."""

    def __init__(self, cfg: K2Config):
        super().__init__()
        self.inv_freq, self.attention_factor, self.softmax_scale = rope_parameters(cfg)
        self._device_inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] (int) -> cos, sin [..., rope_dim/2] fp32 (attention factor applied)."""
        inv_freq = self._device_inv_freq.get(positions.device)
        if inv_freq is None:
            inv_freq = self._device_inv_freq[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [..., d] by cos/sin [..., d/2] (broadcast). With `interleave`, pairs are (x0,x1),(x2,x3),...
    (DeepSeek layout) and the output lists the rotated even dims, then the odd ones, as transformers does; q and k
    use the same layout so their dot products are unchanged."""
    half = x.shape[-1] // 2
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Decode weight layout: [in, out] copies of the matrices a CPU decode step reads
#
# A decode step multiplies one row per sequence by every weight matrix, so it is bound by how fast the matrix-vector
# product streams the weights. On CPU, MKL streams an [in, out] matrix (x @ W^T with W^T contiguous) up to ~2x
# faster than nn.Linear's [out, in] layout (lm_head of `small`: ~0.6 ms vs ~1.5 ms per token on this machine), and
# one wide product beats two narrow ones. So, only on CPU, only without autograd and only for a few rows, matmuls
# read copies of the weights transposed to [in, out], with matrices that share an input concatenated (q_a + kv_a,
# gate + up). A copy is made on first use, cached on the module as a plain attribute (never a parameter, buffer or
# state_dict entry) and keyed on its sources' storage and version counter: any in-place update (optimizer step,
# QK-Clip, load_state_dict, copy_) bumps the version; fused optimizer kernels (fused AdamW, as in the Trainer and
# MuonClip) do not, so every torch.optim step also bumps a global step count that is part of the key; and `.to()`
# drops every copy (K2ForCausalLM._apply). So a stale copy is never read. The cost is one more copy of the matrices
# in memory, freed by `K2ForCausalLM.release_decode_weights()`; writes through `param.data` bypass the version
# counter: call it after those.
DECODE_LAYOUT_MAX_ROWS = 4  # from 8 rows on the copies stop paying (MKL's small-M gemm takes over)
_DECODE_SLOT = "_decode_t_"
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _decode_layout(x: torch.Tensor) -> bool:
    """True when matmuls on x should read the [in, out] decode copies."""
    return (x.numel() <= DECODE_LAYOUT_MAX_ROWS * x.shape[-1] and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def _decode_weight(holder: nn.Module, name: str, *weights: torch.Tensor) -> torch.Tensor:
    """`weights` ([..., out_i, in] each) concatenated along out and stored as one contiguous [..., in, sum out_i]
    copy, cached on `holder` under `name` and rebuilt whenever a source changed."""
    # (weights created under inference mode have no version counter; nothing outside that mode can modify them)
    key = (_optimizer_steps, *((w.data_ptr(), None if w.is_inference() else w._version) for w in weights))
    slot = _DECODE_SLOT + name
    cached = holder.__dict__.get(slot)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when built in inference mode
            merged = weights[0] if len(weights) == 1 else torch.cat(weights, dim=-2)
            cached = (key, merged.detach().transpose(-2, -1).contiguous())
        holder.__dict__[slot] = cached
    return cached[1]


def _linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """linear(x), through its decode copy when x is a few rows on CPU without autograd."""
    if not _decode_layout(x):
        return linear(x)
    out = torch.matmul(x, _decode_weight(linear, "weight", linear.weight))
    return out if linear.bias is None else out + linear.bias


# ----------------------------------------------------------------------------------------------------------------
# Decode cache: latent c_kv (normalized) + rotated k_rope per token, never per-head K/V
class MLACache:
    """Compressed decode cache. `latents[layer]` is [B, max_len, kv_lora_rank + qk_rope_head_dim]
    (c_kv after kv_a_layernorm, then k_rope after RoPE); `lengths` [B] counts the tokens held per row."""

    def __init__(self, cfg: K2Config, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device):
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"MLACache: batch_size={batch_size} and max_len={max_len} must be positive")
        self.batch_size, self.max_len = batch_size, max_len
        self.kv_lora_rank, self.rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.latents = [
            torch.zeros(batch_size, max_len, width, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)
        ]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.step: CacheStep | None = None  # set by K2ForCausalLM.forward for the duration of one forward

    @property
    def dtype(self) -> torch.dtype:
        return self.latents[0].dtype

    @property
    def device(self) -> torch.device:
        return self.latents[0].device

    def bytes_per_token(self) -> int:
        return sum(t.shape[-1] * t.element_size() for t in self.latents)

    def reset(self, rows: torch.Tensor | list[int] | int | None = None) -> None:
        """Free rows (all when None): their length goes back to 0."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)] = 0


@dataclass
class CacheStep:
    """Where one cached forward writes and reads. Decided once per forward from the row lengths read to the host
    (one sync), so the layers never sync with the device to size or mask their reads."""

    rows: slice | torch.Tensor  # the rows of this call: a contiguous block (read as a view) or their ids
    positions: torch.Tensor  # [B', T] the new tokens' absolute positions (= the row's length before + t)
    span: int  # cache slots to read: the longest row's length after the write
    start: int | None  # every row starts at this length (the write is a slice copy), else None
    _future: torch.Tensor | None = None

    @classmethod
    def plan(cls, rows: slice | torch.Tensor, starts: list[int], length: int, device) -> "CacheStep":
        """rows + their lengths before this call (host ints) + the number of new tokens per row."""
        same = all(s == starts[0] for s in starts)
        if same:
            positions = torch.arange(starts[0], starts[0] + length, device=device).expand(len(starts), length)
        else:
            positions = torch.tensor(starts, device=device).unsqueeze(1) + torch.arange(length, device=device)
        return cls(rows, positions, max(starts) + length, starts[0] if same else None)

    @classmethod
    def from_positions(cls, rows: slice | torch.Tensor | None, positions: torch.Tensor) -> "CacheStep":
        """For a layer called directly with positions (no plan from the model): syncs to read them."""
        starts = positions[:, 0].tolist()
        rows = slice(0, positions.shape[0]) if rows is None else rows
        step = cls.plan(rows, starts, positions.shape[1], positions.device)
        step.positions = positions
        return step

    @property
    def ragged(self) -> bool:
        """Some row ends before `span`: its tail slots hold other data and must be masked."""
        return self.start is None

    def future_mask(self) -> torch.Tensor:
        """[B', T, span] True where a slot lies after the query's own position (computed once, shared by layers)."""
        if self._future is None:
            slots = torch.arange(self.span, device=self.positions.device).view(1, 1, self.span)
            self._future = slots > self.positions.unsqueeze(-1)
        return self._future

    def write(self, store: torch.Tensor, new: torch.Tensor) -> None:
        """Write the new tokens' latents [B', T, w] into a layer's store [B, max_len, w]."""
        if self.start is not None and isinstance(self.rows, slice):
            store[self.rows, self.start : self.start + new.shape[1]] = new
            return
        rows = self.rows
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=store.device)
        store[rows.unsqueeze(1), self.positions] = new


# ----------------------------------------------------------------------------------------------------------------
# Multi-head latent attention
# ----------------------------------------------------------------------------------------------------------------
# Attention kernels (training / full-sequence path)
EXPLICIT_ATTENTION_MAX_SCORES = 1 << 26  # B*h*T*T/2 scores kept for backward per layer; above this, SDPA
ATTENTION_QUERY_BLOCK = 256


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                     record_max_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal softmax attention. q, k [B, h, T, dq], v [B, h, T, dv] -> (out [B, h, T, dv], per-head max scaled
    logit [h] fp32 when `record_max_logits`, else None).

    On CPU, for moderate B*h*T^2, explicit attention in query blocks of ATTENTION_QUERY_BLOCK: block i only
    multiplies against keys 0..end_i (~5/8 of the full square at T = 512), the matmuls run at the dtype's matmul
    speed, and the max logit falls out of the scores it already has. It is 2-2.5x faster than CPU SDPA's flash
    kernel at K2-small head sizes (48/32) in bf16 (benchmarks/bench_model.py). Like transformers' eager
    attention, bf16 scores are rounded to bf16 before a softmax that accumulates in fp32. Elsewhere (CUDA, or
    scores too large to keep for backward) SDPA, plus a separate no-grad blockwise pass for the max logit."""
    B, nh, T, _ = q.shape
    if q.device.type != "cpu" or B * nh * T * T // 2 > EXPLICIT_ATTENTION_MAX_SCORES:
        out = padded_sdpa(q, k, v, scale, is_causal=True)
        return out, (max_causal_logits(q, k, scale) if record_max_logits else None)
    q3, k3, v3 = q.reshape(B * nh, T, -1), k.reshape(B * nh, T, -1), v.reshape(B * nh, T, -1)
    outs, block_max = [], []
    for start in range(0, T, ATTENTION_QUERY_BLOCK):
        end = min(T, start + ATTENTION_QUERY_BLOCK)
        # the causal mask enters as the additive input of baddbmm: one kernel, no separate masking pass
        mask = _causal_bias(start, end, q.dtype, q.device)
        scores = torch.baddbmm(mask, q3[:, start:end], k3[:, :end].transpose(1, 2), alpha=scale)
        if record_max_logits:
            block_max.append(scores.detach().view(B, nh, -1).amax(dim=(0, 2)))
        outs.append(torch.bmm(torch.softmax(scores, dim=-1), v3[:, :end]))
    out = torch.cat(outs, dim=1).view(B, nh, T, -1)
    max_logits = torch.stack(block_max).amax(dim=0).float() if record_max_logits else None
    return out, max_logits


def _build_causal_bias(start: int, end: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[end - start, end] additive mask for queries start..end-1 over keys 0..end-1: 0 where visible, -inf after."""
    future = torch.ones(end - start, end, dtype=torch.bool, device=device).triu_(start + 1)
    return torch.zeros(end - start, end, dtype=dtype, device=device).masked_fill_(future, float("-inf"))


_cached_causal_bias = functools.lru_cache(maxsize=64)(_build_causal_bias)


def _causal_bias(start: int, end: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # eager: cached; torch.compile traces the construction instead (and constant-folds it)
    builder = _build_causal_bias if torch.compiler.is_compiling() else _cached_causal_bias
    return builder(start, end, dtype, device)


@torch.no_grad()
def max_causal_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-head max of the scaled causal logits q.k (q, k [B, h, T, d]) -> [h] fp32, in query blocks so the
    memory stays O(block * T) (used beside fused attention kernels that never expose their scores)."""
    B, nh, T, _ = q.shape
    result = torch.full((nh,), float("-inf"), device=q.device)
    for start in range(0, T, ATTENTION_QUERY_BLOCK):
        end = min(T, start + ATTENTION_QUERY_BLOCK)
        scores = torch.matmul(q[:, :, start:end], k[:, :, :end].transpose(-2, -1)).float() * scale
        masked = scores + _causal_bias(start, end, torch.float32, q.device)
        result = torch.maximum(result, masked.amax(dim=(0, 2, 3)))
    return result


def padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kwargs) -> torch.Tensor:
    """scaled_dot_product_attention with equal head sizes: CPU's flash kernel needs q/k and v to match (else SDPA
    takes the slow math path that materializes the scores), so the smaller side is zero-padded; zeros change
    neither the scores nor the kept output columns."""
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    if v_dim < qk_dim:
        v = F.pad(v, (0, qk_dim - v_dim))
    elif v_dim > qk_dim:
        q, k = F.pad(q, (0, v_dim - qk_dim)), F.pad(k, (0, v_dim - qk_dim))
    return F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)[..., :v_dim]


class MLA(nn.Module):
    def __init__(self, cfg: K2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.rope_interleave = cfg.rope_interleave
        H, nh, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nh * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 as in the released code
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, H, bias=bias)
        self.softmax_scale = rope_parameters(cfg)[2]
        # QK-Clip signal: when on, the training forward stores the per-head max scaled logit here.
        self.record_max_logits = False
        self.max_logits: torch.Tensor | None = None

    def _project(self, x, cos, sin):
        """x [B, T, H] -> q_nope [B,T,h,dn], q_rope [B,T,h,dr] (rotated), c_kv [B,T,r] (normed), k_rope [B,T,dr]."""
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.num_heads, self.qk_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_rope = apply_rope(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2), self.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, self.rope_interleave)
        return q_nope, q_rope, c_kv, k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: MLACache | None = None,
                cache_rows: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None:
            return _linear(self._attend_absorbed(x, cos, sin, cache, cache_rows, positions), self.o_proj)
        q_nope, q_rope, c_kv, k_rope = self._project(x, cos, sin)
        out = self._attend_full(q_nope, q_rope, c_kv, k_rope)
        return self.o_proj(out)

    # -- training / full-sequence path -------------------------------------------------------------------------
    def _attend_full(self, q_nope, q_rope, c_kv, k_rope) -> torch.Tensor:
        B, T, nh, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, T, nh, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # [B, h, T, dq]
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(B, T, nh, self.rope_dim)), dim=-1).transpose(1, 2)
        out, max_logits = causal_attention(q, k, v.transpose(1, 2), self.softmax_scale,
                                           record_max_logits=self.record_max_logits)
        if max_logits is not None:
            self.max_logits = max_logits
        return out.transpose(1, 2).reshape(B, T, nh * self.v_dim)

    # -- decode path: compressed cache + weight absorption ------------------------------------------------------
    def _project_cached(self, x, cos, sin):
        """_project for the cached path, in fewer ops (decode is per-op overhead bound on CPU): k_rope is rotated
        together with the query heads, as one more head."""
        B, T, _ = x.shape
        nh, r = self.num_heads, self.kv_lora_rank
        if self.q_lora_rank is None:
            q, kv = _linear(x, self.q_proj), _linear(x, self.kv_a_proj_with_mqa)
        elif _decode_layout(x) and self.q_a_proj.bias is None:  # q_a and kv_a read x: one product on one copy
            fused = _decode_weight(self, "q_a_kv_a", self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight)
            q_a, kv = torch.matmul(x, fused).split([self.q_lora_rank, r + self.rope_dim], dim=-1)
            q = _linear(self.q_a_layernorm(q_a), self.q_b_proj)
        else:
            q = _linear(self.q_a_layernorm(_linear(x, self.q_a_proj)), self.q_b_proj)
            kv = _linear(x, self.kv_a_proj_with_mqa)
        c_kv, k_rope = kv.split([r, self.rope_dim], dim=-1)
        q_nope, q_rope = q.view(B, T, nh, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        rope = torch.cat((q_rope, k_rope.unsqueeze(2)), dim=2)  # [B, T, h + 1, dr]
        rope = apply_rope(rope, cos.unsqueeze(-2), sin.unsqueeze(-2), self.rope_interleave)
        return q_nope, rope[:, :, :nh], self.kv_a_layernorm(c_kv), rope[:, :, nh]

    def _attend_absorbed(self, x, cos, sin, cache: MLACache, rows, positions) -> torch.Tensor:
        """Append x's tokens to the cache and attend over the cached latents. The new tokens are written first
        (at `positions` [B', T], their absolute positions), then every query attends to cache slots 0..its own
        position. One token per row (decode): kv_b_proj's k half is folded into q, its v half applied after the
        weighted sum, so per-head keys and values are never formed."""
        B, T, _ = x.shape
        nh, r = self.num_heads, self.kv_lora_rank
        q_nope, q_rope, c_kv, k_rope = self._project_cached(x, cos, sin)
        step = cache.step if cache.step is not None else CacheStep.from_positions(rows, positions)
        store = cache.latents[self.layer_idx]
        step.write(store, torch.cat((c_kv, k_rope), dim=-1).to(store.dtype))
        latents = store[step.rows, : step.span]  # [B', S, r + dr]
        if latents.dtype != q_nope.dtype:
            latents = latents.to(q_nope.dtype)
        if T > 1:  # prefill: expanding the latents once is cheaper than absorbing for T queries
            return self._attend_cached_expanded(q_nope, q_rope, latents, step.positions)

        # decode (T == 1). kv_b_proj.weight viewed per head [h, dn + dv, r]: W_uk = [:, :dn], W_uv = [:, dn:].
        # Plain views: bmm reads them strided, so nothing is copied or cached per step.
        w_kv = self.kv_b_proj.weight.view(nh, self.nope_dim + self.v_dim, r)
        if w_kv.dtype != q_nope.dtype:
            w_kv = w_kv.to(q_nope.dtype)
        q_latent = torch.bmm(q_nope.reshape(B, nh, self.nope_dim).transpose(0, 1), w_kv[:, : self.nope_dim])
        query = torch.cat((q_latent.transpose(0, 1), q_rope.reshape(B, nh, self.rope_dim)), dim=-1)
        query.mul_(self.softmax_scale)  # [B', h, r + dr], scaled here: h*(r+dr) values instead of h*S scores
        scores = torch.bmm(query, latents.transpose(1, 2))  # [B', h, S]
        if step.ragged:  # rows shorter than the longest: mask their tail
            scores = scores.masked_fill(step.future_mask(), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if probs.dtype != latents.dtype:
            probs = probs.to(latents.dtype)
        out_latent = torch.bmm(probs, latents[..., :r])  # [B', h, r]
        out = torch.bmm(out_latent.transpose(0, 1), w_kv[:, self.nope_dim:].transpose(1, 2))  # [h, B', dv]
        return out.transpose(0, 1).reshape(B, 1, nh * self.v_dim)

    def _attend_cached_expanded(self, q_nope, q_rope, latents, positions) -> torch.Tensor:
        """Multi-token append (prefill): expand the cached latents to per-head k/v through kv_b_proj (transient,
        never cached) and attend with a mask that lets query t see cache slots 0..positions[t]."""
        B, T, nh, _ = q_nope.shape
        S = latents.shape[1]
        c_kv, k_rope = latents.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, S, nh, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(B, S, nh, self.rope_dim)), dim=-1).transpose(1, 2)
        visible = torch.arange(S, device=q.device).view(1, 1, S) <= positions.unsqueeze(-1)  # [B, T, S]
        out = padded_sdpa(q, k, v.transpose(1, 2), self.softmax_scale, attn_mask=visible.unsqueeze(1))
        return out.transpose(1, 2).reshape(B, T, nh * self.v_dim)


# ----------------------------------------------------------------------------------------------------------------
# Feed-forward: dense SwiGLU, router, routed experts, MoE
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for the dense layers and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _decode_layout(x):  # decode: one product for gate and up on the [in, out] copies (see _decode_weight)
            gate, up = torch.matmul(x, _decode_weight(self, "gate_up", self.gate_proj.weight, self.up_proj.weight)
                                    ).chunk(2, dim=-1)
            return torch.matmul(F.silu(gate) * up, _decode_weight(self, "down", self.down_proj.weight))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


_router_load_paused = False  # see `router_load_paused`


@contextlib.contextmanager
def router_load_paused():
    """Routers add nothing to their `load` inside. For activation checkpointing (`openk2.train`): the recompute in
    backward runs a block's forward again, in training mode, on tokens its forward already counted."""
    global _router_load_paused
    previous, _router_load_paused = _router_load_paused, True
    try:
        yield
    finally:
        _router_load_paused = previous


class Router(nn.Module):
    """Top-k router (DeepSeek-V3 `noaux_tc`): fp32 scores; `e_score_correction_bias` shifts *selection* only;
    group-limited top-k when n_group > 1; weights from the unbiased scores, optionally normalized, then scaled.

    While training it counts tokens per expert in `load` (fp32 [E], non-persistent) for the aux-loss-free
    bias update (`K2ForCausalLM.update_router_bias`) and telemetry; not under `router_load_paused()`."""

    def __init__(self, cfg: K2Config):
        super().__init__()
        E = cfg.n_routed_experts
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.norm_topk_prob = cfg.scoring_func, cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("load", torch.zeros(E, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the correction bias or the load counts: they stay fp32.
        super()._apply(fn, recurse)
        for name in ("e_score_correction_bias", "load"):
            buffer = self._buffers[name]
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (topk_idx [N, k] long, topk_weight [N, k] fp32, scores [N, E] fp32)."""
        if torch.is_autocast_enabled(x.device.type):  # fp32 scores whatever autocast says
            with torch.autocast(device_type=x.device.type, enabled=False):
                logits = F.linear(x.float(), self.weight.float())
        else:  # (entering the autocast context costs more than the router's matmul at decode sizes)
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        with torch.no_grad():
            choice = scores + self.e_score_correction_bias.float()
            if self.n_group > 1:
                N = choice.shape[0]
                grouped = choice.view(N, self.n_group, -1)
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
                keep = group_scores.topk(self.topk_group, dim=-1).indices
                group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
                choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(N, -1)
            topk_idx = choice.topk(self.top_k, dim=-1).indices
        topk_weight = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.routed_scaling_factor
        if self.training and not _router_load_paused:
            with torch.no_grad():
                self.load += torch.bincount(topk_idx.flatten(), minlength=self.num_experts).to(self.load.dtype)
        return topk_idx, topk_weight, scores


def use_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the routed-expert matmuls run as one `torch._grouped_mm` (else a fallback: RoutedExperts' padded
    batched matmul, expert parallelism's loop over its local experts). One rule for both, so a model runs with and
    without expert parallelism wherever it runs at all.

    Eager, wherever the op exists (CPU in any dtype; CUDA in any dtype, bf16 the fast kernel). Under torch.compile
    its shape rules accept bf16 only (the CUDA kernel's dtype), and compiled CPU graphs take the fallback in
    every dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling():
        return device_type != "cpu" and dtype == torch.bfloat16
    return True


class RoutedExperts(nn.Module):
    """E SwiGLU experts as stacked weights, run by a sorted grouped dispatch (no Python loop over experts).

    forward(x [N, H], topk_idx [N, k], topk_weight [N, k]) -> [N, H] = sum_j w_j * Expert_{idx_j}(x).
    The N*k assignments are laid out in a buffer where each expert owns one contiguous group of rows (one gather
    of x), `torch._grouped_mm` runs all groups at once (or, where `use_grouped_mm` says it cannot, a batched
    matmul over groups padded to a common capacity), and the weighted results are index-added back to
    their tokens. Decode-sized batches (N * k <= E) take the selected experts' weights directly instead.
    Under autocast the experts compute in the autocast dtype (bf16), like every other matmul.
    Expert parallelism replaces this module wholesale (same forward signature)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # dispatch: "auto" | "grouped_mm" | "padded_bmm". Group sizes are rounded up to `capacity_multiple` rows
        # where a new matmul shape is expensive: CPU low-precision matmuls build (and cache) a kernel per shape, so
        # unrounded per-expert counts would build new kernels at every step.
        self.dispatch = "auto"
        self.capacity_multiple = 64

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        N, k = topk_idx.shape
        dtype = _autocast_dtype(x.device.type) or self.gate_proj.dtype
        if N * k <= self.num_experts:
            # Few assignments (decode): a grouped matmul would iterate over mostly empty groups.
            if x.device.type == "cpu" and not torch.compiler.is_compiling():
                return self._per_expert_swiglu(x, topk_idx, topk_weight, dtype)
            return self._gathered_swiglu(x, topk_idx, topk_weight, dtype)
        flat_expert = topk_idx.reshape(-1)
        weights = [w.to(dtype) for w in (self.gate_proj, self.up_proj, self.down_proj)]  # no-op unless autocast
        dispatch = self.dispatch
        if dispatch == "auto":
            dispatch = "grouped_mm" if use_grouped_mm(x.device.type, dtype) else "padded_bmm"
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        if dispatch == "padded_bmm":
            capacity = -(-int(counts.max()) // self.capacity_multiple) * self.capacity_multiple
            group_sizes = torch.full_like(counts, capacity)
        elif x.device.type == "cpu" and dtype != torch.float32:
            group_sizes = (counts + self.capacity_multiple - 1) // self.capacity_multiple * self.capacity_multiple
        else:
            group_sizes = counts
        rows, source = _expert_buffer_layout(flat_expert, counts, group_sizes, k, group_sizes is counts)
        buffer = torch.cat((x.to(dtype), x.new_zeros(1, x.shape[-1], dtype=dtype))).index_select(0, source)
        if dispatch == "padded_bmm":
            y = self._padded_bmm_swiglu(buffer.view(self.num_experts, -1, x.shape[-1]), *weights)
        else:
            y = self._grouped_mm_swiglu(buffer, group_sizes, *weights)
        # weight each row by its assignment's routing weight (padding rows: 0) and add it to its token
        row_weight = topk_weight.new_zeros(buffer.shape[0]).scatter(0, rows, topk_weight.reshape(-1)).to(dtype)
        out = buffer.new_zeros(N + 1, x.shape[-1]).index_add(0, source, y * row_weight.unsqueeze(1))
        return out[:N].to(x.dtype)

    @staticmethod
    def _grouped_mm_swiglu(xs, group_sizes, gate, up, down):
        offsets = group_sizes.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(xs, gate.transpose(-2, -1), offs=offsets))
        h = h * torch._grouped_mm(xs, up.transpose(-2, -1), offs=offsets)
        return torch._grouped_mm(h, down.transpose(-2, -1), offs=offsets)

    def _per_expert_swiglu(self, x, topk_idx, topk_weight, dtype):
        """CPU decode: each selected expert's weights are read in place (views of the stacks, or of their decode
        copies; no gather) by plain matmuls over the tokens routed to it. Reading the k expert ids to the host
        costs nothing on CPU."""
        N, k = topk_idx.shape
        xs = x.to(dtype)
        if N == 1 and _decode_layout(xs) and self.gate_proj.dtype == dtype:
            return self._one_token_decode_layout(xs, topk_idx[0].tolist(), topk_weight).to(x.dtype)
        routed: dict[int, list[tuple[int, int]]] = {}  # expert -> [(token, slot)]
        for token, experts in enumerate(topk_idx.tolist()):
            for slot, e in enumerate(experts):
                routed.setdefault(e, []).append((token, slot))
        out = torch.zeros(N, x.shape[-1], dtype=dtype, device=x.device)
        weight = topk_weight.to(dtype)
        for e, assignments in routed.items():
            tokens = torch.tensor([t for t, _ in assignments], device=x.device)
            slots = torch.tensor([j for _, j in assignments], device=x.device)
            gate, up, down = self.gate_proj[e], self.up_proj[e], self.down_proj[e]
            if gate.dtype != dtype:
                gate, up, down = gate.to(dtype), up.to(dtype), down.to(dtype)
            xe = xs.index_select(0, tokens)
            y = F.linear(F.silu(F.linear(xe, gate)) * F.linear(xe, up), down)
            out.index_add_(0, tokens, y * weight[tokens, slots].unsqueeze(1))
        return out.to(x.dtype)

    def _one_token_decode_layout(self, x, experts: list[int], topk_weight):
        """Batch-1 decode on the [in, out] copies, in few ops: one gate+up product per expert, one SwiGLU over all
        k, the routing weights folded in before the down products (linear), which accumulate in place."""
        gate_up = _decode_weight(self, "gate_up", self.gate_proj, self.up_proj)  # [E, H, 2I]
        down = _decode_weight(self, "down", self.down_proj)  # [E, I, H]
        gate, up = torch.cat([torch.mm(x, gate_up[e]) for e in experts]).chunk(2, dim=-1)  # [k, I] each
        h = F.silu(gate) * up * topk_weight.to(x.dtype).view(-1, 1)
        out = torch.mm(h[:1], down[experts[0]])
        for j in range(1, len(experts)):
            out = torch.addmm(out, h[j : j + 1], down[experts[j]])
        return out

    def _gathered_swiglu(self, x, topk_idx, topk_weight, dtype):
        """Accelerator decode: gather each assignment's expert weights (no host sync) and run one batched matmul
        per projection."""
        N, k = topk_idx.shape
        expert = topk_idx.reshape(-1)
        gate, up, down = (w.index_select(0, expert).to(dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        xs = x.to(dtype).repeat_interleave(k, dim=0).unsqueeze(1)  # [N*k, 1, H]
        h = F.silu(torch.bmm(xs, gate.transpose(1, 2))) * torch.bmm(xs, up.transpose(1, 2))
        y = torch.bmm(h, down.transpose(1, 2)).view(N, k, -1)
        return torch.bmm(topk_weight.unsqueeze(1).to(y.dtype), y).squeeze(1).to(x.dtype)

    @staticmethod
    def _padded_bmm_swiglu(padded, gate, up, down):
        """padded [E, capacity, H] -> [E * capacity, H]: one batched matmul per projection."""
        h = F.silu(torch.bmm(padded, gate.transpose(-2, -1))) * torch.bmm(padded, up.transpose(-2, -1))
        return torch.bmm(h, down.transpose(-2, -1)).flatten(0, 1)


def _expert_buffer_layout(flat_expert: torch.Tensor, counts: torch.Tensor, group_sizes: torch.Tensor, k: int,
                          exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a buffer in which expert e owns group_sizes[e] consecutive rows (>= counts[e]; the rest padding).
    Returns rows [N*k] (each assignment's buffer row, in (token, slot) order) and source [R] (the token each
    buffer row reads; padding rows read token N, an appended zero row). `exact`: no padding, so R = N*k is known
    without reading group_sizes back from the device."""
    assignments = flat_expert.numel()
    order = torch.argsort(flat_expert, stable=True)
    sorted_expert = flat_expert[order]
    rank = torch.arange(assignments, device=flat_expert.device) - (counts.cumsum(0) - counts)[sorted_expert]
    group_start = group_sizes.cumsum(0) - group_sizes
    rows = torch.empty_like(order).scatter_(0, order, group_start[sorted_expert] + rank)
    total = assignments if exact else int(group_sizes.sum())
    source = torch.full((total,), assignments // k, dtype=torch.long, device=flat_expert.device)
    source.scatter_(0, rows, torch.arange(assignments, device=flat_expert.device) // k)
    return rows, source


class MoE(nn.Module):
    """Router + routed experts + shared expert. Optional DeepSeek-V3 sequence-wise balance loss in `aux_loss`."""

    def __init__(self, cfg: K2Config):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.seq_aux_alpha = cfg.aux_loss_alpha if cfg.seq_aux else 0.0
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        topk_idx, topk_weight, scores = self.gate(flat)
        out = self.experts(flat, topk_idx, topk_weight)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.aux_loss = None
        if self.training and self.seq_aux_alpha > 0:
            self.aux_loss = self._sequence_balance_loss(scores.view(B, T, -1), topk_idx.view(B, T, -1))
        return out.view(B, T, H)

    def _sequence_balance_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """alpha * mean_b sum_i f_i P_i with f_i = E/(k T) * #tokens of the sequence routed to i and P_i the mean
        normalized score of expert i over the sequence (DeepSeek-V3 eq. 17-20)."""
        B, T, E = scores.shape
        k = topk_idx.shape[-1]
        counts = torch.zeros(B, E, device=scores.device, dtype=scores.dtype)
        counts.scatter_add_(1, topk_idx.reshape(B, T * k), torch.ones(B, T * k, device=scores.device, dtype=scores.dtype))
        f = counts * (E / (k * T))
        p = (scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)).mean(dim=1)
        return self.seq_aux_alpha * (f * p).sum(dim=-1).mean()


# ----------------------------------------------------------------------------------------------------------------
# Blocks and the model
class DecoderLayer(nn.Module):
    def __init__(self, cfg: K2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache=None, cache_rows=None, positions=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, cache_rows, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class K2Model(nn.Module):
    def __init__(self, cfg: K2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)

    def forward(self, input_ids, cache=None, cache_rows=None, positions=None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary(positions)  # [T, dr/2] or [B', T, dr/2]
        if cos.dim() == 2:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, cache_rows, positions if cache is not None else None)
        return self.norm(x)


class K2ForCausalLM(nn.Module):
    """The K2 causal LM. `model(input_ids, labels=None, *, cache=None, cache_rows=None)` -> CausalLMOutput."""

    def __init__(self, config: K2Config):
        super().__init__()
        config.validate()
        self.config = config
        self.model = K2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Multi-token prediction modules, depth 1..D (empty for the released shape): training-only.
        self.mtp = nn.ModuleList(MTPLayer(config, depth) for depth in range(1, config.num_nextn_predict_layers + 1))
        self.reset_parameters()

    # -- init ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, initializer_range) for every matrix (linears, embedding, experts, router); ones for norms;
        zeros for biases and the router correction bias."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, RoutedExperts):
                for weight in (module.gate_proj, module.up_proj, module.down_proj):
                    weight.normal_(0.0, std)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std)
                module.e_score_correction_bias.zero_()
                module.load.zero_()

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, cache: MLACache | None = None,
                cache_rows: torch.Tensor | None = None) -> CausalLMOutput:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [B, T]; got {tuple(input_ids.shape)} {input_ids.dtype}")
        if cache is None:
            hidden = self.model(input_ids)
            logits = self.lm_head(hidden)
        else:
            cache.step = self._plan_cache_step(input_ids, cache, cache_rows)
            try:
                hidden = self.model(input_ids, cache, cache.step.rows, cache.step.positions)
            finally:
                rows, cache.step = cache.step.rows, None
            logits = _linear(hidden, self.lm_head)
            cache.lengths[rows] += input_ids.shape[1]

        # MTP modules need the future tokens' labels, and only training uses them (decode never does).
        run_mtp = bool(len(self.mtp)) and self.training and labels is not None and cache is None
        mtp_loss = self._mtp_loss(input_ids, hidden, labels) if run_mtp else None
        aux_loss = self._aux_loss(include_mtp=run_mtp) if self.training else None
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
            if aux_loss is not None:
                loss = loss + aux_loss
            if mtp_loss is not None:
                loss = loss + self.config.mtp_loss_weight * mtp_loss
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss, mtp_loss=mtp_loss)

    def _aux_loss(self, include_mtp: bool) -> torch.Tensor | None:
        """Sum of this forward's sequence-wise balance losses (None when off). MTP blocks count only when they ran
        in this forward (otherwise their stored value is a previous forward's)."""
        blocks = list(self.model.layers) + (list(self.mtp) if include_mtp else [])
        terms = [block.mlp.aux_loss for block in blocks if isinstance(block.mlp, MoE) and block.mlp.aux_loss is not None]
        return torch.stack(terms).sum() if terms else None

    def _mtp_loss(self, input_ids: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(1/D) sum_k CE_k (DeepSeek-V3 eq. 24-25 without lambda): depth k at position i reads the previous depth's
        hidden state h_i and the embedding of token i+k, and predicts labels[i+k+1]. Depth k covers the first
        T-k positions (those whose input token exists). Depth 0's hidden state is the main model's output (after
        its final norm: what the lm_head reads)."""
        T = input_ids.shape[1]
        cos, sin = self.model.rotary(torch.arange(T, device=input_ids.device))
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        losses = []
        for depth, layer in enumerate(self.mtp, start=1):
            n = T - depth
            if n < 2:  # no position has a target this deep (the sequence is too short)
                break
            hidden, normed = layer(hidden[:, :n], self.model.embed_tokens(input_ids[:, depth:]), cos[:, :n], sin[:, :n])
            losses.append(causal_lm_loss(self.lm_head(normed), labels[:, depth:]))
        if not losses:
            return hidden.new_zeros((), dtype=torch.float32)
        return torch.stack(losses).sum() / len(self.mtp)

    def _plan_cache_step(self, input_ids, cache: MLACache, cache_rows) -> CacheStep:
        """Validate cache_rows against the cache and plan the write/read (one host read of the row lengths)."""
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids {tuple(input_ids.shape)}: a cached forward needs at least one row and token")
        if cache_rows is None:
            if B != cache.batch_size:
                raise ValueError(f"input_ids has {B} rows but the cache has {cache.batch_size}; pass cache_rows")
            rows: slice | torch.Tensor = slice(0, B)
            starts = cache.lengths.tolist()
        else:
            cache_rows = torch.as_tensor(cache_rows, dtype=torch.long, device=cache.lengths.device).reshape(-1)
            row_ids = cache_rows.tolist()
            if len(row_ids) != B:
                raise ValueError(f"cache_rows has {len(row_ids)} entries for {B} input rows")
            if any(not 0 <= row < cache.batch_size for row in row_ids):
                raise ValueError(f"cache_rows {row_ids} out of range for a cache of {cache.batch_size} rows")
            if len(set(row_ids)) != len(row_ids):
                raise ValueError(f"cache_rows {row_ids} lists a row twice")
            lengths = cache.lengths.tolist()
            starts = [lengths[row] for row in row_ids]
            first = row_ids[0]
            # contiguous ascending rows: the cache is read as a view
            rows = slice(first, first + B) if row_ids == list(range(first, first + B)) else cache_rows
        if max(starts) + T > cache.max_len:
            raise ValueError(f"cache overflow: a row would hold {max(starts) + T} tokens > max_len {cache.max_len}")
        return CacheStep.plan(rows, starts, T, input_ids.device)

    # -- decode cache ------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> MLACache:
        """An empty compressed cache for `batch_size` rows of up to `max_len` tokens (dtype: the model's)."""
        weight = self.lm_head.weight
        return MLACache(self.config, batch_size, max_len, dtype or weight.dtype, weight.device)

    def release_decode_weights(self) -> None:
        """Free the [in, out] weight copies CPU decode steps cache (see "Decode weight layout"); they are rebuilt
        on the next decode step. Needed only after writes through `param.data`, or to get the memory back."""
        for module in self.modules():
            for slot in [k for k in module.__dict__ if k.startswith(_DECODE_SLOT)]:
                del module.__dict__[slot]

    def _apply(self, fn, recurse=True):
        # .to() / .float() / .cuda() give the parameters new storage, which may reuse the old address: drop the
        # decode copies rather than trust their (address, version) keys.
        self.release_decode_weights()
        return super()._apply(fn, recurse)

    # -- QK-Clip signal ----------------------------------------------------------------------------------------
    def attention_modules(self) -> list[MLA]:
        """MLA per main layer, then one per MTP module."""
        return [layer.self_attn for layer in self.model.layers] + [layer.self_attn for layer in self.mtp]

    def set_record_max_logits(self, flag: bool) -> None:
        for attn in self.attention_modules():
            attn.record_max_logits = flag
            if not flag:
                attn.max_logits = None

    def max_attention_logits(self) -> torch.Tensor:
        """[L + D, H] fp32: each layer's (then each MTP module's) per-head max scaled logit from the last recorded
        training forward."""
        values = [attn.max_logits for attn in self.attention_modules()]
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            mtp_note = ""
            if any(i >= self.config.num_hidden_layers for i in missing):
                mtp_note = (f"; indices >= {self.config.num_hidden_layers} are MTP modules, which run only in a "
                            "training-mode forward with labels")
            raise RuntimeError(
                f"no max attention logits recorded for layers {missing}: call set_record_max_logits(True) and run a "
                f"full-sequence forward (not a cached decode) first{mtp_note}"
            )
        return torch.stack(values)

    # -- router balancing and telemetry ------------------------------------------------------------------------
    def routers(self) -> list[Router]:
        """The MoE layers' routers, then the MTP modules' (their biases balance like any other layer's)."""
        blocks = list(self.model.layers) + list(self.mtp)
        return [block.mlp.gate for block in blocks if isinstance(block.mlp, MoE)]

    def expert_load(self) -> torch.Tensor:
        """[n_moe_layers + D, E] fp32 tokens routed to each expert since the last bias update (MTP rows last)."""
        routers = self.routers()
        if not routers:
            return torch.zeros(0, self.config.n_routed_experts)
        return torch.stack([r.load.detach().clone() for r in routers])

    @torch.no_grad()
    def update_router_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing: b -= gamma * sign(load - mean(load)) per MoE layer, then reset the counts.
        (Under data parallelism, all-reduce `gate.load` across ranks before calling this.)"""
        for router in self.routers():
            load = router.load
            router.e_score_correction_bias -= gamma * torch.sign(load - load.mean())
            load.zero_()

    # -- checkpoints (file formats live in openk2.checkpoint) --------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> "K2ForCausalLM":
        from openk2 import checkpoint

        return checkpoint.load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path, **kwargs) -> None:
        from openk2 import checkpoint

        checkpoint.save_pretrained(self, path, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits[:, t] predicts labels[:, t + 1]; label -100 is ignored.
    Computed in fp32; returns 0 (not NaN) when every label is ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(logits.shape[:2])}")
    # Shift the labels, not the logits (no copy of the big tensor): the last position gets an ignored label.
    labels = labels.to(logits.device)
    shift_labels = torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)), dim=1).reshape(-1)
    total = ChunkedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), shift_labels)
    count = (shift_labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed token cross-entropy of logits [N, V] (any float dtype) against targets [N] (IGNORE_INDEX skipped),
    fp32 math done in row chunks that stay in cache: the whole [N, V] fp32 log-softmax is never materialized
    (on CPU, F.cross_entropy on upcast logits is memory-bound: 3x slower at N = 2048, V = 8192). Backward writes
    softmax - one_hot straight into a gradient of the logits' dtype."""

    CHUNK_BYTES = {"cpu": 1 << 21}  # fp32 bytes per chunk; other devices: 256 MiB

    @staticmethod
    def _rows(logits: torch.Tensor) -> int:
        budget = ChunkedCrossEntropy.CHUNK_BYTES.get(logits.device.type, 1 << 28)
        return max(8, budget // (4 * logits.shape[-1]))

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = ChunkedCrossEntropy._rows(logits)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            lse[start : start + rows] = torch.logsumexp(logits[start : start + rows].float(), dim=-1)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        target_logit = logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1).float()
        ctx.save_for_backward(logits, safe_targets, valid, lse)
        return torch.where(valid, lse - target_logit, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, safe_targets, valid, lse = ctx.saved_tensors
        rows = ChunkedCrossEntropy._rows(logits)
        grad = torch.empty_like(logits)
        scale = valid.float() * grad_total  # ignored rows get a zero gradient
        minus_one = torch.full((min(rows, logits.shape[0]), 1), -1.0, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            end = min(start + rows, logits.shape[0])
            chunk = (logits[start:end].float() - lse[start:end, None]).exp_()  # softmax (never in place: fp32 logits)
            chunk.scatter_add_(1, safe_targets[start:end, None], minus_one[: end - start])
            grad[start:end] = chunk.mul_(scale[start:end, None])
        return grad, None


# ----------------------------------------------------------------------------------------------------------------
# Multi-token prediction (DeepSeek-V3 report §2.2), training-only
class MTPHeadNorm(nn.Module):
    """The module's own final norm before the shared lm_head (`shared_head.norm` in the released layout; the
    head itself is the main model's lm_head, which checkpoints may also store as `shared_head.head`)."""

    def __init__(self, cfg: K2Config):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """MTP module of depth k: h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]), then one MoE decoder block
    (MLA + MoE, the same class as the main layers), then `shared_head.norm` and the shared lm_head predict t_{i+k+1}.

    The concatenation puts the embedding first, as the released DeepSeek-V3 weights expect (`eh_proj` = embedding
    then hidden; the report's eq. 21 lists them the other way round). The embedding and lm_head are the main
    model's (shared, not copied). Its MLA's layer index is num_hidden_layers + k - 1 (its key prefix in released
    checkpoints); it is never given a decode cache. forward(hidden [B, n, H], next_embeds [B, n, H], cos, sin) ->
    (h^k [B, n, H], the block output that the next depth reads; shared_head.norm(h^k), what the lm_head reads).
    Every own weight is used inside forward, so the module can be an FSDP unit of its own."""

    def __init__(self, cfg: K2Config, depth: int):
        super().__init__(cfg, cfg.num_hidden_layers + depth - 1)  # index >= first_k_dense_replace: an MoE block
        self.depth = depth
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = MTPHeadNorm(cfg)

    def forward(self, hidden, next_embeds, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        mixed = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        out = super().forward(mixed, cos, sin)
        return out, self.shared_head.norm(out)
