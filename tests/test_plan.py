"""The planner: figures checked against hand arithmetic on the tiny preset, the K2 report's 30 GB/GPU, --fit, CLI."""

import dataclasses
import itertools
import json
import math
import random

import pytest

from openk2.config import K2Config, flops_per_token
from openk2.plan import (GB, Choices, Hardware, Layout, PlanError, fit, geometry, in_flight, main,
                         partition_layers, partition_min_max, plan, stage_memory, stage_model, stage_times,
                         stage_totals)

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


TINY_PLAN_ARGS = ["--preset", "tiny", "--gpus", "4", "--pp", "2", "--ep", "2", "--seq-len", "64",
                  "--global-batch-tokens", "512"]

def test_cli_plan_fit_and_json(capsys):
    assert main([*TINY_PLAN_ARGS, "--reserve-gb", "0"]) == 0
    out = capsys.readouterr().out
    assert "Per-GPU memory" in out and "MFU" in out and "verdict: fits" in out
    assert main([*TINY_PLAN_ARGS, "--reserve-gb", "0", "--json"]) == 0
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
    # it fits without optimizer offload, but 25 % offload frees the memory for the balanced partition (MTP on the
    # last stage alone, test_k2_with_mtp_balances_the_last_stage): --fit finds that faster plan
    fastest = max(k2_layout, key=lambda p: p.mfu)
    assert fastest.choices.optimizer_offload == 0.25 and fastest.mfu == pytest.approx(0.381, abs=0.002)


# ---- compute-aware pipeline partition


def _brute_force(n, stages, stage_time, stage_memory, capacity):
    """(slowest stage time, peak memory) of the best partition over every way to cut n layers, or None."""
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        spans = list(zip(bounds, bounds[1:]))
        peak = max(stage_memory(i, j, s) for s, (i, j) in enumerate(spans))
        if peak <= capacity:
            key = (max(stage_time(i, j) for i, j in spans), peak)
            best = key if best is None or key < best else best
    return best


def test_partition_min_max_matches_brute_force():
    """Random cost lists, stage-dependent memory (early stages hold more in flight), tight and loose capacity."""
    rng = random.Random(0)
    checked = 0
    for _ in range(600):
        n = rng.randint(1, 8)
        stages = rng.randint(1, min(4, n))
        compute = [rng.choice([1, 2, 3, 5, 8]) * rng.random() for _ in range(n)]
        weights = [rng.uniform(0, 1) for _ in range(n)]
        acts = [rng.uniform(0, 3) for _ in range(n)]

        def stage_time(i, j):  # a sum plus an exposed-communication-like max: grows with every layer
            return sum(compute[i:j]) + 0.3 * max(compute[i:j])

        def memory_of(i, j, s):  # weights + activations in flight, many more on early stages
            return sum(weights[i:j]) + (stages - s) ** 2 * sum(acts[i:j])

        for capacity in (math.inf, rng.uniform(3, 20)):
            runs = partition_min_max(n, stages, stage_time, memory_of, capacity)
            expected = _brute_force(n, stages, stage_time, memory_of, capacity)
            if expected is None:
                assert runs is None
                continue
            assert [i for run in runs for i in run] == list(range(n)) and len(runs) == stages
            assert all(runs)
            spans = [(run[0], run[-1] + 1) for run in runs]
            assert max(stage_time(i, j) for i, j in spans) == expected[0]  # the optimum, exactly
            assert max(memory_of(i, j, s) for s, (i, j) in enumerate(spans)) == pytest.approx(expected[1], rel=1e-5)
            checked += 1
    assert checked > 600
    # hand case: one heavy last layer (an lm_head) gets a stage of its own; the memory tie-break (here: the
    # layer count) then spreads the rest evenly instead of the greedy check's [0–1 | 2–5 | 6]
    costs = [1, 1, 1, 1, 1, 1, 4]
    assert partition_min_max(7, 3, lambda i, j: sum(costs[i:j])) == [[0, 1], [2, 3, 4, 5], [6]]
    assert partition_min_max(7, 3, lambda i, j: sum(costs[i:j]), lambda i, j, s: j - i) == [[0, 1, 2], [3, 4, 5], [6]]
    assert partition_min_max(7, 3, lambda i, j: sum(costs[i:j]), lambda i, j, s: j - i, capacity=2) is None
    # early stages hold more in flight: layer 2's activations fit only on the last of 3 stages. A greedy check
    # filling stages front to back puts [0, 1] on stage 0, then cannot place layer 2 on stage 1, and finds
    # nothing; filled back to front it finds the optimum
    acts = [0, 0, 3, 0]
    runs = partition_min_max(4, 3, lambda i, j: j - i, lambda i, j, s: (j - i) + (3 - s) ** 2 * sum(acts[i:j]),
                             capacity=10)
    assert runs == [[0], [1], [2, 3]]


