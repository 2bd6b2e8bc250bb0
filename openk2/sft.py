"""`openk2 sft`: supervised fine-tuning on chats with tool calls (K2 chat format), Muon by default.

Loss is on assistant tokens only (the chat encoder's mask); chats are packed into fixed-length windows; the loop,
telemetry and checkpoints are the pre-training ones (`openk2.train.Trainer`). With no --data it trains on the
built-in tool-use world (`openk2.toolworld`) and scores well-formed and correct tool calls on held-out prompts
before and after, written to RUN_DIR/tool_eval.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

from openk2 import toolworld
from openk2.train import (TrainConfig, Trainer, TrainingStopped, _log, add_train_arguments, pick_device,
                          resolve_config)

IGNORE = -100


# ----------------------------------------------------------------------------------------------------------------
# Chat records → packed windows


def read_chat_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Records with `messages` (and optional `tools`); bad lines are reported with file:line and skipped."""
    records, bad = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                bad.append(f"{path}:{lineno}: not a UTF-8 JSON object ({e})")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
                bad.append(f"{path}:{lineno}: expected an object with a 'messages' list")
                continue
            rec["_where"] = f"{path}:{lineno}"
            records.append(rec)
    return records, bad


def encode_records(records: list[dict[str, Any]], tokenizer) -> tuple[list[tuple[list[int], list[int]]], list[str]]:
    """Each chat → (ids, labels) with labels = ids on assistant tokens and IGNORE elsewhere."""
    from openk2.chat import encode_chat

    out, bad = [], []
    for rec in records:
        try:
            enc = encode_chat(tokenizer, rec["messages"], rec.get("tools"))
        except (ValueError, KeyError, TypeError) as e:
            bad.append(f"{rec.get('_where', '?')}: {e}")
            continue
        labels = [t if m else IGNORE for t, m in zip(enc.ids, enc.assistant_mask)]
        out.append((list(enc.ids), labels))
    return out, bad


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int
         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Greedy packing of whole chats, in order, into windows of `seq_len`; returns (ids, labels, n_dropped).

    A chat longer than a window is dropped (and counted) rather than cut: cutting keeps the prompt and loses the
    assistant turns the loss is about. Packed chats share a window without a cross-chat attention mask (the
    usual packing trade-off; each chat starts with its own system turn, and only assistant tokens are scored).
    """
    windows: list[tuple[list[int], list[int]]] = []
    dropped = 0
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    for ids, labels in examples:
        if len(ids) > seq_len:
            dropped += 1
            continue
        if len(cur_ids) + len(ids) > seq_len:
            windows.append((cur_ids, cur_labels))
            cur_ids, cur_labels = [], []
        cur_ids += ids
        cur_labels += labels
    if cur_ids:
        windows.append((cur_ids, cur_labels))
    ids_t = torch.full((len(windows), seq_len), pad_id, dtype=torch.long)
    labels_t = torch.full((len(windows), seq_len), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(windows):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        labels_t[i, : len(labels)] = torch.tensor(labels)
    return ids_t, labels_t, dropped


class SFTBatches:
    """Packed windows, reshuffled each epoch from (seed, epoch); the position is exact for resume."""

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 batch_size: int, seed: int):
        if len(train[0]) < batch_size:
            raise ValueError(f"only {len(train[0])} packed training windows for batch size {batch_size}; "
                             "add data or lower --batch-size / --seq-len")
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.train[0]), generator=g)

    def next_batch(self):
        if self.index + self.batch_size > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        rows = self._order[self.index: self.index + self.batch_size]
        self.index += self.batch_size
        return self.train[0][rows], self.train[1][rows]

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "windows": len(self.train[0])}

    def load_state_dict(self, state):
        if state["windows"] != len(self.train[0]):
            raise ValueError(f"resume: the data packs into {len(self.train[0])} windows, the checkpoint was made "
                             f"with {state['windows']}; resume with the same data, --seq-len and tokenizer")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()

    def val_batches(self):
        ids, labels = self.val
        for i in range(0, len(ids), self.batch_size):
            yield ids[i: i + self.batch_size], labels[i: i + self.batch_size]


# ----------------------------------------------------------------------------------------------------------------
# Tool-call evaluation on held-out prompts


@torch.no_grad()
def evaluate_tool_calls(model, tokenizer, tasks: list[toolworld.ToolTask], *, max_tokens: int = 64,
                        batch_size: int = 16) -> dict[str, Any]:
    """Greedy first assistant turn for each held-out question; share of well-formed and correct tool calls."""
    from openk2.chat import encode_chat, parse_generated
    from openk2.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    prompts = [encode_chat(tokenizer, t.messages(with_answer=False), toolworld.TOOLS,
                           add_generation_prompt=True).ids for t in tasks]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    completions = engine.generate([list(p) for p in prompts], params)
    well, right_tool, correct, examples = 0, 0, 0, []
    for task, comp in zip(tasks, completions):
        parsed = parse_generated(tokenizer, comp.token_ids, comp.text, toolworld.TOOLS)  # only real markers count
        calls = [_call_dict(c) for c in parsed.tool_calls]
        score = toolworld.score_tool_call(task, calls, parsed.errors)
        well += score.well_formed
        right_tool += score.right_tool
        correct += score.correct
        if len(examples) < 4:
            examples.append({"question": task.question, "output": comp.text, "well_formed": score.well_formed,
                             "correct": score.correct})
    n = max(len(tasks), 1)
    return {"n": len(tasks), "well_formed": well / n, "right_tool": right_tool / n, "correct": correct / n,
            "examples": examples}


@torch.no_grad()
def in_context_copying(model, base_vocab_size: int, *, rows: int = 8, length: int = 40, seed: int = 0
                       ) -> dict[str, float]:
    """Mean next-token loss on random ordinary-token sequences, on the first pass and on an exact repeat of them.

    A model with induction heads predicts the repeat almost perfectly (loss near 0); one without scores both
    passes alike (about ln(vocab)). Copying a call's arguments (numbers, names) from the question needs this
    ability, so a base without it learns the call format in SFT but not the values."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, base_vocab_size, (rows, length), generator=g)
    ids = torch.cat([first, first], dim=1).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    logits = model(ids).logits.float()
    model.train(was_training)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return {"first_pass_loss": float(nll[:, : length - 1].mean()), "repeat_loss": float(nll[:, length:].mean())}


