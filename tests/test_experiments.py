"""Smoke tests of the MuonClip experiments (benchmarks/exp_token_efficiency.py, exp_qk_clip_stability.py) at toy
size: the real training loop runs, the figures and results.json are written, and the numbers are consistent."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def experiments():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("exp_token_efficiency"), importlib.import_module("exp_qk_clip_stability")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _assert_pngs(paths):
    assert paths
    for path in map(Path, paths):
        assert path.read_bytes()[:8] == PNG_MAGIC, path


def test_tokens_to_reach_interpolates_on_the_val_curve(experiments):
    te, _ = experiments
    rows = [{"tokens": 100, "val_loss": 5.0}, {"tokens": 150}, {"tokens": 200, "val_loss": 4.0},
            {"tokens": 300, "val_loss": 3.0}]
    assert te.tokens_to_reach(rows, 3.5) == pytest.approx(250.0)
    assert te.tokens_to_reach(rows, 6.0) == 100.0  # already below at the first point
    assert te.tokens_to_reach(rows, 2.9) is None  # never reached


def test_token_efficiency_quick(experiments, tmp_path, capsys):
    te, _ = experiments
    assert te.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["best"]) == {"muonclip", "adamw"}
    for name, run in res["runs"].items():
        curve = run["val_curve"]
        assert len(curve) >= 2, name
        assert curve[-1][1] < curve[0][1] + 1.0 and curve[-1][1] < 6.3, name  # trained, not diverged (ln 512 = 6.24)
        assert run["final_val_loss"] == pytest.approx(curve[-1][1])
        assert (tmp_path / name / "metrics.jsonl").exists()
    adamw = res["runs"][res["best"]["adamw"]]
    assert res["adamw_final_val_loss"] == adamw["final_val_loss"]
    if res["muonclip_tokens_to_reach"] is not None:
        assert res["ratio"] == pytest.approx(res["muonclip_tokens_to_reach"] / adamw["tokens"])
    _assert_pngs(res["figures"])
    assert "ratio vs AdamW" in capsys.readouterr().out


def test_qk_clip_stability_quick(experiments, tmp_path, capsys):
    _, qs = experiments
    assert qs.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    tau = res["settings"]["tau"]
    muon, clip = res["runs"]["muon_lr0.05_wd0"]["summary"], res["runs"]["muonclip_lr0.05_wd0"]["summary"]
    assert muon["steps_with_any_clip"] == 0  # plain Muon never clips
    assert muon["peak_max_logit"] > 2 * tau
    assert clip["steps_with_any_clip"] > 0
    assert clip["peak_max_logit"] < muon["peak_max_logit"]  # the clip holds the logits down
    # the same number of clipped heads is logged as the optimizer reports, never more than exist
    rows = [json.loads(line) for line in (tmp_path / "muonclip_lr0.05_wd0" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["clipped_heads"] <= res["total_heads"] for r in rows)
    assert all(r["clipped_heads"] > 0 for r in rows if r["max_logit"] > tau)  # every head above tau is clipped
    _assert_pngs(res["figures"])
    assert "MuonClip vs plain Muon" in capsys.readouterr().out