def _small_geometry(layers: int, mtp: int):
    cfg = K2Config.preset("tiny")
    cfg.num_hidden_layers, cfg.num_nextn_predict_layers = layers, mtp
    return geometry(cfg)


@pytest.mark.parametrize("layers, mtp, pp, v", [(8, 1, 2, 1), (8, 1, 3, 1), (10, 0, 4, 1), (8, 1, 2, 2),
                                                 (10, 1, 3, 2), (9, 0, 2, 3)])
def test_plan_partition_is_optimal_against_brute_force(layers, mtp, pp, v):
    """Through the real stage model (tiny shape, 8–10 layers): every cut of the layers into pp × v chunks, each
    rank's time and memory as `plan` reports them. v = 1 is exact by construction; the interleaved local search
    also reaches the optimal bottleneck on these cases."""
    geo = _small_geometry(layers, mtp)
    layout = Layout(pp=pp, ep=2, virtual_stages=v)
    choices = Choices(seq_len=64, global_batch_tokens=64 * 2 * pp * 3, reserve_gb=0.0, activation_offload=False)
    chunks = pp * v
    for gpu_mem_gb in (1e9, 0.0012, 0.0009):
        hw = Hardware(gpu_mem_gb=gpu_mem_gb)
        p = plan(geo, layout, choices, hw)
        model = stage_model(geo, layout, choices, hw, p.micro_batches)
        best = None
        for cuts in itertools.combinations(range(1, geo.num_layers), chunks - 1):
            bounds = [0, *cuts, geo.num_layers]
            ranks = []
            for rank in range(pp):
                totals = stage_totals(model, [(bounds[c], bounds[c + 1]) for c in range(rank, chunks, pp)])
                ranks.append((stage_times(model, totals)["busy"], sum(stage_memory(model, totals, rank).values())))
            if max(m for _, m in ranks) <= gpu_mem_gb * GB:
                key = max(t for t, _ in ranks)
                best = key if best is None else min(best, key)
        if best is None:
            assert not p.fits
        else:
            assert p.fits and p.bottleneck.busy_s == pytest.approx(best, rel=1e-9)


K2_LAYOUTS = [Layout(pp=pp, ep=ep, dp=dp, virtual_stages=v)
              for pp, ep, dp in ((16, 16, 1), (8, 16, 2), (16, 8, 2), (4, 32, 2)) for v in (1, 2)]


@pytest.mark.parametrize("mtp", [0, 1])
def test_time_partition_never_slower_than_memory_partition(mtp, k2):
    cfg = dataclasses.replace(k2, num_nextn_predict_layers=mtp)
    geo = geometry(cfg)
    fitting = 0
    for layout, gpu_mem_gb in itertools.product(K2_LAYOUTS, (80, 141)):
        for choices in (Choices(), Choices(optimizer_offload=0.5), Choices(activation_offload=False)):
            hw = Hardware(gpu_mem_gb=gpu_mem_gb)
            by_memory = plan(geo, layout, dataclasses.replace(choices, balance="memory"), hw)
            by_time = plan(geo, layout, choices, hw)
            if by_memory.fits:
                fitting += 1
                assert by_time.fits
                assert by_time.bottleneck.busy_s <= by_memory.bottleneck.busy_s * (1 + 1e-9), layout
                assert by_time.step_s <= by_memory.step_s * (1 + 1e-9), layout
            else:  # nothing fits? then the smallest peak memory, the closest to fitting
                assert by_time.worst.total_memory <= by_memory.worst.total_memory * (1 + 1e-6)
    assert fitting >= 20


