"""QK-Clip stability at small scale (issue 3, "Benchmarks and experiments"; K2 report §2.1, spec §2.3).

A small MLA model with few, wide heads and a high Muon learning rate (three lr / weight-decay variants): plain
Muon's (`qk_clip_tau=None`) max attention logit grows past 10·τ. The same run with MuonClip (same seed, data, lr) keeps it
at τ; we report the peak logits, the one-step overshoot, the final losses (goal: MuonClip within 1% of the
unclipped run, or better where that one spikes) and the share of heads clipped per step over training.

τ = 30 here (the report's "very aggressive" small-ablation value; K2 used 100).

The recorded max logit of a step is measured in that step's forward pass, i.e. on the weights left by the previous
step's Muon update *and* clip. The clip of step t scales by τ / S_t, with S_t measured before step t's update, so
the update of step t itself is not undone: the recorded logit can exceed τ by one step's growth (the overshoot
reported below); it is never allowed to compound.

    python benchmarks/exp_qk_clip_stability.py --out runs/exp_qk_clip_stability        # full (~11 min, 2 cores)
    python benchmarks/exp_qk_clip_stability.py --quick --out /tmp/qs                     # toy smoke run (seconds)

Every run is the real training loop (`openk2.train.Trainer`); the shared-corpus and run helpers come from
exp_token_efficiency.py. Writes OUT/results.json and OUT/stability_*.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_token_efficiency import (  # noqa: E402
    machine_note, prepare_shared_corpus, print_table, run_seconds, series, train_run, write_results)

from openk2.config import K2Config  # noqa: E402


@dataclass
class Settings:
    tau: float
    variants: list[tuple[float, float]]  # (learning rate, weight decay) pairs; each is run with and without clip
    steps: int
    batch_size: int
    seq_len: int
    warmup_steps: int
    val_every: int
    val_batches: int
    vocab_size: int
    val_fraction: float
    loss_window: int  # final loss = mean train loss over the last `loss_window` steps (one step is noisy)


def settings(quick: bool) -> Settings:
    if quick:
        # tau far below the tiny model's logits (~0.06 at init, ~0.3 after 10 steps) so the clip certainly acts
        return Settings(tau=0.1, variants=[(0.05, 0.0)], steps=10, batch_size=4, seq_len=32, warmup_steps=1,
                        val_every=5, val_batches=2, vocab_size=512, val_fraction=0.34, loss_window=3)
    return Settings(tau=30.0, variants=[(0.02, 0.0), (0.05, 0.0), (0.1, 0.1)], steps=800, batch_size=8, seq_len=128,
                    warmup_steps=10, val_every=50, val_batches=4, vocab_size=2048, val_fraction=0.05,
                    loss_window=30)


def model_config(vocab_size: int, quick: bool) -> K2Config:
    """Few, wide heads (2 heads x (64 nope + 32 rope)): each head's q·k has more room to grow per Muon step."""
    base = K2Config.preset("tiny")
    if quick:
        return base.replace(vocab_size=vocab_size, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2)
    return base.replace(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, moe_intermediate_size=128,
                        num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=64,
                        kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=32,
                        num_attention_heads=2, num_key_value_heads=2)


