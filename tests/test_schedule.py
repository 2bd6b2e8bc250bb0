import math

import pytest
import torch
from torch import nn

from openk2.optim import WSDSchedule, lr_multiplier, set_lr, wsd_lr_multiplier


def test_wsd_phases_cosine():
    s = WSDSchedule(warmup_steps=4, stable_steps=3, decay_steps=4, floor=0.1)
    got = [s(i) for i in range(13)]
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # warmup reaches the peak on its last step
    assert got[4:7] == [1.0, 1.0, 1.0]  # stable
    # cosine from 1 to the floor over 4 steps (the first already below the peak, the last at the floor), then the floor
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)]
    assert got[7:11] == pytest.approx(expected)
    assert got[7] < 1.0 and got[10] == pytest.approx(0.1)
    assert got[11:] == [0.1, 0.1]
    assert all(a >= b for a, b in zip(got[3:], got[4:]))  # never increases after warmup


def test_wsd_linear_and_no_warmup():
    s = WSDSchedule(warmup_steps=0, stable_steps=2, decay_steps=5, floor=0.0, decay="linear")
    assert [s(i) for i in range(8)] == pytest.approx([1, 1, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0])


def test_k2_numbers_example():
    # 500 warmup steps, 2e-4 stable, cosine to 2e-5
    s = WSDSchedule(warmup_steps=500, stable_steps=1000, decay_steps=1000, floor=0.1)
    peak = 2e-4
    assert peak * s(0) == pytest.approx(2e-4 / 500)
    assert peak * s(499) == pytest.approx(2e-4) and peak * s(1499) == pytest.approx(2e-4)
    assert peak * s(1999) == pytest.approx(1.1e-4)  # halfway through the cosine (its 500th of 1000 steps)
    assert peak * s(2499) == pytest.approx(2e-5)  # the decay's last step is at the floor
    assert peak * s(10**6) == pytest.approx(2e-5)


def test_stateless_given_step_so_resume_is_exact():
    s = WSDSchedule(warmup_steps=10, stable_steps=20, decay_steps=30)
    forward = [s(i) for i in range(70)]
    backward = [s(i) for i in reversed(range(70))][::-1]
    assert forward == backward
    assert wsd_lr_multiplier(45, total_steps=60, warmup_steps=10, decay_steps=30) == lr_multiplier(45, s)


def test_lambda_lr_resume_matches_uninterrupted():
    def make():
        torch.manual_seed(0)
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
        return opt

    s = WSDSchedule(warmup_steps=3, stable_steps=2, decay_steps=5, floor=0.2)
    opt = make()
    sched = s.lambda_lr(opt)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt2 = make()
    sched2 = s.lambda_lr(opt2)
    for _ in range(4):
        opt2.step()
        sched2.step()
    opt_state, sched_state = opt2.state_dict(), sched2.state_dict()
    opt3 = make()
    sched3 = s.lambda_lr(opt3)
    opt3.load_state_dict(opt_state)  # carries the group lr
    sched3.load_state_dict(sched_state)
    resumed = []
    for _ in range(6):
        resumed.append(opt3.param_groups[0]["lr"])
        opt3.step()
        sched3.step()
    assert resumed == pytest.approx(lrs[4:])
    set_lr(opt3, 0.5)
    assert opt3.param_groups[0]["lr"] == 0.5


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="floor"):
        WSDSchedule(1, 1, 1, floor=1.5)
    with pytest.raises(ValueError, match="decay"):
        WSDSchedule(1, 1, 1, decay="exp")
    with pytest.raises(ValueError, match=">= 0"):
        WSDSchedule(-1, 1, 1)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_ends_at_the_floor_and_a_one_step_decay_decays(decay):
    """The decay's last step uses lr_floor (as warmup's last step uses the peak), and its first is below the peak:
    a 1-step decay is that one step at the floor, not a step at the peak."""
    s = WSDSchedule(warmup_steps=2, stable_steps=3, decay_steps=6, floor=0.1, decay=decay)
    assert s(s.total_steps - 1) == pytest.approx(0.1) and s(s.warmup_steps + s.stable_steps) < 1.0
    one = WSDSchedule(warmup_steps=0, stable_steps=9, decay_steps=1, floor=0.25, decay=decay)
    assert [one(i) for i in range(11)] == [1.0] * 9 + [0.25, 0.25]
    # a run of 10 steps with decay_fraction 0.1: its last step decays
    assert wsd_lr_multiplier(9, total_steps=10, warmup_steps=0, decay_steps=1, floor=0.1, decay=decay) == 0.1
