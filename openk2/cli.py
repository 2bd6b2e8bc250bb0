"""`openk2 <stage> ...`: one entry point per pipeline stage. Each stage module owns its own argparse."""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "prepare": ("openk2.data", "main", "tokenize a corpus into uint32 shards"),
    "pretrain": ("openk2.train", "main_pretrain", "pre-train a K2-architecture model with MuonClip"),
    "sft": ("openk2.sft", "main", "supervised fine-tuning on chats with tool calls"),
    "sample": ("openk2.engine", "main_sample", "print a completion from a checkpoint"),
    "chat": ("openk2.engine", "main_chat", "interactive terminal chat with a checkpoint"),
    "serve": ("openk2.serve", "main", "OpenAI-compatible HTTP server"),
    "plot": ("openk2.plots", "main", "write PNG plots for a run directory"),
    "plan": ("openk2.plan", "main", "memory / step-time planner for the K2 shape on N GPUs"),
    "convert": ("openk2.checkpoint", "main", "convert checkpoints (block-FP8 <-> bf16)"),
    "consolidate": ("openk2.parallel", "main_consolidate", "distributed checkpoint -> one HF-layout checkpoint"),
    "info": ("openk2.config", "main", "show a preset or config.json and its parameter counts"),
}


def _usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: openk2 <stage> [args]   (openk2 <stage> --help for details)", "", "stages:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"openk2: unknown stage {stage!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = STAGES[stage]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
