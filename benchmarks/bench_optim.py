"""Optimizer benchmarks (issue 3): step time of AdamW, torch.optim.Muon and openk2 MuonClip on the `small` model,
Newton-Schulz head to head, and the optimizer's share of a full training step.

1. Optimizer step (gradients fixed, random): AdamW on everything; torch.optim.Muon on the 2-D hidden matrices
   (embeddings, head, router excluded; NS in bf16; adjust_lr_fn="match_rms_adamw") + AdamW for the rest,
   including the 3-D expert stacks it rejects; ours = MuonClip (Muon on 2-D matrices *and* expert stacks, AdamW
   for the rest), without and with QK-Clip (every head above tau every step, the worst case).
   Issue anchors (2 cores): AdamW ~34 ms, torch Muon ~84 ms.
2. Newton-Schulz only, same inputs: the 2-D matrices (torch's `_zeropower_via_newtonschulz` one by one vs ours,
   batched by shape); the expert stacks of the `small` preset whatever --preset says (15 stacks, 240 matrices
   192x384; a naive batched bf16 NS per stack written the usual way, X@X^T then b*A + c*A@A then a*X + B@X,
   and torch's 2-D NS looped over experts, vs ours with the standard iteration (what the optimizer runs) and
   the opt-in Gram NS (fewer FLOPs, but not safe on low-rank momentum: docs/muonclip.md), at least 7
   interleaved rounds, with FLOP counts and GFLOP/s.
   Goals: ours not slower than torch's on 2-D; expert stacks >= 1.5x faster than the naive batched NS.
3. Optimizer share of a full step at 16K, 128K and 1M tokens per step, from the measured forward+backward time
   per token (bf16 autocast) and the measured MuonClip step: share = t_opt / (t_opt + tokens * t_token).
   Goal: <= 5 % at 1M.

Timings interleave the contenders round by round and report medians, so a noisy machine biases none of them.

    python benchmarks/bench_optim.py            # full (a minute or two; run on a quiet machine)
    python benchmarks/bench_optim.py --quick    # sanity run on the tiny preset (seconds)
    python benchmarks/bench_optim.py --threads 1 --clock cpu   # on a shared, loaded machine
    python benchmarks/bench_optim.py --ns-only --rounds 15     # the Newton-Schulz comparison alone (focused)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from openk2.config import K2Config
from openk2.model import K2ForCausalLM
from openk2.optim import MuonClip, zeropower_via_newtonschulz
from openk2.optim.muon import MAX_NS_BATCH, NS_COEFFICIENTS, gram_pays, orthogonalize_many
from openk2.perf import measure_matmul_peak

NS_STEPS = 5


def naive_batched_ns(G: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The baseline the issue names: batched bf16 NS with separate ops (no fused scale-add)."""
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def ns_flops(shape: torch.Size, gram: bool, steps: int = NS_STEPS) -> int:
    """Matmul FLOPs of one NS of a matrix [..., A, B] (m = short side, n = long side, 5 steps).
    Standard: per step X X^T (2 m^2 n), A@A (2 m^3), B@X (2 m^2 n). Gram with a restart after 3 steps
    (openk2.optim.muon._gram_newton_schulz): per phase X X^T + Q X (4 m^2 n), and 9 + 5 = 14 m x m products."""
    m, n = min(shape[-2:]), max(shape[-2:])
    if gram:
        return 2 * (4 * m * m * n) + 14 * 2 * m**3
    return steps * (4 * m * m * n + 2 * m**3)


def torch_ns(G: torch.Tensor) -> torch.Tensor:
    from torch.optim._muon import _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(G, NS_COEFFICIENTS, NS_STEPS, 1e-7)


CLOCK = time.perf_counter  # --clock cpu: process CPU time (less disturbed by other jobs on a shared machine)


