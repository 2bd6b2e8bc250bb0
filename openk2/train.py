"""The training loop shared by pre-training and SFT.

One `Trainer` owns: the step (grad accumulation, bf16 autocast, clipping, NaN/inf skipping), the optimizer
(MuonClip or AdamW) and the WSD schedule, telemetry (`metrics.jsonl`, a progress bar, plots), the loss-spike
detector, and atomic checkpoints that resume bit-identically. Data comes from any *batch source* with
`next_batch() -> (input_ids, labels)`, `state_dict()`, `load_state_dict()` and `val_batches()`.

Run directory layout:
    RUN_DIR/train_config.json        the resolved TrainConfig
    RUN_DIR/metrics.jsonl            one JSON object per step (+ val_loss on validation steps, + mtp_loss when
                                     the model has multi-token-prediction modules)
    RUN_DIR/checkpoints/step_NNNNNN/ HF-layout model + tokenizer + trainer_state.pt (optimizer, data, RNG, ...)
    RUN_DIR/checkpoints/latest       names the newest complete checkpoint (written last, atomically)
    RUN_DIR/plots/*.png
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from openk2.checkpoint import LATEST_POINTER as LATEST  # the one name of the `latest` pointer file
from openk2.fileio import atomic_write

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything a run needs; saved as RUN_DIR/train_config.json and overridable from the CLI or --config FILE."""

    # model
    preset: str = "small"
    model_config: str | None = None  # a config.json path; overrides the preset
    init_from: str | None = None  # start from these weights (HF dir or RUN_DIR) instead of random init
    mtp_layers: int | None = None  # multi-token-prediction modules to train (None: as the model config says)
    mtp_loss_weight: float | None = None  # weight of the mean MTP loss (None: the model config's, 0.3 by default)
    # data
    data: list[str] = field(default_factory=list)  # empty: the embedded default corpus
    text_field: str = "text"
    tokenizer: str | None = None  # a tokenizer dir; default: train a BPE on the corpus with the model's vocab
    val_fraction: float = 0.01
    # run
    out: str = "runs/pretrain"
    steps: int = 300  # ~5 minutes at `small` on 2 CPU cores (measured: 0.87 s/step + ~45 s data prep)
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    seed: int = 0
    dtype: str = "bf16"  # bf16: autocast over fp32 master weights; fp32: no autocast
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    # optimizer + schedule
    optimizer: str = "muonclip"  # muonclip | adamw
    lr: float = 3e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    qk_clip_tau: float | None = 100.0
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_lr: float | None = None  # muonclip only: lr of its AdamW group (embeddings, head, norms); None = lr (K2)
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # WSD: last 20% of steps decay
    lr_floor: float = 0.1  # decay to lr * lr_floor
    grad_clip: float = 1.0
    router_bias_gamma: float = 1e-3
    # telemetry
    log_every: int = 1
    detail_every: int = 25  # per-layer max logits and expert load
    val_every: int = 100
    val_batches: int = 8
    spike_margin: float = 0.15  # a step is a spike if loss > (1 + margin) * running median
    spike_window: int = 50
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    progress: bool = True
    plots: bool = True
    # checkpoints
    ckpt_every: int = 100
    keep_last: int = 3
    resume: bool = False
    # distributed
    ep: int = 1
    # With grad_accum > 1 on an FSDP-sharded model: reduce-scatter the gradients once per step, after the last
    # micro-batch (every rank keeps full-size gradients across micro-batches: see docs/distributed.md). False:
    # after every micro-batch (only sharded gradients are kept; grad_accum times the gradient traffic).
    accumulate_without_sync: bool = True
    count_collectives: bool = False  # add per-step collective counts to metrics.jsonl (costs Python time per op)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if "adamw_betas" in d:
            d["adamw_betas"] = tuple(d["adamw_betas"])
        return cls(**d).validated()

    def validated(self) -> "TrainConfig":
        def need(cond: bool, name: str, what: str):
            if not cond:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {what}")

        need(self.optimizer in ("muonclip", "adamw"), "optimizer", "expected 'muonclip' or 'adamw'")
        need(self.dtype in ("bf16", "fp32"), "dtype", "expected 'bf16' or 'fp32'")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "ckpt_every", "keep_last", "log_every",
                     "val_every", "detail_every"):  # every N steps: a large N does it (almost) never
            need(getattr(self, name) > 0, name, "must be > 0")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.adamw_lr is None or self.adamw_lr > 0, "adamw_lr", "must be > 0 or None (share lr)")
        need(self.adamw_lr is None or self.optimizer == "muonclip", "adamw_lr",
             "only for optimizer='muonclip' (its AdamW group); with optimizer='adamw' use lr")
        need(0 <= self.decay_fraction <= 1, "decay_fraction", "must be in [0, 1]")
        need(self.qk_clip_tau is None or self.qk_clip_tau > 0, "qk_clip_tau", "must be > 0 or None")
        need(self.mtp_layers is None or (isinstance(self.mtp_layers, int) and self.mtp_layers >= 0), "mtp_layers",
             "must be an integer >= 0 or None")
        need(self.mtp_loss_weight is None or self.mtp_loss_weight >= 0, "mtp_loss_weight", "must be >= 0 or None")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Schedule and spike detection


