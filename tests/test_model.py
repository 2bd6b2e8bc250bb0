import math

import pytest
import torch
import torch.nn.functional as F

from openk2.config import K2Config
from openk2 import model as model_module
from openk2.model import (IGNORE_INDEX, ChunkedCrossEntropy, K2ForCausalLM, MoE, RoutedExperts, Router,
                          causal_attention, causal_lm_loss)


def tiny(**changes) -> K2Config:
    return K2Config.preset("tiny").replace(**changes)


def randomize_norms_and_bias(model: K2ForCausalLM, scale: float = 0.0) -> None:
    """Norm weights away from 1 so a wrong norm placement shows; router bias optional."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for router in model.routers():
            router.e_score_correction_bias.copy_(scale * torch.randn_like(router.e_score_correction_bias))


# ---------------------------------------------------------------------------------------------------------------
# forward / loss
def test_forward_shapes_and_loss_matches_manual_cross_entropy():
    model = K2ForCausalLM(tiny())
    ids = torch.randint(0, 512, (2, 12))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 12, 512)
    shifted = out.logits[:, :-1].reshape(-1, 512)
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE_INDEX
    expected = F.cross_entropy(shifted[keep], target[keep])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], missing
    # all labels ignored -> 0, not NaN
    assert causal_lm_loss(out.logits.detach(), torch.full_like(ids, IGNORE_INDEX)).item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:, :5])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_torch_in_value_and_gradient(dtype, monkeypatch):
    monkeypatch.setitem(ChunkedCrossEntropy.CHUNK_BYTES, "cpu", 8 * 4 * 50)  # 8-row chunks: 37 rows -> 5 chunks
    torch.manual_seed(0)
    logits = (3 * torch.randn(37, 50)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (37,))
    targets[[0, 9, 36]] = IGNORE_INDEX
    ours = ChunkedCrossEntropy.apply(logits, targets)
    (2.5 * ours).backward()
    reference_logits = logits.detach().float().requires_grad_()
    reference = F.cross_entropy(reference_logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (2.5 * reference).backward()
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)
    assert logits.grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: the gradient is stored in bf16
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad, atol=tolerance, rtol=tolerance)
    assert logits.grad[[0, 9, 36]].abs().max() == 0  # ignored rows get no gradient


def test_bf16_model_keeps_router_bias_fp32_and_runs():
    model = K2ForCausalLM(tiny()).to(torch.bfloat16)
    router = model.routers()[0]
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32 and router.load.dtype == torch.float32
    ids = torch.randint(0, 512, (2, 8))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    with torch.no_grad():
        cache = model.eval().init_cache(1, 16)
        assert cache.dtype == torch.bfloat16
        model(ids[:1], cache=cache)
        assert torch.isfinite(model(ids[:1, :1], cache=cache).logits).all()


def test_parameter_names_follow_the_contract():
    model = K2ForCausalLM(tiny())
    names = dict(model.named_parameters())
    E, I, H = 8, 32, 64
    assert names["model.layers.1.mlp.experts.gate_proj"].shape == (E, I, H)
    assert names["model.layers.1.mlp.experts.up_proj"].shape == (E, I, H)
    assert names["model.layers.1.mlp.experts.down_proj"].shape == (E, H, I)
    assert names["model.layers.1.mlp.gate.weight"].shape == (E, H)
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names
    for key in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{key}.weight" in names
    state = model.state_dict()
    assert state["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert not any(k.endswith(".load") for k in state)  # telemetry is not checkpointed
    assert "lm_head.weight" in state and "model.norm.weight" in state


# ---------------------------------------------------------------------------------------------------------------
# QK-Clip signal
def test_max_logits_equal_brute_force_recomputation():
    cfg = tiny(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                             "mscale": 1.0, "mscale_all_dim": 1.0})
    model = K2ForCausalLM(cfg)
    randomize_norms_and_bias(model)
    ids = torch.randint(0, 512, (3, 10))
    plain = model(ids).logits
    model.set_record_max_logits(True)
    recorded_out = model(ids).logits
    torch.testing.assert_close(recorded_out, plain, atol=1e-5, rtol=1e-5)  # same forward either way
    recorded = model.max_attention_logits()
    assert recorded.shape == (3, 4) and recorded.dtype == torch.float32

    # brute force: hook each attention input, recompute q.k per head in float64
    inputs = {}
    hooks = [attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a))
             for i, attn in enumerate(model.attention_modules())]
    model(ids)
    for h in hooks:
        h.remove()
    for i, attn in enumerate(model.attention_modules()):
        x, cos, sin = inputs[i][:3]
        q_nope, q_rope, c_kv, k_rope = attn._project(x, cos, sin)
        kv = attn.kv_b_proj(c_kv).view(3, 10, 4, -1)
        k_nope = kv[..., : attn.nope_dim]
        q = torch.cat((q_nope, q_rope), -1).double()
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(3, 10, 4, -1)), -1).double()
        expected = torch.full((4,), -math.inf, dtype=torch.float64)
        for b in range(3):
            for h in range(4):
                for t in range(10):
                    for s in range(t + 1):
                        expected[h] = max(expected[h], (q[b, t, h] @ k[b, s, h]).item() * attn.softmax_scale)
        torch.testing.assert_close(recorded[i].double(), expected, atol=1e-5, rtol=1e-5)
    model.set_record_max_logits(False)
    with pytest.raises(RuntimeError, match="max attention logits"):
        model.max_attention_logits()


@pytest.mark.parametrize("path", ["blocked", "sdpa"])
def test_causal_attention_kernels_match_reference_with_grads(path, monkeypatch):
    """Both training attention paths (blocked explicit on CPU; SDPA + separate max pass) equal a float64
    reference in output, gradients and per-head max logit, over several uneven query blocks."""
    if path == "sdpa":
        monkeypatch.setattr(model_module, "EXPLICIT_ATTENTION_MAX_SCORES", 0)
    monkeypatch.setattr(model_module, "ATTENTION_QUERY_BLOCK", 48)
    torch.manual_seed(0)
    B, h, T, dq, dv, scale = 2, 3, 130, 12, 8, 0.3
    q, k, v = (torch.randn(B, h, T, d, requires_grad=True) for d in (dq, dq, dv))
    grad_out = torch.randn(B, h, T, dv)
    out, max_logits = causal_attention(q, k, v, scale, record_max_logits=True)
    out.backward(grad_out)
    grads = [t.grad.clone() for t in (q, k, v)]

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = (q64 @ k64.transpose(-2, -1)) * scale
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v64
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(max_logits.double(), scores.amax(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert causal_attention(q, k, v, scale)[1] is None  # recording off: nothing computed


# ---------------------------------------------------------------------------------------------------------------
# decode with the absorbed, compressed cache
@pytest.mark.parametrize("q_lora_rank, yarn, interleave", [(32, True, True), (None, False, False)])
def test_absorbed_decode_matches_full_forward_for_64_greedy_steps(q_lora_rank, yarn, interleave):
    scaling = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32,
               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5} if yarn else None
    cfg = tiny(q_lora_rank=q_lora_rank, rope_scaling=scaling, rope_interleave=interleave)
    model = K2ForCausalLM(cfg).eval()
    randomize_norms_and_bias(model, scale=0.05)
    prompt = torch.randint(0, 512, (1, 7))
    steps = 64
    with torch.no_grad():
        cache = model.init_cache(1, 7 + steps)
        assert cache.bytes_per_token() == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
        logits = model(prompt, cache=cache).logits[:, -1]
        tokens, step_logits = [], []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            step_logits.append(logits)
            logits = model(token, cache=cache).logits[:, -1]
        assert cache.lengths.tolist() == [7 + steps]
        # full forward over the generated sequence: same greedy tokens, same logits
        sequence = torch.cat([prompt] + tokens, dim=1)
        full = model(sequence).logits[0, 6:-1]
        assert torch.equal(full.argmax(-1), torch.cat(tokens, 1)[0])
        torch.testing.assert_close(torch.cat(step_logits), full, atol=1e-4, rtol=0)


def test_cache_rows_at_different_lengths():
    model = K2ForCausalLM(tiny()).eval()
    randomize_norms_and_bias(model)
    a = torch.randint(0, 512, (1, 9))
    b = torch.randint(0, 512, (1, 4))
    with torch.no_grad():
        cache = model.init_cache(3, 32)
        model(b, cache=cache, cache_rows=torch.tensor([2]))  # prefill one request per call, any row
        model(a, cache=cache, cache_rows=torch.tensor([0]))
        assert cache.lengths.tolist() == [9, 0, 4]
        next_tokens = torch.randint(0, 512, (2, 1))
        both = model(next_tokens, cache=cache, cache_rows=torch.tensor([0, 2])).logits[:, -1]
        assert cache.lengths.tolist() == [10, 0, 5]
        ref_a = model(torch.cat([a, next_tokens[:1]], 1)).logits[0, -1]
        ref_b = model(torch.cat([b, next_tokens[1:]], 1)).logits[0, -1]
        torch.testing.assert_close(both[0], ref_a, atol=1e-4, rtol=0)
        torch.testing.assert_close(both[1], ref_b, atol=1e-4, rtol=0)
        # several tokens appended to a non-empty row at once (a second prefill chunk)
        chunk = torch.randint(0, 512, (1, 3))
        chunked = model(chunk, cache=cache, cache_rows=torch.tensor([2])).logits
        reference = model(torch.cat([b, next_tokens[1:], chunk], 1)).logits[:, -3:]
        torch.testing.assert_close(chunked, reference, atol=1e-4, rtol=0)
        assert cache.lengths.tolist() == [10, 0, 8]
        cache.reset([0])
        assert cache.lengths.tolist() == [0, 0, 8]
        again = model(a, cache=cache, cache_rows=torch.tensor([0])).logits
        torch.testing.assert_close(again, model(a).logits, atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="overflow"):
            model(torch.zeros(1, 30, dtype=torch.long), cache=cache, cache_rows=torch.tensor([0]))
        with pytest.raises(ValueError, match="cache_rows"):
            model(next_tokens, cache=cache, cache_rows=torch.tensor([0, 5]))
        with pytest.raises(ValueError, match="twice"):
            model(next_tokens, cache=cache, cache_rows=torch.tensor([2, 2]))
        # contiguous rows (read as a view) and the same rows listed out of order give the same logits
        lengths = cache.lengths.clone()
        pair = torch.randint(0, 512, (2, 1))
        contiguous = model(pair, cache=cache, cache_rows=torch.tensor([1, 2])).logits
        cache.lengths.copy_(lengths)
        swapped = model(pair.flip(0), cache=cache, cache_rows=torch.tensor([2, 1])).logits
        torch.testing.assert_close(contiguous, swapped.flip(0), atol=1e-5, rtol=0)


def greedy_decode(model: K2ForCausalLM, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [1, steps], the logits each was picked from [steps, V]) from the cached decode path, run as the
    engine runs it (inference mode)."""
    with torch.inference_mode():
        cache = model.init_cache(1, prompt.shape[1] + steps)
        logits = model(prompt, cache=cache).logits[:, -1]
        tokens, step_logits = [], []
        for _ in range(steps):
            tokens.append(logits.argmax(-1, keepdim=True))
            step_logits.append(logits)
            logits = model(tokens[-1], cache=cache).logits[:, -1]
    return torch.cat(tokens, 1), torch.cat(step_logits)


