import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from openk2.optim import Muon, MuonClip, WSDSchedule, split_params_for_muonclip, update_scale, zeropower_via_newtonschulz
from openk2.optim.muon import NS_COEFFICIENTS

FIXTURES = Path(__file__).parent / "fixtures"


def _svals(X):
    return torch.linalg.svdvals(X.float())


# -- Newton-Schulz ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (48, 200)])
def test_newton_schulz_singular_values_in_band_random(shape):
    G = torch.randn(*shape)
    O = zeropower_via_newtonschulz(G)
    assert O.dtype == torch.bfloat16 and O.shape == G.shape
    s = _svals(O)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())


def test_newton_schulz_ill_conditioned():
    # condition number 1e4: singular values spread over 4 decades. NS is a polynomial p(sigma) applied to the
    # normalized singular values; 5 quintic steps lift anything above ~1/500 of the Frobenius norm into the band,
    # keep the order (monotone), and never overshoot.
    U, _ = torch.linalg.qr(torch.randn(128, 64))
    V, _ = torch.linalg.qr(torch.randn(64, 64))
    S = torch.logspace(0, -4, 64)
    G = U @ torch.diag(S) @ V.T
    s_out = _svals(zeropower_via_newtonschulz(G))  # descending, same order as S
    s_in = S / S.norm()
    assert s_out.max() < 1.25
    lifted = s_in > 2e-3
    assert lifted.sum() >= 20
    assert s_out[lifted].min() > 0.6, s_out[lifted]
    # the tail is amplified (by up to a^5 ~ 486), not destroyed or flipped
    tail = ~lifted
    assert (s_out[tail] > 50 * s_in[tail]).all()


def test_newton_schulz_batched_equals_per_matrix():
    stack = torch.randn(6, 32, 80)
    batched = zeropower_via_newtonschulz(stack)
    for e in range(6):
        assert torch.equal(batched[e], zeropower_via_newtonschulz(stack[e]))
    tall = torch.randn(5, 80, 32)  # tall stacks take the transposed path per expert, too
    batched = zeropower_via_newtonschulz(tall)
    for e in range(5):
        assert torch.equal(batched[e], zeropower_via_newtonschulz(tall[e]))


def test_orthogonalize_many_batches_by_shape_with_the_same_values():
    from openk2.optim.muon import MAX_NS_BATCH, orthogonalize_many

    updates = [torch.randn(24, 40), torch.randn(40, 24), torch.randn(3, 24, 40), torch.randn(2, 40, 24),
               torch.randn(MAX_NS_BATCH + 3, 24, 40), torch.randn(16, 16)]
    for u, o in zip(updates, orthogonalize_many(updates)):
        assert o.shape == u.shape
        torch.testing.assert_close(o.float(), zeropower_via_newtonschulz(u).float(), rtol=0, atol=1e-2)


def test_newton_schulz_zero_matrix_stays_zero():
    assert torch.equal(zeropower_via_newtonschulz(torch.zeros(8, 16)).float(), torch.zeros(8, 16))


# -- Gram Newton-Schulz (the fast path for wide expert stacks) ------------------------------------------------


def _gram_and_standard(G):
    return zeropower_via_newtonschulz(G, method="gram").float(), zeropower_via_newtonschulz(G).float()


@pytest.mark.parametrize("shape", [(128, 256), (256, 128), (3, 64, 224)])
def test_gram_newton_schulz_band_and_closeness_random(shape):
    # Same polynomial as the standard iteration, evaluated on X X^T: the band and the entries must agree to
    # bf16 rounding. Measured max |gram - standard| 0.008-0.018 on such inputs; the bound is 0.04.
    G = torch.randn(*shape)
    gram, standard = _gram_and_standard(G)
    assert gram.shape == G.shape
    s = _svals(gram)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    assert (gram - standard).abs().max() < 0.04


def _with_spectrum(rows, cols, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, len(S), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, len(S), generator=g, dtype=torch.float64))
    return ((U * S.double()) @ V.T).float()


def _exact_newton_schulz(G, steps=5):
    """The same quintic iteration in fp64: the reference both bf16 evaluations approximate."""
    a, b, c = NS_COEFFICIENTS
    X = G.double()
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X
    X = X / X.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).float()


