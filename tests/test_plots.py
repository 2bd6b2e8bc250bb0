import json

import pytest

from openk2.plots import main, plot_runs, read_metrics


def _write_run(d, n=30, clip=True):
    d.mkdir()
    rows = []
    for step in range(1, n + 1):
        r = {"step": step, "loss": 5 - step * 0.05, "lr": 1e-3, "max_logit": 20 + step, "clipped_heads": int(clip),
             "spike": step == 7}
        if step % 10 == 0:
            r["val_loss"] = 5 - step * 0.04
            r["expert_load"] = [[step, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 5.0]]
        rows.append(r)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "train_config.json").write_text(json.dumps({"optimizer": "muonclip", "qk_clip_tau": 30.0}))
    return d


def test_plots_are_written_and_overlay_runs(tmp_path):
    a, b = _write_run(tmp_path / "a"), _write_run(tmp_path / "b", clip=False)
    paths = plot_runs([a, b], tmp_path / "out", tau=30.0)
    assert {p.name for p in paths} == {"loss.png", "max_logit.png", "clipped_heads.png", "lr.png",
                                       "expert_load.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert main([str(a)]) == 0 and (a / "plots" / "max_logit.png").exists()


def test_bad_metrics_line_is_named(tmp_path):
    d = _write_run(tmp_path / "r")
    with open(d / "metrics.jsonl", "a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:31"):
        read_metrics(d)
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(tmp_path)
