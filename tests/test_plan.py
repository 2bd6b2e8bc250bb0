"""The planner: figures checked against hand arithmetic on the tiny preset, the K2 report's 30 GB/GPU, --fit, CLI."""

import dataclasses
import json

import pytest

from openk2.config import K2Config, flops_per_token
from openk2.plan import (GB, Choices, Hardware, Layout, PlanError, fit, geometry, in_flight, main,
                         partition_layers, plan)

# tiny preset by hand (see openk2/config.py): H 64, 3 layers (layer 0 dense), 8 experts top-2, 1 shared,
# q_lora 32, kv_lora 32, qk 16+8, v 16, 4 heads, vocab 512, dense 128, expert 32.
ATTENTION = 64 * 32 + 32 + 32 * 4 * 24 + 64 * 40 + 32 + 32 * 4 * 32 + 4 * 16 * 64  # 15936
DENSE, EXPERT, ROUTER, EMBED, LAYER_NORMS = 3 * 64 * 128, 3 * 64 * 32, 8 * 64, 512 * 64, 2 * 64
TINY_4GPU = Choices(seq_len=64, global_batch_tokens=512, reserve_gb=0.0, activation_offload=False)


@pytest.fixture(scope="module")
def tiny():
    return K2Config.preset("tiny")


@pytest.fixture(scope="module")
def k2():
    return K2Config.preset("k2")


def test_geometry_matches_config_counts_and_flops(tiny, k2):
    for cfg in (tiny, k2):
        geo = geometry(cfg)
        counts = cfg.param_counts()
        rebuilt = geo.embed_params + geo.head_params + sum(l.replicated_params + l.expert_params for l in geo.layers)
        assert rebuilt == pytest.approx(counts["total"], rel=1e-12)
        assert geo.model_flops_per_token(4096) == pytest.approx(flops_per_token(cfg, 4096), rel=1e-12)
    assert ATTENTION == 15936 and tiny.param_counts()["attention_per_layer"] == ATTENTION