def assert_decode_matches_full_forward(model: K2ForCausalLM, prompt: torch.Tensor, steps: int = 6) -> None:
    tokens, step_logits = greedy_decode(model, prompt, steps)
    with torch.no_grad():
        full = model(torch.cat([prompt, tokens], 1)).logits[0, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(step_logits, full, atol=1e-4, rtol=0)


def test_decode_weight_layout_copies_never_go_stale():
    model = K2ForCausalLM(tiny()).eval()
    randomize_norms_and_bias(model, scale=0.05)
    prompt = torch.randint(0, 512, (1, 5))
    assert_decode_matches_full_forward(model, prompt)
    # the decode steps really read cached [in, out] copies (else nothing below could fail)
    experts = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    lm_head_copy = model.lm_head.__dict__["_decode_t_weight"][1]
    assert lm_head_copy.shape == (64, 512) and lm_head_copy.is_contiguous() and not lm_head_copy.is_inference()
    assert experts.__dict__["_decode_t_gate_up"][1].shape == (8, 64, 2 * 32)  # [E, H, gate I + up I]
    assert model.model.layers[1].self_attn.__dict__["_decode_t_q_a_kv_a"][1].shape == (64, 32 + 32 + 8)

    # 1. training after decode: the training forward reads the parameters, and an optimizer step is seen by the
    #    next decode, even fused AdamW's, whose kernel does not bump the parameters' version counters
    twin = K2ForCausalLM(tiny())
    twin.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (2, 8))
    model.train()
    loss = model(ids, labels=ids).loss
    torch.testing.assert_close(loss, twin.train()(ids, labels=ids).loss, atol=0, rtol=0)
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True).step()
    assert_decode_matches_full_forward(model.eval(), prompt)
    # 2. an in-place update of a few rows of single weights (QK-Clip style)
    with torch.no_grad():
        model.model.layers[1].self_attn.kv_b_proj.weight[:8].mul_(0.5)
        model.lm_head.weight[:100].mul_(-1.0)
        experts.down_proj[3].mul_(2.0)
    assert_decode_matches_full_forward(model, prompt)
    # 3. load_state_dict (copy_ into the parameters) and a dtype round trip (new storage)
    model.load_state_dict(K2ForCausalLM(tiny()).state_dict())
    assert_decode_matches_full_forward(model, prompt)
    model.to(torch.bfloat16).float()
    assert_decode_matches_full_forward(model, prompt)
    model.release_decode_weights()
    assert not [k for m in model.modules() for k in m.__dict__ if k.startswith("_decode_t_")]
    assert_decode_matches_full_forward(model, prompt)


