"""`openk2 plan`: per-GPU memory and step-time planner for a K2-shaped model on N GPUs.

The model of the cluster follows the K2 report (spec §3 "Infrastructure") and Moonlight's distributed Muon
(spec §2.4). Everything is arithmetic on the config's shapes and on hardware figures given as flags; nothing
here touches torch. The formulas are written out in docs/planner.md; the short version:

Layout.  world = pp × ep × tp × dp.  A model-parallel group is pp × ep × tp GPUs.
  * PP: the decoder layers (+ MTP modules) are cut into pp × v contiguous chunks (v = virtual stages,
    interleaved 1F1B); chunk c lives on pipeline rank c mod pp. The embedding rides with layer 0, the final norm
    and lm_head with the last layer. The cut minimises the slowest rank's busy time subject to every rank
    fitting in GPU memory, tie-break on memory (`balance_pipeline`); `--balance memory` balances parameter
    bytes only.
  * EP: each MoE layer's routed experts are split over ep ranks; the rest of the layer (attention, shared
    expert, router, norms) is replicated over ep, so the ep ranks act as data parallel for it.
  * TP (optional, default 1 as in K2): splits every matrix tp ways (experts too) and, with sequence
    parallelism, the activations.
  * DP: ZeRO-1. Optimizer states are sharded over dp for expert parameters and over dp × ep for the replicated
    parameters (they have dp × ep replicas). bf16 weights and the fp32 gradient-accumulation buffer are not.

Memory per GPU (bytes): 2·P (bf16 weights) + 4·P (fp32 grad buffer) + optimizer/shard·(1 − offload)
  + activations (stored per micro-batch × micro-batches in flight on that pipeline rank) + Newton–Schulz
  workspace (largest full Muon matrix on the rank) + transient working set (one layer un-saved, all-to-all
  buffers, logits on the last rank) + a fixed reserve (CUDA context, NCCL, fragmentation).

Step time: the slowest pipeline rank's busy time (compute + whatever communication does not hide behind it)
× (1 + bubble), plus the optimizer phase (DP reduce-scatter / gathers, Newton–Schulz, state update, offload
traffic). MFU = model FLOPs / (step time × GPUs × peak bf16 FLOP/s); model FLOPs = 6·N_active·tokens + causal
attention, recompute not counted.

Units: GB = 1e9 bytes, GB/s = 1e9 bytes/s everywhere.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

GB = 1e9
FP8_TILE_BYTES = 1 + 4 / 128  # FP8-E4M3 element + one fp32 scale per 1×128 tile
REPORT_PARAMS_GRADS_GB_PER_GPU = 30.0  # K2 report: bf16 params + fp32 grad buffer over 256 GPUs ≈ 6 TB ≈ 30 GB/GPU
DEFAULT_GLOBAL_BATCH_TOKENS = 2**26  # 67.1M tokens = 16384 sequences of 4096 (spec §3)


class PlanError(ValueError):
    """An impossible layout or option; the message names the flag (or config field) at fault."""


# --------------------------------------------------------------------------------------------------------------
# Inputs: hardware, layout, training choices


@dataclass
class Hardware:
    """Per-GPU / per-node hardware figures. Defaults: an H800 SXM node as K2 used (spec §3)."""

    bf16_tflops: float = 989.0  # dense bf16 tensor-core peak per GPU (H800 = H100 SXM compute)
    matmul_efficiency: float = 0.6  # achieved fraction of peak in the model's GEMMs (grouped expert GEMMs are small)
    hbm_tb_s: float = 3.35  # HBM3 bandwidth per GPU
    nvlink_gb_s: float = 200.0  # per direction per GPU (H800 NVLink: 400 GB/s bidirectional)
    nic_gbit: float = 400.0  # one NIC's line rate (RoCE)
    nics_per_node: int = 8
    pcie_gb_s: float = 64.0  # PCIe Gen5 x16 per direction
    comm_efficiency: float = 0.8  # achieved fraction of every link's bandwidth in collectives and copies
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    host_mem_gb: float = 2048.0  # per node (K2: 2 TB)

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def nic_bytes_s_per_gpu(self) -> float:
        return self.nic_gbit / 8 * 1e9 * self.nics_per_node / self.gpus_per_node * self.comm_efficiency

    @property
    def nvlink_bytes_s(self) -> float:
        return self.nvlink_gb_s * 1e9 * self.comm_efficiency

    @property
    def pcie_bytes_s(self) -> float:
        return self.pcie_gb_s * 1e9 * self.comm_efficiency

    @property
    def hbm_bytes_s(self) -> float:
        return self.hbm_tb_s * 1e12


@dataclass(frozen=True)
class Layout:
    """How the GPUs are used. virtual_stages = model chunks per pipeline rank (interleaved 1F1B when > 1)."""

    pp: int = 1
    ep: int = 1
    tp: int = 1
    dp: int = 1
    virtual_stages: int = 1
    micro_batch: int = 1

    @property
    def gpus(self) -> int:
        return self.pp * self.ep * self.tp * self.dp

    def short(self) -> str:
        parts = [f"PP{self.pp}" + (f"(v{self.virtual_stages})" if self.virtual_stages > 1 else ""),
                 f"EP{self.ep}", f"DP{self.dp}"]
        if self.tp > 1:
            parts.insert(2, f"TP{self.tp}")
        return "×".join(parts) + f" mb{self.micro_batch}"


@dataclass(frozen=True)
class Choices:
    """The report's memory/time choices (spec §3), each switchable, plus optimizer and schedule figures."""

    recompute: bool = True  # selective: RMSNorm, SwiGLU, MLA up-projections, MoE down-projections
    fp8_activations: bool = True  # FP8-E4M3 storage of MoE up-proj inputs and SwiGLU inputs (1×128 tiles)
    activation_offload: bool = True  # the remaining stored activations go to host memory by a copy engine
    optimizer_offload: float = 0.0  # fraction of (sharded) optimizer state kept in host memory
    optimizer: str = "muonclip"  # or "adamw" (the ZeRO-1 baseline)
    master_weights: bool = True  # fp32 master copy in the optimizer state (mixed precision)
    seq_len: int = 4096
    global_batch_tokens: int = DEFAULT_GLOBAL_BATCH_TOKENS
    extra_warmup: int = 0  # extra warm-up micro-batches (K2 uses more to overlap EP all-to-all)
    ep_overlap: float = 0.8  # fraction of the EP all-to-all time that can hide behind compute
    a2a_bytes: float = 2.0  # bytes per element on the wire for dispatch/combine (bf16)
    offload_window: int = 2  # layer-micro-batches of activations kept on GPU when offloading (current + prefetch)
    reserve_gb: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    balance: str = "time"  # pipeline partition: "time" (slowest stage, then memory) or "memory" (parameters only)


# --------------------------------------------------------------------------------------------------------------
# Model geometry: what one decoder layer costs, from the config's fields and cfg.param_counts()


@dataclass(frozen=True)
class LayerCost:
    index: int
    is_moe: bool
    replicated_params: float  # attention + dense MLP or shared expert + router + norms (split by tp only)
    expert_params: float  # all routed experts of the layer (split over ep × tp)
    adamw_params: float  # the part of replicated_params kept by AdamW under MuonClip (norms, embed, lm_head)
    flops_per_token: float  # forward + backward model FLOPs for one token through this layer
    muon_shapes: tuple[tuple[int, int], ...]  # full (rows, cols) of the replicated Muon matrices
    expert_shapes: tuple[tuple[int, int], ...]  # (rows, cols) of ONE routed expert's matrices


