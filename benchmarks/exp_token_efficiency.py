"""Token efficiency of MuonClip vs AdamW on the default pre-training corpus (issue 3, "Benchmarks and experiments").

Same model, same data (the default corpus tokenized once and shared by every run), same step budget; a short
learning-rate sweep per optimizer (best run = lowest final validation loss); then the tokens MuonClip needs to reach
AdamW's final validation loss, read off MuonClip's validation curve by linear interpolation between validation
points. The report's goal is <= 0.6x.

Every run is the real training loop (`openk2.train.Trainer` with a `TrainConfig`), nothing re-implemented here.
The helpers at the top (shared corpus, one run, curve interpolation) are also used by exp_qk_clip_stability.py.

    python benchmarks/exp_token_efficiency.py --out runs/exp_token_efficiency            # full (~25 min, 2 cores)
    python benchmarks/exp_token_efficiency.py --quick --out /tmp/te                      # toy smoke run (seconds)

Writes OUT/results.json, OUT/token_efficiency_val_loss.png, OUT/token_efficiency_lr_sweep.png, one run dir per run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from openk2 import data as data_mod  # noqa: E402
from openk2.config import K2Config  # noqa: E402
from openk2.plots import read_metrics  # noqa: E402
from openk2.tokenizer import K2Tokenizer, train_tokenizer  # noqa: E402
from openk2.train import PretrainBatches, Trainer, TrainConfig, build_model  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Shared helpers (also imported by exp_qk_clip_stability.py)


@dataclass
class SharedCorpus:
    tokenizer_dir: Path
    data_dir: Path
    vocab_size: int
    train_tokens: int
    val_tokens: int


def prepare_shared_corpus(out: Path, *, vocab_size: int, quick: bool, val_fraction: float) -> SharedCorpus:
    """Tokenizer + uint32 shards of the default corpus, prepared once under OUT/corpus and reused by every run.

    quick: only the first 3 plays of the default corpus (a fixed subset) and in-process tokenization, so the smoke
    test takes seconds."""
    sources = data_mod.default_corpus()
    if quick:
        sources = sources[:3]
    tok_dir, data_dir = out / "corpus" / "tokenizer", out / "corpus" / "data"
    if not (tok_dir / "tokenizer_config.json").exists():
        tokenizer = train_tokenizer(data_mod.iter_texts(sources), vocab_size)
        tokenizer.save(tok_dir)
    tokenizer = K2Tokenizer.load(tok_dir)
    if tokenizer.vocab_size != vocab_size:
        raise SystemExit(f"{tok_dir}: tokenizer has {tokenizer.vocab_size} tokens, expected {vocab_size}; "
                         f"delete {out / 'corpus'} or pick another --out")
    info = data_mod.prepare_corpus(sources, tokenizer, data_dir, val_fraction=val_fraction, progress=False,
                                   num_workers=0 if quick else 1)
    if info.val_tokens == 0:
        raise SystemExit(f"{data_dir}: the validation split is empty; raise val_fraction")
    return SharedCorpus(tok_dir, data_dir, vocab_size, info.train_tokens, info.val_tokens)


def train_run(run_dir: Path, model_config: K2Config, corpus: SharedCorpus, **train_fields) -> list[dict]:
    """One run of the real loop (Trainer.fit) on the shared corpus; returns its metrics.jsonl rows.

    A finished run (summary.json present with the same train_config.json) is not repeated, so an interrupted
    experiment resumes where it stopped."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model_config_path = run_dir / "model_config.json"
    model_config.save_json(model_config_path)
    cfg = TrainConfig(model_config=str(model_config_path), tokenizer=str(corpus.tokenizer_dir), out=str(run_dir),
                      progress=False, plots=False, keep_last=1, **train_fields).validated()
    cfg_json = json.dumps(cfg.to_dict(), indent=2)
    summary, saved_cfg = run_dir / "summary.json", run_dir / "train_config.json"
    if summary.exists() and saved_cfg.exists() and saved_cfg.read_text() == cfg_json:
        return read_metrics(run_dir)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    summary.unlink(missing_ok=True)
    # the same seeding as run_pretrain, so a run here equals `openk2 pretrain --config train_config.json`
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg, torch.device(cfg.device if cfg.device != "auto" else "cpu"))
    trainer = Trainer(cfg, model, PretrainBatches(corpus.data_dir, cfg), tokenizer=K2Tokenizer.load(
        corpus.tokenizer_dir))
    trainer.fit()
    return read_metrics(run_dir)


