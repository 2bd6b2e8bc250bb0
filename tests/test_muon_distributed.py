"""MuonClip under FSDP2 (2 processes, gloo, CPU) gives the same weights as one process.

The worker (tests/muon_dist_worker.py) trains the tiny openk2 model for 4 steps with QK-Clip firing, sharded by
`fully_shard` (2-D matrices go through the owner-computes gather/scatter, 3-D expert stacks are orthogonalized
locally per whole expert), next to a single-process reference fed the same global batch; then openk2.parallel's
expert-parallel + FSDP2 layout (expert stacks on the 2-D (dp, ep) mesh) against a reference given the same
gradients; plus an odd-sized model for uneven shards.

Tolerance: the two runs do the same floating-point operations on the same bits (see the worker's docstring), so
the expected difference is exactly 0. We allow 1e-6 of the distance the weights moved, for a BLAS that blocks a
batched matmul differently when the batch has fewer experts (4 local vs 8); anything from a wrong gather,
a mis-sliced scatter, a missed clip or a per-shard (instead of per-matrix) orthogonalization is orders of
magnitude larger (one step moves weights by ~1e-2).
"""

import json
from pathlib import Path

import dist_launch
import pytest

WORKER = Path(__file__).with_name("muon_dist_worker.py")


@pytest.fixture(scope="module")
def dist_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("muon_dist") / "result.json"
    proc = dist_launch.launch_expecting_success(WORKER, [str(out)], 2, 180)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def test_fsdp2_muonclip_equals_single_process(dist_result):
    k2 = dist_result["k2"]
    assert dist_result["world"] == 2
    assert k2["moved"] > 1e-2  # the weights really trained
    assert k2["max_diff"] <= 1e-6 * k2["moved"], k2["max_diff"]
    # expert stacks are sharded on the expert dim: whole experts per rank, orthogonalized without communication
    assert all(p == "(Shard(dim=0),)" for p in k2["expert_placements"].values())


def test_fsdp2_qk_clip_and_stats_match(dist_result):
    steps = dist_result["k2"]["stats"]
    assert sum(s["ref"]["clipped_heads"] for s in steps) > 0  # the clip fired
    for s in steps:
        ref, sharded = s["ref"], s["sharded"]
        assert sharded["clipped_heads"] == ref["clipped_heads"]
        assert sharded["max_logit_per_layer"] == ref["max_logit_per_layer"]  # MAX all-reduce = max over the batch
        assert sharded["update_rms"] == pytest.approx(ref["update_rms"], rel=1e-6)


def test_fsdp2_uneven_shards(dist_result):
    uneven = dist_result["uneven"]
    assert uneven["local_rows"] == [9, 8]  # 17 rows over 2 ranks
    assert uneven["max_diff"] <= 1e-7
    assert uneven["update_rms"][0] == pytest.approx(uneven["update_rms"][1], rel=1e-6)


def test_expert_parallel_layout_same_update(dist_result):
    """openk2.parallel with ep=2: expert stacks are DTensors on the (dp, ep) mesh, sharded on the expert dim by
    both; given the same gradient and signal, the update is the single-process one (orthogonalized locally)."""
    ep = dist_result["expert_parallel"]
    assert all("Shard(dim=0)" in p and "Replicate" not in p for p in ep["expert_placements"].values())
    assert ep["clipped_heads"] > 0
    assert ep["max_diff"] <= 1e-7, ep["max_diff"]


def test_other_placements_fall_back_to_a_full_gather(dist_result):
    other = dist_result["other"]
    assert other["moved"] > 1e-2
    assert other["max_diff"] <= 1e-7, other["max_diff"]