@dataclass
class Geometry:
    """Per-layer costs for one config, plus the dims the activation model needs."""

    cfg: Any
    counts: dict[str, float]
    layers: list[LayerCost]
    hidden: int
    vocab: int
    n_experts: int
    top_k: int
    moe_inter: int
    shared_inter: int
    dense_inter: int
    heads: int
    qk_head: int
    v_head: int
    q_lora: int  # 0 when q_lora_rank is None
    kv_lora: int
    rope_dim: int
    embed_params: float
    head_params: float  # final norm + lm_head
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Causal attention, forward + backward: 3 × (2·heads·(qk_head + v_head) · seq/2)."""
        return 3.0 * self.heads * (self.qk_head + self.v_head) * seq_len

    def head_flops_per_token(self) -> float:
        return 6.0 * self.hidden * self.vocab

    def model_flops_per_token(self, seq_len: int) -> float:
        attention = self.attention_flops_per_token(seq_len) * self.num_layers
        return sum(layer.flops_per_token for layer in self.layers) + attention + self.head_flops_per_token()


def geometry(cfg: Any) -> Geometry:
    """Build per-layer costs from a K2Config (fields + `param_counts()`)."""
    counts = {k: float(v) for k, v in cfg.param_counts().items()}
    for key in ("embed", "lm_head", "attention_per_layer", "dense_mlp_per_layer", "routed_expert",
                "shared_experts_per_layer", "router_per_layer", "norms", "total", "active"):
        if key not in counts:
            raise PlanError(f"cfg.param_counts() has no {key!r} entry (openk2/config.py contract)")
    layers_n = int(cfg.num_hidden_layers)
    n_dense = int(cfg.first_k_dense_replace)
    n_experts, top_k = int(cfg.n_routed_experts), int(cfg.num_experts_per_tok)
    hidden, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    q_lora = int(cfg.q_lora_rank or 0)
    kv_lora, rope = int(cfg.kv_lora_rank), int(cfg.qk_rope_head_dim)
    qk_head = int(cfg.qk_nope_head_dim) + rope
    v_head = int(cfg.v_head_dim)
    moe_inter, dense_inter = int(cfg.moe_intermediate_size), int(cfg.intermediate_size)
    shared_inter = moe_inter * int(cfg.n_shared_experts or 0)
    # The final norm is one H-vector; the rest of `norms` is spread evenly over the layers.
    final_norm = float(hidden)
    norms_per_layer = (counts["norms"] - final_norm) / layers_n
    # q_a / kv_a RMSNorm gains are inside attention_per_layer; under MuonClip they are AdamW parameters too.
    adamw_per_layer = norms_per_layer + q_lora + int(cfg.kv_lora_rank)

    attention_shapes = [(heads * qk_head, q_lora), (q_lora, hidden)] if q_lora else [(heads * qk_head, hidden)]
    attention_shapes += [(kv_lora + rope, hidden), (heads * (int(cfg.qk_nope_head_dim) + v_head), kv_lora),
                         (hidden, heads * v_head)]
    layers = []
    for i in range(layers_n):
        attention = counts["attention_per_layer"]
        if i < n_dense:
            mlp = counts["dense_mlp_per_layer"]
            layers.append(LayerCost(
                index=i, is_moe=False, replicated_params=attention + mlp + norms_per_layer, expert_params=0.0,
                adamw_params=adamw_per_layer, flops_per_token=6.0 * (attention + mlp),
                muon_shapes=tuple(attention_shapes + [(dense_inter, hidden)] * 2 + [(hidden, dense_inter)]),
                expert_shapes=()))
        else:
            shared, router = counts["shared_experts_per_layer"], counts["router_per_layer"]
            expert = counts["routed_expert"]
            shared_shapes = [(shared_inter, hidden)] * 2 + [(hidden, shared_inter)] if shared_inter else []
            layers.append(LayerCost(
                index=i, is_moe=True, replicated_params=attention + shared + router + norms_per_layer,
                expert_params=n_experts * expert, adamw_params=adamw_per_layer,
                flops_per_token=6.0 * (attention + shared + router + top_k * expert),
                muon_shapes=tuple(attention_shapes + shared_shapes + [(n_experts, hidden)]),
                expert_shapes=((moe_inter, hidden), (moe_inter, hidden), (hidden, moe_inter))))
    # Multi-token-prediction modules (training-only): an MoE block + eh_proj [H, 2H] + 3 norms each, placed after
    # the last layer (the last pipeline stage, next to the lm_head they share; their pass through it is counted
    # here). The embedding they also read is not duplicated on that stage in this model.
    for depth in range(int(getattr(cfg, "num_nextn_predict_layers", 0) or 0)):
        attention, shared, router = counts["attention_per_layer"], counts["shared_experts_per_layer"], counts["router_per_layer"]
        eh_proj, mtp_norms = 2.0 * hidden * hidden, 3.0 * hidden
        shared_shapes = [(shared_inter, hidden)] * 2 + [(hidden, shared_inter)] if shared_inter else []
        layers.append(LayerCost(
            index=layers_n + depth, is_moe=True,
            replicated_params=attention + shared + router + norms_per_layer + eh_proj + mtp_norms,
            expert_params=n_experts * counts["routed_expert"], adamw_params=adamw_per_layer + mtp_norms,
            flops_per_token=6.0 * (attention + shared + router + top_k * counts["routed_expert"] + eh_proj
                                   + counts["lm_head"]),
            muon_shapes=tuple(attention_shapes + shared_shapes + [(n_experts, hidden), (hidden, 2 * hidden)]),
            expert_shapes=((moe_inter, hidden), (moe_inter, hidden), (hidden, moe_inter))))
    return Geometry(
        cfg=cfg, counts=counts, layers=layers, hidden=hidden, vocab=int(cfg.vocab_size), n_experts=n_experts,
        top_k=top_k, moe_inter=moe_inter, shared_inter=shared_inter, dense_inter=dense_inter, heads=heads,
        qk_head=qk_head, v_head=v_head, q_lora=q_lora, kv_lora=kv_lora, rope_dim=rope,
        embed_params=counts["embed"], head_params=counts["lm_head"] + final_norm)


# --------------------------------------------------------------------------------------------------------------
# Pipeline partition


def layer_gpu_params(geo: Geometry, layer: LayerCost, ep: int, tp: int) -> float:
    """Parameters one GPU holds for this layer (embedding / lm_head included on the first / last layer)."""
    params = layer.replicated_params / tp + layer.expert_params / (ep * tp)
    if layer.index == 0:
        params += geo.embed_params / tp
    if layer.index == geo.num_layers - 1:
        params += geo.head_params / tp
    return params


def partition_layers(costs: Sequence[float], chunks: int) -> list[list[int]]:
    """Split layer indices into `chunks` contiguous non-empty runs minimising the largest run's cost.

    The optimum is one of the contiguous sums, so binary-search those with a greedy feasibility check.
    """
    n = len(costs)
    if not 1 <= chunks <= n:
        raise PlanError(f"cannot cut {n} layers into {chunks} pipeline chunks (--pp × --virtual-stages)")
    prefix = list(itertools.accumulate(costs, initial=0.0))
    candidates = sorted({prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1)})

    def greedy(limit: float) -> list[list[int]] | None:
        runs: list[list[int]] = [[]]
        total = 0.0
        for i, cost in enumerate(costs):
            if cost > limit * (1 + 1e-12):
                return None
            if runs[-1] and total + cost > limit * (1 + 1e-12):
                runs.append([])
                total = 0.0
            runs[-1].append(i)
            total += cost
        return runs if len(runs) <= chunks else None

    lo = bisect.bisect_left(candidates, max(costs))
    hi = len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if greedy(candidates[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    runs = greedy(candidates[lo])
    assert runs is not None
    while len(runs) < chunks:  # split the longest run: never raises the maximum
        longest = max(range(len(runs)), key=lambda r: len(runs[r]))
        run = runs[longest]
        half = len(run) // 2
        runs[longest:longest + 1] = [run[:half], run[half:]]
    return runs


def memory_balanced_runs(geo: Geometry, layout: Layout) -> list[list[int]]:
    """The pp × v contiguous chunks balanced by per-GPU parameter bytes alone (`--balance memory`)."""
    key = ("memory runs", layout.pp, layout.virtual_stages, layout.ep, layout.tp)
    if key not in geo._cache:
        costs = [layer_gpu_params(geo, layer, layout.ep, layout.tp) for layer in geo.layers]
        geo._cache[key] = partition_layers(costs, layout.pp * layout.virtual_stages)
    return geo._cache[key]


def partition_min_max(n_layers: int, stages: int, stage_time: Callable[[int, int], float],
                      stage_memory: Callable[[int, int, int], float] | None = None,
                      capacity: float = math.inf) -> list[list[int]] | None:
    """Cut layers 0..n−1 into `stages` contiguous non-empty stages, pipeline order.

    Objective: minimise the slowest stage's time, subject to every stage's memory ≤ `capacity`; among the
    partitions that reach that time, minimise the largest stage memory. Returns None when nothing fits.
    `stage_time(i, j)` is the time of a stage holding layers i..j−1 (the same at every position);
    `stage_memory(i, j, s)` is its memory as stage s. Neither may decrease when a stage gains a layer (true of
    sums, maxima and the planner's exposed-communication terms except when two of them are exposed at once), and
    memory must not increase with s (in 1F1B later stages keep fewer micro-batches in flight).

    Algorithm: the optimal bottleneck is the time of some contiguous run, so binary-search the sorted run times
    for the smallest limit T at which the greedy check succeeds. The check fills the stages from the last one
    backwards, each with as many layers as stay within the time and memory limits, leaving one layer for every
    earlier stage. It is exact: by induction each greedy stage starts no later than the same stage of any
    partition that meets the limits (a stage's layers also fit a later stage, which holds less), so if one
    exists greedy's stage 0 reaches layer 0. With T fixed, the memory limit is then bisected (to 1e-6 relative)
    for the tie-break. Cost: O(n²) time evaluations for the candidates, O(n · log) greedy passes.
    """
    if not 1 <= stages <= n_layers:
        raise PlanError(f"cannot cut {n_layers} layers into {stages} pipeline stages (--pp × --virtual-stages)")
    slack = 1 + 1e-12  # the limits are values of the same functions; the slack only absorbs rounding
    times = {(i, j): stage_time(i, j) for i in range(n_layers) for j in range(i + 1, n_layers + 1)}

    def greedy(time_limit: float, memory_limit: float) -> list[list[int]] | None:
        stages_out: list[list[int]] = []
        end = n_layers
        for s in reversed(range(stages)):
            start = end  # grow the stage leftwards, leaving one layer for each earlier stage
            while start > s and times[start - 1, end] <= time_limit * slack and (
                    stage_memory is None or stage_memory(start - 1, end, s) <= memory_limit * slack):
                start -= 1
            if start == end:
                return None
            stages_out.append(list(range(start, end)))
            end = start
        return stages_out[::-1] if end == 0 else None

    def peak_memory(runs: list[list[int]]) -> float:
        assert stage_memory is not None
        return max(stage_memory(run[0], run[-1] + 1, s) for s, run in enumerate(runs))

    candidates = sorted(set(times.values()))
    best = greedy(candidates[-1], capacity)
    if best is None:
        return None
    lo, hi = 0, len(candidates) - 1  # invariant: greedy(candidates[hi]) succeeds
    while lo < hi:
        mid = (lo + hi) // 2
        runs = greedy(candidates[mid], capacity)
        if runs is None:
            lo = mid + 1
        else:
            hi, best = mid, runs
    if stage_memory is None:
        return best
    time_limit = candidates[hi]
    low_memory, high_memory = 0.0, peak_memory(best)
    while high_memory - low_memory > 1e-6 * high_memory:
        middle = (low_memory + high_memory) / 2
        runs = greedy(time_limit, middle)
        if runs is None:
            low_memory = middle
        else:
            best, high_memory = runs, peak_memory(runs)
    return best


# --------------------------------------------------------------------------------------------------------------
# Activations: bytes stored per token per layer for the backward pass


def activation_bytes_per_token(geo: Geometry, is_moe: bool, recompute: bool, fp8: bool) -> dict[str, float]:
    """Stored activation bytes per token for one decoder layer (bf16 unless noted), by category.

    Flash-style attention: only q, k, v, the output and the fp32 log-sum-exp are kept, not the score matrix.
    Selective recompute drops RMSNorm outputs, MLA up-projection outputs (q, k, v), SwiGLU outputs and routed
    MoE down-projection outputs (needed for the routing-weight gradient). FP8 storage shrinks the dispatched
    MoE up-projection inputs and every SwiGLU input (gate and up outputs) to 1 byte + fp32 scale per 128.
    """
    h, bf16 = geo.hidden, 2.0
    fp8_or_bf16 = FP8_TILE_BYTES if fp8 else bf16
    out = {
        "residual stream (block inputs)": 2 * h * bf16,
        "RMSNorm outputs": 0.0 if recompute else (2 * h + geo.q_lora + geo.kv_lora) * bf16,
        "MLA down-projection outputs": (geo.q_lora + geo.kv_lora + geo.rope_dim) * bf16,
        "MLA up-projection outputs (q, k, v)":
            0.0 if recompute else geo.heads * (2 * geo.qk_head + geo.v_head) * bf16,
        "attention output + LSE": geo.heads * geo.v_head * bf16 + geo.heads * 4.0,
    }
    if is_moe:
        swiglu_width = geo.top_k * geo.moe_inter + geo.shared_inter
        out["router scores (fp32)"] = geo.n_experts * 4.0
        out["MoE up-projection inputs"] = geo.top_k * h * fp8_or_bf16
        out["SwiGLU inputs"] = 2 * swiglu_width * fp8_or_bf16
        out["SwiGLU outputs"] = 0.0 if recompute else swiglu_width * bf16
        out["MoE down-projection outputs"] = 0.0 if recompute else geo.top_k * h * bf16
    else:
        out["SwiGLU inputs"] = 2 * geo.dense_inter * fp8_or_bf16
        out["SwiGLU outputs"] = 0.0 if recompute else geo.dense_inter * bf16
    return out


def recompute_costs_per_token(geo: Geometry, is_moe: bool, recompute: bool, fp8: bool) -> tuple[float, float]:
    """(extra matmul FLOPs, extra HBM bytes) per token per layer that recompute and FP8 storage cost.

    Matmuls re-run: the MLA up-projections (q_b_proj, kv_b_proj) and the routed down-projections. Memory-bound
    work: RMSNorm and SwiGLU re-run (read inputs, write outputs) and FP8 quantize + dequantize (≈ 6 bytes moved
    per stored element).
    """
    flops = hbm = 0.0
    swiglu_width = (geo.top_k * geo.moe_inter + geo.shared_inter) if is_moe else geo.dense_inter
    if recompute:
        flops += 2.0 * geo.heads * (geo.qk_head * geo.q_lora + (geo.qk_head - geo.rope_dim + geo.v_head) * geo.kv_lora)
        if is_moe:
            flops += 2.0 * geo.top_k * geo.moe_inter * geo.hidden
        hbm += 4.0 * (2 * geo.hidden + geo.q_lora + geo.kv_lora)  # RMSNorm: read + write bf16
        hbm += 6.0 * swiglu_width  # SwiGLU: read 2 inputs, write 1 output, bf16
    if fp8:
        stored = 2 * swiglu_width + (geo.top_k * geo.hidden if is_moe else 0)
        hbm += 6.0 * stored
    return flops, hbm


# --------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class RankPlan:
    """Memory (bytes) and time (seconds) of one pipeline rank (every ep/tp/dp peer of it is alike)."""

    rank: int
    layers: list[int]
    params: float
    memory: dict[str, float]
    host_bytes: float
    compute_s: float
    busy_s: float
    times: dict[str, float]
    activations_per_micro_batch: float = 0.0  # stored bytes for one micro-batch through all the rank's layers
    in_flight: float = 0.0  # micro-batches' worth of activations held at the schedule's peak

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())


@dataclass
class Plan:
    layout: Layout
    choices: Choices
    hardware: Hardware
    micro_batches: int  # per pipeline per step
    ranks: list[RankPlan]
    worst: RankPlan  # the pipeline rank with the largest GPU memory
    bottleneck: RankPlan  # the pipeline rank with the longest busy time: it sets the pipeline's pace
    step_s: float
    time_breakdown: dict[str, float]
    model_flops_per_step: float
    mfu: float
    tokens_per_s: float
    unique_params_grads_bytes: float  # bf16 + fp32 of every parameter once
    mean_params_grads_bytes: float  # per GPU, averaged over pipeline ranks (replicas included)
    host_bytes_per_node: float
    dp_comm_ratio_vs_adamw: float
    fits: bool
    reasons: list[str]
    notes: list[str]
    partition_memory_bound: bool = False  # GPU memory kept the pipeline partition from a faster one
    geo: Geometry = field(repr=False, default=None)  # type: ignore[assignment]

    def summary(self) -> dict[str, Any]:
        return {
            "layout": dataclasses.asdict(self.layout), "gpus": self.layout.gpus,
            "choices": dataclasses.asdict(self.choices), "micro_batches": self.micro_batches,
            "memory_gb": {k: v / GB for k, v in self.worst.memory.items()},
            "peak_gpu_memory_gb": self.worst.total_memory / GB, "worst_pp_rank": self.worst.rank,
            "bottleneck_pp_rank": self.bottleneck.rank,
            "stages": [{"rank": r.rank, "layers": r.layers, "busy_s": r.busy_s, "compute_s": r.compute_s,
                        "memory_gb": r.total_memory / GB, "host_gb": r.host_bytes / GB} for r in self.ranks],
            "mean_params_grads_gb": self.mean_params_grads_bytes / GB,
            "unique_params_grads_tb": self.unique_params_grads_bytes / 1e12,
            "host_gb_per_node": self.host_bytes_per_node / GB,
            "step_s": self.step_s, "time_s": self.time_breakdown, "mfu": self.mfu,
            "tokens_per_s": self.tokens_per_s, "dp_comm_ratio_vs_adamw": self.dp_comm_ratio_vs_adamw,
            "fits": self.fits, "reasons": self.reasons,
        }


def validate(geo: Geometry, layout: Layout, choices: Choices, hw: Hardware) -> int:
    """Raise PlanError naming the flag for an impossible layout; return micro-batches per pipeline per step."""
    for name, value in (("--pp", layout.pp), ("--ep", layout.ep), ("--tp", layout.tp), ("dp", layout.dp),
                        ("--virtual-stages", layout.virtual_stages), ("--micro-batch", layout.micro_batch),
                        ("--seq-len", choices.seq_len)):
        if value < 1:
            raise PlanError(f"{name} must be ≥ 1, got {value}")
    if layout.pp * layout.virtual_stages > geo.num_layers:
        raise PlanError(f"--pp {layout.pp} × --virtual-stages {layout.virtual_stages} = "
                        f"{layout.pp * layout.virtual_stages} pipeline chunks, but the model has "
                        f"{geo.num_layers} layers (num_hidden_layers + MTP modules); each chunk needs at least one layer")
    if layout.virtual_stages > 1 and layout.pp == 1:
        raise PlanError("--virtual-stages > 1 needs --pp > 1 (interleaving is a pipeline schedule)")
    if geo.n_experts % layout.ep:
        raise PlanError(f"--ep {layout.ep} does not divide n_routed_experts = {geo.n_experts}")
    if geo.heads % layout.tp:
        raise PlanError(f"--tp {layout.tp} does not divide num_attention_heads = {geo.heads}")
    if layout.tp > hw.gpus_per_node:
        raise PlanError(f"--tp {layout.tp} exceeds --gpus-per-node {hw.gpus_per_node} (TP needs NVLink)")
    if not 0.0 <= choices.optimizer_offload <= 1.0:
        raise PlanError(f"--opt-offload must be in [0, 1], got {choices.optimizer_offload}")
    if choices.balance not in ("time", "memory"):
        raise PlanError(f"--balance must be time or memory, got {choices.balance!r}")
    if choices.optimizer not in ("muonclip", "adamw"):
        raise PlanError(f"--optimizer must be muonclip or adamw, got {choices.optimizer!r}")
    if choices.global_batch_tokens % choices.seq_len:
        raise PlanError(f"--global-batch-tokens {choices.global_batch_tokens} is not a multiple of "
                        f"--seq-len {choices.seq_len}")
    sequences = choices.global_batch_tokens // choices.seq_len
    per_step = layout.dp * layout.ep * layout.micro_batch  # data replicas × micro-batch size
    if sequences % per_step:
        raise PlanError(f"--global-batch-tokens {choices.global_batch_tokens} = {sequences} sequences is not "
                        f"divisible by dp {layout.dp} × --ep {layout.ep} × --micro-batch {layout.micro_batch} "
                        f"= {per_step} (each data replica needs whole micro-batches)")
    micro_batches = sequences // per_step
    if layout.virtual_stages > 1 and micro_batches % layout.pp:
        raise PlanError(f"interleaved 1F1B needs the micro-batch count per pipeline ({micro_batches}) to be a "
                        f"multiple of --pp {layout.pp}; change --global-batch-tokens or --micro-batch, "
                        f"or use --virtual-stages 1")
    return micro_batches


def in_flight(layout: Layout, rank: int, micro_batches: int, extra_warmup: int) -> float:
    """Micro-batch-sized activation sets a pipeline rank holds at its peak, in units of 'all its layers'.

    1F1B (v = 1): warm-up pp − r − 1, so pp − r micro-batches are in flight on rank r.
    Interleaved (Megatron): warm-up 2·(pp − r − 1) + (v − 1)·pp chunk-forwards, + 1 in flight, each holding
    one chunk (1/v of the rank's layers).
    """
    pp, v = layout.pp, layout.virtual_stages
    if v == 1:
        return float(min(pp - rank + extra_warmup, micro_batches))
    chunk_forwards = min(2 * (pp - rank - 1) + (v - 1) * pp + 1 + extra_warmup, micro_batches * v)
    return chunk_forwards / v


# --------------------------------------------------------------------------------------------------------------
# Stage costs: what each layer adds to a pipeline stage's time and memory


@dataclass
class _LayerColumns:
    """Per-layer, per-GPU figures, one list entry per layer, that depend only on ep, tp, recompute, FP8 and
    seq_len (cached per geometry). The embedding sits on layer 0, the final norm + lm_head on the last layer."""

    replicated: list[float]  # parameters with dp × ep replicas (attention, dense/shared MLP, router, norms, ...)
    adamw: list[float]  # the AdamW part of `replicated` under MuonClip
    experts: list[float]  # routed-expert parameters (dp replicas)
    act_per_token: list[float]  # stored activation bytes per token
    full_act_per_token: list[float]  # un-saved (no recompute, no FP8) bytes per token
    flops_per_token: list[float]  # model + recompute FLOPs incl. causal attention (+ lm_head), forward + backward
    extra_hbm_per_token: list[float]  # recompute / FP8 conversion HBM bytes
    ns_flops: list[float]  # Newton–Schulz FLOPs for its full Muon matrices (experts: the ep share)
    ns_workspace: list[float]  # bytes for Newton–Schulz on its largest full Muon matrix
    is_moe: list[bool]
    prefix: dict[str, list[float]] = field(default_factory=dict)  # prefix sums of the additive columns

    def __post_init__(self) -> None:
        for name in ("replicated", "adamw", "experts", "ns_flops"):
            self.prefix[name] = list(itertools.accumulate(getattr(self, name), initial=0.0))


def _layer_columns(geo: Geometry, ep: int, tp: int, recompute: bool, fp8: bool, seq_len: int) -> _LayerColumns:
    key = ("layer columns", ep, tp, recompute, fp8, seq_len)
    if key in geo._cache:
        return geo._cache[key]
    act = {kind: sum(activation_bytes_per_token(geo, kind, recompute, fp8).values()) for kind in (False, True)}
    full = {kind: sum(activation_bytes_per_token(geo, kind, False, False).values()) for kind in (False, True)}
    extra = {kind: recompute_costs_per_token(geo, kind, recompute, fp8) for kind in (False, True)}
    attention_flops = geo.attention_flops_per_token(seq_len)
    names = [f.name for f in dataclasses.fields(_LayerColumns) if f.name != "prefix"]
    column: dict[str, list[Any]] = {name: [] for name in names}
    for layer in geo.layers:
        first, last = layer.index == 0, layer.index == geo.num_layers - 1
        extra_params = (geo.embed_params if first else 0.0) + (geo.head_params if last else 0.0)
        ns_flops = sum(_ns_flops(r, c) for r, c in layer.muon_shapes)
        ns_flops += sum(_ns_flops(r, c) for r, c in layer.expert_shapes) * geo.n_experts / (ep * tp)
        values = {
            "replicated": (layer.replicated_params + extra_params) / tp,
            "adamw": (layer.adamw_params + extra_params) / tp,
            "experts": layer.expert_params / (ep * tp),
            "act_per_token": act[layer.is_moe] / tp,
            "full_act_per_token": full[layer.is_moe] / tp,
            "flops_per_token": (layer.flops_per_token + attention_flops + extra[layer.is_moe][0]
                                + (geo.head_flops_per_token() if last else 0.0)) / tp,
            "extra_hbm_per_token": extra[layer.is_moe][1] / tp,
            "ns_flops": ns_flops,
            "ns_workspace": max(_ns_workspace(r, c) for r, c in layer.muon_shapes + layer.expert_shapes),
            "is_moe": layer.is_moe,
        }
        for name in names:
            column[name].append(values[name])
    columns = _LayerColumns(**column)
    geo._cache[key] = columns
    return columns


def _range_sum(prefix: list[float], ranges: Sequence[tuple[int, int]]) -> float:
    if len(ranges) == 1:  # a plain pipeline stage (the common case, in the partition's inner loop)
        return prefix[ranges[0][1]] - prefix[ranges[0][0]]
    return sum(prefix[j] - prefix[i] for i, j in ranges)


@dataclass
class StageModel:
    """What every layer adds to a pipeline stage's time and memory, per GPU, for one layout and set of choices.

    A stage's (or an interleaved rank's) figures are sums and maxima over its layers (`stage_totals`), turned
    into seconds by `stage_times` and bytes by `stage_memory`. `plan` reports exactly these, so the partition
    optimises what the plan shows. Times are seconds for all the step's micro-batches.
    """

    geo: Geometry
    layout: Layout
    choices: Choices
    micro_batches: int
    columns: _LayerColumns
    compute_s: list[float]  # matmul FLOPs (+ the lm_head on the last layer) and recompute/FP8 HBM traffic
    a2a_s: list[float]  # EP dispatch + combine, forward and backward
    offload_s: list[float]  # activation offload PCIe traffic (out and back)
    p2p_s: float  # PP send/recv of one pipeline rank, all its chunks
    params: list[float]  # per-GPU parameters
    optimizer_bytes: list[float]  # the layer's optimizer-state shard before offload
    act_bytes: list[float]  # stored activations of one micro-batch
    a2a_buffer_bytes: float  # dispatch send/recv buffers on a rank with an MoE layer
    logits_bytes: float  # logits + fp32 loss workspace on the last rank
    prefix: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("compute_s", "a2a_s", "offload_s", "params", "optimizer_bytes", "act_bytes"):
            self.prefix[name] = list(itertools.accumulate(getattr(self, name), initial=0.0))

    @property
    def num_layers(self) -> int:
        return len(self.params)


@dataclass(frozen=True)
class StageTotals:
    compute_s: float
    a2a_s: float
    offload_s: float
    params: float
    optimizer_bytes: float
    act_bytes: float  # stored per micro-batch, all the stage's layers
    largest_act_bytes: float  # stored per micro-batch, its largest layer
    largest_full_act_bytes: float
    ns_workspace: float
    has_moe: bool
    has_last: bool


def stage_model(geo: Geometry, layout: Layout, choices: Choices, hw: Hardware, micro_batches: int) -> StageModel:
    pp, ep, tp, dp, v = layout.pp, layout.ep, layout.tp, layout.dp, layout.virtual_stages
    col = _layer_columns(geo, ep, tp, choices.recompute, choices.fp8_activations, choices.seq_len)
    tokens_mb = layout.micro_batch * choices.seq_len  # tokens per micro-batch per data replica
    tokens_rank = micro_batches * tokens_mb  # tokens each GPU's pipeline sees per step (÷ tp is in the columns)
    compute_rate = hw.peak_flops * hw.matmul_efficiency
    muon = choices.optimizer == "muonclip"
    master = 4.0 if choices.master_weights else 0.0
    muon_state, adam_state = 4.0 + master, 8.0 + master  # bytes/param: momentum | 2 moments (+ fp32 master)
    # Where the EP group's peers sit: tp innermost, then ep, in the rank order.
    ep_in_node = max(1, min(ep, hw.gpus_per_node // tp))
    ep_nvlink_share = (ep_in_node - 1) / (ep - 1) if ep > 1 else 0.0
    a2a_bytes = tokens_rank / tp * 4 * geo.top_k * geo.hidden * choices.a2a_bytes * (ep - 1) / ep if ep > 1 else 0.0
    a2a_layer = max(a2a_bytes * ep_nvlink_share / hw.nvlink_bytes_s,
                    a2a_bytes * (1 - ep_nvlink_share) / hw.nic_bytes_s_per_gpu)
    p2p = 0.0
    if pp > 1:  # one activation forward and one gradient backward per chunk per micro-batch
        mp_in_one_node = pp * ep * tp <= hw.gpus_per_node
        p2p_bytes = micro_batches * v * 2 * tokens_mb * geo.hidden * 2.0 / tp
        p2p = p2p_bytes / (hw.nvlink_bytes_s if mp_in_one_node else hw.nic_bytes_s_per_gpu)
    # ZeRO-1: replicated parameters have dp × ep replicas to shard over, expert parameters dp.
    if muon:
        optimizer_bytes = [((r - a) * muon_state + a * adam_state) / (dp * ep) + e * muon_state / dp
                           for r, a, e in zip(col.replicated, col.adamw, col.experts)]
    else:
        optimizer_bytes = [r * adam_state / (dp * ep) + e * adam_state / dp
                           for r, e in zip(col.replicated, col.experts)]
    act_bytes = [a * tokens_mb for a in col.act_per_token]
    offload_rate = 2 * micro_batches / hw.pcie_bytes_s if choices.activation_offload else 0.0
    return StageModel(
        geo=geo, layout=layout, choices=choices, micro_batches=micro_batches, columns=col,
        compute_s=[tokens_rank * f / compute_rate + tokens_rank * h / hw.hbm_bytes_s
                   for f, h in zip(col.flops_per_token, col.extra_hbm_per_token)],
        a2a_s=[a2a_layer if moe else 0.0 for moe in col.is_moe],
        offload_s=[b * offload_rate for b in act_bytes], p2p_s=p2p,
        params=[r + e for r, e in zip(col.replicated, col.experts)],
        optimizer_bytes=optimizer_bytes, act_bytes=act_bytes,
        a2a_buffer_bytes=2 * tokens_mb * geo.top_k * geo.hidden * choices.a2a_bytes / tp if ep > 1 else 0.0,
        logits_bytes=tokens_mb * geo.vocab / tp * (2.0 + 4.0))


def stage_totals(model: StageModel, ranges: Sequence[tuple[int, int]]) -> StageTotals:
    """Sums and maxima over the layers i..j−1 of each (i, j) in `ranges` (a stage, or an interleaved rank)."""
    col, prefix = model.columns, model.prefix
    tokens_mb = model.layout.micro_batch * model.choices.seq_len
    return StageTotals(
        compute_s=_range_sum(prefix["compute_s"], ranges), a2a_s=_range_sum(prefix["a2a_s"], ranges),
        offload_s=_range_sum(prefix["offload_s"], ranges), params=_range_sum(prefix["params"], ranges),
        optimizer_bytes=_range_sum(prefix["optimizer_bytes"], ranges),
        act_bytes=_range_sum(prefix["act_bytes"], ranges),
        largest_act_bytes=max(max(col.act_per_token[i:j]) for i, j in ranges) * tokens_mb,
        largest_full_act_bytes=max(max(col.full_act_per_token[i:j]) for i, j in ranges) * tokens_mb,
        ns_workspace=max(max(col.ns_workspace[i:j]) for i, j in ranges)
        if model.choices.optimizer == "muonclip" else 0.0,
        has_moe=any(any(col.is_moe[i:j]) for i, j in ranges), has_last=any(j == model.num_layers for _, j in ranges))


def stage_times(model: StageModel, t: StageTotals) -> dict[str, float]:
    """Seconds a stage is busy in the pipelined part of the step ("busy"), with its parts."""
    exposed = _exposed(model, t.compute_s, t.a2a_s, t.offload_s)
    return {"compute (incl. recompute)": t.compute_s, "EP all-to-all (total)": t.a2a_s,
            "EP all-to-all exposed": exposed[0], "PP send/recv (total)": model.p2p_s,
            "PP send/recv exposed": exposed[1], "activation offload PCIe (total)": t.offload_s,
            "activation offload exposed": exposed[2], "busy": t.compute_s + sum(exposed)}


def _exposed(model: StageModel, compute: float, a2a: float, offload: float) -> tuple[float, float, float]:
    """The EP all-to-all, PP send/recv and activation-offload seconds that do not hide behind the compute."""
    a2a_exposed = a2a - min(model.choices.ep_overlap * a2a, compute)
    p2p_exposed = max(0.0, model.p2p_s - compute)  # decoupled weight-gradient compute hides it otherwise
    offload_exposed = max(0.0, offload - compute)
    return a2a_exposed, p2p_exposed, offload_exposed


def stage_memory(model: StageModel, t: StageTotals, rank: int) -> dict[str, float]:
    """Bytes on one GPU of pipeline rank `rank` holding the stage, by component."""
    choices = model.choices
    stored = t.act_bytes * in_flight(model.layout, rank, model.micro_batches, choices.extra_warmup)
    gpu_acts = min(stored, choices.offload_window * t.largest_act_bytes) if choices.activation_offload else stored
    # Transient: one layer's full (un-saved) activations while it runs or recomputes, the all-to-all send/recv
    # buffers, and the logits + fp32 loss workspace on the last rank.
    transient = t.largest_full_act_bytes + (model.a2a_buffer_bytes if t.has_moe else 0.0) \
        + (model.logits_bytes if t.has_last else 0.0)
    return {"bf16 weights": 2.0 * t.params, "fp32 grad buffer": 4.0 * t.params,
            "optimizer states (GPU part)": t.optimizer_bytes * (1 - choices.optimizer_offload),
            "activations (GPU-resident)": gpu_acts, "Newton–Schulz workspace": t.ns_workspace,
            "transient working set": transient, "reserve": choices.reserve_gb * GB}


# --------------------------------------------------------------------------------------------------------------
# The compute-aware partition


@dataclass
class PipelinePartition:
    runs: list[list[int]]  # pp × v chunks of layer indices; chunk c on pipeline rank c mod pp
    notes: list[str]  # for the user: memory forcing imbalance, nothing fitting, interleaving limits
    memory_bound: bool  # GPU memory kept it from a faster partition (or nothing fits)


def balance_pipeline(model: StageModel, capacity: float) -> PipelinePartition:
    """The pp × v chunks of layers `plan` uses, and notes for the user.

    Objective: minimise the slowest pipeline rank's busy time (compute + the communication it cannot hide: the
    pace of the pipeline), subject to every rank's GPU memory ≤ `capacity`; tie-break on the largest rank
    memory. The embedding, the lm_head and each MTP module (with its own lm_head pass) are costs of the first /
    last layers, so the first and last stages get fewer decoder layers when those are heavy. The optimizer
    phase after the pipeline drains (< 1 % of a K2 step) is not part of it (`plan` handles that tie).

    v = 1: exact, by `partition_min_max` (binary search on the bottleneck, greedy check).
    v > 1 (interleaved): rank r holds chunks r, r + pp, …, so a rank's time is a sum over non-adjacent chunks
    and the greedy argument no longer applies. A local search instead moves one chunk boundary by one layer
    while that lowers (memory overflow, rank times sorted slowest first, peak memory) lexicographically,
    starting from the parameter-balanced and the compute-balanced chunks; the better result is kept (so it is
    never slower than the parameter-balanced partition that `--balance memory` gives).
    When no partition fits, the one with the smallest peak memory (v = 1) or overflow (v > 1) is returned.
    """
    n, pp, chunks = model.num_layers, model.layout.pp, model.layout.pp * model.layout.virtual_stages
    if chunks == 1:
        return PipelinePartition([list(range(n))], [], False)
    if model.layout.virtual_stages == 1:
        compute, a2a, offload = (model.prefix[k] for k in ("compute_s", "a2a_s", "offload_s"))
        times: dict[tuple[int, int], float] = {}  # both searches below ask for every stage's time
        peaks: dict[tuple[int, int, int], float] = {}  # the greedy passes ask for the same stages again

        def stage_time(i: int, j: int) -> float:
            if (i, j) not in times:
                c = compute[j] - compute[i]
                times[i, j] = c + sum(_exposed(model, c, a2a[j] - a2a[i], offload[j] - offload[i]))
            return times[i, j]

        def stage_peak(i: int, j: int, rank: int) -> float:
            if (i, j, rank) not in peaks:
                peaks[i, j, rank] = sum(stage_memory(model, stage_totals(model, [(i, j)]), rank).values())
            return peaks[i, j, rank]

        runs = partition_min_max(n, pp, stage_time, stage_peak, capacity)
        if runs is None:
            smallest = partition_min_max(n, pp, lambda i, j: 0.0, stage_peak)
            assert smallest is not None
            return PipelinePartition(smallest, [f"no pipeline partition fits in {capacity / GB:g} GB per GPU; "
                                                f"shown: the one with the smallest peak memory"], True)
        unconstrained = partition_min_max(n, pp, stage_time)
        assert unconstrained is not None
        slowest = max(stage_time(r[0], r[-1] + 1) for r in runs)
        fastest = max(stage_time(r[0], r[-1] + 1) for r in unconstrained)
        if slowest <= fastest * (1 + 1e-9):
            return PipelinePartition(runs, [], False)
        return PipelinePartition(runs, [
            f"GPU memory forces pipeline imbalance: the slowest stage is busy {slowest:.1f} s per step, "
            f"{fastest:.1f} s with unlimited memory ({_layer_counts(unconstrained)} layers per stage)"], True)

    compute_costs = [c + (1 - model.choices.ep_overlap) * a for c, a in zip(model.compute_s, model.a2a_s)]
    results = [_refine_interleaved(model, seed, capacity)
               for seed in (memory_balanced_runs(model.geo, model.layout), partition_layers(compute_costs, chunks))]
    key, runs, blocked = min(results, key=lambda result: result[0])
    notes = []
    if key[0] > 0:
        notes.append(f"no pipeline partition found that fits in {capacity / GB:g} GB per GPU")
    elif blocked:
        notes.append("GPU memory forces pipeline imbalance: moving a layer off the slowest rank would overflow "
                     "a neighbour's memory")
    for rank in range(pp):
        own = runs[rank::pp]
        busy = stage_times(model, stage_totals(model, [(c[0], c[-1] + 1) for c in own]))["busy"]
        if _rounded(busy) == key[1][0] and all(len(c) == 1 for c in own):
            notes.append(f"pipeline rank {rank} is the slowest with one layer per chunk (interleaving gives every "
                         f"rank at least one layer per chunk): --virtual-stages 1 can give it fewer layers")
            break
    return PipelinePartition(runs, notes, key[0] > 0 or blocked)


def _rounded(seconds: float) -> float:
    """Times compared to 12 significant digits: sums of the same layers in another order are equal."""
    return float(f"{seconds:.12g}")


def _layer_counts(runs: list[list[int]]) -> str:
    return "/".join(str(len(r)) for r in runs)


def _refine_interleaved(model: StageModel, runs: list[list[int]], capacity: float
                        ) -> tuple[tuple[float, list[float], float], list[list[int]], bool]:
    """Local search over chunk boundaries (see `balance_pipeline`): (key, chunks, memory blocked a better move)."""
    n, pp, chunks = model.num_layers, model.layout.pp, len(runs)
    bounds = [run[0] for run in runs] + [n]  # chunk c = layers bounds[c] .. bounds[c + 1] − 1

    def evaluate(rank: int) -> tuple[float, float]:
        t = stage_totals(model, [(bounds[c], bounds[c + 1]) for c in range(rank, chunks, pp)])
        return stage_times(model, t)["busy"], sum(stage_memory(model, t, rank).values())

    def key(ranks: list[tuple[float, float]]) -> tuple[float, list[float], float]:
        peak = max(m for _, m in ranks)
        return max(0.0, peak - capacity), sorted((_rounded(t) for t, _ in ranks), reverse=True), peak

    ranks = [evaluate(r) for r in range(pp)]
    best = key(ranks)
    improved, blocked = True, False
    while improved:
        improved, blocked = False, False
        for c in range(chunks - 1):
            for step in (-1, 1):
                boundary = bounds[c + 1] + step
                if not bounds[c] < boundary < bounds[c + 2]:
                    continue  # both chunks keep at least one layer
                old, bounds[c + 1] = bounds[c + 1], boundary
                trial = list(ranks)
                for r in {c % pp, (c + 1) % pp}:
                    trial[r] = evaluate(r)
                candidate = key(trial)
                if candidate < best:
                    best, ranks, improved = candidate, trial, True
                else:
                    bounds[c + 1] = old
                    blocked |= candidate[0] > best[0] and candidate[1] < best[1]
    return best, [list(range(bounds[c], bounds[c + 1])) for c in range(chunks)], blocked


# --------------------------------------------------------------------------------------------------------------
# plan(): every pipeline rank's memory and time from the stage model


def plan(cfg_or_geo: Any, layout: Layout, choices: Choices = Choices(), hw: Hardware = Hardware()) -> Plan:
    """Memory per GPU and step time for one layout. Raises PlanError for impossible layouts."""
    geo = cfg_or_geo if isinstance(cfg_or_geo, Geometry) else geometry(cfg_or_geo)
    micro_batches = validate(geo, layout, choices, hw)
    pp, ep, dp = layout.pp, layout.ep, layout.dp
    tokens_rank = micro_batches * layout.micro_batch * choices.seq_len  # per data replica per step
    model = stage_model(geo, layout, choices, hw, micro_batches)
    if choices.balance == "memory":
        partition = PipelinePartition(memory_balanced_runs(geo, layout), [], False)
        ranks = _rank_plans(model, partition.runs, hw)
    else:
        partition = balance_pipeline(model, hw.gpu_mem_gb * GB)
        ranks = _rank_plans(model, partition.runs, hw)
        # The partition's objective leaves out the optimizer phase after the pipeline drains (< 1 % of a K2 step):
        # where the parameter-balanced partition fits with the same slowest stage and a shorter step, keep it.
        other = _rank_plans(model, memory_balanced_runs(geo, layout), hw)
        if (max(r.total_memory for r in other) <= hw.gpu_mem_gb * GB
                and max(r.busy_s for r in other) <= max(r.busy_s for r in ranks) * (1 + 1e-9)
                and _step_parts(other, layout, micro_batches)[0] < _step_parts(ranks, layout, micro_batches)[0]):
            ranks = other

    slowest = max(ranks, key=lambda r: r.busy_s)
    step, bubble, slowest_optimizer = _step_parts(ranks, layout, micro_batches)
    time_breakdown = {
        "compute (slowest pipeline rank)": slowest.compute_s,
        "EP all-to-all exposed": slowest.times["EP all-to-all exposed"],
        "PP send/recv exposed": slowest.times["PP send/recv exposed"],
        "activation offload exposed": slowest.times["activation offload exposed"],
        "pipeline bubble": bubble,
    }
    time_breakdown.update({k: slowest_optimizer.times[k] for k in _OPTIMIZER_PARTS})
    tokens = tokens_rank * dp * ep
    model_flops = tokens * geo.model_flops_per_token(choices.seq_len)
    mfu = model_flops / (step * layout.gpus * hw.peak_flops)
    worst = max(ranks, key=lambda r: r.total_memory)
    host_per_node = max(r.host_bytes for r in ranks) * min(hw.gpus_per_node, layout.gpus)
    dp_adamw = sum(r.times["DP bytes AdamW"] for r in ranks)
    dp_ratio = sum(r.times["DP bytes"] for r in ranks) / dp_adamw if dp_adamw else 1.0

    reasons, notes = [], list(partition.notes)
    if worst.total_memory > hw.gpu_mem_gb * GB:
        reasons.append(f"GPU memory {worst.total_memory / GB:.1f} GB on pipeline rank {worst.rank} > "
                       f"{hw.gpu_mem_gb:g} GB")
    if host_per_node > hw.host_mem_gb * GB:
        reasons.append(f"host memory {host_per_node / GB:.0f} GB per node > {hw.host_mem_gb:g} GB")
    if micro_batches < pp:
        notes.append(f"only {micro_batches} micro-batches for {pp} pipeline stages: the pipeline never fills")
    if slowest.times["activation offload exposed"] > 0:
        notes.append("activation offload is PCIe-bound (not hidden behind compute)")
    params_grads = [r.memory["bf16 weights"] + r.memory["fp32 grad buffer"] for r in ranks]
    return Plan(
        layout=layout, choices=choices, hardware=hw, micro_batches=micro_batches, ranks=ranks, worst=worst,
        bottleneck=slowest,
        step_s=step, time_breakdown=time_breakdown, model_flops_per_step=model_flops, mfu=mfu,
        tokens_per_s=tokens / step, unique_params_grads_bytes=6.0 * geo.counts["total"],
        mean_params_grads_bytes=sum(params_grads) / len(params_grads), host_bytes_per_node=host_per_node,
        dp_comm_ratio_vs_adamw=dp_ratio, fits=not reasons, reasons=reasons, notes=notes,
        partition_memory_bound=partition.memory_bound, geo=geo)


_OPTIMIZER_PARTS = ("DP reduce-scatter + gathers", "Newton–Schulz", "optimizer update", "optimizer offload PCIe")


def _step_parts(ranks: list[RankPlan], layout: Layout, micro_batches: int) -> tuple[float, float, RankPlan]:
    """(step seconds, pipeline bubble, the rank with the longest optimizer phase).

    The slowest rank's busy time sets the pace; interleaved 1F1B adds a bubble of (pp − 1) / (v · m) of it; the
    optimizer phase (after the pipeline drains) is counted as exposed.
    """
    steady = max(r.busy_s for r in ranks)
    bubble = steady * (layout.pp - 1) / (layout.virtual_stages * micro_batches)
    slowest_optimizer = max(ranks, key=lambda r: sum(r.times[k] for k in _OPTIMIZER_PARTS))
    return steady + bubble + sum(slowest_optimizer.times[k] for k in _OPTIMIZER_PARTS), bubble, slowest_optimizer


def _rank_plans(model: StageModel, runs: list[list[int]], hw: Hardware) -> list[RankPlan]:
    """Every pipeline rank's memory and times for the chunks `runs` (chunk c on rank c mod pp)."""
    layout, choices, micro_batches = model.layout, model.choices, model.micro_batches
    pp, ep, tp, dp = layout.pp, layout.ep, layout.tp, layout.dp
    muon = choices.optimizer == "muonclip"
    compute_rate = hw.peak_flops * hw.matmul_efficiency
    ranks: list[RankPlan] = []
    for rank in range(pp):
        chunks = runs[rank::pp]
        ids = [i for chunk in chunks for i in chunk]
        ranges = [(chunk[0], chunk[-1] + 1) for chunk in chunks]
        totals = stage_totals(model, ranges)
        memory = stage_memory(model, totals, rank)
        times = stage_times(model, totals)
        busy = times.pop("busy")
        col = model.columns
        replicated, experts = _range_sum(col.prefix["replicated"], ranges), _range_sum(col.prefix["experts"], ranges)
        replicated_muon = replicated - _range_sum(col.prefix["adamw"], ranges) if muon else 0.0
        expert_muon = experts if muon else 0.0
        n_in_flight = in_flight(layout, rank, micro_batches, choices.extra_warmup)
        stored = totals.act_bytes * n_in_flight
        host = totals.optimizer_bytes * choices.optimizer_offload + (stored - memory["activations (GPU-resident)"])

        # ---- optimizer phase (after the pipeline drains; counted as exposed)
        # ZeRO-1 AdamW moves fp32 reduce-scatter + all-gather (spec §2.4 accounting: 4 + 4 B/param); MuonClip adds
        # a bf16 DP-gather of the momentum-updated gradient of every Muon parameter (2 B/param).
        share_r = (dp * ep - 1) / (dp * ep)
        share_e = (dp - 1) / dp
        dp_bytes_adamw = 8.0 * (replicated * share_r + experts * share_e)
        dp_bytes = dp_bytes_adamw + 2.0 * (replicated_muon * share_r + expert_muon * share_e)
        dp_time = dp_bytes / hw.nic_bytes_s_per_gpu
        tp_gather = (replicated_muon + expert_muon) * 2.0 * (tp - 1) / hw.nvlink_bytes_s
        ns_time = _range_sum(col.prefix["ns_flops"], ranges) / compute_rate if muon else 0.0
        shard_params = replicated / (dp * ep) + experts / dp
        state_per_param = totals.optimizer_bytes / shard_params if shard_params else 0.0
        update_time = shard_params * (2 * state_per_param + 4.0 + 2.0) / hw.hbm_bytes_s
        opt_offload_time = 2 * totals.optimizer_bytes * choices.optimizer_offload / hw.pcie_bytes_s
        times.update({
            "DP reduce-scatter + gathers": dp_time + tp_gather, "DP bytes": dp_bytes,
            "DP bytes AdamW": dp_bytes_adamw, "Newton–Schulz": ns_time, "optimizer update": update_time,
            "optimizer offload PCIe": opt_offload_time,
        })
        ranks.append(RankPlan(rank=rank, layers=ids, params=totals.params, memory=memory, host_bytes=host,
                              compute_s=totals.compute_s, busy_s=busy, times=times,
                              activations_per_micro_batch=totals.act_bytes, in_flight=n_in_flight))
    return ranks


def _ns_workspace(rows: int, cols: int) -> float:
    """Bytes to orthogonalise one full matrix: gathered fp32 G, two bf16 iterates X, bf16 A = X Xᵀ and B."""
    return rows * cols * (4 + 2 + 2) + 2 * min(rows, cols) ** 2 * 2


def _ns_flops(rows: int, cols: int, steps: int = 5) -> float:
    """Quintic Newton–Schulz on an r×c matrix (r ≤ c after the transpose): per step X Xᵀ, A², B X."""
    r, c = min(rows, cols), max(rows, cols)
    return steps * (4.0 * r * r * c + 2.0 * r**3)


# --------------------------------------------------------------------------------------------------------------
# --fit: search layouts for a cluster


@dataclass
class FitResult:
    fitting: list[Plan]  # best first: fewest GPUs, then highest MFU
    rejected: dict[str, int]  # reason category -> number of candidates
    closest_misses: dict[int, Plan]  # GPU count -> the lowest-memory candidate that did not fit
    evaluated: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fit(cfg_or_geo: Any, hw: Hardware, max_gpus: int, base: Choices = Choices(),
        pp_options: Iterable[int] | None = None, tp_options: Iterable[int] = (1,),
        micro_batches: Iterable[int] = (1, 2), virtual_options: Iterable[int] = (1, 2, 4),
        offload_grid: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> FitResult:
    """Search PP/EP/TP/DP/virtual-stages/micro-batch and recompute/FP8/offload choices for ≤ max_gpus GPUs.

    GPU counts are whole nodes (or a part of one node). For each layout and on/off choice of recompute, FP8
    storage and activation offload, the smallest optimizer-offload fraction on the grid that fits is solved for
    directly from the plan without offload. Candidates are screened with the parameter-balanced pipeline
    partition (cheap, cached; a layout that fits only with an uneven partition can be missed); those that fit
    are planned again with `base.balance` at that fraction and every larger one on the grid (more offload costs
    PCIe time but can free the memory a faster, uneven partition needs), and the fastest is kept.
    """
    geo = cfg_or_geo if isinstance(cfg_or_geo, Geometry) else geometry(cfg_or_geo)
    if pp_options is None:
        pp_options = [p for p in (1, 2, 4, 8, 16, 32, 64) if p <= geo.num_layers]
    offload_grid = sorted(offload_grid)
    capacity = hw.gpu_mem_gb * GB
    fitting: list[Plan] = []
    rejected: dict[str, int] = {}
    misses: dict[int, Plan] = {}
    evaluated = 0
    toggles = list(itertools.product((True, False), repeat=3))
    invalid = "invalid layout (pp × v > layers, batch not divisible into micro-batches, or v > 1 with pp = 1)"

    def reject(category: str, candidate: Plan) -> None:
        rejected[category] = rejected.get(category, 0) + 1
        miss = misses.get(candidate.layout.gpus)
        if miss is None or candidate.worst.total_memory < miss.worst.total_memory:
            misses[candidate.layout.gpus] = candidate

    for pp, tp in itertools.product(pp_options, tp_options):
        for ep in _divisors(geo.n_experts):
            mp = pp * ep * tp
            if mp > max_gpus:
                break
            for dp in range(1, max_gpus // mp + 1):
                gpus = mp * dp
                if gpus > hw.gpus_per_node and gpus % hw.gpus_per_node:
                    continue  # whole nodes only beyond one node
                for v, mb in itertools.product(virtual_options, micro_batches):
                    layout = Layout(pp=pp, ep=ep, tp=tp, dp=dp, virtual_stages=v, micro_batch=mb)
                    try:
                        validate(geo, layout, base, hw)
                    except PlanError:
                        rejected[invalid] = rejected.get(invalid, 0) + 1
                        continue
                    for recompute, fp8, act_offload in toggles:
                        # Screen with the (cached) parameter-balanced partition; re-plan what fits with base's.
                        choices = dataclasses.replace(base, recompute=recompute, fp8_activations=fp8,
                                                      activation_offload=act_offload, optimizer_offload=0.0,
                                                      balance="memory")
                        candidate = plan(geo, layout, choices, hw)
                        evaluated += 1
                        if not candidate.fits:
                            needed = _offload_needed(candidate, capacity)
                            offload = next((f for f in offload_grid if f >= needed - 1e-12), None)
                            if offload is None:  # record the most-offloaded plan: it is the closest miss
                                most = dataclasses.replace(choices, optimizer_offload=offload_grid[-1])
                                reject("GPU memory even with the most optimizer offload", plan(geo, layout, most, hw))
                                continue
                            candidate = plan(geo, layout, dataclasses.replace(choices, optimizer_offload=offload),
                                             hw)
                            evaluated += 1
                        if candidate.fits:
                            if base.balance != "memory":
                                timed = plan(geo, layout, dataclasses.replace(candidate.choices,
                                                                              balance=base.balance), hw)
                                options = [timed]
                                if timed.partition_memory_bound:
                                    # More optimizer offload can free the memory a faster, uneven partition
                                    # needs: try the larger fractions on the grid too.
                                    options += [plan(geo, layout, dataclasses.replace(timed.choices,
                                                                                      optimizer_offload=f), hw)
                                                for f in offload_grid if f > timed.choices.optimizer_offload + 1e-12]
                                evaluated += len(options)
                                candidate = min([p for p in options if p.fits] or [candidate],
                                                key=lambda p: p.step_s)
                            fitting.append(candidate)
                        else:
                            reject("host memory per node" if candidate.host_bytes_per_node > hw.host_mem_gb * GB
                                   else "GPU memory", candidate)
    fitting.sort(key=lambda p: (p.layout.gpus, -p.mfu))
    return FitResult(fitting=fitting, rejected=rejected, closest_misses=misses, evaluated=evaluated)


def _offload_needed(p: Plan, capacity: float) -> float:
    """Smallest optimizer-offload fraction that brings every pipeline rank under `capacity` (inf if none)."""
    needed = 0.0
    for r in p.ranks:
        over = r.total_memory - capacity
        if over > 0:
            optimizer = r.memory["optimizer states (GPU part)"] / (1 - p.choices.optimizer_offload)
            needed = max(needed, over / optimizer if optimizer > 0 else math.inf)
    return needed


# --------------------------------------------------------------------------------------------------------------
# Output


def _choices_text(c: Choices) -> str:
    on = [name for name, flag in (("recompute", c.recompute), ("fp8-acts", c.fp8_activations),
                                  ("act-offload", c.activation_offload)) if flag]
    if c.optimizer_offload:
        on.append(f"opt-offload {c.optimizer_offload:.0%}")
    return ", ".join(on) or "none"


def _ranges(ids: list[int]) -> str:
    """[0, 31, 32] -> '0, 31–32': a pipeline rank's chunks."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def render_plan(p: Plan, console: Any) -> None:
    from rich.table import Table

    layout, c, hw = p.layout, p.choices, p.hardware
    console.print(f"[bold]Layout[/bold] {layout.short()} on {layout.gpus} GPUs "
                  f"({hw.gpu_mem_gb:g} GB each, {hw.gpus_per_node}/node); optimizer {c.optimizer}; "
                  f"seq {c.seq_len}, global batch {c.global_batch_tokens / 1e6:.1f}M tokens = "
                  f"{p.micro_batches} micro-batches per pipeline; choices: {_choices_text(c)}")
    table = Table(title=f"Per-GPU memory (GB) by pipeline rank; worst = rank {p.worst.rank}")
    table.add_column("component")
    shown = {0, p.worst.rank, p.bottleneck.rank, len(p.ranks) - 1, len(p.ranks) // 2}
    shown_ranks = [p.ranks[i] for i in sorted(shown)] if len(p.ranks) > 6 else p.ranks
    for r in shown_ranks:
        table.add_column(f"rank {r.rank}\nlayers {_ranges(r.layers)}", justify="right")
    for name in p.worst.memory:
        table.add_row(name, *(f"{r.memory[name] / GB:.2f}" for r in shown_ranks))
    table.add_row("[bold]total[/bold]", *(f"[bold]{r.total_memory / GB:.2f}[/bold]" for r in shown_ranks))
    table.add_row("host memory (offloaded)", *(f"{r.host_bytes / GB:.2f}" for r in shown_ranks))
    console.print(table)
    console.print(f"bf16 params + fp32 grad buffer: {p.unique_params_grads_bytes / 1e12:.2f} TB for the unique "
                  f"parameters; per GPU {p.mean_params_grads_bytes / GB:.1f} GB on average "
                  f"(non-expert parameters replicated over EP; K2 report: ≈ {REPORT_PARAMS_GRADS_GB_PER_GPU:g} GB)")
    w = p.worst
    console.print(f"activations on rank {w.rank}: {w.activations_per_micro_batch / GB:.2f} GB stored per micro-batch "
                  f"of {layout.micro_batch}×{c.seq_len} tokens through its {len(w.layers)} layers, "
                  f"{w.in_flight:g} micro-batches in flight "
                  f"({'interleaved 1F1B' if layout.virtual_stages > 1 else '1F1B'})")
    console.print(f"host memory per node: {p.host_bytes_per_node / GB:.0f} GB of {hw.host_mem_gb:g} GB")
    render_activation_choices(p, console)
    render_stages(p, console)

    times = Table(title="Estimated step time")
    times.add_column("part")
    times.add_column("seconds", justify="right")
    times.add_column("share", justify="right")
    for name, seconds in p.time_breakdown.items():
        times.add_row(name, f"{seconds:.2f}", f"{seconds / p.step_s:.1%}")
    times.add_row("[bold]step[/bold]", f"[bold]{p.step_s:.2f}[/bold]", "100%")
    console.print(times)
    slowest = max(p.ranks, key=lambda r: r.busy_s)
    console.print(f"EP all-to-all {slowest.times['EP all-to-all (total)']:.2f} s per step on the slowest rank, "
                  f"{slowest.times['EP all-to-all exposed']:.2f} s exposed; "
                  f"DP traffic MuonClip / ZeRO-1 AdamW = {p.dp_comm_ratio_vs_adamw:.3f}×")
    console.print(f"[bold]MFU {p.mfu:.1%}[/bold]  ({p.tokens_per_s / 1e6:.2f}M tokens/s, "
                  f"{p.tokens_per_s / layout.gpus:.0f} tokens/s/GPU; peak {hw.bf16_tflops:g} TFLOP/s bf16, "
                  f"GEMM efficiency {hw.matmul_efficiency:.0%})")
    for note in p.notes:
        console.print(f"note: {note}")
    verdict = "[green]fits[/green]" if p.fits else "[red]does not fit[/red]: " + "; ".join(p.reasons)
    console.print(f"verdict: {verdict}")


def render_stages(p: Plan, console: Any) -> None:
    """One row per pipeline rank: its layers, busy time in the pipelined part of the step, and GPU memory."""
    from rich.table import Table

    how = "slowest stage, then memory" if p.choices.balance == "time" else "parameter bytes (--balance memory)"
    table = Table(title=f"Pipeline stages, partitioned by {how}; bottleneck = rank {p.bottleneck.rank}")
    for name in ("rank", "layers", "busy s", "compute s", "exposed comm s", "GPU GB", ""):
        table.add_column(name, justify="left" if name in ("layers", "") else "right")
    for r in p.ranks:
        marks = [m for m, on in (("bottleneck", r is p.bottleneck), ("most memory", r is p.worst)) if on]
        row = [str(r.rank), _ranges(r.layers), f"{r.busy_s:.1f}", f"{r.compute_s:.1f}",
               f"{r.busy_s - r.compute_s:.1f}", f"{r.total_memory / GB:.2f}", ", ".join(marks)]
        table.add_row(*(f"[bold]{x}[/bold]" for x in row) if r is p.bottleneck else row)
    console.print(table)
    mean = sum(r.busy_s for r in p.ranks) / len(p.ranks)
    console.print(f"stage balance: bottleneck {p.bottleneck.busy_s:.1f} s vs mean {mean:.1f} s "
                  f"({p.bottleneck.busy_s / mean - 1:+.1%}); layers are numbered 0–{p.geo.num_layers - 1}, "
                  f"the embedding on layer 0, the lm_head on the last"
                  + (f", MTP module(s) from layer {p.geo.cfg.num_hidden_layers}"
                     if p.geo.num_layers > p.geo.cfg.num_hidden_layers else ""))


def render_activation_choices(p: Plan, console: Any) -> None:
    """Stored activations of one MoE layer for one micro-batch, by category, under the report's choices."""
    from rich.table import Table

    tokens = p.layout.micro_batch * p.choices.seq_len / p.layout.tp
    columns = [("no savings", False, False), ("+ recompute", True, False), ("+ recompute + FP8", True, True)]
    per_column = [activation_bytes_per_token(p.geo, True, rc, f8) for _, rc, f8 in columns]
    table = Table(title=f"Stored activations of one MoE layer, one micro-batch ({tokens:g} tokens per GPU), GB")
    table.add_column("category")
    for name, rc, f8 in columns:
        chosen = (rc, f8) == (p.choices.recompute, p.choices.fp8_activations)
        table.add_column(f"[bold]{name} (chosen)[/bold]" if chosen else name, justify="right")
    for category in per_column[0]:
        table.add_row(category, *(f"{col[category] * tokens / GB:.3f}" for col in per_column))
    table.add_row("[bold]total[/bold]", *(f"{sum(col.values()) * tokens / GB:.3f}" for col in per_column))
    console.print(table)
    if p.choices.activation_offload:
        console.print(f"activation offload: {p.choices.offload_window} layer-micro-batches stay on the GPU, the rest "
                      f"goes to host memory over PCIe and is prefetched for the backward pass")


def render_fit(result: FitResult, hw: Hardware, max_gpus: int, top: int, console: Any) -> None:
    from rich.table import Table

    def plan_table(title: str, plans: list[Plan]) -> Table:
        table = Table(title=title)
        for col in ("GPUs", "layout", "choices", "GPU GB", "host GB/node", "step s", "MFU"):
            table.add_column(col, justify="left" if col in ("layout", "choices") else "right")
        for p in plans:
            table.add_row(str(p.layout.gpus), p.layout.short(), _choices_text(p.choices),
                          f"{p.worst.total_memory / GB:.1f}", f"{p.host_bytes_per_node / GB:.0f}",
                          f"{p.step_s:.1f}", f"{p.mfu:.1%}")
        return table

    console.print(f"searched {result.evaluated} plans for ≤ {max_gpus} GPUs of {hw.gpu_mem_gb:g} GB "
                  f"({hw.gpus_per_node} per node, {hw.host_mem_gb:g} GB host memory per node)")
    if not result.fitting:
        console.print("[red]no layout fits[/red]")
    else:
        smallest = result.fitting[0].layout.gpus
        console.print(plan_table(f"Smallest layouts that fit: {smallest} GPUs, by MFU",
                                 [p for p in result.fitting if p.layout.gpus == smallest][:top]))
        best_per_count: dict[int, Plan] = {}
        for p in result.fitting:
            best_per_count.setdefault(p.layout.gpus, p)
        larger = sorted(best_per_count.values(), key=lambda p: p.layout.gpus)[1:]
        if larger:
            console.print(plan_table("Best layout at each larger GPU count", larger[-top:]))
    smallest = result.fitting[0].layout.gpus if result.fitting else max_gpus + 1
    console.print("why the others don't:")
    for reason, n in sorted(result.rejected.items(), key=lambda kv: -kv[1]):
        console.print(f"  {n} candidates: {reason}")
    for gpus in sorted(g for g in result.closest_misses if g < smallest)[-5:]:
        miss = result.closest_misses[gpus]
        console.print(f"  {gpus} GPUs: nothing fits; closest {miss.layout.short()} with "
                      f"{_choices_text(miss.choices)}: {'; '.join(miss.reasons)}")


# --------------------------------------------------------------------------------------------------------------
# CLI


def load_config(preset: str | None, config_path: str | None) -> Any:
    from openk2.config import K2Config

    if config_path:
        return K2Config.from_json(config_path)
    return K2Config.preset(preset or "k2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openk2 plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="k2", help="K2Config preset")
    src.add_argument("--config", help="a config.json instead of a preset")
    p.add_argument("--gpus", type=int, default=256, help="GPUs in the job (or the cluster size with --fit)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0)
    p.add_argument("--pp", type=int, default=16, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=16, help="expert-parallel size")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--virtual-stages", type=int, default=None,
                   help="model chunks per pipeline rank (interleaved 1F1B); default: 1 or 2, the faster that fits")
    p.add_argument("--balance", choices=("time", "memory"), default="time",
                   help="pipeline partition: slowest stage's time subject to memory, or parameter bytes only")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch-tokens", type=int, default=DEFAULT_GLOBAL_BATCH_TOKENS)
    p.add_argument("--optimizer", choices=("muonclip", "adamw"), default="muonclip")
    p.add_argument("--master-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="fp32 master weights in the optimizer state")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                   help="selective recompute of RMSNorm, SwiGLU, MLA up-projections, MoE down-projections")
    p.add_argument("--fp8-acts", action=argparse.BooleanOptionalAction, default=True,
                   help="FP8-E4M3 storage of MoE up-projection and SwiGLU inputs (1×128 tiles, fp32 scales)")
    p.add_argument("--act-offload", action=argparse.BooleanOptionalAction, default=True,
                   help="offload the remaining activations to host memory")
    p.add_argument("--opt-offload", type=float, default=0.0, help="fraction of optimizer state in host memory")
    p.add_argument("--extra-warmup", type=int, default=0, help="extra warm-up micro-batches in the PP schedule")
    p.add_argument("--ep-overlap", type=float, default=0.8, help="fraction of EP all-to-all hidden by compute")
    p.add_argument("--reserve-gb", type=float, default=4.0, help="per-GPU reserve (CUDA context, NCCL, fragments)")
    hwg = p.add_argument_group("hardware (defaults: H800 SXM nodes, 8×400 Gbps RoCE)")
    hwg.add_argument("--bf16-tflops", type=float, default=989.0)
    hwg.add_argument("--matmul-efficiency", type=float, default=0.6, help="achieved fraction of peak in GEMMs")
    hwg.add_argument("--hbm-tb-s", type=float, default=3.35)
    hwg.add_argument("--nvlink-gb-s", type=float, default=200.0, help="per direction per GPU")
    hwg.add_argument("--nic-gbit", type=float, default=400.0)
    hwg.add_argument("--nics-per-node", type=int, default=8)
    hwg.add_argument("--pcie-gb-s", type=float, default=64.0)
    hwg.add_argument("--comm-efficiency", type=float, default=0.8)
    hwg.add_argument("--gpus-per-node", type=int, default=8)
    hwg.add_argument("--host-mem-gb", type=float, default=2048.0, help="per node")
    p.add_argument("--fit", action="store_true", help="search the layouts that fit --gpus GPUs of --gpu-mem-gb")
    p.add_argument("--top", type=int, default=8, help="layouts to list with --fit")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of tables")
    return p


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=130)
    try:
        cfg = load_config(args.preset, args.config)
        hw = Hardware(bf16_tflops=args.bf16_tflops, matmul_efficiency=args.matmul_efficiency,
                      hbm_tb_s=args.hbm_tb_s, nvlink_gb_s=args.nvlink_gb_s, nic_gbit=args.nic_gbit,
                      nics_per_node=args.nics_per_node, pcie_gb_s=args.pcie_gb_s,
                      comm_efficiency=args.comm_efficiency, gpus_per_node=args.gpus_per_node,
                      gpu_mem_gb=args.gpu_mem_gb, host_mem_gb=args.host_mem_gb)
        for name, value in (("--matmul-efficiency", hw.matmul_efficiency), ("--comm-efficiency",
                                                                            hw.comm_efficiency)):
            if not 0 < value <= 1:
                raise PlanError(f"{name} must be in (0, 1], got {value}")
        if not 0 <= args.ep_overlap <= 1:
            raise PlanError(f"--ep-overlap must be in [0, 1], got {args.ep_overlap}")
        if args.gpus < 1:
            raise PlanError(f"--gpus must be ≥ 1, got {args.gpus}")
        choices = Choices(recompute=args.recompute, fp8_activations=args.fp8_acts,
                          activation_offload=args.act_offload, optimizer_offload=args.opt_offload,
                          optimizer=args.optimizer, master_weights=args.master_weights, seq_len=args.seq_len,
                          global_batch_tokens=args.global_batch_tokens, extra_warmup=args.extra_warmup,
                          ep_overlap=args.ep_overlap, reserve_gb=args.reserve_gb, balance=args.balance)
        geo = geometry(cfg)
        if args.fit:
            result = fit(geo, hw, args.gpus, choices, tp_options=(args.tp,))
            if args.json:
                print(json.dumps({"fitting": [p.summary() for p in result.fitting[:args.top]],
                                  "rejected": result.rejected, "evaluated": result.evaluated}, indent=1))
            else:
                render_fit(result, hw, args.gpus, args.top, console)
            return 0 if result.fitting else 1
        mp = args.pp * args.ep * args.tp
        if args.gpus % mp:
            raise PlanError(f"--gpus {args.gpus} is not divisible by --pp {args.pp} × --ep {args.ep} × "
                            f"--tp {args.tp} = {mp}")
        virtual = args.virtual_stages
        layout = Layout(pp=args.pp, ep=args.ep, tp=args.tp, dp=args.gpus // mp, micro_batch=args.micro_batch,
                        virtual_stages=virtual or 1)
        result_plan = plan(geo, layout, choices, hw)
        if virtual is None and args.pp > 1:
            try:  # interleave when the layer and micro-batch counts allow it and it is faster
                interleaved = plan(geo, dataclasses.replace(layout, virtual_stages=2), choices, hw)
            except PlanError:
                interleaved = result_plan
            result_plan = min(result_plan, interleaved, key=lambda p: (not p.fits, p.step_s))
        if args.json:
            print(json.dumps(result_plan.summary(), indent=1))
        else:
            render_plan(result_plan, console)
        return 0
    except (ValueError, OSError) as err:  # PlanError, a bad config field, a missing --config file
        print(f"openk2 plan: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