def race(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each contender, interleaved round by round (one warm-up call each)."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fake_grads(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3


def build_optimizers(cfg: K2Config) -> dict[str, tuple[nn.Module, Callable[[], None]]]:
    """name -> (model, step function); each contender owns a model copy so states don't interact."""
    out = {}
    torch.manual_seed(0)
    base = K2ForCausalLM(cfg)

    def copy_model() -> nn.Module:
        m = K2ForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        fake_grads(m)
        return m

    m = copy_model()
    adamw = torch.optim.AdamW(m.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1)
    out["AdamW (all params)"] = (m, adamw.step)

    m = copy_model()
    rule = MuonClip(m, qk_clip_tau=None)  # just to read the grouping rule
    named = dict(m.named_parameters())
    hidden_2d = [named[n] for n in rule.muon_param_names() if named[n].ndim == 2]
    rest = [p for p in m.parameters() if all(p is not q for q in hidden_2d)]
    t_muon = torch.optim.Muon(hidden_2d, lr=2e-4, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    t_adamw = torch.optim.AdamW(rest, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1)
    out["torch Muon (2-D) + AdamW (rest, incl. experts)"] = (m, lambda: (t_muon.step(), t_adamw.step()))

    m = copy_model()
    ours = MuonClip(m, lr=2e-4, qk_clip_tau=None)
    out["ours MuonClip, no clip (Muon on 2-D + experts)"] = (m, ours.step)

    m = copy_model()
    clipped = MuonClip(m, lr=2e-4, qk_clip_tau=100.0)
    heads = cfg.num_attention_heads

    def step_with_clip() -> None:
        for t in clipped.attention_targets:  # a fresh signal with every head above tau: the clip's worst case
            t.module.max_logits = torch.full((heads,), 150.0)
        clipped.step()

    out["ours MuonClip, QK-Clip on every head"] = (m, step_with_clip)
    return out


def forward_backward_per_token(cfg: K2Config, batch: int, seq: int, rounds: int) -> float:
    torch.manual_seed(0)
    model = K2ForCausalLM(cfg)
    model.set_record_max_logits(True)  # MuonClip training records logits: include its cost
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def fwd_bwd() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return race({"fb": fwd_bwd}, rounds)["fb"] / (batch * seq)


def table(title: str, rows: list[tuple[str, float]], base: str) -> None:
    print(f"\n{title}")
    ref = dict(rows)[base]
    width = max(len(n) for n, _ in rows)
    for name, sec in rows:
        print(f"  {name:<{width}}  {sec * 1e3:9.1f} ms   x{sec / ref:5.2f} of {base.split(' (')[0]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, short forward/backward (sanity run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default=None, help="model preset (default: small; tiny with --quick)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default), or process CPU time for a loaded machine (use with --threads 1)")
    ap.add_argument("--ns-only", action="store_true", help="only the Newton-Schulz comparison (section 2)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10; 2 with --quick)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 10)
    args.preset = args.preset or ("tiny" if args.quick else "small")
    cfg = K2Config.preset(args.preset)
    print(f"bench_optim: preset={args.preset} threads={args.threads} rounds={rounds} clock={args.clock} "
          f"torch={torch.__version__}")

    # 1. optimizer steps
    if not args.ns_only:
        contenders = build_optimizers(cfg)
        steps = race({name: fn for name, (_, fn) in contenders.items()}, rounds)
        table("1. optimizer step (median)", list(steps.items()), "AdamW (all params)")
        model = contenders["ours MuonClip, no clip (Muon on 2-D + experts)"][0]
    else:
        torch.manual_seed(0)
        model = K2ForCausalLM(cfg)

    # 2. Newton-Schulz head to head
    opt_names = MuonClip(model, qk_clip_tau=None).muon_param_names()
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(named[n].shape, generator=g) for n in opt_names if named[n].ndim == 2]
    stack_model = model if args.preset == "small" else K2ForCausalLM(K2Config.preset("small"))
    stack_named = dict(stack_model.named_parameters())
    stack_names = MuonClip(stack_model, qk_clip_tau=None).muon_param_names()
    stacks = [torch.randn(stack_named[n].shape, generator=g) for n in stack_names if stack_named[n].ndim == 3]
    ns2 = race({"torch NS, one matrix at a time": lambda: [torch_ns(x) for x in mats],
                "ours, one matrix at a time": lambda: [zeropower_via_newtonschulz(x) for x in mats],
                "ours, batched by shape": lambda: orthogonalize_many(mats)}, rounds)
    table(f"2a. Newton-Schulz on the {len(mats)} 2-D hidden matrices", list(ns2.items()),
          "torch NS, one matrix at a time")
    n_experts = sum(s.shape[0] for s in stacks)
    naive_name, standard_name, gram_name = ("naive batched bf16 NS per stack",
                                            "ours, standard NS (what MuonClip runs)",
                                            "ours, Gram NS (opt-in, unsafe on low-rank momentum)")
    ns3 = race({naive_name: lambda: [naive_batched_ns(s) for s in stacks],
                "torch NS looped over experts": lambda: [torch_ns(e) for s in stacks for e in s],
                standard_name: lambda: orthogonalize_many(stacks),
                gram_name: lambda: orthogonalize_many(stacks, stack_method="auto")}, max(rounds, 7))
    shapes = sorted({tuple(s.shape) for s in stacks})
    table(f"2b. Newton-Schulz on {len(stacks)} expert stacks of `small` ({n_experts} matrices, {shapes}), "
          f"median of {max(rounds, 7)} rounds", list(ns3.items()), naive_name)
    flops_std = sum(s.shape[0] * ns_flops(s.shape, gram=False) for s in stacks)
    flops_ours = sum(s.shape[0] * ns_flops(s.shape, gram=gram_pays(s.shape)) for s in stacks)
    print(f"  matmul FLOPs: standard {flops_std / 1e9:.1f} G ({flops_std / ns3[naive_name] / 1e9:.0f} GFLOP/s naive, "
          f"{flops_std / ns3[standard_name] / 1e9:.0f} GFLOP/s ours standard); Gram {flops_ours / 1e9:.1f} G "
          f"({flops_ours / ns3[gram_name] / 1e9:.0f} GFLOP/s), {flops_std / flops_ours:.2f}x fewer")
    # what any implementation could reach: its matmul FLOPs at the measured bf16 matmul peak, and at the best rate
    # one batched product of this shape reaches (median, as above; NS is a chain of such products)
    peak = measure_matmul_peak(torch.bfloat16)
    m, n = min(shapes[0][-2:]), max(shapes[0][-2:])
    x = torch.randn(MAX_NS_BATCH, m, n).bfloat16()
    bmm_rate = 2 * MAX_NS_BATCH * m * m * n / race({"bmm": lambda: torch.bmm(x, x.mT)}, 50)["bmm"]
    print(f"  bf16 matmul peak (1024^3) {peak / 1e9:.0f} GFLOP/s; one [{MAX_NS_BATCH}, {m}, {n}] x its transpose "
          f"{bmm_rate / 1e9:.0f} GFLOP/s ({bmm_rate / peak:.0%}). Naive at {flops_std / ns3[naive_name] / peak:.0%} "
          f"of peak, ours standard at {flops_std / ns3[standard_name] / peak:.0%}.\n"
          f"  ceiling vs naive: standard iteration {ns3[naive_name] * bmm_rate / flops_std:.2f}x at that bmm rate "
          f"({ns3[naive_name] * peak / flops_std:.2f}x at peak); Gram {ns3[naive_name] * bmm_rate / flops_ours:.2f}x "
          f"({ns3[naive_name] * peak / flops_ours:.2f}x)")

    naive, ours_3d = ns3[naive_name], ns3[standard_name]
    if args.ns_only:
        print(f"\ngoal: expert stacks ours vs naive batched: {naive / ours_3d:.2f}x faster (goal >= 1.5)  "
              f"{'MET' if naive / ours_3d >= 1.5 else 'NOT MET'}")
        return

    # 3. share of a full step
    batch, seq = (2, 64) if args.quick else (4, 512)
    t_token = forward_backward_per_token(cfg, batch, seq, rounds)
    t_opt = steps["ours MuonClip, QK-Clip on every head"]
    print(f"\n3. optimizer share of a step (forward+backward {t_token * 1e6:.1f} us/token measured at {batch}x{seq}, "
          f"bf16 autocast; MuonClip step {t_opt * 1e3:.1f} ms)")
    for tokens in (16 * 1024, 128 * 1024, 1024 * 1024):
        share = t_opt / (t_opt + tokens * t_token)
        print(f"  {tokens // 1024:>5}K tokens/step: {share * 100:6.2f} %")

    torch_2d, ours_2d = ns2["torch NS, one matrix at a time"], ns2["ours, batched by shape"]
    share_1m = t_opt / (t_opt + 1024 * 1024 * t_token)
    print("\ngoals:")
    print(f"  2-D NS ours vs torch: {torch_2d / ours_2d:.2f}x faster (goal >= 1.0)  "
          f"{'MET' if ours_2d <= torch_2d else 'NOT MET'}")
    print(f"  expert stacks ours vs naive batched: {naive / ours_3d:.2f}x faster (goal >= 1.5)  "
          f"{'MET' if naive / ours_3d >= 1.5 else 'NOT MET'}")
    print(f"  optimizer share at 1M tokens: {share_1m * 100:.2f} % (goal <= 5 %)  "
          f"{'MET' if share_1m <= 0.05 else 'NOT MET'}")


if __name__ == "__main__":
    main()
