"""K2Config: the released Kimi-K2 / DeepSeek-V3 `config.json`, as a dataclass, plus presets and parameter counts.

Field names are the `config.json` keys of `moonshotai/Kimi-K2-Instruct` (DeepSeek-V3 code path). `from_dict` also
accepts the spellings newer transformers (5.x) writes (`rope_parameters`, `dtype`, `num_mtp_layers`, derived
`head_dim` / `qk_head_dim`); `to_dict` always writes the released spellings. Unknown keys are kept in `extra` and
written back. Contradictory values raise ValueError naming the field.

`openk2 info [--preset NAME | --config FILE]` prints a config and its parameter counts.

The `k2` preset and the report's figures: the preset is the pre-training shape, the released config plus one
DeepSeek-V3-style multi-token-prediction (MTP) module (`num_nextn_predict_layers: 1`). It counts 1.0436T total
parameters (report: 1.04T, Table 2; base model 1043B, Table 4) and 32.86B activated (report: 32.6B; +0.8%).
Activated is the main model's per-token path: the MTP module only trains (as DeepSeek-V3's 37B activated
excludes its MTP module). The released Instruct config has `num_nextn_predict_layers: 0` (UNVERIFIED third-party
copies) and no MTP weights: that shape is `total_without_mtp`, 1.0264T, 1.3% under 1.04T. The MTP module is one
MoE block (17.06B: 384 experts x 3 x 7168 x 2048, shared expert, MLA) + eh_proj (2 x 7168 -> 7168) + 3 norms =
17.16B; it shares the embedding and lm_head, which are not counted twice. `openk2 info` shows both totals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
ROPE_SCALING_TYPES = ("yarn",)

# Keys transformers writes that are derived from other fields: checked against those fields, then dropped.
_DERIVED_KEYS = ("head_dim", "qk_head_dim")


@dataclass
class K2Config:
    """The model shape and its released `config.json` keys. Defaults are the Kimi-K2 values (spec §1.1)."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # per routed / shared expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_attention_heads: int = 64
    num_key_value_heads: int = 64  # nominal for MLA; must equal num_attention_heads
    rope_theta: float = 50000.0
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        }
    )
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pad_token_id: int | None = 163839
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    # Sequence-wise balance loss (DeepSeek-V3): active in training when aux_loss_alpha > 0 and seq_aux is true.
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # Multi-token prediction (DeepSeek-V3 §2.2): D sequential MTP modules after the main model, each one more
    # MoE block predicting one token further ahead. Training-only (inference ignores them). The released
    # Instruct config says 0; the pre-training shape (`k2` preset, the report's 1043B) has 1.
    num_nextn_predict_layers: int = 0
    # Training loss = main CE + mtp_loss_weight * mean over depths of the MTP CE (DeepSeek-V3: 0.3, later 0.1).
    # An openk2 key: the released configs do not have it, and it changes nothing at inference.
    mtp_loss_weight: float = 0.3
    quantization_config: dict | None = None
    torch_dtype: str | None = "bfloat16"
    model_type: str = "kimi_k2"
    architectures: list[str] | None = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------------------------
    # Derived shapes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # ----------------------------------------------------------------------------------------------------------
    # Validation
    def validate(self) -> None:
        """Raise ValueError naming the first field that contradicts another (or is out of range)."""

        def fail(name: str, why: str) -> None:
            raise ValueError(f"K2Config.{name}={getattr(self, name)!r}: {why}")

        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "num_attention_heads", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        if not isinstance(self.qk_nope_head_dim, int) or self.qk_nope_head_dim < 0:
            fail("qk_nope_head_dim", "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", "must be a positive integer or null")
        if self.n_shared_experts < 0:
            fail("n_shared_experts", "must be >= 0")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "K2 has an untied lm_head; tied embeddings are not supported")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"exceeds n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            fail("n_routed_experts", f"is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            fail("topk_group", f"exceeds n_group={self.n_group}")
        if self.n_group > 1:
            per_group = self.n_routed_experts // self.n_group
            if per_group < 2:
                fail("n_group", "group-limited routing scores groups by their top-2 experts; need >= 2 per group")
            if self.num_experts_per_tok > self.topk_group * per_group:
                fail("num_experts_per_tok", f"exceeds the {self.topk_group * per_group} experts in topk_group groups")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"unknown; expected one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"unknown; expected one of {TOPK_METHODS}")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' (SwiGLU) is implemented")
        if self.num_key_value_heads != self.num_attention_heads:
            fail("num_key_value_heads", "MLA has one latent per token; must equal num_attention_heads")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "rotary dims come in pairs; must be even")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be > 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ROPE_SCALING_TYPES:
                fail("rope_scaling", f"type {kind!r} is not supported; expected one of {ROPE_SCALING_TYPES} or null")
            factor = self.rope_scaling.get("factor")
            if factor is None or factor <= 0:
                fail("rope_scaling", "yarn needs a positive 'factor'")
            if "original_max_position_embeddings" not in self.rope_scaling:
                fail("rope_scaling", "yarn needs 'original_max_position_embeddings'")
        if (not isinstance(self.num_nextn_predict_layers, int) or isinstance(self.num_nextn_predict_layers, bool)
                or self.num_nextn_predict_layers < 0):
            fail("num_nextn_predict_layers", "must be a non-negative integer")
        if not isinstance(self.mtp_loss_weight, (int, float)) or not math.isfinite(self.mtp_loss_weight) \
                or self.mtp_loss_weight < 0:
            fail("mtp_loss_weight", "must be a finite number >= 0")

    # ----------------------------------------------------------------------------------------------------------
    # Serialization
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "K2Config":
        """Build from a `config.json` dict (released or transformers-5 spellings). Unknown keys go to `extra`."""
        d = dict(d)
        known = set(cls.field_names())
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = dict(d.pop("extra", {}) or {})

        # transformers 5.x spellings -> released spellings
        if "rope_parameters" in d:
            params = dict(d.pop("rope_parameters") or {})
            if "rope_theta" in params and "rope_theta" not in d:
                d["rope_theta"] = params["rope_theta"]
            params.pop("rope_theta", None)
            kind = params.get("rope_type", params.get("type", "default"))
            if "rope_scaling" not in d:
                if kind == "default":
                    d["rope_scaling"] = None
                else:
                    scaling = {k: v for k, v in params.items() if k not in ("rope_type", "type")}
                    d["rope_scaling"] = {"type": kind, **scaling}
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        else:
            d.pop("dtype", None)
        if "num_mtp_layers" in d:
            value = d.pop("num_mtp_layers")
            d.setdefault("num_nextn_predict_layers", value)
        if "num_local_experts" in d:
            d.setdefault("n_routed_experts", d.pop("num_local_experts"))
        derived = {k: d.pop(k) for k in _DERIVED_KEYS if k in d}

        for key, value in d.items():
            (kwargs if key in known else extra).__setitem__(key, value)
        if isinstance(kwargs.get("rope_scaling"), dict):
            scaling = dict(kwargs["rope_scaling"])
            if "type" not in scaling and "rope_type" in scaling:
                scaling["type"] = scaling.pop("rope_type")
            else:
                scaling.pop("rope_type", None)
            kwargs["rope_scaling"] = scaling
        cfg = cls(**kwargs, extra=extra)

        # A derived key that disagrees with the fields it derives from is a contradiction, not a detail.
        expected = {"qk_head_dim": cfg.qk_head_dim, "head_dim": cfg.qk_rope_head_dim}
        for key, value in derived.items():
            if value is not None and value != expected[key]:
                raise ValueError(f"config key {key}={value!r} contradicts the head dims (expected {expected[key]})")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "K2Config":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """The released `config.json` spellings, with `extra` merged back in."""
        out = {name: getattr(self, name) for name in self.field_names()}
        out = json.loads(json.dumps(out))  # deep copy, JSON types only
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> "K2Config":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------------------
    # Presets
    @classmethod
    def preset(cls, name: str) -> "K2Config":
        """`tiny` (tests), `small` (CPU benchmarks / default pre-training), `k2` (the real 1.04T shape)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name]())

    # ----------------------------------------------------------------------------------------------------------
    # Parameter counts (no torch needed)
    def param_counts(self) -> dict[str, int]:
        """Parameter counts by component, matching the instantiated K2ForCausalLM's parameters exactly.

        - `total`: every parameter the model holds, MTP modules included (the report's 1043B base-model figure
          counts the one MTP module of the pre-training shape).
        - `total_without_mtp`: the main model alone, i.e. the released (MTP-free) checkpoint's shape.
        - `active`: what one token touches on the main model's path: embedding row table and lm_head in full (as
          the report's 32.6B does), every attention / dense / norm weight, the routers, the shared experts and
          `num_experts_per_tok` routed experts per MoE layer. MTP modules are excluded (they only run in
          training, as DeepSeek-V3's 37B activated excludes its MTP module).
        - `mtp_module`: one MTP module's own parameters (enorm, hnorm, eh_proj, one MoE block, shared_head.norm;
          the embedding and lm_head are shared with the main model and not counted again);
          `mtp_module_active`: the part of it one token touches; `mtp_total` = num_nextn_predict_layers x
          mtp_module.
        Buffers (the router bias) are not parameters and are not counted.
        """
        H, nh = self.hidden_size, self.num_attention_heads
        bias = self.attention_bias
        if self.q_lora_rank is None:
            q = H * nh * self.qk_head_dim
        else:
            q = H * self.q_lora_rank + (self.q_lora_rank if bias else 0) + self.q_lora_rank
            q += self.q_lora_rank * nh * self.qk_head_dim
        kv_a = H * (self.kv_lora_rank + self.qk_rope_head_dim) + ((self.kv_lora_rank + self.qk_rope_head_dim) if bias else 0)
        kv = kv_a + self.kv_lora_rank + self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
        o = nh * self.v_head_dim * H + (H if bias else 0)
        attention = q + kv + o
        dense_mlp = 3 * H * self.intermediate_size
        expert = 3 * H * self.moe_intermediate_size
        shared = expert * self.n_shared_experts
        router = self.n_routed_experts * H
        embed = lm_head = self.vocab_size * H
        layer_norms = 2 * H
        norms = self.num_hidden_layers * layer_norms + H
        n_dense, n_moe = self.first_k_dense_replace, self.num_moe_layers
        common = embed + lm_head + self.num_hidden_layers * attention + n_dense * dense_mlp + norms
        common += n_moe * (shared + router)
        total_without_mtp = common + n_moe * self.n_routed_experts * expert
        active = common + n_moe * self.num_experts_per_tok * expert
        # One MTP module: an MoE decoder block + eh_proj [H, 2H] + enorm, hnorm, shared_head.norm.
        mtp_block_common = attention + layer_norms + shared + router + 2 * H * H + 3 * H
        mtp_module = mtp_block_common + self.n_routed_experts * expert
        mtp_module_active = mtp_block_common + self.num_experts_per_tok * expert
        mtp_total = self.num_nextn_predict_layers * mtp_module
        return {
            "embed": embed,
            "lm_head": lm_head,
            "attention_per_layer": attention,
            "dense_mlp_per_layer": dense_mlp,
            "routed_expert": expert,
            "shared_experts_per_layer": shared,
            "router_per_layer": router,
            "norms": norms,
            "total": total_without_mtp + mtp_total,
            "total_without_mtp": total_without_mtp,
            "active": active,
            "mtp_module": mtp_module,
            "mtp_module_active": mtp_module_active,
            "mtp_total": mtp_total,
        }

    def num_parameters(self, active: bool = False) -> int:
        return self.param_counts()["active" if active else "total"]

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2, absorbed: bool = True) -> int:
        """Decode-cache bytes per token over all layers: latent c_kv + shared k_rope (absorbed) or per-head K and V."""
        if absorbed:
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)
        return per_layer * self.num_hidden_layers * bytes_per_element


def flops_per_token(cfg: K2Config, seq_len: int) -> float:
    """Model FLOPs per token for one training step (forward + backward), the MFU numerator.

        flops = 6 * N_matmul + 6 * (L + D) * H_heads * (qk_head_dim + v_head_dim) * seq_len / 2

    N_matmul = active parameters that take part in a matmul (active minus the embedding table and the norms: an
    embedding lookup does no FLOPs). Each matmul weight costs 2 FLOPs per token forward, 4 backward. The attention
    term counts QK^T (qk_head_dim) and PV (v_head_dim) per head, 2 FLOPs per multiply-add, x3 for backward, over the
    causal half of the seq_len x seq_len score matrix (average context seq_len / 2).
    With D = num_nextn_predict_layers MTP modules (they run in every training step), N_matmul also counts, per
    module, its block's active matmul weights, eh_proj and another pass through the shared lm_head, and the
    attention term its block (over seq_len; the module sees seq_len - k positions, a negligible difference).
    """
    counts = cfg.param_counts()
    n_matmul = counts["active"] - counts["embed"] - counts["norms"]
    depth = cfg.num_nextn_predict_layers
    if depth:
        mtp_norms = 2 * cfg.hidden_size + 3 * cfg.hidden_size  # block norms + enorm, hnorm, shared_head.norm
        n_matmul += depth * (counts["mtp_module_active"] - mtp_norms + counts["lm_head"])
    layers = cfg.num_hidden_layers + depth
    attention = 6 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 6.0 * n_matmul + attention


def _tiny() -> dict:
    return dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
        topk_group=1, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        aux_loss_alpha=0.0, seq_aux=False, torch_dtype="float32", model_type="kimi_k2",
    )


def _small() -> dict:
    # The CPU benchmark anchor: hidden 384, 6 layers, 16 routed experts top-4 + 1 shared,
    # 28.6M total / 15.4M active parameters with vocab 8192.
    return dict(
        vocab_size=8192, hidden_size=384, intermediate_size=1152, moe_intermediate_size=192, num_hidden_layers=6,
        first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=1,
        topk_group=1, routed_scaling_factor=2.5, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=8, num_key_value_heads=8, rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        aux_loss_alpha=0.0, seq_aux=False, torch_dtype="float32", model_type="kimi_k2",
    )


def _k2() -> dict:
    # The pre-training shape: the released config plus the one MTP module that the report's 1043B base-model
    # count (Table 4) includes; `num_nextn_predict_layers=0` gives the released (Instruct) shape, 1.026T.
    return dict(num_nextn_predict_layers=1, quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
    })


PRESETS = {"tiny": _tiny, "small": _small, "k2": _k2}


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def main(argv: list[str] | None = None) -> int:
    """`openk2 info [--preset NAME | --config FILE]`: the config and its parameter counts."""
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="openk2 info", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, choices=sorted(PRESETS))
    source.add_argument("--config", default=None, help="path to a config.json")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length for the FLOPs/token figure")
    args = parser.parse_args(argv)
    cfg = K2Config.from_json(args.config) if args.config else K2Config.preset(args.preset or "small")
    name = args.config or (args.preset or "small")

    console = Console()
    table = Table(title=f"config: {name}")
    table.add_column("key")
    table.add_column("value")
    for key, value in cfg.to_dict().items():
        table.add_row(key, json.dumps(value))
    console.print(table)

    counts = cfg.param_counts()
    n_moe, n_dense, L = cfg.num_moe_layers, cfg.first_k_dense_replace, cfg.num_hidden_layers
    rows = [
        ("embed", counts["embed"]),
        ("lm_head", counts["lm_head"]),
        (f"attention ({L} layers)", L * counts["attention_per_layer"]),
        (f"dense MLP ({n_dense} layers)", n_dense * counts["dense_mlp_per_layer"]),
        (f"routed experts ({n_moe} x {cfg.n_routed_experts})", n_moe * cfg.n_routed_experts * counts["routed_expert"]),
        (f"shared experts ({n_moe} layers)", n_moe * counts["shared_experts_per_layer"]),
        (f"routers ({n_moe} layers)", n_moe * counts["router_per_layer"]),
        ("norms", counts["norms"]),
    ]
    depth = cfg.num_nextn_predict_layers
    if depth:
        rows.append((f"MTP modules ({depth} x 1 MoE block + eh_proj + 3 norms)", counts["mtp_total"]))
        rows.append(("total without MTP (released shape)", counts["total_without_mtp"]))
    rows += [
        ("total" + (" with MTP" if depth else ""), counts["total"]),
        (f"active per token (top-{cfg.num_experts_per_tok}, main model)", counts["active"]),
    ]
    ptable = Table(title="parameters")
    ptable.add_column("component")
    ptable.add_column("count", justify="right")
    ptable.add_column("human", justify="right")
    for label, n in rows:
        ptable.add_row(label, f"{n:,}", _human(n))
    console.print(ptable)
    fpt = flops_per_token(cfg, args.seq_len)
    console.print(f"train FLOPs/token at seq_len {args.seq_len}: {_human(fpt)}  (6*N_active_matmul + attention"
                  + (f"; includes the {depth} MTP module(s))" if depth else ")"))
    if depth:
        console.print("MTP modules train only (generation ignores them); active excludes them, as DeepSeek-V3's "
                      "37B does. num_nextn_predict_layers=0 gives the released shape.")
    console.print(
        f"decode KV cache per token (bf16): absorbed MLA {cfg.kv_cache_bytes_per_token():,} B vs per-head K/V "
        f"{cfg.kv_cache_bytes_per_token(absorbed=False):,} B"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
