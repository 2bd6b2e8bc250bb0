"""Model benchmarks: openk2 K2ForCausalLM vs transformers' DeepseekV3ForCausalLM, same config, same weights,
same process (issue 2).

1. Train step (forward + backward + AdamW) tokens/s, fp32 and bf16 autocast, at `tiny` and `small`
   (small: 2048 tokens per step, batch 4 x 512). MFU = model FLOPs/s / measured matmul peak of the same dtype in
   this run, with model FLOPs per token = openk2.config.flops_per_token(cfg, seq_len)
   = 6 * (active matmul parameters) + 6 * L * heads * (qk_head_dim + v_head_dim) * seq_len / 2.
2. Decode tokens/s at a 1024-token context, batch 1 and 8: our absorbed latent cache vs transformers `generate`
   (greedy, its default cache). Only the decode steps are timed: ours after a per-row prefill, under
   inference_mode as the engine runs it; theirs from per-step timestamps after its prefill. Median of interleaved
   rounds (ours, theirs, ours, ...).
3. KV-cache bytes per token: latent c_kv + k_rope vs a per-head K/V cache, for `small` and `k2` (bf16).

    python benchmarks/bench_model.py            # full (minutes; run on a quiet machine)
    python benchmarks/bench_model.py --quick    # sanity run
    python benchmarks/bench_model.py --threads 1 --clock cpu   # on a loaded machine: CPU time, 1 thread
    python benchmarks/bench_model.py --decode-only [--rounds 5]  # decode rows only, interleaved rounds

Goals (issue 2, at small): fp32 >= 1.1x, bf16 >= 2x transformers and >= 40 % of the bf16 matmul peak;
decode >= 3x at batch 1 and >= 2x at batch 8.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from openk2.config import K2Config, flops_per_token
from openk2.model import K2ForCausalLM

# Wall time by default; `--clock cpu` uses this process's CPU time, which a loaded shared machine distorts far
# less (use it with --threads 1: with several threads CPU time also counts spin-waiting).
clock = time.perf_counter


def matmul_peak(dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best-of FLOP/s of a square matmul in `dtype` (the MFU denominator)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        torch.mm(a, b)
        best = min(best, clock() - start)
    return 2 * size**3 / best


def paired_models(cfg: K2Config):
    """Ours and transformers' model holding the same weights (transformers' random init, copied to ours)."""
    import transformers
    from transformers.core_model_loading import revert_weight_conversion

    from openk2.checkpoint import load_hf_state_dict

    fields = {k: v for k, v in cfg.to_dict().items() if k != "model_type"}
    hf_config = transformers.DeepseekV3Config(**fields, num_mtp_layers=0)
    hf_config._attn_implementation = "sdpa"
    theirs = transformers.DeepseekV3ForCausalLM(hf_config)
    ours = K2ForCausalLM(cfg)
    load_hf_state_dict(ours, revert_weight_conversion(theirs, theirs.state_dict()))
    return ours, theirs


def make_train_step(model, ids, labels, autocast_dtype):
    """A closure running one train step (forward + backward + AdamW step) and returning its seconds."""
    # same optimizer for both models; fused is torch's fastest AdamW on CPU (6x the foreach one here) and CUDA
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> float:
        model.train()
        ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        start = clock()
        with ctx:
            loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return clock() - start

    return step


def bench_train(name: str, cfg: K2Config, batch: int, seq: int, steps: int, warmup: int, peaks: dict) -> list:
    rows = []
    ours, theirs = paired_models(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    tokens = batch * seq
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        # alternate the two models step by step so machine load hits both alike; median of each
        step_ours, step_theirs = make_train_step(ours, ids, ids, dtype), make_train_step(theirs, ids, ids, dtype)
        times_ours, times_theirs = [], []
        for i in range(warmup + steps):
            t_o, t_t = step_ours(), step_theirs()
            if i >= warmup:
                times_ours.append(t_o)
                times_theirs.append(t_t)
        t_ours, t_theirs = statistics.median(times_ours), statistics.median(times_theirs)
        flops = flops_per_token(cfg, seq) * tokens
        peak = peaks[label]
        rows.append((f"train {name} {label} ({tokens} tok/step)", tokens / t_ours, tokens / t_theirs,
                     f"MFU ours {100 * flops / t_ours / peak:.0f}% / hf {100 * flops / t_theirs / peak:.0f}%"))
    return rows


def bench_decode(cfg: K2Config, batch: int, context: int, new_tokens: int, rounds: int = 1) -> tuple:
    """Decode tokens/s, ours vs transformers, median over `rounds` interleaved rounds (ours, theirs, ours, ...)."""
    ours, theirs = paired_models(cfg)
    ours.eval()
    theirs.eval()
    prompts = torch.randint(0, cfg.vocab_size, (batch, context))

    # ours runs as the engine runs it: inference mode, one prefill per request, then all rows decode together
    with torch.inference_mode():
        cache = ours.init_cache(batch, context + new_tokens + 1)
        for row in range(batch):
            ours(prompts[row : row + 1], cache=cache, cache_rows=torch.tensor([row]))
        prefilled = cache.lengths.clone()
        ours(prompts[:, -1:], cache=cache)  # warm-up step (builds the decode weight layout)

    def decode_ours() -> float:
        with torch.inference_mode():
            cache.lengths.copy_(prefilled)  # rewind: every round decodes the same positions
            token = prompts[:, -1:]
            start = clock()
            for _ in range(new_tokens):
                logits = ours(token, cache=cache).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
            return clock() - start

    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):  # generate calls this once per generated token: a timestamp per step
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(clock())
            return scores

    def generate(n: int) -> StepClock:
        step_clock = StepClock()
        theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=cfg.pad_token_id,
                        logits_processor=LogitsProcessorList([step_clock]))
        return step_clock

    def decode_theirs() -> float:
        stamps = generate(1 + new_tokens).stamps
        return stamps[-1] - stamps[0]  # new_tokens decode steps after the prefill

    generate(2)  # warm-up
    times_ours, times_theirs = [], []
    for _ in range(rounds):
        times_ours.append(decode_ours())
        times_theirs.append(decode_theirs())
    tokens = batch * new_tokens
    return (f"decode small batch {batch} @ {context} ctx", tokens / statistics.median(times_ours),
            tokens / statistics.median(times_theirs), f"{new_tokens} steps, median of {rounds} rounds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, short decode: a sanity run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--decode-only", action="store_true",
                        help="only the decode comparison (1024-token context, 32 new tokens; 128 and 4 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved decode rounds (default 5, quick 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    from rich.console import Console
    from rich.table import Table

    quick = args.quick
    steps, warmup = (1, 1) if quick else (8, 2)
    rows, peaks = [], {}
    if not args.decode_only:
        peaks = {
            "fp32": matmul_peak(torch.float32, 1024 if quick else 2048, 3 if quick else 10),
            "bf16": matmul_peak(torch.bfloat16, 1024 if quick else 2048, 3 if quick else 10),
        }
        rows += bench_train("tiny", K2Config.preset("tiny"), 4, 64, steps, warmup, peaks)
        small_batch, small_seq = (1, 256) if quick else (4, 512)
        rows += bench_train("small", K2Config.preset("small"), small_batch, small_seq, steps, warmup, peaks)
    context, new_tokens = (128, 4) if quick else (1024, 32)
    rounds = args.rounds or (1 if quick else 5)
    small = K2Config.preset("small")
    for batch in (1, 8):
        rows.append(bench_decode(small, batch, context, new_tokens, rounds))

    table = Table(title=f"openk2 model vs transformers DeepseekV3 ({torch.get_num_threads()} threads, {args.clock} "
                        f"clock{', QUICK' if quick else ''})")
    for col in ("benchmark", "ours tok/s", "transformers tok/s", "ratio", "note"):
        table.add_column(col, justify="right" if "tok" in col or col == "ratio" else "left")
    for label, ours, theirs, note in rows:
        table.add_row(label, f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / theirs:.2f}x", note)
    console = Console()
    console.print(table)
    if peaks:
        console.print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")

    kv = Table(title="decode KV cache bytes per token (bf16, all layers)")
    for col in ("config", "absorbed latent (c_kv + k_rope)", "per-head K/V", "ratio"):
        kv.add_column(col)
    for name in ("small", "k2"):
        cfg = K2Config.preset(name)
        latent, per_head = cfg.kv_cache_bytes_per_token(), cfg.kv_cache_bytes_per_token(absorbed=False)
        kv.add_row(name, f"{latent:,}", f"{per_head:,}", f"{per_head / latent:.1f}x smaller")
    console.print(kv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
