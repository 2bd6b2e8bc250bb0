"""Token efficiency of MuonClip vs AdamW on the default pre-training corpus (issue 3, "Benchmarks and experiments").

The question: how many tokens does MuonClip need to reach AdamW's final validation loss, same model, data and step
budget, lr tuned for each (goal <= 0.6x). Method, a budget sweep:

1. lr sweep of both optimizers at the full budget (the grid is extended outward while the best lr sits at its edge);
2. MuonClip at its best lr with shorter budgets, each a complete WSD schedule of its own (same warm-up, decay over
   the last 20% of *its* steps), and the budget whose final validation loss equals AdamW's final validation loss,
   interpolated linearly in log(tokens) between the two budgets that bracket it;
3. at the budget nearest that crossing, MuonClip at 1/2x and 2x its lr (does per-budget lr tuning change it?);
4. the best run of each optimizer repeated with another seed (the noise level).

The first version's reading (AdamW's final loss read off the full-budget MuonClip run's validation curve) is kept as
a secondary table; it is biased toward 1 because AdamW's final loss includes its WSD decay drop, which one MuonClip
run only gets at its own end.

Same data for every run (the default corpus tokenized once, read in the same order); every run is the real
training loop (`openk2.train.Trainer` with a `TrainConfig`), nothing re-implemented here. A finished run whose
train_config.json is unchanged is reused, so an interrupted experiment resumes. The helpers at the top (shared
corpus, one run, curve interpolation) are also used by exp_qk_clip_stability.py.

    python benchmarks/exp_token_efficiency.py --threads 1 --out runs/exp_token_efficiency_v2  # full, ~1 h
    python benchmarks/exp_token_efficiency.py --quick --out /tmp/te                             # seconds

Writes OUT/results.json (after every phase), OUT/token_efficiency_{val_loss,lr_sweep,budget_sweep}.png and one run
directory per run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
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
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    with _run_lock(out / "corpus", poll_seconds=1.0):  # helper processes started together prepare it once
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
    experiment resumes where it stopped. A run another live process is training (RUN_DIR/running.pid) is waited
    for and then reused, so two processes can share one experiment directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with _run_lock(run_dir):
        model_config_path = run_dir / "model_config.json"
        model_config.save_json(model_config_path)
        cfg = TrainConfig(model_config=str(model_config_path), tokenizer=str(corpus.tokenizer_dir),
                          out=str(run_dir), progress=False, plots=False, keep_last=1, **train_fields).validated()
        summary, saved_cfg = run_dir / "summary.json", run_dir / "train_config.json"
        if summary.exists() and saved_cfg.exists() and same_config(json.loads(saved_cfg.read_text()), cfg):
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


def same_config(saved: dict, cfg: TrainConfig) -> bool:
    """A saved train_config.json describes the run `cfg` asks for. A TrainConfig field added to the code after the
    run was made counts as equal when `cfg` holds its default (the run behaved as that default)."""
    current = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as in the saved file
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    return set(saved) <= set(current) and all(saved.get(k, defaults[k]) == v for k, v in current.items())


@contextlib.contextmanager
def _run_lock(run_dir: Path, poll_seconds: float = 10.0):
    """RUN_DIR/running.pid, created atomically; while another live process holds it, wait. A lock left by a process
    that no longer exists (killed) is taken over."""
    lock = run_dir / "running.pid"
    announced = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or "0")
            except (OSError, ValueError):  # just created, pid not written yet
                holder = -1
            if holder == 0 or (holder > 0 and not _process_alive(holder)):
                lock.unlink(missing_ok=True)  # stale
                continue
            if not announced:
                print(f"  {run_dir.name}: held by process {holder} (training or preparing it); waiting", flush=True)
                announced = True
            time.sleep(poll_seconds)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    """The K2 architecture (MLA + MoE) at a size that trains at several steps/s on one CPU thread: 6 layers (1 dense,
    5 MoE with 4 routed experts top-2 + 1 shared) of width 128 and a 1024-token vocabulary, so ~87% of the 2.0M
    parameters are the matrices Muon updates (embedding + head are 13%; in the first version, 2 layers over a 2048
    vocabulary, they were half and Muon touched only the other half)."""
    base = K2Config.preset("tiny")
    if quick:
        return base.replace(vocab_size=vocab_size, num_hidden_layers=2)
    return base.replace(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, moe_intermediate_size=128,
                        num_hidden_layers=6, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=64,
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
    max_extensions: int  # extra lr values (or budgets) tried when the best one is at the edge of the grid
    budget_fractions: list[float]  # MuonClip's shorter budgets, as fractions of `steps`
    budget_val_every: int  # validation interval of the shorter-budget runs (their final loss is what counts)
    lr_check: bool  # at one budget fraction, also run MuonClip at 1/2x and 2x its best lr
    extra_seeds: list[int]  # seeds repeated for the best run of each optimizer (seed 0 is the main one)


def settings(quick: bool) -> Settings:
    if quick:
        # 10 steps, so the 8-step budget has a 2-step decay of its own (the full run is still at peak lr there)
        return Settings(steps=10, batch_size=4, seq_len=32, val_every=2, val_batches=2, warmup_steps=2,
                        vocab_size=512, val_fraction=0.34, lrs={"muonclip": [1e-2], "adamw": [1e-2]},
                        max_extensions=0, budget_fractions=[0.5, 0.8], budget_val_every=2, lr_check=True,
                        extra_seeds=[1])
    # 400 x 32 x 128 = 1.64M tokens (0.8 tokens per parameter; 32 sequences per step cost ~1.4x 16 on this CPU, so
    # the larger batch buys tokens cheaply); validation on a fixed 8 x 32 x 128 = 32,768-token slice
    return Settings(steps=400, batch_size=32, seq_len=128, val_every=40, val_batches=8, warmup_steps=20,
                    vocab_size=1024, val_fraction=0.05,
                    lrs={"muonclip": [5e-3, 1e-2, 2e-2], "adamw": [1.25e-3, 2.5e-3, 5e-3]}, max_extensions=2,
                    budget_fractions=[0.4, 0.55, 0.7, 0.85], budget_val_every=80, lr_check=True, extra_seeds=[1])


def budget_crossing(points: list[tuple[float, float]], target: float) -> tuple[float | None, str]:
    """The budget (tokens) whose final validation loss equals `target`, from (budget tokens, final val loss) points,
    each a complete run with its own schedule: linear interpolation in log(tokens) between the first budget at or
    below the target and the budget before it. Returns (tokens, how), how one of 'interpolated', 'below_smallest'
    (even the smallest budget reaches the target; tokens None) and 'not_reached' (no budget does; tokens None)."""
    pts = sorted(points)
    for i, (x, y) in enumerate(pts):
        if y <= target:
            if i == 0:
                return None, "below_smallest"
            x0, y0 = pts[i - 1]
            t = (y0 - target) / (y0 - y)
            return float(math.exp(math.log(x0) + t * (math.log(x) - math.log(x0)))), "interpolated"
    return None, "not_reached"


def loglinear_crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """Cross-check of budget_crossing that uses every point: least-squares line loss = a + b*ln(tokens) and the
    tokens where it equals `target` (None with fewer than 2 points or a line that does not fall)."""
    if len(points) < 2:
        return None
    xs, ys = np.log([p[0] for p in points]), np.array([p[1] for p in points])
    b, a = np.polyfit(xs, ys, 1)
    return None if b >= 0 else float(math.exp((target - a) / b))


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (90 dpi) and close one matplotlib figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot(out: Path, runs: dict[str, dict], best: dict[str, str], target: float, budget: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (FormatStrFormatter for the sweep's lr axis)

    colors = {"muonclip": "tab:blue", "adamw": "tab:orange"}
    sweep = {n: r for n, r in runs.items() if r["role"] == "lr_sweep"}
    paths = []

    # 1. validation curves of the lr sweep (full budget)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in sweep.items():
        xs, ys = series(run["rows"], "val_loss")
        is_best = best[run["optimizer"]] == name
        ax.plot(xs / 1e6, ys, "-o" if is_best else "--", ms=2.5, lw=1.8 if is_best else 0.8,
                alpha=1.0 if is_best else 0.45, color=colors[run["optimizer"]],
                label=f"{run['optimizer']} lr={run['lr']:g}" + (" (best)" if is_best else ""))
    ax.axhline(target, color="gray", ls=":", lw=1, label=f"AdamW final val {target:.3f}")
    lo = min(float(series(r["rows"], "val_loss")[1].min()) for r in sweep.values())
    ax.set_ylim(lo - 0.1, lo + 2.0)
    ax.set(xlabel="training tokens (M)", ylabel="validation loss", title="MuonClip vs AdamW: validation loss")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "token_efficiency_val_loss.png"))

    # 2. the lr sweep
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for opt in ("muonclip", "adamw"):
        pts = sorted((r["lr"], r["final_val_loss"]) for r in sweep.values() if r["optimizer"] == opt)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=colors[opt], label=opt)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sorted({r["lr"] for r in sweep.values()}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="x", labelsize=7)
    ax.set(xlabel="learning rate", ylabel="final validation loss", title="learning-rate sweep (full budget)")
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out / "token_efficiency_lr_sweep.png"))

    # 3. the budget sweep: MuonClip's final loss per budget vs AdamW's final loss at the full budget
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    pts = sorted((p["tokens"], p["final_val_loss"]) for p in budget["points"])
    ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], "-o", color=colors["muonclip"],
            label=f"MuonClip lr={budget['lr']:g}, one complete WSD run per budget")
    for name, run in runs.items():
        if run["role"] == "lr_check":
            ax.plot(run["tokens"] / 1e6, run["final_val_loss"], "x", color="tab:green", ms=7)
            ax.annotate(f"lr={run['lr']:g}", (run["tokens"] / 1e6, run["final_val_loss"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
        elif run["role"] == "seed":
            ax.plot(run["tokens"] / 1e6, run["final_val_loss"], "^", color=colors[run["optimizer"]], ms=6,
                    mfc="none", label=f"{run['optimizer']} seed {run['seed']}")
    adamw = runs[best["adamw"]]
    ax.plot(adamw["tokens"] / 1e6, target, "s", color=colors["adamw"], ms=7, label=f"AdamW lr={adamw['lr']:g}")
    ax.axhline(target, color="gray", ls=":", lw=1, label=f"AdamW final val {target:.3f}")
    if budget["tokens_to_reach"] is not None:
        ax.axvline(budget["tokens_to_reach"] / 1e6, color=colors["muonclip"], ls=":", lw=1,
                   label=f"MuonClip budget matching it: {budget['tokens_to_reach'] / 1e6:.2f}M "
                         f"({budget['ratio']:.2f}x)")
    ax.set(xlabel="training budget (M tokens)", ylabel="final validation loss", title="budget sweep")
    ax.legend(fontsize=7)
    for name, run in runs.items():
        if run["role"] == "budget" or name in (best["muonclip"], best["adamw"]):
            xs, ys = series(run["rows"], "val_loss")
            ax2.plot(xs / 1e6, ys, "-", lw=1.2, color=colors[run["optimizer"]], alpha=0.5 + 0.5 * (run["steps"] ==
                     adamw["steps"]), label=f"{run['optimizer']} {run['steps']} steps")
    ax2.axhline(target, color="gray", ls=":", lw=1)
    lo = min(p[1] for p in pts)
    ax2.set_ylim(lo - 0.1, lo + 1.5)
    ax2.set(xlabel="training tokens (M)", ylabel="validation loss", title="validation curves of the budget runs")
    ax2.legend(fontsize=6)
    paths.append(save_figure(fig, out / "token_efficiency_budget_sweep.png"))
    return paths


def trajectory_reading(adamw: dict, muon: dict, steps: int) -> dict:
    """The first version's method, kept as a secondary reading: AdamW's val loss (at the end, and at points of its
    constant-lr phase) read off the full-budget MuonClip run's validation curve. Biased toward 1 at the end: AdamW's
    final loss includes its WSD decay drop, which this MuonClip curve only gets at its own end."""
    target = adamw["final_val_loss"]
    reach = tokens_to_reach(muon["rows"], target)
    stable_end = steps - int(round(TrainConfig.decay_fraction * steps))
    stable_vals = [(r["step"], r["val_loss"]) for r in adamw["rows"] if r.get("val_loss") is not None
                   and r["step"] <= stable_end]
    by_budget = []
    for frac in (0.25, 0.5, 0.75, 1.0):
        if not stable_vals:
            break
        step = min(stable_vals, key=lambda v: abs(v[0] - frac * stable_end))[0]
        row = next(r for r in adamw["rows"] if r["step"] == step)
        need = tokens_to_reach(muon["rows"], row["val_loss"], until_step=stable_end)
        by_budget.append({"adamw_step": step, "adamw_tokens": row["tokens"], "adamw_val_loss": row["val_loss"],
                          "muonclip_tokens_to_reach": need,
                          "ratio": None if need is None else need / row["tokens"]})
    return {"muonclip_tokens_to_reach_final": reach, "ratio_final": None if reach is None else reach / adamw["tokens"],
            "stable_end_step": stable_end, "stable_phase": by_budget}


PHASES = ("budget", "lr_check", "seeds")  # after the lr sweep, in this order


def fmt(x: float | None, spec: str = ",.0f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def batch_scan(dirs: list[Path], out: Path) -> int:
    """Summarize finished experiments that differ in tokens per step (same model, corpus and token budget): one
    table row and one point per directory's results.json, ratio against tokens per step."""
    rows = []
    for d in dirs:
        path = d / "results.json"
        if not path.exists():
            raise SystemExit(f"{path}: missing (run the experiment with --out {d} first)")
        r = json.loads(path.read_text())
        st = r["settings"]
        muon = r["runs"][r["best"]["muonclip"]]
        rows.append({"dir": str(d), "tokens_per_step": st["batch_size"] * st["seq_len"], "steps": st["steps"],
                     "tokens": r["adamw_tokens"], "adamw_lr": r["runs"][r["best"]["adamw"]]["lr"],
                     "adamw_final": r["adamw_final_val_loss"], "muonclip_lr": muon["lr"],
                     "muonclip_final": muon["final_val_loss"], "ratio": r["ratio"],
                     "ratio_other_seed": r.get("ratio_with_other_seed_target"),
                     "ratio_best_lr": (r.get("lr_check") or {}).get("ratio_with_best_lr"), "phase": r["phase"]})
    rows.sort(key=lambda x: x["tokens_per_step"])
    print_table("token efficiency against tokens per step (same model, corpus and token budget; lr tuned for each)",
                ["tokens/step", "steps", "AdamW lr", "AdamW final", "MuonClip lr", "MuonClip final", "ratio",
                 "ratio (seed-1 target)", "ratio (best lr at budget)", "phase"],
                [[f"{x['tokens_per_step']:,}", x["steps"], f"{x['adamw_lr']:g}", f"{x['adamw_final']:.3f}",
                  f"{x['muonclip_lr']:g}", f"{x['muonclip_final']:.3f}", fmt(x["ratio"], ".3f"),
                  fmt(x["ratio_other_seed"], ".3f"), fmt(x["ratio_best_lr"], ".3f"), x["phase"]] for x in rows])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    pts = [(x["tokens_per_step"], x["ratio"]) for x in rows if x["ratio"] is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color="tab:blue", label="budget sweep (seed 0)")
    alt = [(x["tokens_per_step"], x["ratio_other_seed"]) for x in rows if x["ratio_other_seed"] is not None]
    if alt:
        ax.plot([p[0] for p in alt], [p[1] for p in alt], "x", color="tab:gray", label="seed-1 AdamW target")
    ax.axhline(0.6, color="tab:red", ls=":", lw=1, label="goal 0.6x")
    ax.axhline(1.0, color="gray", ls="-", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="tokens per step (same total tokens)", ylabel="MuonClip tokens / AdamW tokens", ylim=(0, 1.05),
           title="Token efficiency vs batch size")
    ax.legend(fontsize=7)
    out.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out / "token_efficiency_batch_scan.png")
    (out / "batch_scan.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'token_efficiency_batch_scan.png'} and {out / 'batch_scan.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy-size smoke run (seconds)")
    p.add_argument("--out", default="runs/exp_token_efficiency_v2", help="output directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    p.add_argument("--steps", type=int, default=None, help="override the full step budget")
    p.add_argument("--batch-size", type=int, default=None, help="override sequences per step (default 32)")
    p.add_argument("--warmup-steps", type=int, default=None, help="override the warm-up (default 20 steps)")
    p.add_argument("--val-every", type=int, default=None, help="validation interval of the full-budget runs "
                   "(default 40; shorter budgets validate every 2x this and at their end)")
    p.add_argument("--val-tokens", type=int, default=None, help="size of the fixed validation slice in tokens "
                   "(default 32768; rounded down to whole batches)")
    p.add_argument("--muonclip-lrs", type=float, nargs="+", default=None, help="override MuonClip's lr grid")
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=None, help="override AdamW's lr grid")
    p.add_argument("--muonclip-adamw-lr", type=float, default=None, help="MuonClip runs give their AdamW group "
                   "(embeddings, head, norms) this lr instead of sharing lr (an ablation; K2 shares; run names "
                   "gain _alrX)")
    p.add_argument("--max-extensions", type=int, default=None, help="lr values (and budgets) added while the best "
                   "sits at the edge of the grid (default 2; 0 = the grid only)")
    p.add_argument("--fractions", type=float, nargs="+", default=None, help="MuonClip's shorter budgets as "
                   "fractions of the full one (default 0.4 0.55 0.7 0.85)")
    p.add_argument("--no-lr-check", action="store_true", help="skip the 1/2x and 2x lr runs at one budget")
    p.add_argument("--sweep-only", choices=("muonclip", "adamw"), default=None, help="run only this optimizer's lr "
                   "sweep and exit (a second process can sweep AdamW while the first sweeps MuonClip)")
    p.add_argument("--budget-worker", action="store_true", help="run (or reuse, or wait for) MuonClip's lr sweep, "
                   "then only its budget runs for --fractions (largest first, the main process goes smallest first), and exit: a "
                   "helper process for a long experiment")
    p.add_argument("--lr-check-fraction", type=float, default=None, help="the budget (fraction of the full one) "
                   "for the lr check; default: the budget run nearest the crossing")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="phases after the lr sweep "
                   "(which always runs or is reused); a second process with e.g. `--phases seeds` can run the "
                   "seed repeats while the first works through the budgets, and the first then reuses them")
    p.add_argument("--extra-seeds", type=int, nargs="*", default=None, help="seeds repeated for the best run of "
                   "each optimizer (default: 1; none: no repeats)")
    p.add_argument("--scan", type=Path, nargs="+", default=None, metavar="DIR", help="no training: summarize finished "
                   "experiments (their results.json) that differ in tokens per step, into --out")
    args = p.parse_args(argv)
    if args.scan:
        return batch_scan(args.scan, Path(args.out))
    if args.budget_worker:
        args.sweep_only = "muonclip"
    torch.set_num_threads(args.threads)
    s = settings(args.quick)
    if args.steps:
        s.steps = args.steps
    val_tokens = args.val_tokens or s.val_batches * s.batch_size * s.seq_len
    if args.batch_size:
        s.batch_size = args.batch_size
    s.val_batches = max(1, val_tokens // (s.batch_size * s.seq_len))  # same slice whatever the batch size
    if args.warmup_steps is not None:
        s.warmup_steps = args.warmup_steps
    if args.val_every:
        s.val_every, s.budget_val_every = args.val_every, 2 * args.val_every
    for opt, lrs in (("muonclip", args.muonclip_lrs), ("adamw", args.adamw_lrs)):
        if lrs:
            s.lrs[opt] = lrs
    if args.max_extensions is not None:
        s.max_extensions = args.max_extensions
    if args.fractions:
        s.budget_fractions = sorted(args.fractions)
    if args.no_lr_check:
        s.lr_check = False
    if args.extra_seeds is not None:
        s.extra_seeds = args.extra_seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    note = machine_note()
    corpus = prepare_shared_corpus(out, vocab_size=s.vocab_size, quick=args.quick, val_fraction=s.val_fraction)
    mcfg = model_config(s.vocab_size, args.quick)
    counts = mcfg.param_counts()
    print(f"corpus: {corpus.train_tokens:,} train / {corpus.val_tokens:,} val tokens; model {counts['total']:,} "
          f"parameters ({(counts['embed'] + counts['lm_head']) / counts['total']:.0%} embedding + head); "
          f"{s.steps} steps x {s.batch_size} x {s.seq_len} tokens; validation "
          f"{s.val_batches * s.batch_size * s.seq_len:,} tokens", flush=True)

    runs: dict[str, dict] = {}

    def run(opt: str, lr: float, *, steps: int, role: str, seed: int = 0) -> dict:
        adamw_lr = args.muonclip_adamw_lr if opt == "muonclip" else None
        name = (f"{opt}_lr{lr:g}" + (f"_alr{adamw_lr:g}" if adamw_lr else "")
                + (f"_steps{steps}" if steps != s.steps else "") + (f"_seed{seed}" if seed else ""))
        rows = train_run(out / name, mcfg, corpus, optimizer=opt, lr=lr, steps=steps, batch_size=s.batch_size,
                         seq_len=s.seq_len, val_every=s.val_every if steps == s.steps else s.budget_val_every,
                         val_batches=s.val_batches, warmup_steps=s.warmup_steps, ckpt_every=steps,
                         qk_clip_tau=100.0, seed=seed, adamw_lr=adamw_lr)
        vals = series(rows, "val_loss")[1]
        final_val = float(vals[-1]) if len(vals) else float("nan")
        runs[name] = {"optimizer": opt, "lr": lr, "adamw_lr": adamw_lr, "steps": steps, "seed": seed, "role": role,
                      "rows": rows, "final_val_loss": final_val, "final_train_loss": float(rows[-1]["loss"]),
                      "tokens": int(rows[-1]["tokens"]), "seconds": run_seconds(rows)}
        print(f"  {name}: final val {final_val:.4f} ({runs[name]['seconds']:.0f} s)", flush=True)
        return runs[name]

    def sweep_runs(opt: str) -> list[str]:
        return [n for n, r in runs.items() if r["optimizer"] == opt and r["role"] == "lr_sweep"]

    def best_of(opt: str) -> str:
        return min(sweep_runs(opt), key=lambda n: runs[n]["final_val_loss"])

    def at_edge(opt: str) -> bool:
        lrs = [runs[n]["lr"] for n in sweep_runs(opt)]
        return len(lrs) > 1 and runs[best_of(opt)]["lr"] in (min(lrs), max(lrs))

    def steps_for(frac: float) -> int:
        return max(s.warmup_steps + 1, int(round(frac * s.steps)))

    # Phase 1: lr sweep of both optimizers at the full budget
    for opt, lrs in s.lrs.items():
        if args.sweep_only and opt != args.sweep_only:
            continue
        for lr in lrs:
            run(opt, lr, steps=s.steps, role="lr_sweep")
        # a best lr at the edge of the grid may not be the optimum: extend the sweep outward (x2 or /2)
        for _ in range(s.max_extensions):
            if not at_edge(opt):
                break
            lrs_run = [runs[n]["lr"] for n in sweep_runs(opt)]
            best_lr = runs[best_of(opt)]["lr"]
            run(opt, best_lr * 2 if best_lr == max(lrs_run) else best_lr / 2, steps=s.steps, role="lr_sweep")
    if args.budget_worker:
        # largest budget first: the main process goes smallest first, so the two meet in the middle instead of
        # waiting on each other's run
        for frac in reversed(s.budget_fractions):
            run("muonclip", runs[best_of("muonclip")]["lr"], steps=steps_for(frac), role="budget")
    if args.sweep_only:
        return 0
    best = {opt: best_of(opt) for opt in s.lrs}
    adamw, muon = runs[best["adamw"]], runs[best["muonclip"]]
    target = adamw["final_val_loss"]
    edge = {opt: at_edge(opt) for opt in s.lrs}

    # Phase 2: budget sweep. MuonClip at its best lr with shorter budgets, each a complete WSD schedule (same warm-up,
    # decay over the last decay_fraction of its own steps); the budget whose final val loss equals AdamW's final val
    # loss at the full budget, interpolated. AdamW's own lr-sweep best at the full budget sets the target.
    def budget_runs() -> list[dict]:
        return [r for r in runs.values() if r["optimizer"] == "muonclip" and r["lr"] == muon["lr"] and r["seed"] == 0
                and r["role"] in ("budget", "lr_sweep")]

    for frac in s.budget_fractions if "budget" in args.phases else []:
        run("muonclip", muon["lr"], steps=steps_for(frac), role="budget")
    # bracket the target: a smaller budget, or a larger one
    for _ in range(s.max_extensions if "budget" in args.phases else 0):
        _, how = budget_crossing([(r["tokens"], r["final_val_loss"]) for r in budget_runs()], target)
        if how == "interpolated":
            break
        budgets = sorted(r["steps"] for r in budget_runs())
        new_steps = int(round(budgets[0] * 0.7)) if how == "below_smallest" else int(round(budgets[-1] * 1.25))
        if new_steps <= s.warmup_steps or new_steps in budgets:
            break
        run("muonclip", muon["lr"], steps=new_steps, role="budget")

    def budget_result() -> dict:
        pts = sorted((r["tokens"], r["final_val_loss"]) for r in budget_runs())
        reach, how = budget_crossing(pts, target)
        fit = loglinear_crossing(pts, target)
        return {"lr": muon["lr"], "points": [{"steps": r["steps"], "tokens": r["tokens"],
                                              "final_val_loss": r["final_val_loss"]}
                                             for r in sorted(budget_runs(), key=lambda r: r["steps"])],
                "target": target, "adamw_tokens": adamw["tokens"], "tokens_to_reach": reach, "how": how,
                "ratio": None if reach is None else reach / adamw["tokens"],
                "loglinear_fit_tokens": fit, "loglinear_fit_ratio": None if fit is None else fit / adamw["tokens"],
                "smallest_fraction": pts[0][0] / adamw["tokens"], "largest_fraction": pts[-1][0] / adamw["tokens"]}

    budget = budget_result()

    def report(phase: str) -> None:
        """Print the tables and write results.json + figures; called after every phase so a run stopped part way
        still leaves its results."""
        print(f"\n===== results after phase: {phase} =====")
        print_table("learning-rate sweep at the full budget (final validation loss; best per optimizer marked *)",
                    ["run", "optimizer", "lr", "final train", "final val", "tokens", "s"],
                    [[n + (" *" if n in best.values() else ""), r["optimizer"], f"{r['lr']:g}",
                      f"{r['final_train_loss']:.4f}", f"{r['final_val_loss']:.4f}", f"{r['tokens']:,}", r["seconds"]]
                     for n, r in runs.items() if r["role"] == "lr_sweep"])
        print_table(f"budget sweep: MuonClip lr={muon['lr']:g}, each budget a complete WSD run; target = AdamW's "
                    f"final val {target:.4f} at {adamw['tokens']:,} tokens",
                    ["MuonClip steps", "tokens", "fraction of AdamW's", "final val", "vs target", "s"],
                    [[r["steps"], f"{r['tokens']:,}", f"{r['tokens'] / adamw['tokens']:.2f}",
                      f"{r['final_val_loss']:.4f}", f"{r['final_val_loss'] - target:+.4f}", r["seconds"]]
                     for r in sorted(budget_runs(), key=lambda r: r["steps"])])
        bracket = {"below_smallest": f"<= {budget['smallest_fraction']:.2f} (even the smallest budget beats it)",
                   "not_reached": f"> {budget['largest_fraction']:.2f} (no budget reaches it)"}
        print_table("tokens MuonClip needs to reach AdamW's final validation loss (goal <= 0.6x)",
                    ["method", "MuonClip tokens", "ratio vs AdamW"],
                    [["budget sweep, log-linear interpolation", fmt(budget["tokens_to_reach"]),
                      bracket.get(budget["how"], fmt(budget["ratio"], ".3f"))],
                     ["budget sweep, least-squares loss vs ln(tokens)", fmt(budget["loglinear_fit_tokens"]),
                      fmt(budget["loglinear_fit_ratio"], ".3f")],
                     ["(old) read off the full MuonClip run's curve", fmt(traj["muonclip_tokens_to_reach_final"]),
                      fmt(traj["ratio_final"], ".3f")]])
        print_table(f"(old reading) MuonClip's full-budget curve vs AdamW's inside the constant-lr phase "
                    f"(steps <= {traj['stable_end_step']})",
                    ["AdamW step", "AdamW tokens", "AdamW val", "MuonClip tokens", "ratio"],
                    [[b["adamw_step"], f"{b['adamw_tokens']:,}", f"{b['adamw_val_loss']:.4f}",
                      fmt(b["muonclip_tokens_to_reach"], ",.0f", "not reached"), fmt(b["ratio"], ".2f")]
                     for b in traj["stable_phase"]])
        if lr_check:
            print_table(f"lr check at {lr_check['steps']} steps ({lr_check['fraction']:.2f} of the budget)",
                        ["lr", "final val", "vs target"],
                        [[f"{lr:g}" + (" (reused)" if lr == muon["lr"] else ""), f"{v:.4f}", f"{v - target:+.4f}"]
                         for lr, v in sorted(lr_check["final_val_by_lr"].items())])
            print(f"ratio with the best of the three lrs at that budget: "
                  f"{fmt(lr_check['ratio_with_best_lr'], '.3f')} ({lr_check['verdict']})")
        if seeds:
            print_table("seed repeats of the best runs (full budget)", ["run", "seed 0", "other seed", "diff"],
                        [[k, f"{v['seed0']:.4f}", f"{v['other']:.4f}", f"{v['other'] - v['seed0']:+.4f}"]
                         for k, v in seeds.items()])
            if seeds_ratio is not None:
                print(f"ratio with the other seed's AdamW final loss as the target: {fmt(seeds_ratio, '.3f')}")
        for opt, is_edge in edge.items():
            if is_edge:
                print(f"note: {opt}'s best lr {runs[best[opt]]['lr']:g} is at the edge of its sweep")
        figures = plot(out, runs, best, target, budget)
        results = {
            "experiment": "token_efficiency", "method": "budget_sweep", "phase": phase, "quick": args.quick,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)), "machine": note,
            "wall_seconds": round(time.time() - started, 1), "settings": asdict(s),
            "muonclip_adamw_lr": args.muonclip_adamw_lr,
            "model_config": {k: v for k, v in mcfg.to_dict().items() if not isinstance(v, dict)},
            "parameters": counts, "corpus": {"train_tokens": corpus.train_tokens, "val_tokens": corpus.val_tokens},
            "runs": {n: {k: v for k, v in r.items() if k != "rows"} | {
                "val_curve": [[int(x), float(y)] for x, y in zip(*series(r["rows"], "val_loss"))]}
                for n, r in runs.items()},
            "best": best, "adamw_final_val_loss": target, "adamw_tokens": adamw["tokens"],
            "ratio": budget["ratio"], "goal_ratio": 0.6, "budget_sweep": budget, "trajectory_reading": traj,
            "lr_check": lr_check, "seeds": seeds, "ratio_with_other_seed_target": seeds_ratio,
            "best_lr_at_sweep_edge": edge, "figures": [str(f) for f in figures],
        }
        write_results(out, results, figures)

    traj = trajectory_reading(adamw, muon, s.steps)
    lr_check: dict = {}
    seeds: dict = {}
    seeds_ratio = None
    if not args.quick:  # partial results on disk in case a long experiment is stopped (--quick: only at the end)
        report("budget sweep")

    # Phase 3: at the budget nearest the crossing, 1/2x and 2x MuonClip's lr: does tuning lr per budget change it?
    if s.lr_check and "lr_check" in args.phases:
        shorter = [r for r in budget_runs() if r["steps"] != s.steps] or budget_runs()
        anchor = budget["tokens_to_reach"] or (shorter[0]["tokens"] if budget["how"] == "below_smallest"
                                               else shorter[-1]["tokens"])
        if args.lr_check_fraction:  # a fixed budget instead (lets a helper process start these runs early)
            anchor = steps_for(args.lr_check_fraction) * s.batch_size * s.seq_len
        at = min(shorter, key=lambda r: abs(math.log(r["tokens"] / anchor)))
        by_lr = {muon["lr"]: at["final_val_loss"]}
        for lr in (muon["lr"] / 2, muon["lr"] * 2):
            by_lr[lr] = run("muonclip", lr, steps=at["steps"], role="lr_check")["final_val_loss"]
        best_val = min(by_lr.values())
        pts = [(r["tokens"], best_val if r is at else r["final_val_loss"]) for r in budget_runs()]
        reach, how = budget_crossing(pts, target)
        ratio_best = None if reach is None else reach / adamw["tokens"]
        kept = min(by_lr, key=by_lr.get) == muon["lr"]
        lr_check = {"steps": at["steps"], "fraction": at["tokens"] / adamw["tokens"],
                    "final_val_by_lr": by_lr, "best_lr": min(by_lr, key=by_lr.get),
                    "ratio_with_best_lr": ratio_best, "how": how,
                    "verdict": "the reused lr is the best of the three" if kept else
                    "another lr is better at this budget, so the reused lr overstates MuonClip's tokens"}
        if not args.quick:
            report("lr check")

    # Phase 4: the best run of each optimizer again with other seeds (initialization and data order): noise level
    for seed in s.extra_seeds if "seeds" in args.phases else []:
        for opt in ("adamw", "muonclip"):
            r = run(opt, runs[best[opt]]["lr"], steps=s.steps, role="seed", seed=seed)
            seeds[f"{opt} lr={r['lr']:g} seed {seed}"] = {"seed0": runs[best[opt]]["final_val_loss"],
                                                          "other": r["final_val_loss"]}
        other_target = runs[f"adamw_lr{adamw['lr']:g}_seed{seed}"]["final_val_loss"]
        reach, _ = budget_crossing([(r["tokens"], r["final_val_loss"]) for r in budget_runs()], other_target)
        seeds_ratio = None if reach is None else reach / adamw["tokens"]
    report("all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