def test_partition_is_min_max_and_contiguous():
    assert partition_layers([1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    assert partition_layers([5, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]
    assert partition_layers([3, 1, 1, 1], 3) == [[0], [1], [2, 3]]  # optimum 3, then split the longest run
    with pytest.raises(PlanError, match="--pp"):
        partition_layers([1, 1], 3)


def test_in_flight_micro_batches():
    assert in_flight(Layout(pp=4), rank=0, micro_batches=8, extra_warmup=0) == 4  # 1F1B: pp - r
    assert in_flight(Layout(pp=4), rank=3, micro_batches=8, extra_warmup=0) == 1
    assert in_flight(Layout(pp=4), rank=0, micro_batches=2, extra_warmup=0) == 2  # capped by the batch
    # interleaved: 2(pp-r-1) + (v-1)pp + 1 chunk-forwards of 1/v of the rank's layers
    assert in_flight(Layout(pp=4, virtual_stages=2), rank=0, micro_batches=8, extra_warmup=0) == 11 / 2


def test_tiny_on_4_gpus_memory_by_hand(tiny):
    """PP2 × EP2 on 4 GPUs, seq 64, 512-token batch: m = 8 sequences / (dp 1 · ep 2) = 4 micro-batches."""
    p = plan(tiny, Layout(pp=2, ep=2, dp=1), TINY_4GPU)
    assert p.micro_batches == 4
    # per-GPU params: layer0 = attn + dense + norms + embed; MoE layer = attn + shared + router + norms + 8/2 experts
    layer0 = ATTENTION + DENSE + LAYER_NORMS + EMBED  # 73408
    moe = ATTENTION + EXPERT + ROUTER + LAYER_NORMS + 4 * EXPERT  # 47296
    head = EMBED + 64  # lm_head + final norm
    # [0 | 1,2] costs max(73408, 127424); [0,1 | 2] costs max(120704, 80128): the partition takes the latter
    r0, r1 = p.ranks
    assert (r0.layers, r1.layers) == ([0, 1], [2])
    assert r0.params == layer0 + moe == 120704 and r1.params == moe + head == 80128
    assert r0.memory["bf16 weights"] == 2 * 120704 and r0.memory["fp32 grad buffer"] == 4 * 120704
    # MuonClip ZeRO-1: Muon 8 B/param (momentum + master), AdamW 12 B/param (embed, head, norms incl. q_a/kv_a);
    # replicated params shard over dp·ep = 2, experts over dp = 1.
    adamw0 = EMBED + 2 * (LAYER_NORMS + 64)  # 33152
    muon0 = (layer0 + ATTENTION + EXPERT + ROUTER + LAYER_NORMS) - adamw0  # 62976
    assert r0.memory["optimizer states (GPU part)"] == (muon0 * 8 + adamw0 * 12) / 2 + 4 * EXPERT * 8 == 647424
    # stored activation bytes per token (recompute + FP8 on): residual 256, MLA down (32+32+8)·2 = 144,
    # attention out 4·16·2 + LSE 4·4 = 144; dense: SwiGLU inputs 2·128·1.03125 = 264 -> 808;
    # MoE: router 32 + up-proj inputs 2·64·1.03125 = 132 + SwiGLU inputs 2·96·1.03125 = 198 -> 906.
    # rank 0 holds pp - 0 = 2 micro-batches of 64 tokens; rank 1 one.
    assert r0.memory["activations (GPU-resident)"] == (808 + 906) * 64 * 2
    assert r1.memory["activations (GPU-resident)"] == 906 * 64 * 1
    # NS workspace: largest by bytes is a dense 128×64 on rank 0 (8192·8 + 2·64²·2), o_proj 64×64 on rank 1
    assert r0.memory["Newton–Schulz workspace"] == 81920 and r1.memory["Newton–Schulz workspace"] == 49152
    # transient: un-saved MoE layer (2560 B/token) + a2a send/recv 2·64·2·64·2; rank 1 adds logits 64·512·6
    assert r0.memory["transient working set"] == 2560 * 64 + 32768
    assert r1.memory["transient working set"] == 2560 * 64 + 32768 + 64 * 512 * 6
    assert p.worst is r0 and r0.total_memory == 1869568
    assert p.fits  # 1.9 MB on 80 GB

    offloaded = plan(tiny, Layout(pp=2, ep=2, dp=1), Choices(seq_len=64, global_batch_tokens=512, reserve_gb=0.0))
    # activation offload keeps 2 layer-micro-batches (the largest layer) on the GPU, the rest on the host
    assert offloaded.ranks[0].memory["activations (GPU-resident)"] == 2 * 906 * 64
    assert offloaded.ranks[0].host_bytes == (808 + 906) * 64 * 2 - 2 * 906 * 64


def test_tiny_data_parallel_time_by_hand(tiny):
    """pp = ep = 1, dp = 4, no recompute/FP8/offload: compute + DP traffic + Newton–Schulz + update."""
    hw = Hardware(bf16_tflops=1.0, matmul_efficiency=0.5, hbm_tb_s=1.0, nic_gbit=80.0, nics_per_node=8,
                  gpus_per_node=8, comm_efficiency=1.0)
    choices = Choices(seq_len=64, global_batch_tokens=512, reserve_gb=0.0, recompute=False,
                      fp8_activations=False, activation_offload=False)
    p = plan(tiny, Layout(dp=4), choices, hw)
    assert p.micro_batches == 2
    attention = 3 * 4 * (24 + 16) * 64  # causal, fwd + bwd, per token per layer
    flops = (6 * (ATTENTION + DENSE) + attention) + 2 * (6 * (ATTENTION + 3 * EXPERT + ROUTER) + attention)  # shared + top-2
    flops += 6 * 64 * 512  # lm_head
    assert flops == 950400
    compute = 2 * 64 * flops / 0.5e12
    # DP: AdamW-like 8 B/param + 2 B/param gather for Muon params, ring share 3/4, 10 GB/s per GPU
    adamw = EMBED + EMBED + 64 + 3 * (LAYER_NORMS + 64)  # 66176
    dp_bytes = 8 * 249984 * 0.75 + 2 * (249984 - adamw) * 0.75
    # Newton–Schulz, 5 steps of 4r²c + 2r³ on each full matrix (r ≤ c), by hand per matrix
    ns_attention = 2293760 + 1638400 + 2688000 + 2949120 + 7864320  # q_b, q_a, kv_a, kv_b, o
    ns = ns_attention * 3 + 3 * 13107200 + 2 * (3 * 1638400 + 87040 + 8 * 3 * 1638400)
    optimizer_bytes = ((249984 - 98304 - adamw) * 8 + adamw * 12) / 4 + 98304 * 8 / 4
    update = (2 * optimizer_bytes + 6 * 249984 / 4) / 1e12
    assert p.time_breakdown["compute (slowest pipeline rank)"] == pytest.approx(compute, rel=1e-12)
    assert p.time_breakdown["pipeline bubble"] == 0 and p.time_breakdown["EP all-to-all exposed"] == 0
    assert p.time_breakdown["DP reduce-scatter + gathers"] == pytest.approx(dp_bytes / 1e10, rel=1e-12)
    assert p.time_breakdown["Newton–Schulz"] == pytest.approx(ns / 0.5e12, rel=1e-12)
    assert p.time_breakdown["optimizer update"] == pytest.approx(update, rel=1e-12)
    step = compute + dp_bytes / 1e10 + ns / 0.5e12 + update
    assert p.step_s == pytest.approx(step, rel=1e-12)
    assert p.mfu == pytest.approx(512 * 950400 / (step * 4 * 1e12), rel=1e-12)
    assert p.dp_comm_ratio_vs_adamw == pytest.approx(dp_bytes / (8 * 249984 * 0.75))
    assert 1.0 < p.dp_comm_ratio_vs_adamw <= 1.25  # spec §2.4: MuonClip comm in (1, 1.25]× ZeRO-1 AdamW
    adam = plan(tiny, Layout(dp=4), dataclasses.replace(choices, optimizer="adamw"), hw)
    assert adam.dp_comm_ratio_vs_adamw == 1.0 and adam.time_breakdown["Newton–Schulz"] == 0


def test_pipeline_bubble_and_all_to_all(tiny):
    hw = Hardware(comm_efficiency=1.0)
    p = plan(tiny, Layout(pp=2, ep=2, dp=1), TINY_4GPU, hw)
    slowest = max(p.ranks, key=lambda r: r.busy_s)
    assert p.time_breakdown["pipeline bubble"] == pytest.approx(slowest.busy_s * 1 / 4)  # (pp-1)/(v·m)
    # rank 0: 1 MoE layer, 4 micro-batches of 64 tokens, 4 all-to-alls of top-2 copies of 64 bf16, half leave
    a2a_bytes = 4 * 64 * 1 * 4 * 2 * 64 * 2 * (1 / 2)
    assert p.ranks[0].times["EP all-to-all (total)"] == pytest.approx(a2a_bytes / 200e9)  # both EP peers in-node
    assert p.ranks[0].times["EP all-to-all exposed"] == pytest.approx(0.2 * a2a_bytes / 200e9)


def test_k2_reproduces_report_30gb_per_gpu(k2):
    """K2 report: bf16 params + fp32 grad buffer ≈ 6 TB over the 256-GPU PP16×EP16 group ≈ 30 GB per GPU."""
    p = plan(k2, Layout(pp=16, ep=16, dp=1, virtual_stages=2))
    assert p.unique_params_grads_bytes / 1e12 == pytest.approx(6.0, rel=0.10)
    assert p.mean_params_grads_bytes / GB == pytest.approx(30.0, rel=0.10)
    worst_pg = max(r.memory["bf16 weights"] + r.memory["fp32 grad buffer"] for r in p.ranks)
    assert worst_pg / GB == pytest.approx(30.0, rel=0.10)
    assert p.fits and p.micro_batches == 1024  # 16384 sequences / 16 EP replicas
    assert 0.2 < p.mfu < 0.7
    assert 1.0 < p.dp_comm_ratio_vs_adamw <= 1.25
    assert sorted(i for r in p.ranks for i in r.layers) == list(range(61 + k2.num_nextn_predict_layers))  # + MTP
    # everything on the GPU (no recompute, FP8 or offload) cannot fit in 80 GB
    bare = plan(k2, Layout(pp=16, ep=16, dp=1, virtual_stages=2),
                Choices(recompute=False, fp8_activations=False, activation_offload=False))
    assert not bare.fits and "GPU memory" in bare.reasons[0]


def test_fit_finds_smallest_fitting_layout_and_rejects_others(tiny):
    hw = Hardware(gpu_mem_gb=0.0015)  # 1.5 MB per GPU: the tiny model does not fit on one
    base = Choices(seq_len=64, global_batch_tokens=512, reserve_gb=0.0)
    result = fit(tiny, hw, max_gpus=4, base=base)
    assert result.fitting, result.rejected
    best = result.fitting[0]
    assert best.layout.gpus == 2 and all(p.layout.gpus >= 2 for p in result.fitting)
    again = plan(tiny, best.layout, best.choices, hw)
    assert again.fits and again.worst.total_memory <= 0.0015 * GB
    same_count = [p.mfu for p in result.fitting if p.layout.gpus == 2]
    assert best.mfu == max(same_count)
    one = result.closest_misses[1]
    assert one.layout.gpus == 1 and not one.fits and "GPU memory" in one.reasons[0]
    assert not plan(tiny, Layout(), base, hw).fits


@pytest.mark.parametrize("argv, flag", [
    (["--ep", "5", "--pp", "1", "--gpus", "5"], "--ep 5"),
    (["--pp", "4", "--ep", "1", "--gpus", "4", "--virtual-stages", "1"], "--pp 4"),
    (["--pp", "2", "--ep", "2", "--gpus", "6"], "--gpus 6"),
    (["--pp", "1", "--ep", "2", "--gpus", "2", "--global-batch-tokens", "100"], "--global-batch-tokens"),
    (["--pp", "1", "--ep", "1", "--gpus", "1", "--tp", "3"], "--tp 3"),
])
def test_cli_errors_name_the_flag(argv, flag, capsys):
    assert main(["--preset", "tiny", "--seq-len", "64", "--global-batch-tokens", "512", *argv]) == 2
    err = capsys.readouterr().err
    assert "openk2 plan: error:" in err and flag in err


def test_cli_plan_fit_and_json(capsys):
    assert main(["--preset", "tiny", "--gpus", "4", "--pp", "2", "--ep", "2", "--seq-len", "64",
                 "--global-batch-tokens", "512", "--reserve-gb", "0"]) == 0
    out = capsys.readouterr().out
    assert "Per-GPU memory" in out and "MFU" in out and "verdict: fits" in out
    assert main(["--preset", "tiny", "--gpus", "4", "--pp", "2", "--ep", "2", "--seq-len", "64",
                 "--global-batch-tokens", "512", "--reserve-gb", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["gpus"] == 4 and summary["fits"] and summary["layout"]["virtual_stages"] == 1  # 3 layers < 4
    assert main(["--preset", "tiny", "--gpus", "4", "--gpu-mem-gb", "0.0015", "--seq-len", "64",
                 "--global-batch-tokens", "512", "--reserve-gb", "0", "--fit"]) == 0
    out = capsys.readouterr().out
    assert "Smallest layouts that fit: 2 GPUs" in out and "1 GPUs: nothing fits" in out


def test_cli_reads_config_file(tiny, tmp_path, capsys):
    path = tmp_path / "config.json"
    tiny.save_json(path)
    assert main(["--config", str(path), "--gpus", "2", "--pp", "1", "--ep", "2", "--seq-len", "64",
                 "--global-batch-tokens", "512", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"]["ep"] == 2 and summary["micro_batches"] == 4
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_k2_fit_on_256_gpus(k2):
    result = fit(k2, Hardware(gpu_mem_gb=80.0), max_gpus=256)
    smallest = result.fitting[0]
    # bf16 weights + fp32 grads alone (6.16 TB) need ≥ 77 GPUs of 80 GB; the search never goes below that
    assert smallest.layout.gpus * 80 * GB >= smallest.unique_params_grads_bytes
    assert smallest.fits and smallest.worst.total_memory <= 80 * GB
    # 64 GPUs cannot hold 6.16 TB of weights + grads in 80 GB each: rejected, with the reason
    assert 64 in result.closest_misses and "GPU memory" in result.closest_misses[64].reasons[0]
    k2_layout = [p for p in result.fitting if (p.layout.pp, p.layout.ep, p.layout.gpus) == (16, 16, 256)]
    assert k2_layout, "the report's PP16 × EP16 on 32 nodes must be among the layouts that fit"