def test_gram_newton_schulz_ill_conditioned_is_as_accurate_as_the_standard_iteration():
    # The cases that break a Gram iteration without restart (bf16 noise in the small eigenvalues of X X^T goes
    # negative and is amplified each step: singular values of 7 to 7700 were measured) must stay in the band:
    # condition number 1e4 and 1e6, and a rank-1-dominated momentum-like matrix (without the restart these give
    # largest singular values of 32, 17 and 13,700). Against the fp64 iteration, Gram's error is below the
    # standard bf16 iteration's (measured rms 0.66-0.72x of it, max entry error <= 0.053 vs <= 0.097).
    cases = [_with_spectrum(128, 64, torch.logspace(0, -4, 64)),
             _with_spectrum(128, 256, torch.logspace(0, -6, 128), seed=1),
             _with_spectrum(96, 224, torch.cat([torch.tensor([100.0]), torch.ones(95) * 0.05]), seed=2)]
    for G in cases:
        gram, standard = _gram_and_standard(G)
        exact = _exact_newton_schulz(G)
        assert _svals(gram).max() < 1.25, _svals(gram).max()
        assert (gram - exact).abs().max() < 0.06
        assert (gram - exact).pow(2).mean() <= (standard - exact).pow(2).mean()
    # the lifted part of the 1e4 case is in the band and the tail amplified, as for the standard iteration
    S = torch.logspace(0, -4, 64)
    s_in, s_out = S / S.norm(), _svals(zeropower_via_newtonschulz(cases[0], method="gram"))
    lifted = s_in > 2e-3
    assert s_out[lifted].min() > 0.6 and (s_out[~lifted] > 50 * s_in[~lifted]).all()


def test_gram_newton_schulz_batched_equals_per_matrix_and_zero_stays_zero():
    for stack in (torch.randn(6, 128, 256), torch.randn(5, 256, 128)):
        batched = zeropower_via_newtonschulz(stack, method="gram")
        for e in range(stack.shape[0]):
            assert torch.equal(batched[e], zeropower_via_newtonschulz(stack[e], method="gram"))
    assert torch.equal(zeropower_via_newtonschulz(torch.zeros(2, 8, 16), method="gram").float(),
                       torch.zeros(2, 8, 16))
    for steps in (1, 3, 4):  # one phase only / restart exactly at the end / short second phase
        G = torch.randn(64, 160)
        gram, standard = (zeropower_via_newtonschulz(G, steps, method=m).float() for m in ("gram", "standard"))
        assert (gram - standard).abs().max() < 0.04, steps


def test_optimizer_stack_update_stays_in_the_band_on_real_low_rank_expert_momentum():
    # Momentum of one rarely routed expert from an `openk2 pretrain` run (small preset, step 200): one dominant
    # direction, condition ~800. Gram NS is not safe on such input: on this matrix and 12 small perturbations of
    # it (2e-6 noise, ~1% of its entries' scale) it gave largest singular values of 4.9-583 in 5 of the 12
    # cases; training with Gram for the stacks spiked 22 times in 300 steps. The optimizer's path (the standard
    # iteration) must keep every one in the NS band (measured <= 1.14), in a batch and through Muon.step.
    from safetensors.torch import load_file

    from openk2.optim.muon import orthogonalize_many

    G = load_file(FIXTURES / "expert_momentum_low_rank.safetensors")["momentum"]
    stack = torch.stack([G] + [G + 2e-6 * torch.randn(G.shape, generator=torch.Generator().manual_seed(s))
                               for s in range(12)])
    (out,) = orthogonalize_many([stack])
    assert torch.isfinite(out).all()
    assert max(_svals(o.float()).max() for o in out) < 1.25
    param = nn.Parameter(torch.zeros_like(stack))
    opt = Muon([param], lr=1.0, weight_decay=0.0, rms_scale="original")
    param.grad = stack.clone()
    opt.step()
    assert max(_svals(w).max() for w in param.detach()) < 1.25 * update_scale(G.shape, "original")


