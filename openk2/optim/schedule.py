"""Warmup-Stable-Decay (WSD) learning-rate schedule, stateless given the step (so a resumed run is exact).

K2 (shared/k2-spec.md §3): 500 warmup steps, then 2e-4 constant for 10T tokens, then cosine 2e-4 -> 2e-5 over
5.5T tokens. At 67M tokens per step that is about 149,254 stable and 82,090 decay steps:

    sched = WSDSchedule(warmup_steps=500, stable_steps=149_254, decay_steps=82_090, floor=0.1, decay="cosine")
    opt = MuonClip(model, lr=2e-4)              # the peak lr lives in the optimizer's groups
    lr_sched = sched.lambda_lr(opt)             # torch.optim.lr_scheduler.LambdaLR; call lr_sched.step() per step
    # or, without torch schedulers:  set_lr(opt, 2e-4 * sched(step))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WSDSchedule:
    """lr multiplier (relative to the peak lr) at a given optimizer step (0-based, the step about to be taken):
    linear warmup (step+1)/warmup_steps (its last step is at the peak), 1.0 for stable_steps, then a cosine or
    linear decay over decay_steps whose first step is already below the peak and whose last step is at `floor`
    (k-th decay step: progress k/decay_steps, k = 1..decay_steps), and `floor` after that."""

    warmup_steps: int
    stable_steps: int
    decay_steps: int
    floor: float = 0.1
    decay: str = "cosine"

    def __post_init__(self) -> None:
        if min(self.warmup_steps, self.stable_steps, self.decay_steps) < 0:
            raise ValueError(f"WSDSchedule: step counts must be >= 0, got {self}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"WSDSchedule.floor must be in [0, 1], got {self.floor}")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"WSDSchedule.decay must be 'cosine' or 'linear', got {self.decay!r}")

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.stable_steps + self.decay_steps

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self)

    def lambda_lr(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR over every param group (each group's "initial_lr" is its peak lr)."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self, last_epoch=last_epoch)


def lr_multiplier(step: int, s: WSDSchedule) -> float:
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    into_decay = step - s.warmup_steps - s.stable_steps
    if into_decay < 0:
        return 1.0
    if into_decay >= s.decay_steps:
        return s.floor
    progress = (into_decay + 1) / s.decay_steps  # as warmup: the phase's last step reaches its target
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.decay == "cosine" else 1 - progress
    return s.floor + (1 - s.floor) * shape


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr (for loops that compute lr = peak * schedule(step) themselves)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def wsd_lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, decay_steps: int, floor: float = 0.1,
                      decay: str = "cosine") -> float:
    """lr multiplier for a run of `total_steps` whose last `decay_steps` decay (stable = the rest)."""
    stable = max(0, total_steps - warmup_steps - decay_steps)
    return lr_multiplier(step, WSDSchedule(warmup_steps, stable, decay_steps, floor, decay))