def test_k2_with_mtp_balances_the_last_stage(k2):
    """PP16 × EP16 on 256 × 80 GB, measured 2026-11-29 (see docs/planner.md):
    no MTP: MFU 43.3 % (parameter balance, v = 1) / 43.6 % (time balance, v = 2);
    MTP, parameter balance: 28.7 % (v = 1) / 28.9 % (v = 2) — the last stage is busy 196 s, the others ≤ 123 s;
    MTP, time balance: 34.0 % (v = 1) / 34.2 % (v = 2), the last stage [60, MTP] 165.5 s: memory keeps rank 0
    from taking a fifth layer (a note says so); with 25 % of the optimizer state offloaded (as K2 did at 32
    nodes) rank 0 takes layers 0–4 and the last stage the MTP module alone: 38.1 %, 5.4 points under no-MTP.
    The gap is layer granularity: MTP + two lm_head passes (134.7 s) outweigh 4 decoder layers (123.1 s), so
    the other 15 stages share 61 layers and one of them takes 5."""
    geo = geometry(k2)
    no_mtp = geometry(dataclasses.replace(k2, num_nextn_predict_layers=0))
    layout = Layout(pp=16, ep=16, dp=1)
    memory_v2 = plan(geo, dataclasses.replace(layout, virtual_stages=2), Choices(balance="memory"))
    assert memory_v2.mfu == pytest.approx(0.289, abs=0.002) and memory_v2.bottleneck.rank == 15
    base = plan(no_mtp, dataclasses.replace(layout, virtual_stages=2))
    assert base.mfu == pytest.approx(0.436, abs=0.002)

    tight = plan(geo, layout)
    assert tight.fits and tight.mfu == pytest.approx(0.340, abs=0.002)
    assert tight.ranks[-1].layers == [60, 61] and tight.bottleneck.rank == 15
    assert any("memory forces pipeline imbalance" in note for note in tight.notes)
    interleaved = plan(geo, dataclasses.replace(layout, virtual_stages=2))
    assert interleaved.ranks[-1].layers == [31, 61] and any("--virtual-stages 1" in n for n in interleaved.notes)

    offload = plan(geo, layout, Choices(optimizer_offload=0.25))
    assert offload.fits and offload.ranks[0].layers == [0, 1, 2, 3, 4] and offload.ranks[-1].layers == [61]
    assert not any("memory" in note for note in offload.notes)
    assert offload.mfu == pytest.approx(0.381, abs=0.002)
    assert base.mfu - offload.mfu < 0.06
    assert offload.mfu > memory_v2.mfu + 0.09
    # unlimited memory reaches the same partition: 146.9 s is the bottleneck's optimum for this layer list
    roomy = plan(geo, layout, hw=Hardware(gpu_mem_gb=1000))
    assert roomy.bottleneck.busy_s == pytest.approx(offload.bottleneck.busy_s, rel=1e-9)
    # memory is unchanged by the MTP-aware partition's tie-break: the fullest GPU holds as before
    assert tight.worst.total_memory == pytest.approx(memory_v2.worst.total_memory, rel=1e-9)


def test_no_partition_fits_note_and_stage_output(tiny, capsys):
    hw = Hardware(gpu_mem_gb=0.0005)
    p = plan(tiny, Layout(pp=2, ep=2), TINY_4GPU, hw)
    assert not p.fits and any("no pipeline partition fits" in n for n in p.notes)
    assert main([*TINY_PLAN_ARGS, "--reserve-gb", "0"]) == 0
    out = capsys.readouterr().out
    assert "Pipeline stages" in out and "bottleneck" in out and "busy s" in out
    assert main([*TINY_PLAN_ARGS, "--balance", "memory", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["choices"]["balance"] == "memory"
    stages = summary["stages"]
    assert [s["rank"] for s in stages] == [0, 1] and summary["bottleneck_pp_rank"] in (0, 1)
    assert max(s["busy_s"] for s in stages) == stages[summary["bottleneck_pp_rank"]]["busy_s"]


def test_cli_default_virtual_stages_is_the_faster(capsys):
    """Without --virtual-stages the CLI plans v = 1 and v = 2 and shows the faster (K2 + MTP, 80 GB)."""
    args = ["--preset", "k2", "--gpus", "256", "--pp", "16", "--ep", "16", "--json"]
    assert main(args) == 0
    interleaved = json.loads(capsys.readouterr().out)
    assert interleaved["layout"]["virtual_stages"] == 2 and interleaved["mfu"] == pytest.approx(0.342, abs=0.002)
    assert main([*args, "--opt-offload", "0.25"]) == 0  # room for rank 0 to take a fifth layer: v = 1 wins
    plain = json.loads(capsys.readouterr().out)
    assert plain["layout"]["virtual_stages"] == 1 and plain["mfu"] == pytest.approx(0.381, abs=0.002)
    assert plain["stages"][-1]["layers"] == [61] and plain["bottleneck_pp_rank"] == 0