def test_cached_layers_called_directly_plan_their_own_step():
    """K2Model called with a cache but without K2ForCausalLM's plan (positions only) gives the same hidden states."""
    model = K2ForCausalLM(tiny()).eval()
    a, b = torch.randint(0, 512, (1, 6)), torch.randint(0, 512, (1, 3))
    with torch.no_grad():
        planned = model.init_cache(2, 16)
        model(a, cache=planned, cache_rows=torch.tensor([0]))
        model(b, cache=planned, cache_rows=torch.tensor([1]))
        direct = model.init_cache(2, 16)
        for row, ids in ((0, a), (1, b)):
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            model.model(ids, direct, torch.tensor([row]), positions)
        direct.lengths.copy_(planned.lengths)
        nxt = torch.randint(0, 512, (2, 1))
        hidden_direct = model.model(nxt, direct, None, planned.lengths.unsqueeze(1).clone())
        logits = model(nxt, cache=planned).logits
        torch.testing.assert_close(model.lm_head(hidden_direct), logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(direct.latents[2][:, :7], planned.latents[2][:, :7], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# router and experts
def test_router_bias_changes_selection_not_weights():
    cfg = tiny(norm_topk_prob=False)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    idx0, w0, scores = router(x)
    expected = scores.gather(1, idx0) * cfg.routed_scaling_factor
    torch.testing.assert_close(w0, expected)
    with torch.no_grad():
        router.e_score_correction_bias[3] = 10.0  # expert 3 now always selected
    idx1, w1, _ = router(x)
    assert (idx1 == 3).any(dim=1).all()
    assert not torch.equal(idx0, idx1)
    # weights are the unbiased scores of whatever was selected
    torch.testing.assert_close(w1, scores.gather(1, idx1) * cfg.routed_scaling_factor)


def test_group_limited_routing_only_picks_from_top_groups():
    cfg = tiny(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(200, cfg.hidden_size)
    idx, w, scores = router(x)
    group_scores = scores.view(200, 4, 2).topk(2, -1).values.sum(-1)
    allowed = group_scores.topk(2, -1).indices
    assert ((idx // 2).unsqueeze(-1) == allowed.unsqueeze(1)).any(-1).all()
    torch.testing.assert_close(w.sum(-1), torch.full((200,), cfg.routed_scaling_factor))  # norm_topk_prob


def test_bias_update_moves_skewed_load_toward_uniform():
    cfg = tiny()
    model = K2ForCausalLM(cfg).train()
    routers = model.routers()
    # Skewed inputs: every token leans along one direction that experts 0 and 1 like.
    direction = torch.randn(cfg.hidden_size)
    with torch.no_grad():
        for router in routers:
            router.weight.normal_(0, 0.1)
            router.weight[:2] += 0.1 * direction
    x = torch.randn(512, cfg.hidden_size) + 0.5 * direction

    def imbalance():
        with torch.no_grad():
            for router in routers:
                router(x)
        load = model.expert_load()
        for router in routers:
            router.load.zero_()
        return (load.max(dim=1).values / load.mean(dim=1)).mean().item()

    before = imbalance()
    for _ in range(30):
        with torch.no_grad():
            for router in routers:
                router(x)
        model.update_router_bias(0.02)
        assert model.expert_load().sum() == 0  # counts reset
    after = imbalance()
    assert before > 3.0, before
    assert after < 1.5, (before, after)
    assert routers[0].e_score_correction_bias[:2].max() < 0  # the popular experts were pushed down


def naive_experts(module: RoutedExperts, x, topk_idx, topk_weight):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(topk_idx.shape[1]):
            e = int(topk_idx[n, j])
            h = F.silu(x[n] @ module.gate_proj[e].T) * (x[n] @ module.up_proj[e].T)
            out[n] += topk_weight[n, j] * (h @ module.down_proj[e].T)
    return out


@pytest.mark.parametrize("dispatch", ["grouped_mm", "padded_bmm", "auto"])
def test_grouped_dispatch_equals_naive_per_expert_loop(dispatch):
    if dispatch == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch build")
    experts = RoutedExperts(6, 24, 40)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    experts.dispatch = dispatch
    x = torch.randn(33, 24, requires_grad=True)
    topk_idx = torch.stack([torch.randperm(5)[:3] for _ in range(33)])  # expert 5 never used
    topk_weight = torch.rand(33, 3)
    out = experts(x, topk_idx, topk_weight)
    ref = naive_experts(experts, x, topk_idx, topk_weight)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, experts.gate_proj, experts.down_proj])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, experts.gate_proj, experts.down_proj])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    # few assignments (the decode regime: N * k <= E) take the gathered-weights path; same answer
    few = experts(x[:2], topk_idx[:2], topk_weight[:2])
    torch.testing.assert_close(few, naive_experts(experts, x[:2], topk_idx[:2], topk_weight[:2]), atol=1e-5, rtol=1e-5)
    # bf16 autocast: experts compute in bf16 (output dtype follows the input); on CPU the grouped path rounds each
    # expert's group up to capacity_multiple rows (here 8, so most groups carry padding): same values and grads
    experts.capacity_multiple = 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = experts(x, topk_idx, topk_weight)
    torch.testing.assert_close(out_bf16, ref.detach(), atol=0.05, rtol=0.05)
    grads_bf16 = torch.autograd.grad(out_bf16.square().sum(), [x, experts.gate_proj, experts.down_proj])
    for g, r in zip(grads_bf16, ref_grads):
        assert (g - r).norm() <= 0.02 * r.norm()


def test_decode_sized_expert_paths_equal_naive_loop():
    """N * k <= E: per-expert linears on CPU (with and without autograd, the latter on the decode layout copies)
    and the gathered-weights form used on accelerators all equal the naive loop."""
    experts = RoutedExperts(6, 24, 40)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 24, requires_grad=True)
    topk_idx = torch.tensor([[0, 3, 5], [3, 1, 0]])  # experts 0 and 3 serve both tokens
    topk_weight = torch.rand(2, 3)
    for rows in (1, 2):
        args = x[:rows], topk_idx[:rows], topk_weight[:rows]
        ref = naive_experts(experts, *args)
        torch.testing.assert_close(experts(*args), ref, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(experts(*args), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(experts._gathered_swiglu(*args, torch.float32), ref, atol=1e-5, rtol=1e-5)
    out = experts(x, topk_idx, topk_weight)
    ref = naive_experts(experts, x, topk_idx, topk_weight)
    grads = torch.autograd.grad(out.square().sum(), [x, experts.up_proj, experts.down_proj])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, experts.up_proj, experts.down_proj])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_experts_run_in_bf16_under_autocast():
    experts = RoutedExperts(4, 16, 32)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    seen = []
    real = torch._grouped_mm if hasattr(torch, "_grouped_mm") else None
    x = torch.randn(8, 16)
    idx, w = torch.randint(0, 4, (8, 2)), torch.rand(8, 2)
    experts.dispatch = "padded_bmm"
    hook = torch.overrides.TorchFunctionMode

    class Spy(hook):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.bmm, real):
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16), Spy():
        experts(x, idx, w)
    assert seen and all(d == torch.bfloat16 for d in seen)