def summarize(rows: list[dict], s: Settings, total_heads: int) -> dict:
    steps, logits = series(rows, "max_logit", x="step")
    _, clipped = series(rows, "clipped_heads", x="step")
    losses = np.array([r["loss"] for r in rows], dtype=float)
    vals = series(rows, "val_loss", x="step")[1]
    above_10tau = np.nonzero(logits > 10 * s.tau)[0]
    above_tau = np.nonzero(logits > s.tau)[0]
    share = clipped / total_heads
    quarter = max(len(share) // 4, 1)
    # one-step growth of the max logit (how far a single update can move it): bounds the clip's overshoot
    growth = logits[1:] / np.maximum(logits[:-1], 1e-9)
    return {
        "peak_max_logit": float(logits.max()),
        "final_max_logit": float(logits[-1]),
        "first_step_above_tau": int(steps[above_tau[0]]) if len(above_tau) else None,
        "first_step_above_10tau": int(steps[above_10tau[0]]) if len(above_10tau) else None,
        "steps_above_tau": int(len(above_tau)),
        "peak_over_tau": float(logits.max() / s.tau),
        "max_one_step_growth": float(growth.max()) if len(growth) else None,
        "final_train_loss": float(losses[-s.loss_window:].mean()),
        "final_val_loss": float(vals[-1]) if len(vals) else None,
        "spikes": int(sum(bool(r.get("spike")) for r in rows)),
        "skipped": int(sum(bool(r.get("skipped")) for r in rows)),
        "p99_over_tau": float(np.percentile(logits, 99) / s.tau),
        "share_of_steps_above_tau": float(len(above_tau) / len(logits)),
        "clipped_share_by_tenth": [round(float(c.mean()), 3) for c in np.array_split(share, 10) if len(c)],
        "clipped_share_first_quarter": float(share[:quarter].mean()),
        "clipped_share_last_quarter": float(share[-quarter:].mean()),
        "steps_with_any_clip": int((clipped > 0).sum()),
        "last_step_with_clip": int(steps[np.nonzero(clipped > 0)[0][-1]]) if (clipped > 0).any() else None,
    }


def tag(variant: tuple[float, float], sep: str = " ") -> str:
    lr, wd = variant
    return f"lr={lr:g}{sep}wd={wd:g}" if sep == " " else f"lr{lr:g}_wd{wd:g}"


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window or window <= 1:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:window] / np.arange(1, window)
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def plot(out: Path, runs: dict, s: Settings, total_heads: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(s.variants)
    colors = {"muon": "tab:red", "muonclip": "tab:blue"}
    labels = {"muon": "Muon (no clip)", "muonclip": f"MuonClip τ={s.tau:g}"}
    paths = []

    def save(fig, name):
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False)
    for ax, v in zip(axes[0], s.variants):
        for kind in ("muon", "muonclip"):
            x, y = series(runs[(kind, v)]["rows"], "max_logit", x="step")
            ax.plot(x, y, color=colors[kind], lw=1.2, label=labels[kind])
        ax.axhline(s.tau, color="black", ls="--", lw=1, label=f"τ = {s.tau:g}")
        ax.axhline(10 * s.tau, color="gray", ls=":", lw=1, label=f"10·τ = {10 * s.tau:g}")
        ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="max attention logit (all heads)", title=f"max logit, {tag(v)}")
        ax.legend(fontsize=7)
    save(fig, "stability_max_logit.png")

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False)
    for ax, v in zip(axes[0], s.variants):
        for kind in ("muon", "muonclip"):
            rows = runs[(kind, v)]["rows"]
            x, y = series(rows, "loss", x="step")
            ax.plot(x, y, color=colors[kind], alpha=0.25, lw=0.7)
            ax.plot(x, moving_average(y, 10), color=colors[kind], lw=1.4, label=f"{labels[kind]} (10-step mean)")
            sx = [r["step"] for r in rows if r.get("spike")]
            if sx:
                ax.scatter(sx, [r["loss"] for r in rows if r.get("spike")], marker="x", color=colors[kind],
                           zorder=5, label=f"{labels[kind]} spikes ({len(sx)})")
        ax.set(xlabel="step", ylabel="train loss", title=f"loss, {tag(v)}")
        ax.legend(fontsize=7)
    save(fig, "stability_loss.png")

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.4), squeeze=False)
    window = max(s.steps // 20, 1)
    for ax, v in zip(axes[0], s.variants):
        x, y = series(runs[("muonclip", v)]["rows"], "clipped_heads", x="step")
        share = y / total_heads
        ax.plot(x, share, color="tab:blue", alpha=0.25, lw=0.7, label="per step")
        ax.plot(x, moving_average(share, window), color="tab:blue", lw=1.6, label=f"{window}-step mean")
        ax.set_ylim(-0.02, 1.02)
        ax.set(xlabel="step", ylabel=f"clipped heads / {total_heads}", title=f"share of heads clipped, {tag(v)}")
        ax.legend(fontsize=7)
    save(fig, "stability_clipped_share.png")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy-size smoke run (seconds)")
    p.add_argument("--out", default="runs/exp_qk_clip_stability", help="output directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    p.add_argument("--tau", type=float, default=None, help="override τ")
    p.add_argument("--variants", nargs="+", default=None, metavar="LR:WD",
                   help="override the (learning rate, weight decay) pairs, e.g. 0.05:0 0.1:0.1")
    p.add_argument("--steps", type=int, default=None, help="override the step budget")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = settings(args.quick)
    s.tau = args.tau or s.tau
    if args.variants:
        s.variants = [(float(a), float(b)) for a, b in (v.split(":") for v in args.variants)]
    s.steps = args.steps or s.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    note = machine_note()
    corpus = prepare_shared_corpus(out, vocab_size=s.vocab_size, quick=args.quick, val_fraction=s.val_fraction)
    mcfg = model_config(s.vocab_size, args.quick)
    total_heads = mcfg.num_hidden_layers * mcfg.num_attention_heads
    print(f"model {mcfg.param_counts()['total']:,} parameters, {total_heads} heads; tau {s.tau:g}; "
          f"{s.steps} steps x {s.batch_size} x {s.seq_len} tokens", flush=True)

    runs: dict[tuple[str, float], dict] = {}
    for v in s.variants:
        lr, wd = v
        for kind, tau in (("muon", None), ("muonclip", s.tau)):
            rows = train_run(out / f"{kind}_{tag(v, '_')}", mcfg, corpus, optimizer="muonclip", qk_clip_tau=tau,
                             lr=lr, weight_decay=wd, steps=s.steps, batch_size=s.batch_size,
                             seq_len=s.seq_len, warmup_steps=s.warmup_steps, val_every=s.val_every,
                             val_batches=s.val_batches, ckpt_every=s.steps, detail_every=max(s.steps // 30, 1))
            runs[(kind, v)] = {"rows": rows, "summary": summarize(rows, s, total_heads),
                               "seconds": run_seconds(rows)}
            print(f"  {kind} {tag(v)}: peak max logit {runs[(kind, v)]['summary']['peak_max_logit']:.1f} "
                  f"({runs[(kind, v)]['seconds']:.0f} s)", flush=True)

    table, comparisons = [], {}
    for v in s.variants:
        m, c = runs[("muon", v)]["summary"], runs[("muonclip", v)]["summary"]
        loss_ratio = c["final_train_loss"] / m["final_train_loss"]
        val_ratio = (c["final_val_loss"] / m["final_val_loss"]) if m["final_val_loss"] and c["final_val_loss"] \
            else None
        comparisons[tag(v)] = {
            "muon_past_10tau": m["peak_max_logit"] > 10 * s.tau,
            "muonclip_peak_over_tau": c["peak_over_tau"],
            "loss_ratio_clip_over_muon": loss_ratio,
            "val_ratio_clip_over_muon": val_ratio,
            "loss_within_1pct_or_better": loss_ratio <= 1.01,
            # falls toward zero: the last tenth of training clips less than half as often as the busiest tenth
            "clipped_share_falls": c["clipped_share_by_tenth"][-1] < 0.5 * max(c["clipped_share_by_tenth"]),
        }
        for kind, r in (("muon", m), ("muonclip", c)):
            table.append([tag(v), kind, f"{r['peak_max_logit']:.1f}", f"{r['peak_over_tau']:.2f}",
                          r["first_step_above_10tau"] or "-", f"{r['final_train_loss']:.4f}",
                          "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}", r["spikes"],
                          f"{r['clipped_share_first_quarter']:.2f} -> {r['clipped_share_last_quarter']:.2f}"])
    print_table(f"QK-Clip stability (tau = {s.tau:g}; final train loss = mean of the last {s.loss_window} steps)",
                ["variant", "run", "peak logit", "peak/tau", "step >10tau", "final loss", "final val", "spikes",
                 "clipped share q1 -> q4"], table)
    print_table("MuonClip vs plain Muon",
                ["variant", "Muon > 10 tau", "MuonClip peak/tau", "loss ratio clip/muon", "val ratio", "share falls"],
                [[name, c["muon_past_10tau"], f"{c['muonclip_peak_over_tau']:.3f}",
                  f"{c['loss_ratio_clip_over_muon']:.4f}",
                  "-" if c["val_ratio_clip_over_muon"] is None else f"{c['val_ratio_clip_over_muon']:.4f}",
                  c["clipped_share_falls"]] for name, c in comparisons.items()])

    figures = plot(out, runs, s, total_heads)
    results = {
        "experiment": "qk_clip_stability", "quick": args.quick,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)), "machine": note,
        "wall_seconds": round(time.time() - started, 1), "settings": asdict(s), "total_heads": total_heads,
        "model_config": {k: v for k, v in mcfg.to_dict().items() if not isinstance(v, dict)},
        "parameters": mcfg.param_counts(),
        "runs": {f"{kind}_{tag(v, '_')}": {"summary": r["summary"], "seconds": r["seconds"]}
                 for (kind, v), r in runs.items()},
        "comparisons": comparisons, "figures": [str(f) for f in figures],
    }
    write_results(out, results, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
