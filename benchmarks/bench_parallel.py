"""Distributed training on this CPU: throughput of 1 vs 2 processes, and bytes communicated per step for
MuonClip against a ZeRO-1 AdamW baseline.

    python benchmarks/bench_parallel.py            # `small` preset, 8 timed steps
    python benchmarks/bench_parallel.py --quick    # `tiny` preset, 3 timed steps (sanity run)

Part 1 (tokens/s per process): the same per-rank batch in 1 process, 2 processes pure data parallel (FSDP2) and
2 processes EP=2 (+ FSDP2), gloo, 1 thread per process so 2 processes use the 2 cores. The anchor is the
1-process run; on 2 cores ideal scaling keeps tokens/s per process equal (ratio 1.0).

Part 2 (bytes per step): every collective is counted where it enters the dispatcher (a TorchDispatchMode on the
c10d ops, so FSDP's, the optimizer's and expert parallelism's all-to-alls are all seen), as the bytes each rank
*sends* with ring algorithms: all-gather and reduce-scatter (W-1)/W of the full tensor, all-reduce 2(W-1)/W,
all-to-all what goes to other ranks, gather/scatter what the non-root/root sends; averaged over ranks.
The ZeRO-1 AdamW baseline is FSDP with parameters kept gathered through the step (reshard_after_forward=False:
one parameter all-gather + one gradient reduce-scatter per step, exactly ZeRO-1/2's traffic) and
torch.optim.AdamW on the shards (no optimizer traffic). MuonClip runs on the same FSDP layout and adds its
Newton-Schulz exchange (owner-computes gather/scatter of the momentum-updated matrices) and the QK-Clip max-logit
all-reduce. Moonlight reports MuonClip-style distributed Muon at (1, 1.25]x ZeRO-1 AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openk2.parallel import CollectiveCounter

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Byte counting
# ----------------------------------------------------------------------------------------------------------------


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class CollectiveBytes(CollectiveCounter):
    """openk2's collective counter, accounting the bytes this rank *sends* per c10d collective kind (by_kind)."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.by_kind: dict[str, float] = {}
        self.enabled = True

    def _group(self, pg) -> tuple[int, int]:
        try:
            return int(pg.size()), int(pg.rank())
        except Exception:
            return self.world, -1

    def _add(self, kind: str, value: float) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0.0) + value

    def _count(self, name: str, args) -> None:
        if not self.enabled:
            return
        if name == "_allgather_base_":
            w, _ = self._group(args[2])
            self._add("all_gather", _nbytes(args[0]) * (w - 1) / w)
        elif name == "allgather_":
            w, _ = self._group(args[2])
            self._add("all_gather", sum(_nbytes(t) for t in args[1]) * (w - 1))
        elif name == "_reduce_scatter_base_":
            w, _ = self._group(args[2])
            self._add("reduce_scatter", _nbytes(args[1]) * (w - 1) / w)
        elif name == "allreduce_":
            w, _ = self._group(args[1])
            self._add("all_reduce", sum(_nbytes(t) for t in args[0]) * 2 * (w - 1) / w)
        elif name == "alltoall_base_":
            w, r = self._group(args[2])
            x, in_splits = args[1], list(args[4])
            row = _nbytes(x) / max(x.shape[0], 1) if x.dim() else _nbytes(x)
            own = in_splits[r] * row if in_splits and r >= 0 else _nbytes(x) / w
            self._add("all_to_all", _nbytes(x) - own)
        elif name == "gather_":
            w, r = self._group(args[2])
            if r != int(args[3]):
                self._add("gather", sum(_nbytes(t) for t in args[1]))
        elif name == "scatter_":
            w, r = self._group(args[2])
            if r == int(args[3]) and args[1]:
                self._add("scatter", sum(_nbytes(t) for t in args[1][0]) * (w - 1) / w)
        elif name == "broadcast_":
            w, r = self._group(args[1])
            if r == int(args[2]):
                self._add("broadcast", sum(_nbytes(t) for t in args[0]))
        elif name not in ("barrier", "monitored_barrier"):
            self._add(f"other:{name}", 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Worker (1 process, or one rank under torchrun)
# ----------------------------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from openk2 import parallel
    from openk2.config import K2Config
    from openk2.model import K2ForCausalLM
    from openk2.optim import MuonClip

    torch.set_num_threads(1)
    ctx = parallel.init_distributed(ep=args.ep)
    torch.manual_seed(0)
    config = K2Config.preset(args.preset)
    model = K2ForCausalLM(config)
    parallel.parallelize(model, ctx, reshard_after_forward=not args.zero1_layout)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    else:
        optimizer = MuonClip(model, lr=1e-3, weight_decay=0.1, qk_clip_tau=100.0)
    counter = CollectiveBytes(ctx.world_size)
    generator = torch.Generator().manual_seed(ctx.rank)
    times, fwd_bwd_bytes, opt_bytes = [], [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        counter.by_kind = {}
        t0 = time.perf_counter()
        with counter:
            loss = model(ids, labels=ids).loss
            loss.backward()
            after_backward = dict(counter.by_kind)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counter.enabled = False
        parallel.sync_router_load(model, ctx)
        model.update_router_bias(1e-3)
        counter.enabled = True
        ctx.barrier()
        elapsed = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(elapsed)
            fwd_bwd_bytes.append(sum(after_backward.values()))
            opt_bytes.append(sum(counter.by_kind.values()) - sum(after_backward.values()))
    kinds = {k: v for k, v in counter.by_kind.items()}
    summary = torch.tensor([statistics.median(times), statistics.mean(fwd_bwd_bytes), statistics.mean(opt_bytes)],
                           dtype=torch.float64)
    if ctx.is_distributed:
        dist.all_reduce(summary)
        summary /= ctx.world_size
    step_s, model_bytes, optim_bytes = summary.tolist()
    if ctx.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        Path(args.result).write_text(json.dumps({
            "world": ctx.world_size, "ep": ctx.ep_size, "optimizer": args.optimizer, "step_s": step_s,
            "tokens_per_s_per_process": args.batch_size * args.seq_len / step_s,
            "fwd_bwd_bytes": model_bytes, "optimizer_bytes": optim_bytes, "params": n_params,
            "last_step_by_kind": kinds,
        }))
    ctx.destroy()


# ----------------------------------------------------------------------------------------------------------------
# Orchestrator
# ----------------------------------------------------------------------------------------------------------------


def _run(nproc: int, worker_args: list[str], result: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, __file__, "--worker", "--result", str(result), *worker_args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               __file__, "--worker", "--result", str(result), *worker_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"bench_parallel: {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset, few steps (sanity run)")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="per process")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    # worker-only flags
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default="muonclip", help=argparse.SUPPRESS)
    ap.add_argument("--zero1-layout", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "small")
    args.batch_size = args.batch_size or (2 if args.quick else 4)
    args.seq_len = args.seq_len or (64 if args.quick else 256)
    args.steps = args.steps or (3 if args.quick else 8)
    if args.worker:
        worker(args)
        return 0

    base = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = {
            "1 process": _run(1, base, tmp / "a.json"),
            "2 proc DP (FSDP2)": _run(2, base, tmp / "b.json"),
            "2 proc EP=2 + FSDP2": _run(2, [*base, "--ep", "2"], tmp / "c.json"),
        }
        comm = {
            "AdamW, ZeRO-1 layout": _run(2, [*base, "--optimizer", "adamw", "--zero1-layout"], tmp / "d.json"),
            "MuonClip, ZeRO-1 layout": _run(2, [*base, "--zero1-layout"], tmp / "e.json"),
            "MuonClip, FSDP (reshard)": _run(2, base, tmp / "f.json"),
        }
    print(f"\nbench_parallel: preset {args.preset}, per-process batch {args.batch_size} x {args.seq_len} tokens, "
          f"gloo on CPU, 1 thread per process, median of {args.steps} steps\n")
    anchor = rows["1 process"]["tokens_per_s_per_process"]
    print(f"{'run':<24}{'step s':>9}{'tok/s/proc':>12}{'vs 1 proc':>11}{'tok/s total':>13}")
    for name, r in rows.items():
        tps = r["tokens_per_s_per_process"]
        print(f"{name:<24}{r['step_s']:>9.3f}{tps:>12.0f}{tps / anchor:>10.2f}x{tps * r['world']:>13.0f}")
    comm["MuonClip, EP=2 + FSDP"] = rows["2 proc EP=2 + FSDP2"]  # all-to-all tokens instead of sharded experts
    print("\nbytes sent per rank per step (2 processes; pure DP unless EP says otherwise)")
    baseline = comm["AdamW, ZeRO-1 layout"]
    base_total = baseline["fwd_bwd_bytes"] + baseline["optimizer_bytes"]
    print(f"{'run':<26}{'fwd+bwd MB':>11}{'optimizer MB':>14}{'total MB':>10}{'vs ZeRO-1 AdamW':>17}")
    for name, r in comm.items():
        total = r["fwd_bwd_bytes"] + r["optimizer_bytes"]
        print(f"{name:<26}{r['fwd_bwd_bytes'] / 1e6:>11.2f}{r['optimizer_bytes'] / 1e6:>14.2f}{total / 1e6:>10.2f}"
              f"{total / base_total:>16.3f}x")
    print(f"(params: {baseline['params'] / 1e6:.2f}M; Moonlight reports distributed Muon at <= 1.25x ZeRO-1 AdamW)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
