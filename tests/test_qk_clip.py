import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openk2.config import K2Config
from openk2.model import K2ForCausalLM
from openk2.optim import MuonClip, clip_gamma, clip_mha_, gqa_scales
from openk2.optim.qk_clip import find_attention_modules


class MHA(nn.Module):
    """A plain (GQA when num_kv_heads < num_heads) attention layer that records per-head max logits."""

    def __init__(self, hidden=32, num_heads=4, num_kv_heads=4, head_dim=8, bias=True):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=bias)
        self.record_max_logits = False
        self.max_logits = None

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        if self.record_max_logits:
            self.max_logits = scores.detach().amax(dim=(0, 2, 3))
        out = torch.softmax(scores, -1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class TinyLM(nn.Module):
    def __init__(self, **attn_kwargs):
        super().__init__()
        self.embed_tokens = nn.Embedding(40, 32)
        self.attn = MHA(**attn_kwargs)
        self.lm_head = nn.Linear(32, 40, bias=False)

    def forward(self, ids):
        return self.lm_head(self.attn(self.embed_tokens(ids)))


def test_gamma_and_gqa_scales_give_each_head_exactly_its_gamma():
    gamma = clip_gamma(torch.tensor([50.0, 200.0, 400.0, 250.0, 100.0, 80.0]), tau=100.0)
    assert gamma.tolist() == pytest.approx([1.0, 0.5, 0.25, 0.4, 1.0, 1.0])
    q, k = gqa_scales(gamma, num_kv_heads=3)  # groups (0,1) (2,3) (4,5)
    torch.testing.assert_close(q * k.repeat_interleave(2), gamma)
    assert q[0] == 1 and q[4] == 1 and q[5] == 1  # unclipped Q heads untouched
    assert k[0] == 1 and k[2] == 1  # K only shrinks when the whole group clips: group (2,3) ...
    assert k[1] == pytest.approx(math.sqrt(0.4))  # ... by the sqrt of its mildest gamma
    q_mha, k_mha = gqa_scales(gamma, num_kv_heads=6)  # MHA: the paper's sqrt split
    torch.testing.assert_close(q_mha, gamma.sqrt())
    torch.testing.assert_close(k_mha, gamma.sqrt())


def _push_then_clip(model, attn, x_fn, push_grads, tau_between):
    """1) a Muon step whose gradient grows head 0's q/k weights (lr large, no weight decay); 2) a forward that
    records the new max logits; 3) a MuonClip step with lr 0, i.e. only the clip. Returns (logits before clip,
    logits after clip, state before clip, state after clip)."""
    opt = MuonClip(model, lr=0.5, weight_decay=0.0, qk_clip_tau=1e9)
    assert attn.record_max_logits  # MuonClip turned the signal on
    x_fn()
    for name, p in model.named_parameters():
        p.grad = push_grads.get(name)
    opt.step()  # pushes; the clip saw the pre-step signal (far below tau)
    assert opt.last_stats["clipped_heads"] == 0
    pushed = _recorded(x_fn, attn)
    tau = tau_between(pushed)
    opt.qk_clip_tau = tau
    before = {n: t.clone() for n, t in model.state_dict().items()}
    for g in opt.param_groups:
        g["lr"] = 0.0
    model.zero_grad(set_to_none=True)
    opt.step()
    after = {n: t.clone() for n, t in model.state_dict().items()}
    clipped = _recorded(x_fn, attn)
    return tau, pushed, clipped, before, after, opt.last_stats


def _recorded(x_fn, attn):
    with torch.no_grad():
        x_fn()
    return attn.max_logits.clone()


def _grow_rows(weight, rows):
    """A gradient that, under gradient descent, grows these rows along themselves."""
    g = torch.zeros_like(weight)
    g[rows] = -weight.detach()[rows]
    return g


@pytest.mark.parametrize("q_lora_rank", [32, None])  # q_b_proj after a low-rank q_a_proj, or a full q_proj
def test_qk_clip_on_openk2_mla(q_lora_rank):
    torch.manual_seed(0)
    cfg = K2Config.preset("tiny")
    cfg.q_lora_rank = q_lora_rank
    model = K2ForCausalLM(cfg)
    attn = model.model.layers[1].self_attn
    q_name = "q_b_proj" if q_lora_rank else "q_proj"
    q_proj = getattr(attn, q_name)
    nope, rope, v, H = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    prefix = "model.layers.1.self_attn."
    head0_q = slice(0, nope + rope)
    head0_k = slice(0, nope)
    push = {prefix + f"{q_name}.weight": _grow_rows(q_proj.weight, head0_q),
            prefix + "kv_b_proj.weight": _grow_rows(attn.kv_b_proj.weight, head0_k)}
    tau, pushed, clipped, before, after, stats = _push_then_clip(
        model, attn, lambda: model(ids), push, tau_between=lambda s: float((s[0] + s[1:].max()) / 2))
    assert pushed[0] > tau > pushed[1:].max()
    assert stats["clipped_heads"] == 1 and stats["max_logit"] == pytest.approx(float(pushed.max()), rel=1e-6)
    assert clipped[0] <= tau * 1.01 and clipped[0] >= tau * 0.99  # clipped to tau, not below
    assert torch.equal(clipped[1:], pushed[1:])  # other heads' logits unchanged
    q_before = before[prefix + f"{q_name}.weight"].view(H, nope + rope, -1)
    q_after = after[prefix + f"{q_name}.weight"].view(H, nope + rope, -1)
    kv_before = before[prefix + "kv_b_proj.weight"].view(H, nope + v, -1)
    kv_after = after[prefix + "kv_b_proj.weight"].view(H, nope + v, -1)
    gamma = tau / pushed[0]
    torch.testing.assert_close(q_after[0, :nope], q_before[0, :nope] * gamma.sqrt())
    torch.testing.assert_close(q_after[0, nope:], q_before[0, nope:] * gamma)
    torch.testing.assert_close(kv_after[0, :nope], kv_before[0, :nope] * gamma.sqrt())
    assert torch.equal(q_after[1:], q_before[1:]) and torch.equal(kv_after[1:], kv_before[1:])
    assert torch.equal(kv_after[:, nope:], kv_before[:, nope:])  # V rows
    for name in before:  # everything else, incl. the shared rotary key kv_a_proj_with_mqa and q_a_proj
        if name not in (prefix + f"{q_name}.weight", prefix + "kv_b_proj.weight"):
            assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("num_kv_heads", [4, 2])  # MHA, then GQA with 2 query heads per key head
def test_qk_clip_on_mha_and_gqa(num_kv_heads):
    torch.manual_seed(0)
    model = TinyLM(num_heads=4, num_kv_heads=num_kv_heads, head_dim=8)
    attn = model.attn
    ids = torch.randint(0, 40, (2, 16))
    push = {"attn.q_proj.weight": _grow_rows(attn.q_proj.weight, slice(0, 8)),
            "attn.k_proj.weight": _grow_rows(attn.k_proj.weight, slice(0, 8))}
    tau, pushed, clipped, before, after, stats = _push_then_clip(
        model, attn, lambda: model(ids), push, tau_between=lambda s: float((s[0] + s[1:].max()) / 2))
    assert pushed[0] > tau > pushed[1:].max() and stats["clipped_heads"] == 1
    assert tau * 0.99 <= clipped[0] <= tau * 1.01
    # with GQA head 1 shares head 0's key: it must not be clipped along (K untouched, head 1's logits identical)
    assert torch.equal(clipped[1:], pushed[1:])
    assert torch.equal(after["attn.k_proj.weight"], before["attn.k_proj.weight"]) == (num_kv_heads < 4)
    assert torch.equal(after["attn.q_proj.weight"][8:], before["attn.q_proj.weight"][8:])
    for name in ("attn.v_proj.weight", "attn.v_proj.bias", "attn.o_proj.weight", "embed_tokens.weight"):
        assert torch.equal(after[name], before[name]), name


def test_clip_mha_scales_biases_and_leaves_heads_below_tau_bit_identical():
    torch.manual_seed(0)
    qw, kw, qb, kb = torch.randn(32, 16), torch.randn(16, 16), torch.randn(32), torch.randn(16)
    q0, k0, qb0, kb0 = qw.clone(), kw.clone(), qb.clone(), kb.clone()
    logits = torch.tensor([120.0, 300.0, 90.0, 100.0])  # GQA: kv head 0 serves q heads 0,1; kv head 1 serves 2,3
    mask = clip_mha_(qw, kw, logits, 100.0, num_heads=4, num_kv_heads=2, head_dim=8, q_bias=qb, k_bias=kb)
    assert mask.tolist() == [True, True, False, False]
    assert torch.equal(qw[16:], q0[16:]) and torch.equal(kw[8:], k0[8:]) and torch.equal(qb[16:], qb0[16:])
    k_s = math.sqrt(100 / 120)  # the group's mildest gamma, split evenly
    torch.testing.assert_close(kw[:8], k0[:8] * k_s)
    torch.testing.assert_close(kb[:8], kb0[:8] * k_s)
    torch.testing.assert_close(qw[:8], q0[:8] * (100 / 120) / k_s)
    torch.testing.assert_close(qw[8:16], q0[8:16] * (100 / 300) / k_s)


def _train_max_logits(tau, steps=16):
    torch.manual_seed(0)
    model = TinyLM(num_heads=4, num_kv_heads=2, head_dim=8)
    ids = torch.randint(0, 40, (4, 16))
    opt = MuonClip(model, lr=0.05, weight_decay=0.0, qk_clip_tau=tau)
    assert [t.kind for t in find_attention_modules(model)] == ["mha"]
    seen, clipped = [], []
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(opt.last_stats["max_logit"])
        clipped.append(opt.last_stats["clipped_heads"])
    return seen, clipped


def test_full_loop_keeps_max_logit_near_tau():
    """End to end with a large lr: unclipped, the max logit keeps growing; with tau = 2 the clip acts every step
    and each step's recorded max logit exceeds tau by at most what one step adds."""
    tau = 2.0
    free, free_clipped = _train_max_logits(tau=1e9)
    seen, clipped = _train_max_logits(tau=tau)
    assert sum(free_clipped) == 0 and free[-1] > 3 * tau
    assert sum(clipped) > 0 and max(seen) > tau
    assert max(seen[4:]) < 1.5 * tau and free[-1] > 3 * max(seen)


def test_gradient_accumulation_clips_on_the_max_over_micro_batches():
    torch.manual_seed(0)
    model = TinyLM(num_heads=4, num_kv_heads=2, head_dim=8)
    opt = MuonClip(model, lr=0.0, qk_clip_tau=1e9)
    target = opt.attention_targets[0]
    signals = []
    for _ in range(2):  # two micro-batches of one step
        ids = torch.randint(0, 40, (2, 16))
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        signals.append(model.attn.max_logits.clone())
    with torch.no_grad():  # a validation forward in between is not part of the step's batch
        model(torch.randint(0, 40, (8, 16)) * 0 + 3)
    expected = torch.maximum(*signals)
    assert not torch.equal(signals[0], signals[1])
    assert torch.equal(target.running_max, expected)
    opt.step()
    assert opt.last_stats["max_logit"] == pytest.approx(float(expected.max()))
    assert target.running_max is None
    opt.step()  # no new forward: nothing to clip on, no stale signal reused
    assert math.isnan(opt.last_stats["max_logit"]) and opt.last_stats["clipped_heads"] == 0