def _copy_line(r: dict[str, float]) -> str:
    return (f"in-context copying: loss on random tokens {r['first_pass_loss']:.2f}, on their exact repeat "
            f"{r['repeat_loss']:.2f}" + ("" if r["repeat_loss"] < 0.5 * r["first_pass_loss"] else
                                         " (the model does not copy from its context: it can learn the call format "
                                         "but not copy argument values; a longer-trained base can)"))


def _score_line(r: dict[str, Any]) -> str:
    return f"well-formed {r['well_formed']:.1%}, right tool {r['right_tool']:.1%}, correct {r['correct']:.1%}"


def _call_dict(call) -> dict[str, Any]:
    if isinstance(call, dict):
        return call
    return {"name": getattr(call, "name", None), "arguments": getattr(call, "arguments", None)}


# ----------------------------------------------------------------------------------------------------------------
# `openk2 sft`


def _load_base(base: str | None, cfg: TrainConfig, device: torch.device, records: list[dict]):
    """The base model and tokenizer: a checkpoint / run dir, or (--base none) a fresh model of --preset."""
    from openk2.tokenizer import K2Tokenizer

    if base and base.lower() != "none":
        from openk2.checkpoint import load_pretrained, resolve_checkpoint_dir

        ckpt = resolve_checkpoint_dir(base)
        model = load_pretrained(ckpt, dtype=torch.float32, device=device)
        tokenizer = K2Tokenizer.load(ckpt)
        return model, tokenizer, str(ckpt)
    from openk2.config import K2Config
    from openk2.model import K2ForCausalLM
    from openk2.tokenizer import train_tokenizer
    from openk2.chat import render_chat

    model_cfg = K2Config.from_json(cfg.model_config) if cfg.model_config else K2Config.preset(cfg.preset)
    torch.manual_seed(cfg.seed)
    model = K2ForCausalLM(model_cfg).to(device)
    tok_dir = Path(cfg.out) / "tokenizer"
    if (tok_dir / "tokenizer_config.json").exists():
        tokenizer = K2Tokenizer.load(tok_dir)
    else:  # a fresh model needs a tokenizer: train one on the chats themselves
        texts = (render_chat(r["messages"], r.get("tools")) for r in records)
        tokenizer = train_tokenizer(texts, model_cfg.vocab_size)
        tokenizer.save(tok_dir)
    return model, tokenizer, f"random init ({cfg.preset})"


