"""SFT: chat records → assistant-masked packed windows, bad-line reporting, and `openk2 sft` end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openk2 import toolworld
from openk2.sft import IGNORE, SFTBatches, encode_records, pack, read_chat_jsonl
from openk2.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    from openk2.chat import render_chat

    recs = [t.to_record() for t in toolworld.make_tasks("train", 200)]
    return train_tokenizer((render_chat(r["messages"], r["tools"]) for r in recs), 1024)


def test_labels_are_the_assistant_tokens_only(tokenizer):
    from openk2.chat import encode_chat

    rec = toolworld.make_tasks("train", 1)[0].to_record()
    (ids, labels), = encode_records([rec], tokenizer)[0]
    enc = encode_chat(tokenizer, rec["messages"], rec["tools"])
    assert ids == list(enc.ids)
    kept = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert kept and len(kept) < len(ids)
    text = tokenizer.decode(kept)
    # the tool call and the final answer are trained on; the question and the tool result are not
    assert "calculate" in text or "get_fact" in text
    assert rec["messages"][4]["content"] in text
    assert rec["messages"][1]["content"] not in text


def test_pack_keeps_chats_whole_and_drops_overlong():
    examples = [([1] * 5, [1] * 5), ([2] * 4, [IGNORE, 2, 2, 2]), ([3] * 20, [3] * 20), ([4] * 3, [4] * 3)]
    ids, labels, dropped = pack(examples, seq_len=10, pad_id=0)
    assert dropped == 1
    assert ids.tolist() == [[1] * 5 + [2] * 4 + [0], [4, 4, 4] + [0] * 7]
    assert labels[0].tolist() == [1] * 5 + [IGNORE, 2, 2, 2, IGNORE]
    assert (labels[1, 3:] == IGNORE).all()


def test_sft_batches_resume_exactly():
    ids = torch.arange(40).view(10, 4)
    a = SFTBatches((ids, ids), (ids[:2], ids[:2]), batch_size=3, seed=1)
    for _ in range(4):  # crosses an epoch boundary
        a.next_batch()
    b = SFTBatches((ids, ids), (ids[:2], ids[:2]), batch_size=3, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    with pytest.raises(ValueError, match="windows"):
        SFTBatches((ids[:5], ids[:5]), (ids, ids), batch_size=3, seed=1).load_state_dict(a.state_dict())


def test_bad_jsonl_lines_are_named(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = json.dumps(toolworld.make_tasks("train", 1)[0].to_record())
    path.write_bytes(b"\n".join([good.encode(), b"{not json", b'{"messages": 3}', b"\xff\xfe", good.encode()]))
    records, bad = read_chat_jsonl(path)
    assert len(records) == 2
    assert [b.split(":")[1] for b in bad] == ["2", "3", "4"]
    assert all(str(path) in b for b in bad)


def test_sft_cli_end_to_end(tmp_path):
    """`openk2 sft` on the built-in tool world: trains, checkpoints, and scores held-out tool calls before/after."""
    out = tmp_path / "sft"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "openk2", "sft", "--base", "none", "--preset", "tiny", "--steps", "30",
           "--train-examples", "200", "--eval-examples", "6", "--seq-len", "1024", "--batch-size", "2",
           "--no-progress", "--no-plots", "--out", str(out), "--lr", "3e-3"]
    subprocess.run(cmd, check=True, env=env, timeout=600, capture_output=True)
    report = json.loads((out / "tool_eval.json").read_text())
    assert report["before"]["n"] == report["after"]["n"] == 6
    assert 0.0 <= report["after"]["well_formed"] <= 1.0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first * 0.8, (first, last)
    assert (out / "checkpoints" / "latest").exists()


def test_copy_probe_tells_a_copying_model_from_one_that_cannot():
    """in_context_copying: near-zero loss on the repeat for a model that copies from `length` tokens back, and the
    same loss on both passes (about ln V) for a freshly initialised model."""
    import math
    from types import SimpleNamespace

    from openk2.config import K2Config
    from openk2.model import K2ForCausalLM
    from openk2.sft import in_context_copying

    vocab, length = 512, 40

    class Copier(torch.nn.Module):  # from the repeat on, predicts the token `length` positions back; uniform before
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))  # the probe reads the device from a parameter

        def forward(self, ids):
            logits = torch.zeros(*ids.shape, vocab)
            logits[:, length - 1:2 * length - 1].scatter_(-1, ids[:, :length, None], 30.0)
            return SimpleNamespace(logits=logits)

    copy = in_context_copying(Copier(), vocab, length=length)
    assert copy["repeat_loss"] < 0.01 and abs(copy["first_pass_loss"] - math.log(vocab)) < 0.01
    fresh = in_context_copying(K2ForCausalLM(K2Config.preset("tiny")), vocab, length=length)
    assert abs(fresh["repeat_loss"] - fresh["first_pass_loss"]) < 0.3 < fresh["first_pass_loss"] - 5