def test_sequence_balance_loss_only_when_enabled_and_training():
    model = K2ForCausalLM(tiny(aux_loss_alpha=0.01, seq_aux=True)).train()
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, ids) + out.aux_loss)
    out.loss.backward()
    assert model.routers()[0].weight.grad.abs().sum() > 0
    # uniform routing gives f_i = 1 and P_i = 1/E, so the loss is alpha (its minimum for the uniform case)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    E, k = 8, 2
    scores = torch.ones(1, 8, E)
    idx = torch.arange(8 * k).remainder(E).view(1, 8, k)
    torch.testing.assert_close(moe._sequence_balance_loss(scores, idx), torch.tensor(0.01))
    model.eval()
    assert model(ids, labels=ids).aux_loss is None
    assert K2ForCausalLM(tiny()).train()(ids).aux_loss is None  # presets: off


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers' DeepseekV3ForCausalLM (fp32), through the in-memory key adapter
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0}
PARITY_CONFIGS = {
    "qlora_groups_dense2_yarn": dict(q_lora_rank=32, n_group=2, topk_group=1, first_k_dense_replace=2,
                                     num_hidden_layers=3, rope_scaling=YARN, norm_topk_prob=True),
    "noqlora_dense0_plain_unnormed": dict(q_lora_rank=None, first_k_dense_replace=0, num_hidden_layers=2,
                                          rope_scaling=None, norm_topk_prob=False, rope_interleave=False,
                                          attention_bias=True, routed_scaling_factor=1.7),
    "qlora_4groups_yarn_attention_factor": dict(
        q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
        rope_scaling={**YARN, "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 8.0},
        qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=20, kv_lora_rank=24, n_shared_experts=2),
}


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_parity_with_transformers_deepseek_v3(name):
    transformers = pytest.importorskip("transformers")
    from transformers.core_model_loading import revert_weight_conversion

    from openk2.checkpoint import load_hf_state_dict, to_hf_state_dict

    cfg = tiny(**PARITY_CONFIGS[name], initializer_range=0.1)
    hf_fields = {k: v for k, v in cfg.to_dict().items() if k != "model_type"}
    theirs = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**hf_fields)).eval()
    with torch.no_grad():
        for param_name, p in theirs.named_parameters():
            if "norm" in param_name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif param_name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        # Router biases drawn in [0, 0.2): non-negative, so every kept-group expert's score + bias is > 0. Older
        # transformers fill unselected groups with 0 instead of -inf; with these biases that fill can never
        # outrank a kept expert, so the selection is the same under either convention.
        for buffer_name, b in theirs.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.rand_like(b))
    released = revert_weight_conversion(theirs, theirs.state_dict())  # per-expert released key names
    ours = K2ForCausalLM(cfg).eval()
    load_hf_state_dict(ours, released)
    # the adapter maps back to exactly the same released tensors
    back = to_hf_state_dict(ours)
    assert back.keys() == released.keys()
    assert all(torch.equal(back[k], released[k]) for k in back)

    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids).logits
        ours.set_record_max_logits(True)
        got_explicit = ours(ids).logits
    assert expected.abs().max() > 0.5  # logits large enough for 1e-4 to mean something
    assert (expected - got).abs().max() <= 1e-4
    assert (expected - got_explicit).abs().max() <= 1e-4
    # the loss matches transformers' too
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, labels=ids).loss, theirs(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)