def test_auto_rule_and_where_gram_is_used():
    from openk2.optim.muon import gram_pays, orthogonalize_many

    assert gram_pays((16, 192, 384)) and gram_pays((384, 192)) and gram_pays((2048, 7168))
    assert not gram_pays((256, 256)) and not gram_pays((64, 128)) and not gram_pays((192, 384), steps=3)
    stack, small_stack, matrix = torch.randn(3, 128, 256), torch.randn(3, 32, 80), torch.randn(128, 256)
    assert torch.equal(zeropower_via_newtonschulz(stack, method="auto"),
                       zeropower_via_newtonschulz(stack, method="gram"))
    assert torch.equal(zeropower_via_newtonschulz(small_stack, method="auto"), zeropower_via_newtonschulz(small_stack))
    # the optimizer path: everything takes the standard iteration (Gram is opt-in, see the next test);
    # stack_method="auto" gives Gram to the stacks where it pays, never to 2-D matrices
    o_stack, o_small, o_matrix = orthogonalize_many([stack, small_stack, matrix])
    assert torch.equal(o_stack, zeropower_via_newtonschulz(stack))
    assert torch.equal(o_small, zeropower_via_newtonschulz(small_stack))
    assert torch.equal(o_matrix, zeropower_via_newtonschulz(matrix))
    a_stack, a_small, a_matrix = orthogonalize_many([stack, small_stack, matrix], stack_method="auto")
    assert torch.equal(a_stack, zeropower_via_newtonschulz(stack, method="gram"))
    assert torch.equal(a_small, o_small) and torch.equal(a_matrix, o_matrix)
    with pytest.raises(ValueError, match="method"):
        zeropower_via_newtonschulz(matrix, method="fast")


# -- parity with torch.optim.Muon / AdamW ----------------------------------------------------------------------


def _mats(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(48, 96, generator=g) * 0.05, torch.randn(96, 48, generator=g) * 0.05,
            torch.randn(64, 64, generator=g) * 0.05]


@pytest.mark.parametrize("ours,theirs", [("moonlight", "match_rms_adamw"), ("original", "original")])
def test_muon_matches_torch_muon(ours, theirs):
    a = [nn.Parameter(m.clone()) for m in _mats()]
    b = [nn.Parameter(m.clone()) for m in _mats()]
    opt_a = Muon(a, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, rms_scale=ours)
    opt_b = torch.optim.Muon(b, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn=theirs)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for pa, pb in zip(a, b):
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert pa.sub(_mats()[2]).abs().max() > 1e-3  # the weights really moved


def test_muon_update_rms_moonlight_is_about_point_two():
    p = nn.Parameter(torch.zeros(64, 256))
    opt = Muon([p], lr=1.0, weight_decay=0.0)
    p.grad = torch.randn(64, 256)
    opt.step()
    rms = p.detach().float().pow(2).mean().sqrt().item()
    assert 0.15 < rms < 0.25, rms
    assert abs(opt.last_stats["update_rms"] - rms) < 1e-3
    assert update_scale((64, 256), "moonlight") == pytest.approx(0.2 * 16)
    assert update_scale((256, 64), "original") == pytest.approx(2.0)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 32)
        self.proj = nn.Linear(32, 48)
        self.experts = nn.Parameter(torch.randn(4, 16, 32) * 0.05)
        self.norm = nn.LayerNorm(48)
        self.conv = nn.Conv2d(2, 2, 3)  # 4-D weight: Muon cannot take it
        self.lm_head = nn.Linear(48, 50, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        x = x + torch.einsum("bti,eoi->bto", x, self.experts).mean(-1, keepdim=True)
        h = self.norm(self.proj(x))
        c = self.conv(h.reshape(-1, 2, 4, 6)).sum()
        return self.lm_head(h) + 0 * c


def _loss(model, ids):
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    m1 = _Tiny()
    m2 = copy.deepcopy(m1)
    # every parameter in the AdamW group, so both models see the same gradients
    opt1 = MuonClip(m1, lr=1e-2, weight_decay=0.1, qk_clip_tau=None, muon_filter=lambda n, p: False)
    adamw_names = set(opt1.adamw_param_names())
    assert adamw_names == {n for n, _ in m1.named_parameters()}
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, fused=True)
    ids = torch.randint(0, 50, (2, 12))
    for _ in range(4):
        for m in (m1, m2):
            m.zero_grad()
            _loss(m, ids).backward()
        opt1.step()
        opt2.step()
    named2 = dict(m2.named_parameters())
    for n, p in m1.named_parameters():
        if n in adamw_names:
            torch.testing.assert_close(p, named2[n], rtol=1e-6, atol=1e-7)


def test_adamw_lr_sets_only_the_adamw_group():
    """adamw_lr: MuonClip equals Muon at lr on its matrices plus torch.optim.AdamW at adamw_lr on the rest."""
    torch.manual_seed(0)
    m1 = _Tiny()
    m2 = copy.deepcopy(m1)
    opt = MuonClip(m1, lr=1e-2, weight_decay=0.1, qk_clip_tau=None, adamw_lr=1e-3)
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-3, 1e-2]
    named2 = dict(m2.named_parameters())
    muon_ref = Muon([named2[n] for n in opt.muon_param_names()], lr=1e-2, weight_decay=0.1)
    adamw_ref = torch.optim.AdamW([named2[n] for n in opt.adamw_param_names()], lr=1e-3, weight_decay=0.1,
                                  betas=(0.9, 0.95), eps=1e-8, fused=True)
    ids = torch.randint(0, 50, (2, 12))
    for _ in range(3):
        for m in (m1, m2):
            m.zero_grad()
            _loss(m, ids).backward()
        opt.step(), muon_ref.step(), adamw_ref.step()
    for n, p in m1.named_parameters():
        torch.testing.assert_close(p, named2[n], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="adamw_lr"):
        MuonClip(_Tiny(), lr=1e-2, qk_clip_tau=None, adamw_lr=0.0)


