"""PNG plots of a run from its metrics.jsonl: loss, max logit vs τ, clipped heads, lr, expert load.

`openk2 plot RUN_DIR [RUN_DIR ...]` draws them; several runs are overlaid (e.g. MuonClip vs Muon vs AdamW).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl in this run directory")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
    return rows


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    if not pts:
        return np.array([]), np.array([])
    x, y = zip(*pts)
    return np.asarray(x), np.asarray(y, dtype=float)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window or window <= 1:
        return y
    kernel = np.ones(window) / window
    head = np.cumsum(y[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def plot_runs(run_dirs: list[Path], out_dir: Path, *, tau: float | None = None, labels: list[str] | None = None
              ) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(labels[i] if labels else Path(d).name, read_metrics(d)) for i, d in enumerate(run_dirs)]
    written = []

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # loss (raw per-step, as in the report's Fig. 3, plus a smoothed line and validation points)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in runs:
        x, y = _series(rows, "loss")
        line = ax.plot(x, y, alpha=0.35, lw=0.8)[0]
        ax.plot(x, _smooth(y, 10), color=line.get_color(), lw=1.6, label=f"{label} train")
        vx, vy = _series(rows, "val_loss")
        if len(vx):
            ax.plot(vx, vy, "o--", color=line.get_color(), ms=4, label=f"{label} val")
        spikes = [(r["step"], r["loss"]) for r in rows if r.get("spike")]
        if spikes:
            sx, sy = zip(*spikes)
            ax.scatter(sx, sy, marker="x", color="red", zorder=5, label=f"{label} spikes ({len(spikes)})")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend(fontsize=8)
    save(fig, "loss.png")

    def lines(key: str, ylabel: str, title: str, name: str, *, tau_line: bool = False, height: float = 4):
        fig, ax = plt.subplots(figsize=(7, height))
        for label, rows in runs:
            x, y = _series(rows, key)
            ax.plot(x, y, lw=1.2, label=label)
        if tau_line and tau is not None:
            ax.axhline(tau, color="red", ls="--", lw=1, label=f"τ = {tau:g}")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
        save(fig, name)

    lines("max_logit", "max attention logit (all heads)", "max logit", "max_logit.png", tau_line=True)
    lines("clipped_heads", "heads clipped this step", "QK-Clip activity", "clipped_heads.png")
    lines("lr", "lr", "learning rate (WSD)", "lr.png", height=3)

    # expert load: imbalance (max / mean tokens per expert) over time, and the last recorded load per layer
    label, rows = runs[0]
    loads = [(r["step"], np.asarray(r["expert_load"], dtype=float)) for r in rows if r.get("expert_load")]
    if loads:
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
        steps = [s for s, _ in loads]
        imbalance = np.stack([(ld.max(axis=-1) / np.maximum(ld.mean(axis=-1), 1e-9)) for _, ld in loads])
        for layer in range(imbalance.shape[1]):
            ax0.plot(steps, imbalance[:, layer], lw=1, label=f"MoE layer {layer}")
        ax0.axhline(1.0, color="gray", ls=":", lw=1)
        ax0.set(xlabel="step", ylabel="max / mean expert load", title=f"{label}: load imbalance")
        ax0.legend(fontsize=7)
        last = loads[-1][1]
        im = ax1.imshow(last / np.maximum(last.sum(axis=-1, keepdims=True), 1e-9), aspect="auto", cmap="viridis")
        ax1.set(xlabel="expert", ylabel="MoE layer", title=f"token share per expert (step {loads[-1][0]})")
        fig.colorbar(im, ax=ax1)
        save(fig, "expert_load.png")
    return written


def plot_run(run_dir: Path, *, tau: float | None = None) -> list[Path]:
    return plot_runs([Path(run_dir)], Path(run_dir) / "plots", tau=tau)


def _run_tau(run_dir: Path) -> float | None:
    cfg_path = Path(run_dir) / "train_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("optimizer") == "muonclip":
            return cfg.get("qk_clip_tau")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="openk2 plot", description="Write PNG plots for one or more run directories.")
    p.add_argument("runs", nargs="+", type=Path, help="run directories (several are overlaid)")
    p.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/plots for one run)")
    p.add_argument("--tau", type=float, help="draw this QK-Clip threshold (default: from the run's config)")
    args = p.parse_args(argv)
    out = args.out or (args.runs[0] / "plots" if len(args.runs) == 1 else Path("plots"))
    tau = args.tau if args.tau is not None else _run_tau(args.runs[0])
    for path in plot_runs(args.runs, out, tau=tau):
        print(path)
    return 0
