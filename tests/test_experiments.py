"""Tests of the MuonClip experiments (benchmarks/exp_token_efficiency.py, exp_qk_clip_stability.py) at toy
size: the real training loop runs, the figures and results.json are written, and the numbers are consistent."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from openk2.train import TrainConfig, wsd_schedule

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


def test_budget_crossing_interpolates_in_log_tokens(experiments):
    te, _ = experiments
    pts = [(400, 4.0), (100, 5.0), (1600, 3.0)]  # unsorted on purpose
    tokens, how = te.budget_crossing(pts, 4.5)  # halfway between 100 and 400 in log space: 200
    assert how == "interpolated" and tokens == pytest.approx(200.0)
    assert te.budget_crossing(pts, 3.0) == (pytest.approx(1600.0), "interpolated")  # exactly at a budget
    assert te.budget_crossing(pts, 5.5) == (None, "below_smallest")
    assert te.budget_crossing(pts, 2.9) == (None, "not_reached")
    # the least-squares cross-check: these points lie on loss = 5 - ln(t / 100) / ln 4, so it agrees exactly
    assert te.loglinear_crossing(pts, 4.5) == pytest.approx(200.0)
    assert te.loglinear_crossing([(100, 4.0), (200, 4.1)], 3.0) is None  # a rising line never gets there
    assert te.loglinear_crossing([(100, 4.0)], 3.0) is None


def test_same_config_ignores_fields_added_later_at_their_default(experiments):
    te, _ = experiments
    cfg = TrainConfig(steps=7, lr=0.01, adamw_betas=(0.9, 0.95))
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert te.same_config(saved, cfg)
    older = {k: v for k, v in saved.items() if k != "spike_window"}  # a run made before that field existed
    assert te.same_config(older, cfg)
    assert not te.same_config(older, TrainConfig(steps=7, lr=0.01, spike_window=7))  # ... now set off its default
    assert not te.same_config(saved | {"lr": 0.02}, cfg)
    assert not te.same_config(saved | {"field_we_dropped": 1}, cfg)


def test_budget_worker_runs_largest_budget_first_and_the_main_process_reuses_it(experiments, tmp_path):
    """--budget-worker trains MuonClip's lr sweep, then its budgets largest first (the main process goes smallest
    first, so two processes meet in the middle); the main process afterwards reuses every run it finds."""
    te, _ = experiments
    assert te.main(["--quick", "--out", str(tmp_path), "--budget-worker"]) == 0
    assert not (tmp_path / "results.json").exists()
    budgets = [tmp_path / f"muonclip_lr0.01_steps{steps}" for steps in (5, 8)]
    finished = [(b / "summary.json").stat().st_mtime_ns for b in budgets]
    assert finished[1] < finished[0]  # 8 steps (0.8) before 5 steps (0.5)
    assert te.main(["--quick", "--out", str(tmp_path)]) == 0
    assert [(b / "summary.json").stat().st_mtime_ns for b in budgets] == finished  # reused, not retrained
    assert [p["steps"] for p in json.loads((tmp_path / "results.json").read_text())["budget_sweep"]["points"]] == [5, 8, 10]


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
        assert curve[-1][0] == run["tokens"] == run["steps"] * 4 * 32  # validated at the end of its own budget
        assert (tmp_path / name / "metrics.jsonl").exists()
    adamw = res["runs"][res["best"]["adamw"]]
    assert res["adamw_final_val_loss"] == adamw["final_val_loss"]
    # budget sweep: every budget is a complete run of its own (its WSD decay ends at its own last step)
    budget = res["budget_sweep"]
    assert [p["steps"] for p in budget["points"]] == [5, 8, 10]
    for point in budget["points"]:
        steps = point["steps"]
        name = f"muonclip_lr{budget['lr']:g}" + (f"_steps{steps}" if steps != 10 else "")
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        schedule = wsd_schedule(TrainConfig(steps=steps, warmup_steps=2))
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        assert [r["lr"] for r in rows] == pytest.approx([budget["lr"] * schedule(i) for i in range(steps)])
    # ... so the 8-step budget ends in a decay of its own, where the full run was still at its peak lr
    full_at_8 = dict(res["runs"]["muonclip_lr0.01"]["val_curve"])[8 * 4 * 32]
    assert res["runs"]["muonclip_lr0.01_steps8"]["final_val_loss"] != full_at_8
    rows8 = (tmp_path / "muonclip_lr0.01_steps8" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows8[-1])["lr"] < 0.01
    pts = [(p["tokens"], p["final_val_loss"]) for p in budget["points"]]
    assert (budget["tokens_to_reach"], budget["how"]) == te.budget_crossing(pts, res["adamw_final_val_loss"])
    if budget["tokens_to_reach"] is not None:
        assert res["ratio"] == pytest.approx(budget["tokens_to_reach"] / adamw["tokens"])
    # lr check at one budget (1/2x, 1x, 2x) and a second seed of each optimizer's best run
    assert sorted(res["lr_check"]["final_val_by_lr"]) == ["0.005", "0.01", "0.02"]
    assert {r["role"] for r in res["runs"].values()} == {"lr_sweep", "budget", "lr_check", "seed"}
    assert len(res["seeds"]) == 2
    _assert_pngs(res["figures"])
    assert len(res["figures"]) == 3
    out = capsys.readouterr().out
    assert "ratio vs AdamW" in out and "budget sweep" in out
    # --scan summarizes finished experiments (here the one just run) without training
    assert te.main(["--scan", str(tmp_path), "--out", str(tmp_path / "scan")]) == 0
    (row,) = json.loads((tmp_path / "scan" / "batch_scan.json").read_text())
    assert (row["tokens_per_step"], row["steps"], row["ratio"]) == (4 * 32, 10, res["ratio"])
    _assert_pngs([tmp_path / "scan" / "token_efficiency_batch_scan.png"])
    with pytest.raises(SystemExit, match="results.json"):
        te.main(["--scan", str(tmp_path / "missing"), "--out", str(tmp_path / "scan")])


def test_token_efficiency_adamw_group_lr_ablation(experiments, tmp_path):
    """--muonclip-adamw-lr: MuonClip runs train their AdamW group at that lr (the config says so, the run name too)."""
    te, _ = experiments
    assert te.main(["--quick", "--out", str(tmp_path), "--sweep-only", "muonclip", "--muonclip-adamw-lr", "1e-3"]) == 0
    (run_dir,) = [d for d in tmp_path.iterdir() if d.name.startswith("muonclip")]
    assert run_dir.name == "muonclip_lr0.01_alr0.001"
    cfg = json.loads((run_dir / "train_config.json").read_text())
    assert (cfg["lr"], cfg["adamw_lr"]) == (0.01, 0.001)


def test_two_processes_share_one_corpus(tmp_path):
    """Helper processes started together on one --out prepare the shared corpus once (a lock), not racing on its
    shards (which crashed one of them before)."""
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import exp_token_efficiency as te; "
            f"c = te.prepare_shared_corpus(te.Path({str(tmp_path)!r}), vocab_size=512, quick=True, val_fraction=0.34); "
            "print(c.train_tokens, c.val_tokens)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0].split()[-2:] == outputs[1][0].split()[-2:]
    assert not (tmp_path / "corpus" / "running.pid").exists()


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