def test_grouping_rule_and_override():
    model = _Tiny()
    muon, adamw = split_params_for_muonclip(model)
    muon_names = {n for n, _ in muon}
    assert muon_names == {"proj.weight", "experts"}
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight", "norm.bias", "proj.bias", "conv.weight",
            "conv.bias"} == {n for n, _ in adamw}
    # the user's rule wins, except where Muon cannot handle the tensor (1-D bias -> AdamW, with a warning)
    with pytest.warns(UserWarning, match="proj.bias"):
        muon, _ = split_params_for_muonclip(model, muon_filter=lambda n, p: n.startswith(("proj", "lm_head")))
    assert {n for n, _ in muon} == {"proj.weight", "lm_head.weight"}


def test_grouping_tied_head_goes_to_adamw():
    model = _Tiny()
    model.lm_head.weight = model.embed_tokens.weight = nn.Parameter(torch.randn(50, 48))
    muon, adamw = split_params_for_muonclip(model)
    assert all(p is not model.lm_head.weight for _, p in muon)


def test_nan_gradient_is_reported_and_skipped():
    model = _Tiny()
    opt = MuonClip(model, lr=1e-2, qk_clip_tau=None)
    ids = torch.randint(0, 50, (2, 12))
    _loss(model, ids).backward()
    model.proj.weight.grad[0, 0] = float("nan")
    model.norm.weight.grad[0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning, match="proj.weight"):
        opt.step()
    assert opt.last_stats["nonfinite_skipped"] == 2
    assert torch.equal(model.proj.weight, before["proj.weight"])
    assert torch.equal(model.norm.weight, before["norm.weight"])
    assert "momentum_buffer" not in opt.state[model.proj.weight]
    assert not torch.equal(model.experts, before["experts"])  # the rest trained
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    model = _Tiny()
    opt = MuonClip(model, lr=1e-2, qk_clip_tau=None)
    data = [torch.randint(0, 50, (2, 12)) for _ in range(6)]

    def train(m, o, batches):
        for ids in batches:
            o.zero_grad()
            _loss(m, ids).backward()
            o.step()

    train(model, opt, data[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, data[3:])

    resumed = _Tiny()
    resumed.load_state_dict(saved_model)
    opt2 = MuonClip(resumed, lr=1e-2, qk_clip_tau=None)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, data[3:])
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_lambda_lr_drives_every_group():
    model = _Tiny()
    opt = MuonClip(model, lr=2e-4, qk_clip_tau=None)
    sched = WSDSchedule(warmup_steps=4, stable_steps=2, decay_steps=4, floor=0.1).lambda_lr(opt)
    lrs = []
    for _ in range(12):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()  # no gradients: a no-op, but keeps the scheduler's call-order check quiet
        sched.step()
    assert all(len(set(x)) == 1 for x in lrs)  # Muon and AdamW groups share the lr
    assert lrs[0][0] == pytest.approx(2e-4 / 4) and lrs[3][0] == pytest.approx(2e-4)
    assert lrs[11][0] == pytest.approx(2e-5)


def test_qk_clip_needs_a_model_and_attention():
    with pytest.raises(ValueError, match="nn.Module"):
        MuonClip([nn.Parameter(torch.randn(4, 4))], qk_clip_tau=100.0)
    with pytest.raises(ValueError, match="no attention module"):
        MuonClip(_Tiny(), qk_clip_tau=100.0)
    with pytest.raises(ValueError, match="rms_scale"):
        MuonClip(_Tiny(), qk_clip_tau=None, rms_scale="bogus")


def test_muon_rejects_unsupported_shapes_with_a_clear_error():
    with pytest.raises(ValueError, match=r"\(5,\)"):
        Muon([nn.Parameter(torch.randn(5))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Muon([nn.Parameter(torch.randn(2, 3, 4))])  # 3-D is fine
    assert math.isfinite(update_scale((3, 4), "original"))