def run_sft(cfg: TrainConfig, *, base: str | None, data: str | None, n_train: int, n_eval: int,
            eval_tool_calls: bool = True) -> dict[str, Any]:
    device = pick_device(cfg.device)
    run_dir = Path(cfg.out)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    if data:
        records, bad = read_chat_jsonl(Path(data))
        val_records = records[: max(1, len(records) // 50)]
        records = records[len(val_records):]
        eval_tasks: list[toolworld.ToolTask] = []
    else:  # the built-in tool world; the files are written so the run can be inspected and reproduced
        records = [t.to_record() for t in toolworld.make_tasks("train", n_train, seed=cfg.seed)]
        eval_tasks = toolworld.make_tasks("heldout", n_eval, seed=cfg.seed)
        val_records = [t.to_record() for t in eval_tasks]
        bad = []
        for name, recs in (("train.jsonl", records), ("heldout.jsonl", val_records)):
            with open(run_dir / "data" / name, "w") as f:
                f.writelines(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n" for r in recs)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tokenizer, base_desc = _load_base(base, cfg, device, records)
    train_ex, bad_enc = encode_records(records, tokenizer)
    val_ex, bad_val = encode_records(val_records, tokenizer)
    bad += bad_enc + bad_val
    if bad:
        _log(f"{len(bad)} bad record(s) skipped; first ones:\n  " + "\n  ".join(bad[:10]))
    if not train_ex:
        raise SystemExit("openk2 sft: no usable training chats")
    pad = tokenizer.eos_id
    train_packed = pack(train_ex, cfg.seq_len, pad)
    val_packed = pack(val_ex, cfg.seq_len, pad)
    longest = max(len(ids) for ids, _ in train_ex)
    if train_packed[2] == len(train_ex):
        raise SystemExit(f"openk2 sft: every chat is longer than --seq-len {cfg.seq_len} (longest {longest} "
                         "tokens); raise --seq-len")
    if train_packed[2] or val_packed[2]:
        _log(f"{train_packed[2] + val_packed[2]} chat(s) longer than --seq-len {cfg.seq_len} were left out "
             f"(longest {longest} tokens)")
    batches = SFTBatches(train_packed[:2], val_packed[:2], cfg.batch_size, cfg.seed)
    _log(f"SFT from {base_desc}: {len(train_ex)} chats → {len(train_packed[0])} windows of {cfg.seq_len} tokens")

    report: dict[str, Any] = {"base": base_desc}
    if eval_tool_calls and eval_tasks and not cfg.resume:
        report["before"] = evaluate_tool_calls(model, tokenizer, eval_tasks)
        report["before"]["copying"] = in_context_copying(model, tokenizer.base_vocab_size)
        _log(f"held-out tool calls before SFT: {_score_line(report['before'])}; "
             f"{_copy_line(report['before']['copying'])}")
    trainer = Trainer(cfg, model, batches, tokenizer=tokenizer, stage="sft")
    report["train"] = trainer.fit()
    if eval_tool_calls and eval_tasks:
        report["after"] = evaluate_tool_calls(model, tokenizer, eval_tasks)
        report["after"]["copying"] = in_context_copying(model, tokenizer.base_vocab_size)
        _log(f"held-out tool calls after SFT: {_score_line(report['after'])}; {_copy_line(report['after']['copying'])}")
        (run_dir / "tool_eval.json").write_text(json.dumps(report, indent=2))
    return report


SFT_DEFAULTS = TrainConfig(out="runs/sft", steps=120, batch_size=8, seq_len=512, lr=1e-3, warmup_steps=10,
                           decay_fraction=0.3, val_every=40, ckpt_every=60, detail_every=20)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="openk2 sft", description="Supervised fine-tuning on chats with tool calls. "
                                "With no --data: the built-in tool-use world, scored before and after.")
    p.add_argument("--base", default="runs/pretrain",
                   help="base checkpoint: HF dir or RUN_DIR (default runs/pretrain); 'none' = random init")
    p.add_argument("--train-examples", type=int, default=3000, help="built-in data: training chats")
    p.add_argument("--eval-examples", type=int, default=100, help="built-in data: held-out prompts")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after tool-call evaluation")
    add_train_arguments(p, SFT_DEFAULTS)
    args = p.parse_args(argv)
    extra = {k: getattr(args, k) for k in ("base", "train_examples", "eval_examples", "no_eval")}
    for k in extra:
        delattr(args, k)
    data = getattr(args, "data", None)
    if data is not None:
        if len(data) != 1:
            p.error("--data takes one chats JSONL file")
        args.data = []
    cfg = resolve_config(args, SFT_DEFAULTS)
    if extra["base"].lower() != "none" and not Path(extra["base"]).exists():
        print(f"openk2 sft: base checkpoint {extra['base']} not found. Run `openk2 pretrain` first, pass "
              "--base HF_DIR_OR_RUN_DIR, or --base none to fine-tune a freshly initialised --preset.", file=sys.stderr)
        return 2
    try:
        run_sft(cfg, base=extra["base"], data=data[0] if data else None, n_train=extra["train_examples"],
                n_eval=extra["eval_examples"], eval_tool_calls=not extra["no_eval"])
    except TrainingStopped as e:
        _log(str(e))
        return 1
    return 0