def series(rows: list[dict], key: str, x: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[key]) for r in rows if r.get(key) is not None]
    if not pts:
        return np.array([]), np.array([])
    xs, ys = zip(*pts)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def tokens_to_reach(rows: list[dict], target: float, *, until_step: int | None = None) -> float | None:
    """First point on the validation curve at or below `target`, linearly interpolated between validation points
    (tokens axis); None if the curve never gets there (up to `until_step`, when given)."""
    if until_step is not None:
        rows = [r for r in rows if r["step"] <= until_step]
    xs, ys = series(rows, "val_loss")
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y))
    return None


def run_seconds(rows: list[dict]) -> float:
    """Wall time of a run's training steps, from its metrics (also right for a run reused from an earlier call)."""
    times = [r["time"] for r in rows if "time" in r]
    if len(times) < 2:
        return float("nan")
    return round(times[-1] - times[0] + (times[-1] - times[0]) / (len(times) - 1), 1)  # + one step for the first


def machine_note() -> str:
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s), load average {load:.1f} at start")


def write_results(out: Path, results: dict, figures: list[Path]) -> None:
    """OUT/results.json, and a line saying what was written."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out / 'results.json'} and {', '.join(f.name for f in figures)} "
          f"({results['wall_seconds']:.0f} s)")


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


# ----------------------------------------------------------------------------------------------------------------
# The experiment


def model_config(vocab_size: int, quick: bool) -> K2Config:
    """A `tiny`-like MoE + MLA model that trains at a few steps/s on one CPU thread (~1M parameters)."""
    base = K2Config.preset("tiny")
    if quick:
        return base.replace(vocab_size=vocab_size, num_hidden_layers=2)
    return base.replace(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, moe_intermediate_size=128,
                        num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=64,
                        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                        num_attention_heads=4, num_key_value_heads=4)


@dataclass
class Settings:
    steps: int
    batch_size: int
    seq_len: int
    val_every: int
    val_batches: int
    warmup_steps: int
    vocab_size: int
    val_fraction: float
    lrs: dict[str, list[float]]
    max_extensions: int  # extra lr values tried per optimizer when the best one is at the edge of the grid


def settings(quick: bool) -> Settings:
    if quick:
        return Settings(steps=8, batch_size=4, seq_len=32, val_every=2, val_batches=2, warmup_steps=2,
                        vocab_size=512, val_fraction=0.34, lrs={"muonclip": [1e-2], "adamw": [1e-2]},
                        max_extensions=0)
    return Settings(steps=400, batch_size=16, seq_len=128, val_every=20, val_batches=4, warmup_steps=20,
                    vocab_size=2048, val_fraction=0.05,
                    lrs={"muonclip": [2.5e-3, 5e-3, 1e-2], "adamw": [2.5e-3, 5e-3, 1e-2]}, max_extensions=2)


def plot(out: Path, runs: dict[str, dict], best: dict[str, str], target: float, reach: float | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (FormatStrFormatter for the sweep's lr axis)

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"muonclip": "tab:blue", "adamw": "tab:orange"}
    for name, run in runs.items():
        xs, ys = series(run["rows"], "val_loss")
        is_best = best[run["optimizer"]] == name
        ax.plot(xs / 1e6, ys, "-o" if is_best else "--", ms=2.5, lw=1.8 if is_best else 0.8,
                alpha=1.0 if is_best else 0.45, color=colors[run["optimizer"]],
                label=f"{run['optimizer']} lr={run['lr']:g}" + (" (best)" if is_best else ""))
    ax.axhline(target, color="gray", ls=":", lw=1, label=f"AdamW final val {target:.3f}")
    if reach is not None:
        ax.axvline(reach / 1e6, color="tab:blue", ls=":", lw=1, label=f"MuonClip reaches it at {reach / 1e6:.2f}M")
    lo = min(float(series(r["rows"], "val_loss")[1].min()) for r in runs.values())
    ax.set_ylim(lo - 0.1, lo + 2.0)
    ax.set(xlabel="training tokens (M)", ylabel="validation loss", title="MuonClip vs AdamW: validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "token_efficiency_val_loss.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for opt in ("muonclip", "adamw"):
        pts = sorted((r["lr"], r["final_val_loss"]) for r in runs.values() if r["optimizer"] == opt)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=colors[opt], label=opt)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sorted({r["lr"] for r in runs.values()}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="x", labelsize=7)
    ax.set(xlabel="learning rate", ylabel="final validation loss", title="learning-rate sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "token_efficiency_lr_sweep.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy-size smoke run (seconds)")
    p.add_argument("--out", default="runs/exp_token_efficiency", help="output directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    p.add_argument("--steps", type=int, default=None, help="override the step budget")
    p.add_argument("--muonclip-lrs", type=float, nargs="+", default=None, help="override MuonClip's lr grid")
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=None, help="override AdamW's lr grid")
    p.add_argument("--max-extensions", type=int, default=None, help="lr values added per optimizer while its "
                   "best lr sits at the edge of the grid (default 2; 0 = the grid only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = settings(args.quick)
    if args.steps:
        s.steps = args.steps
    for opt, lrs in (("muonclip", args.muonclip_lrs), ("adamw", args.adamw_lrs)):
        if lrs:
            s.lrs[opt] = lrs
    if args.max_extensions is not None:
        s.max_extensions = args.max_extensions
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    note = machine_note()
    corpus = prepare_shared_corpus(out, vocab_size=s.vocab_size, quick=args.quick, val_fraction=s.val_fraction)
    mcfg = model_config(s.vocab_size, args.quick)
    print(f"corpus: {corpus.train_tokens:,} train / {corpus.val_tokens:,} val tokens; model "
          f"{mcfg.param_counts()['total']:,} parameters; {s.steps} steps x {s.batch_size} x {s.seq_len} tokens",
          flush=True)

    runs: dict[str, dict] = {}

    def run(opt: str, lr: float) -> None:
        name = f"{opt}_lr{lr:g}"
        rows = train_run(out / name, mcfg, corpus, optimizer=opt, lr=lr, steps=s.steps, batch_size=s.batch_size,
                         seq_len=s.seq_len, val_every=s.val_every, val_batches=s.val_batches,
                         warmup_steps=s.warmup_steps, ckpt_every=s.steps, qk_clip_tau=100.0)
        vals = series(rows, "val_loss")[1]
        final_val = float(vals[-1]) if len(vals) else float("nan")
        runs[name] = {"optimizer": opt, "lr": lr, "rows": rows, "final_val_loss": final_val,
                      "final_train_loss": float(rows[-1]["loss"]), "tokens": int(rows[-1]["tokens"]),
                      "seconds": run_seconds(rows)}
        print(f"  {name}: final val {final_val:.4f} ({runs[name]['seconds']:.0f} s)", flush=True)

    def best_of(opt: str) -> str:
        return min((n for n, r in runs.items() if r["optimizer"] == opt), key=lambda n: runs[n]["final_val_loss"])

    def at_edge(opt: str) -> bool:
        lrs = [r["lr"] for r in runs.values() if r["optimizer"] == opt]
        return len(lrs) > 1 and runs[best_of(opt)]["lr"] in (min(lrs), max(lrs))

    for opt, lrs in s.lrs.items():
        for lr in lrs:
            run(opt, lr)
        # a best lr at the edge of the grid may not be the optimum: extend the sweep outward (x2 or /2)
        for _ in range(s.max_extensions):
            if not at_edge(opt):
                break
            lrs_run = [r["lr"] for r in runs.values() if r["optimizer"] == opt]
            best_lr = runs[best_of(opt)]["lr"]
            run(opt, best_lr * 2 if best_lr == max(lrs_run) else best_lr / 2)

    best = {opt: best_of(opt) for opt in s.lrs}
    adamw, muon = runs[best["adamw"]], runs[best["muonclip"]]
    target = adamw["final_val_loss"]
    reach = tokens_to_reach(muon["rows"], target)
    ratio = None if reach is None else reach / adamw["tokens"]
    edge = {opt: at_edge(opt) for opt in s.lrs}
    # The WSD decay (last decay_fraction of the steps) drops both curves steeply at the very end, so a target set by
    # AdamW's *final* loss is met by MuonClip only inside its own decay, which pulls the ratio toward 1 whatever
    # the optimizers' speed. The same question asked within the constant-lr phase compares like with like.
    stable_end = s.steps - int(round(TrainConfig.decay_fraction * s.steps))
    stable_vals = [(r["step"], r["val_loss"]) for r in adamw["rows"] if r.get("val_loss") is not None
                   and r["step"] <= stable_end]
    stable_target = stable_vals[-1][1] if stable_vals else None
    stable_reach = None if stable_target is None else tokens_to_reach(muon["rows"], stable_target,
                                                                      until_step=stable_end)
    stable_tokens = next((r["tokens"] for r in adamw["rows"] if r["step"] == stable_vals[-1][0]), None) \
        if stable_vals else None
    stable_ratio = None if stable_reach is None or not stable_tokens else stable_reach / stable_tokens
    # the same ratio for AdamW's loss at 1/4, 1/2, 3/4 and all of the constant-lr phase (how the lead evolves)
    by_budget = []
    for frac in (0.25, 0.5, 0.75, 1.0):
        step = min(stable_vals, key=lambda v: abs(v[0] - frac * stable_end))[0] if stable_vals else None
        if step is None:
            continue
        row = next(r for r in adamw["rows"] if r["step"] == step)
        need = tokens_to_reach(muon["rows"], row["val_loss"], until_step=stable_end)
        by_budget.append({"adamw_step": step, "adamw_tokens": row["tokens"], "adamw_val_loss": row["val_loss"],
                          "muonclip_tokens_to_reach": need,
                          "ratio": None if need is None else need / row["tokens"]})

    print_table("learning-rate sweep (final validation loss; best per optimizer marked *)",
                ["run", "optimizer", "lr", "final train", "final val", "tokens", "s"],
                [[n + (" *" if n in best.values() else ""), r["optimizer"], f"{r['lr']:g}",
                  f"{r['final_train_loss']:.4f}", f"{r['final_val_loss']:.4f}", f"{r['tokens']:,}", r["seconds"]]
                 for n, r in runs.items()])
    print_table("tokens to reach AdamW's final validation loss (goal <= 0.6x)",
                ["optimizer", "best lr", "final val", "tokens to reach target", "ratio vs AdamW"],
                [["adamw", f"{adamw['lr']:g}", f"{target:.4f}", f"{adamw['tokens']:,}", "1.00"],
                 ["muonclip", f"{muon['lr']:g}", f"{muon['final_val_loss']:.4f}",
                  "not reached" if reach is None else f"{reach:,.0f}",
                  "n/a" if ratio is None else f"{ratio:.2f}"]])
    if stable_target is not None:
        print(f"constant-lr phase (steps <= {stable_end}): AdamW val {stable_target:.4f} at {stable_tokens:,} tokens; "
              f"MuonClip reaches it at {'never' if stable_reach is None else f'{stable_reach:,.0f}'} tokens, "
              f"ratio {'n/a' if stable_ratio is None else f'{stable_ratio:.2f}'}")
    print_table("tokens MuonClip needs to reach AdamW's val loss at points of the constant-lr phase",
                ["AdamW step", "AdamW tokens", "AdamW val", "MuonClip tokens", "ratio"],
                [[b["adamw_step"], f"{b['adamw_tokens']:,}", f"{b['adamw_val_loss']:.4f}",
                  "not reached" if b["muonclip_tokens_to_reach"] is None else f"{b['muonclip_tokens_to_reach']:,.0f}",
                  "n/a" if b["ratio"] is None else f"{b['ratio']:.2f}"] for b in by_budget])
    for opt, at_edge in edge.items():
        if at_edge:
            print(f"note: {opt}'s best lr {runs[best[opt]]['lr']:g} is at the edge of its sweep")

    figures = plot(out, runs, best, target, reach)
    results = {
        "experiment": "token_efficiency", "quick": args.quick, "date_utc": time.strftime("%Y-%m-%d %H:%M",
                                                                                          time.gmtime(started)),
        "machine": note, "wall_seconds": round(time.time() - started, 1), "settings": asdict(s),
        "model_config": {k: v for k, v in mcfg.to_dict().items() if not isinstance(v, dict)},
        "parameters": mcfg.param_counts(),
        "corpus": {"train_tokens": corpus.train_tokens, "val_tokens": corpus.val_tokens},
        "runs": {n: {k: v for k, v in r.items() if k != "rows"} | {
            "val_curve": [[int(x), float(y)] for x, y in zip(*series(r["rows"], "val_loss"))]}
            for n, r in runs.items()},
        "best": best, "adamw_final_val_loss": target, "muonclip_tokens_to_reach": reach,
        "adamw_tokens": adamw["tokens"], "ratio": ratio, "goal_ratio": 0.6,
        "stable_phase": {"end_step": stable_end, "adamw_val_loss": stable_target, "adamw_tokens": stable_tokens,
                         "muonclip_tokens_to_reach": stable_reach, "ratio": stable_ratio, "by_budget": by_budget},
        "best_lr_at_sweep_edge": edge, "figures": [str(f) for f in figures],
    }
    write_results(out, results, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