def wsd_schedule(cfg: "TrainConfig"):
    """Warmup-Stable-Decay over the run: linear warmup, constant, cosine decay to lr_floor over the last part."""
    from openk2.optim.schedule import WSDSchedule

    warmup = min(cfg.warmup_steps, cfg.steps)
    decay = min(int(round(cfg.decay_fraction * cfg.steps)), cfg.steps - warmup)
    return WSDSchedule(warmup_steps=warmup, stable_steps=cfg.steps - warmup - decay, decay_steps=decay,
                       floor=cfg.lr_floor, decay="cosine")


class SpikeDetector:
    """Flags a step whose loss exceeds (1 + margin) × the running median of the last `window` losses."""

    def __init__(self, window: int = 50, margin: float = 0.15, min_history: int = 10):
        self.window, self.margin, self.min_history = window, margin, min_history
        self.history: deque[float] = deque(maxlen=window)
        self.count = 0

    def update(self, loss: float) -> bool:
        spike = len(self.history) >= self.min_history and loss > (1 + self.margin) * statistics.median(self.history)
        self.count += int(spike)
        self.history.append(loss)
        return spike

    def state_dict(self) -> dict:
        return {"history": list(self.history), "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        self.history = deque(s["history"], maxlen=self.window)
        self.count = s["count"]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files of a run


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run; `latest` is written only after its directory is complete."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    ckpt = run_dir / CHECKPOINTS / pointer.read_text().strip()
    from openk2.parallel import is_distributed_checkpoint  # torchrun runs write DCP checkpoints

    if not (ckpt / TRAINER_STATE).exists() and not is_distributed_checkpoint(ckpt):
        raise FileNotFoundError(f"{pointer} names {ckpt.name}, but {ckpt / TRAINER_STATE} is missing")
    return ckpt


def _recover_checkpoints(root: Path) -> None:
    """Before a resume: delete checkpoints interrupted mid-write (`.tmp-step_N`, and the `..tmp-step_N.tmp-PID-*`
    that a kill inside save_pretrained leaves: its own temp dir next to `.tmp-step_N`), and put back a checkpoint
    that a save replacing it moved aside (`.old-step_N`) when the crash came before the new one took its place.
    Every rank of a torchrun job may run this at once."""
    from openk2.checkpoint import restore_interrupted_publish

    for stale in [*root.glob(".tmp-*"), *root.glob("..tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob(".old-*"):
        if not restore_interrupted_publish(root / aside.name.removeprefix(".old-")):
            shutil.rmtree(aside, ignore_errors=True)  # the new checkpoint is in place (or another rank restored)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the `step_N` checkpoint directories under root."""
    found = []
    for p in root.glob("step_*"):
        number = p.name.removeprefix("step_")
        if number.isdigit() and p.is_dir():
            found.append((int(number), p))
    return found


def _start_fresh(root: Path) -> None:
    """A run without --resume in a run directory that holds an earlier run's checkpoints: they stay on disk (each
    loads by its path), but `latest` stops naming one of them, as metrics.jsonl starts over: a --resume after this
    run dies before its first checkpoint starts from scratch rather than pair an earlier run's weights with this
    run's metrics. This run's checkpoints replace those of the same step; pruning counts only steps up to this
    run's, so a higher-numbered earlier checkpoint never takes the place of this run's newest."""
    earlier = sorted(_step_dirs(root))
    if earlier:
        names = ", ".join(p.name for _, p in earlier) if len(earlier) <= 3 else \
            f"{earlier[0][1].name} ... {earlier[-1][1].name}"
        _log(f"fresh run (no --resume) in {root.parent}: {len(earlier)} checkpoint(s) of an earlier run in {root} "
             f"({names}) are no longer `latest`; this run's checkpoints replace (and prune) those up to its own "
             "step and leave higher ones alone. To continue the earlier run, stop and pass --resume; for a clean "
             "directory use another --out.")
    (root / LATEST).unlink(missing_ok=True)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


# ----------------------------------------------------------------------------------------------------------------
# The trainer


class BatchSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class TrainingStopped(RuntimeError):
    """Raised when the run cannot continue (e.g. too many non-finite steps in a row)."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    if cfg.optimizer == "muonclip":
        from openk2.optim import MuonClip

        return MuonClip(model, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                        qk_clip_tau=cfg.qk_clip_tau, adamw_betas=cfg.adamw_betas, adamw_lr=cfg.adamw_lr)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: torch's fastest AdamW on CPU (6x its foreach version for `small`) and on CUDA
    fused = pick_device(cfg.device).type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adamw_betas, eps=1e-8, fused=fused or None)


class Trainer:
    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, batches: BatchSource, *, tokenizer=None,
                 ctx=None, stage: str = "pretrain"):
        self.cfg, self.model, self.batches, self.tokenizer, self.stage = cfg, model, batches, tokenizer, stage
        self.ctx = ctx
        self.distributed = ctx is not None and ctx.world_size > 1
        self.is_main = ctx is None or ctx.is_main
        self.run_dir = Path(cfg.out)
        self.device = next(model.parameters()).device
        self.optimizer = build_optimizer(model, cfg)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.schedule = wsd_schedule(cfg)
        self.spikes = SpikeDetector(cfg.spike_window, cfg.spike_margin)
        self.step = 0
        self.tokens = 0
        self.bad_in_a_row = 0
        self.skipped_steps = 0
        self.no_val_reason: str | None = None
        model.set_record_max_logits(True)  # telemetry wants max_logit even without the clip
        from openk2.config import flops_per_token

        self.flops_per_token = flops_per_token(model.config, cfg.seq_len)
        peak_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        from openk2.perf import measure_matmul_peak

        self.peak_flops = measure_matmul_peak(peak_dtype, str(self.device))
        if cfg.activation_checkpointing:
            _checkpoint_blocks(model)
        self.forward = torch.compile(model) if cfg.compile else model

    # -- one step ------------------------------------------------------------------------------------------------
    def _lr_multiplier(self, step: int) -> float:
        return self.schedule(step)

    def _autocast(self):
        if self.cfg.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def train_step(self) -> dict[str, Any]:
        if not self.cfg.count_collectives:
            return self._train_step()
        from openk2.parallel import CollectiveCounter

        with CollectiveCounter() as counter:
            record = self._train_step()
        record["collectives"] = counter.summary()  # {kind: {"calls", "elements"}} over the whole step
        return record

    def _train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        model.train()
        mult = self._lr_multiplier(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * mult
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, mtp_loss_sum, n_tokens = 0.0, None, 0
        # Under FSDP, micro-batches before the last only accumulate (no reduce-scatter); the last one reduces the sum.
        defer_sync = self.distributed and cfg.grad_accum > 1 and cfg.accumulate_without_sync
        from openk2.parallel import set_gradient_sync

        try:
            for micro in range(cfg.grad_accum):
                if defer_sync:
                    set_gradient_sync(model, micro == cfg.grad_accum - 1)
                input_ids, labels = self.batches.next_batch()
                input_ids, labels = input_ids.to(self.device), labels.to(self.device)
                with self._autocast():
                    out = self.forward(input_ids, labels=labels)
                (out.loss / cfg.grad_accum).backward()
                loss_sum += float(out.loss.detach())
                if out.mtp_loss is not None:
                    mtp_loss_sum = (mtp_loss_sum or 0.0) + float(out.mtp_loss.detach())
                n_tokens += input_ids.numel()
        finally:
            if defer_sync:
                set_gradient_sync(model, True)  # whatever runs next (e.g. another caller's backward) syncs again
        loss = loss_sum / cfg.grad_accum
        mtp_loss = None if mtp_loss_sum is None else mtp_loss_sum / cfg.grad_accum
        if self.distributed:
            from openk2.parallel import clip_grad_norm_ as dist_clip_grad_norm_

            loss = float(self.ctx.all_reduce_mean(torch.tensor(loss, device=self.device)))
            if mtp_loss is not None:
                mtp_loss = float(self.ctx.all_reduce_mean(torch.tensor(mtp_loss, device=self.device)))
            n_tokens *= self.ctx.data_world
            # expert stacks and dense parameters live on different meshes: torch's clip cannot mix them
            grad_norm = float(dist_clip_grad_norm_(model.parameters(), cfg.grad_clip, self.ctx))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        record: dict[str, Any] = {"step": self.step + 1, "lr": cfg.lr * mult, "loss": loss, "grad_norm": grad_norm}
        if cfg.adamw_lr is not None:  # MuonClip's AdamW group on its own lr
            record["adamw_lr"] = cfg.adamw_lr * mult
        if mtp_loss is not None:  # `loss` includes mtp_loss_weight * mtp_loss
            record["mtp_loss"] = mtp_loss
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
            if self.distributed:
                from openk2.parallel import sync_router_load

                sync_router_load(model, self.ctx)
            if (self.step + 1) % cfg.detail_every == 0 or self.step == 0:
                record["expert_load"] = model.expert_load().tolist()
            model.update_router_bias(cfg.router_bias_gamma)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._discard_step_statistics()
            self.bad_in_a_row += 1
            self.skipped_steps += 1
            record["skipped"] = True
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise TrainingStopped(f"step {self.step + 1}: {self.bad_in_a_row} non-finite steps in a row "
                                      f"(loss={loss}, grad_norm={grad_norm}); stopping. Lower --lr or check data.")
        self._add_logit_stats(record, detail=(self.step + 1) % cfg.detail_every == 0 or self.step == 0)
        record["spike"] = bool(finite and self.spikes.update(loss))
        self.step += 1
        self.tokens += n_tokens
        record["tokens"] = self.tokens
        return record

    def _discard_step_statistics(self) -> None:
        """After a skipped step: drop what its forward gathered for the next update, the routers' token counts
        (`load`, input of the bias update) and QK-Clip's running max logits. Neither is in a checkpoint, so keeping
        them would make a run resumed right after a skipped step differ from an uninterrupted one; and a bad
        step's statistics have no business steering the next step's bias update or clip."""
        for router in self.model.routers():
            router.load.zero_()
        for target in getattr(self.optimizer, "attention_targets", ()):  # MuonClip with QK-Clip
            target.running_max = None

    def _add_logit_stats(self, record: dict, *, detail: bool) -> None:
        stats = getattr(self.optimizer, "last_stats", None) or {}
        per_layer = stats.get("max_logit_per_layer")
        if per_layer is None:  # no QK-Clip stats: this rank's signal, made global as MuonClip's is
            per_layer = self.model.max_attention_logits().amax(dim=-1)
            per_layer = (self.ctx.all_reduce_max(per_layer) if self.distributed else per_layer).tolist()
        per_layer = [float(x) for x in per_layer]
        record["max_logit"] = max(per_layer) if per_layer else float("nan")
        record["clipped_heads"] = int(stats.get("clipped_heads", 0))  # MuonClip.last_stats key
        if detail:
            record["max_logit_per_layer"] = per_layer

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean next-token loss per scored token over the validation batches (summed by tokens over all batches and
        ranks, so the result does not depend on how the windows are split into batches or ranks); None (and a
        one-time note) when there is no validation data. Rows whose labels are all ignored (padding, see
        `TokenLoader.iter_epoch`) count nothing."""
        if self.no_val_reason is not None:
            return None
        try:
            batches = list(itertools.islice(self.batches.val_batches(), self.cfg.val_batches))
        except ValueError as e:  # e.g. a corpus too small for a validation split
            batches, reason = [], str(e)
        else:
            reason = "the validation split is empty"
        if not batches:
            self.no_val_reason = reason
            if self.is_main:
                _log(f"validation disabled: {reason}")
            return None
        from openk2.model import IGNORE_INDEX

        self.model.eval()  # eval: no MTP / balance terms, so out.loss is the plain mean next-token cross-entropy
        loss_sum, scored = 0.0, 0
        for input_ids, labels in batches:
            with self._autocast():
                out = self.forward(input_ids.to(self.device), labels=labels.to(self.device))
            tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the targets causal_lm_loss averaged over
            if tokens:
                loss_sum += float(out.loss) * tokens
                scored += tokens
        self.model.train()
        totals = torch.tensor([loss_sum, float(scored)], dtype=torch.float64)
        if self.distributed:
            totals = self.ctx.all_reduce_sum(totals)
        loss_sum, scored = totals.tolist()
        if scored == 0:
            self.no_val_reason = "the validation batches hold no scored token"
            if self.is_main:
                _log(f"validation disabled: {self.no_val_reason}")
            return None
        return loss_sum / scored

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {
            "step": self.step, "tokens": self.tokens, "optimizer": self.optimizer.state_dict(),
            "data": self.batches.state_dict(), "rng": _rng_state(), "spikes": self.spikes.state_dict(),
            "skipped_steps": self.skipped_steps, "bad_in_a_row": self.bad_in_a_row, "stage": self.stage,
        }

    def save_checkpoint(self) -> Path:
        """Write RUN_DIR/checkpoints/step_N atomically (temp dir, then rename), then point `latest` at it."""
        ckpt_root = self.run_dir / CHECKPOINTS
        ckpt_root.mkdir(parents=True, exist_ok=True)
        name = f"step_{self.step:06d}"
        final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
        from openk2.checkpoint import publish_dir, save_pretrained, write_latest_pointer

        if self.distributed:
            from openk2.parallel import save_distributed

            save_distributed(final, self.model, self.optimizer, self.trainer_state_without_optimizer(),
                             tokenizer=self.tokenizer)
        elif self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(self.model, tmp)
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)
            torch.save(self.trainer_state(), tmp / TRAINER_STATE)
            (tmp / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
            # as save_distributed: every file fsynced, an existing step_N replaced only when whole
            publish_dir(tmp, final)
        if self.is_main:
            write_latest_pointer(ckpt_root, name)  # durable (file and directory fsynced) before pruning
            self._prune_checkpoints(ckpt_root)
        return final

    def trainer_state_without_optimizer(self) -> dict:
        state = self.trainer_state()
        state.pop("optimizer")
        return state

    def _prune_checkpoints(self, root: Path) -> None:
        """Keep the newest `keep_last` checkpoints by step number, up to this step. One `latest` names (the one just
        written) is never deleted, nor one of a higher step: that is an earlier run's (see `_start_fresh`)."""
        pointer = root / LATEST
        latest = pointer.read_text().strip() if pointer.exists() else None
        ours = sorted((step, p) for step, p in _step_dirs(root) if step <= self.step)
        for _, old in ours[: -self.cfg.keep_last]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, ckpt: Path) -> None:
        from openk2.parallel import is_distributed_checkpoint, load_distributed

        if is_distributed_checkpoint(ckpt):  # written under torchrun: resumes at any world size, 1 included
            state = load_distributed(ckpt, self.model, self.optimizer)
        elif self.distributed:
            raise TrainingStopped(f"{ckpt} was written by a single-process run (HF layout + {TRAINER_STATE}); a "
                                  "torchrun job resumes only distributed checkpoints. Resume it in one process, or "
                                  f"start the distributed run from its weights with --init-from {ckpt}.")
        else:
            from openk2.checkpoint import load_hf_state_dict_from_dir

            load_hf_state_dict_from_dir(self.model, ckpt)
            state = torch.load(ckpt / TRAINER_STATE, weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bad_in_a_row = state.get("bad_in_a_row", 0)  # non-finite steps in a row just before the checkpoint
        self.batches.load_state_dict(state["data"])
        self.spikes.load_state_dict(state["spikes"])
        _set_rng_state(state["rng"])

    # -- the loop ------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        if cfg.resume:
            _recover_checkpoints(self.run_dir / CHECKPOINTS)
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is not None:
                self.load_checkpoint(ckpt)
                if self.is_main:
                    _log(f"resumed from {ckpt} at step {self.step}")
        elif self.is_main:
            _start_fresh(self.run_dir / CHECKPOINTS)
        if self.is_main:
            _truncate_metrics(metrics_path, self.step)
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        last: dict[str, Any] = {}
        with _Progress(cfg.steps, self.step, enabled=cfg.progress and self.is_main) as bar, \
                open(metrics_path, "a") if self.is_main else open(os.devnull, "w") as metrics:
            t_last = time.perf_counter()
            while self.step < cfg.steps:
                record = self.train_step()
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                step_tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * (
                    self.ctx.data_world if self.ctx is not None else 1)
                record["tokens_per_s"] = step_tokens / dt
                record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak_flops / (
                    self.ctx.world_size if self.ctx is not None else 1)
                record["time"] = round(time.time(), 3)
                if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                    val_loss = self.validate()
                    if val_loss is not None:
                        record["val_loss"] = val_loss
                    t_last = time.perf_counter()  # validation is not part of the step's throughput
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(record, self.spikes.count)
                last = record
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                    t_last = time.perf_counter()
        if self.is_main and cfg.plots:
            from openk2.plots import plot_run

            plot_run(self.run_dir, tau=cfg.qk_clip_tau if cfg.optimizer == "muonclip" else None)
        summary = {"steps": self.step, "tokens": self.tokens, "final_loss": last.get("loss"),
                   "val_loss": last.get("val_loss"), "spikes": self.spikes.count,
                   "skipped_steps": self.skipped_steps, "run_dir": str(self.run_dir)}
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _checkpoint_blocks(model: torch.nn.Module) -> None:
    """Recompute each decoder block in backward (activation checkpointing) without renaming parameters. The
    recompute routes the same tokens again: it must not add them to the routers' load a second time."""
    from torch.utils.checkpoint import checkpoint

    for block in [*model.model.layers, *getattr(model, "mtp", [])]:
        inner = block.forward
        block.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False,
                                                            context_fn=_recompute_without_router_load, **k)


def _recompute_without_router_load():
    """checkpoint's context_fn: (context of the forward, context of the recompute in backward).

    Eager, the recompute runs the block's Python again, routers included: `router_load_paused` keeps it from
    counting the tokens a second time. A block that torch.compile traces whole replays no Python in backward (nor
    the load's in-place add, a graph mutation applied once), and there only dispatch modes are accepted: the
    recompute-everything policy torch.compile applies when no context_fn is given."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    from openk2.model import router_load_paused

    if torch.compiler.is_compiling():
        return create_selective_checkpoint_contexts(lambda *_, **__: CheckpointPolicy.PREFER_RECOMPUTE)
    return contextlib.nullcontext(), router_load_paused()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows past the checkpoint so the file reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass  # a row cut by a kill -9
    atomic_write(path, "".join(k + "\n" for k in keep))


def _log(msg: str) -> None:
    print(f"[openk2] {msg}", file=sys.stderr, flush=True)


class _Progress:
    """A rich progress bar with the key figures (loss, lr, max logit, clipped heads, tok/s, MFU)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def update(self, r: dict, spikes: int) -> None:
        if not self.enabled:
            return
        info = (f"loss {r['loss']:.3f} lr {r['lr']:.2e} maxlogit {r['max_logit']:.1f} clip {r['clipped_heads']} "
                f"{r['tokens_per_s']:.0f} tok/s mfu {100 * r['mfu']:.1f}% spikes {spikes}")
        if "val_loss" in r:
            info += f" val {r['val_loss']:.3f}"
        self.progress.update(self.task, completed=r["step"], info=info)


# ----------------------------------------------------------------------------------------------------------------
# `openk2 pretrain`


def add_train_arguments(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Every TrainConfig field is a flag; --config FILE loads the same fields (flags given explicitly win)."""
    p.add_argument("--config", help="JSON file with TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "qk_clip_tau":
            p.add_argument(flag, type=_tau, default=argparse.SUPPRESS, help=f"QK-Clip τ, or 'none' (default {default})")
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"(default {default})")
        elif f.name == "data":
            p.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help="files/dirs/JSONL/parquet (default: "
                           "the embedded corpus)")
        elif f.name == "adamw_betas":
            p.add_argument(flag, type=float, nargs=2, default=argparse.SUPPRESS, help=f"(default {default})")
        else:
            kind = type(default) if default is not None else _NONE_DEFAULT_TYPES.get(f.name, str)
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"(default {default})")


# fields whose default None hides the type
_NONE_DEFAULT_TYPES = {"mtp_layers": int, "mtp_loss_weight": float, "adamw_lr": float}


def _tau(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "null") else float(text)


def resolve_config(args: argparse.Namespace, defaults: TrainConfig) -> TrainConfig:
    values = defaults.to_dict()
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            file_values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"openk2: cannot read --config {path}: {e}")
        values.update(TrainConfig.from_dict({**values, **file_values}, source=str(path)).to_dict())
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    return TrainConfig.from_dict(values)


def build_model(cfg: TrainConfig, device: torch.device):
    from openk2.config import K2Config
    from openk2.model import K2ForCausalLM

    if cfg.init_from:
        from openk2.checkpoint import load_pretrained, resolve_checkpoint_dir

        model = load_pretrained(resolve_checkpoint_dir(cfg.init_from), dtype=torch.float32, device=device)
        held = model.config.num_nextn_predict_layers
        if cfg.mtp_layers is not None and cfg.mtp_layers != held:
            raise SystemExit(f"openk2: --mtp-layers {cfg.mtp_layers}, but --init-from {cfg.init_from} holds {held} "
                             "MTP module(s); adding or dropping MTP modules of a trained model is not supported")
        if cfg.mtp_loss_weight is not None:
            model.config.mtp_loss_weight = cfg.mtp_loss_weight
        return model
    model_cfg = K2Config.from_json(cfg.model_config) if cfg.model_config else K2Config.preset(cfg.preset)
    if cfg.mtp_layers is not None:
        model_cfg = model_cfg.replace(num_nextn_predict_layers=cfg.mtp_layers)
    if cfg.mtp_loss_weight is not None:
        model_cfg = model_cfg.replace(mtp_loss_weight=cfg.mtp_loss_weight)
    torch.manual_seed(cfg.seed)
    return K2ForCausalLM(model_cfg).to(device)


def prepare_pretraining_data(cfg: TrainConfig, vocab_size: int, ctx=None):
    """Tokenizer (given, or trained on the corpus) and tokenized shards, cached under RUN_DIR/data."""
    from openk2 import data as data_mod
    from openk2.tokenizer import K2Tokenizer, train_tokenizer

    sources = [Path(s) for s in cfg.data] if cfg.data else data_mod.default_corpus()
    run_dir = Path(cfg.out)
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else run_dir / "tokenizer"
    data_dir = run_dir / "data"
    is_main = ctx is None or ctx.is_main
    if is_main:
        if not (tok_dir / "tokenizer_config.json").exists():
            if cfg.tokenizer:
                raise SystemExit(f"openk2: --tokenizer {tok_dir}: no tokenizer_config.json there")
            _log(f"training a {vocab_size}-token byte-level BPE on {len(sources)} source(s)")
            texts = data_mod.iter_texts(sources, text_field=cfg.text_field)
            tokenizer = train_tokenizer(texts, vocab_size)
            tokenizer.save(tok_dir)
        tokenizer = K2Tokenizer.load(tok_dir)
        data_mod.prepare_corpus(sources, tokenizer, data_dir, text_field=cfg.text_field,
                                val_fraction=cfg.val_fraction, seed=cfg.seed, progress=cfg.progress)
    if ctx is not None and ctx.world_size > 1:
        ctx.barrier(timeout_s=24 * 3600)  # rank 0 may tokenize for far longer than the collective timeout
    tokenizer = K2Tokenizer.load(tok_dir)
    if tokenizer.vocab_size != vocab_size:
        raise SystemExit(f"openk2: tokenizer {tok_dir} has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {vocab_size}")
    return tokenizer, data_dir


class PretrainBatches:
    """Adapts the token loader (train split) + a fixed validation pass to the trainer's batch-source protocol."""

    def __init__(self, data_dir: Path, cfg: TrainConfig, rank: int = 0, world: int = 1):
        from openk2.data import TokenLoader

        self.train = TokenLoader(data_dir, split="train", batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                 rank=rank, world_size=world, seed=cfg.seed)
        self.data_dir, self.cfg, self.rank, self.world = data_dir, cfg, rank, world

    def next_batch(self):
        return self.train.next_batch()

    def state_dict(self):
        return self.train.state_dict()

    def load_state_dict(self, state):
        self.train.load_state_dict(state)

    def val_batches(self):
        from openk2.data import val_batches

        return val_batches(self.data_dir, batch_size=self.cfg.batch_size, seq_len=self.cfg.seq_len,
                           rank=self.rank, world_size=self.world, max_batches=self.cfg.val_batches)


def run_pretrain(cfg: TrainConfig) -> dict[str, Any]:
    from openk2 import parallel

    ctx = parallel.init_distributed(ep=cfg.ep)
    summary = _pretrain(cfg, ctx)
    # The normal path only: after an exception the hook from init_distributed aborts the group, where destroy()'s
    # barrier would wait for ranks stuck in a collective.
    ctx.destroy()
    return summary


def _pretrain(cfg: TrainConfig, ctx) -> dict[str, Any]:
    from openk2 import parallel

    device = ctx.device if ctx.world_size > 1 else pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg, device)
    tokenizer, data_dir = prepare_pretraining_data(cfg, model.config.vocab_size, ctx)
    if ctx.world_size > 1:
        parallel.parallelize(model, ctx)
    batches = PretrainBatches(data_dir, cfg, ctx.data_rank, ctx.data_world)
    trainer = Trainer(cfg, model, batches, tokenizer=tokenizer, ctx=ctx, stage="pretrain")
    summary = trainer.fit()
    if ctx.is_main:
        val = summary["val_loss"]
        _log(f"done: {summary['steps']} steps, loss {summary['final_loss']:.4f}, val_loss "
             f"{'n/a' if val is None else f'{val:.4f}'}, spikes {summary['spikes']}; run dir {summary['run_dir']}")
    return summary


def main_pretrain(argv: list[str] | None = None) -> int:
    defaults = TrainConfig(out="runs/pretrain")
    p = argparse.ArgumentParser(prog="openk2 pretrain", description="Pre-train a K2-architecture model with "
                                "MuonClip. With no arguments: the `small` preset on the embedded corpus.")
    add_train_arguments(p, defaults)
    cfg = resolve_config(p.parse_args(argv), defaults)
    try:
        run_pretrain(cfg)
    except TrainingStopped as e:
        _log(str(e))
        return 1
    return 0