def test_from_pretrained_and_save_pretrained_delegate_to_checkpoint(tmp_path):
    model = K2ForCausalLM(tiny()).eval()
    randomize_norms_and_bias(model, scale=0.1)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = K2ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert isinstance(loaded, K2ForCausalLM)
    # (checkpoint.py writes model_type "deepseek_v3" so transformers can load the directory too)
    assert loaded.config.replace(model_type="kimi_k2") == model.config
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------------------------
# Multi-token prediction (training-only MTP modules)
def test_mtp_loss_is_the_depth_one_cross_entropy_computed_by_hand():
    """Depth 1 at position i reads the main model's output h_i and Emb(t_{i+1}) (embedding first in the concat,
    as the released eh_proj expects) and is scored against t_{i+2}; loss = CE + mtp_loss_weight * mtp_loss."""
    torch.manual_seed(0)
    model = K2ForCausalLM(tiny(num_nextn_predict_layers=1, mtp_loss_weight=0.25)).train()
    randomize_norms_and_bias(model)
    ids = torch.randint(0, 512, (2, 12))
    labels = ids.clone()
    labels[0, 5] = IGNORE_INDEX
    out = model(ids, labels=labels)
    mtp = model.mtp[0]
    hidden = model.model(ids)
    mixed = mtp.eh_proj(torch.cat((mtp.enorm(model.model.embed_tokens(ids[:, 1:])), mtp.hnorm(hidden[:, :-1])), -1))
    cos, sin = model.model.rotary(torch.arange(11))
    block_out = mtp.mlp(mtp.post_attention_layernorm(x := mixed + mtp.self_attn(mtp.input_layernorm(mixed),
                                                                               cos[None], sin[None]))) + x
    logits = model.lm_head(mtp.shared_head.norm(block_out))  # [2, 11, V]; position i predicts t_{i+2}
    targets = labels[:, 2:]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 512), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.mtp_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels) + 0.25 * out.mtp_loss)
    # gradient reaches the MTP module's own weights and, through the shared head/embedding, the main ones
    out.loss.backward()
    for p in (mtp.eh_proj.weight, mtp.enorm.weight, mtp.hnorm.weight, mtp.mlp.experts.gate_proj,
              mtp.shared_head.norm.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # eval / generation: MTP does not run, loss is the plain next-token CE
    model.eval()
    with torch.no_grad():
        evaluated = model(ids, labels=labels)
    assert evaluated.mtp_loss is None
    torch.testing.assert_close(evaluated.loss, causal_lm_loss(evaluated.logits, labels))


def test_mtp_module_learns_the_token_two_ahead():
    """A tiny model trained on one random sequence: the depth-1 loss on the true t+2 targets falls far below
    chance, while the same outputs scored against t+3 (labels shifted by one) stay near chance."""
    torch.manual_seed(0)
    model = K2ForCausalLM(tiny(num_nextn_predict_layers=1, mtp_loss_weight=1.0)).train()
    ids = torch.randperm(512)[:24].unsqueeze(0)  # distinct tokens: t+2 follows from t+1 alone
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        optimizer.zero_grad()
        out = model(ids, labels=ids)
        first = first if first is not None else float(out.mtp_loss.detach())
        out.loss.backward()
        optimizer.step()
    with torch.no_grad():
        true_targets = float(model(ids, labels=ids).mtp_loss)
        shifted = torch.cat((ids[:, 1:], torch.full((1, 1), IGNORE_INDEX)), dim=1)  # scores t+3 instead of t+2
        wrong_targets = float(model(ids, labels=shifted).mtp_loss)
    assert first > 5.0  # ~ln(512) at init
    assert true_targets < 0.5 and wrong_targets > 3.0, (true_targets, wrong_targets)


def test_mtp_module_joins_qk_clip_router_balancing_and_expert_load():
    from openk2.optim.qk_clip import apply_qk_clip, find_attention_modules

    torch.manual_seed(0)
    cfg = tiny(num_nextn_predict_layers=1)
    model = K2ForCausalLM(cfg).train()
    L, moe_layers = cfg.num_hidden_layers, cfg.num_moe_layers
    model.set_record_max_logits(True)
    ids = torch.randint(0, 512, (2, 16))
    model(ids, labels=ids)
    logits = model.max_attention_logits()
    assert logits.shape == (L + 1, cfg.num_attention_heads) and torch.isfinite(logits).all()
    assert logits[L].equal(model.mtp[0].self_attn.max_logits)
    # routers: the MTP block's is the last; it counted its 2 x 15 positions, top-k each
    load = model.expert_load()
    assert len(model.routers()) == moe_layers + 1 and load.shape == (moe_layers + 1, cfg.n_routed_experts)
    assert float(load[-1].sum()) == 2 * 15 * cfg.num_experts_per_tok
    model.update_router_bias(0.01)
    assert model.mtp[0].mlp.gate.e_score_correction_bias.abs().sum() > 0
    assert float(model.expert_load().sum()) == 0.0
    # QK-Clip finds and clips the MTP attention too
    targets = find_attention_modules(model)
    assert [t.name for t in targets][-1] == "mtp.0.self_attn"
    before = model.mtp[0].self_attn.q_b_proj.weight.clone()
    tau = float(logits[L].max()) / 2
    stats = apply_qk_clip(targets, tau)
    assert stats["max_logit_per_layer"][-1] == pytest.approx(float(logits[L].max()))  # in target order
    assert not torch.equal(before, model.mtp[0].self_attn.q_b_proj.weight)
    # a forward without labels does not run MTP: its signal is reported missing, by index, with the reason
    fresh = K2ForCausalLM(cfg).train()
    fresh.set_record_max_logits(True)
    fresh(ids)
    with pytest.raises(RuntimeError, match=rf"\[{L}\].*MTP modules"):
        fresh.max_attention_logits()


def test_mtp_does_not_change_the_main_model_or_decoding():
    torch.manual_seed(0)
    with_mtp = K2ForCausalLM(tiny(num_nextn_predict_layers=2)).eval()
    plain = K2ForCausalLM(tiny()).eval()
    missing, unexpected = plain.load_state_dict(with_mtp.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("mtp.") for k in unexpected)
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(with_mtp(ids).logits, plain(ids).logits)
        cache = with_mtp.init_cache(1, 16)
        step_logits = with_mtp(ids, cache=cache).logits
    torch.testing.assert_close(step_logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(cache.latents) == with_mtp.config.num_hidden_layers  # no cache for MTP blocks
