import json

import pytest
import torch

from openk2.config import K2Config, flops_per_token, main


def test_round_trip_json_and_unknown_keys_kept(tmp_path):
    cfg = K2Config.preset("k2")
    data = cfg.to_dict()
    data["some_future_key"] = {"a": 1}
    data["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    loaded = K2Config.from_json(path)
    assert loaded.extra == {"some_future_key": {"a": 1}, "auto_map": data["auto_map"]}
    loaded.save_json(tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again == json.loads(json.dumps(data))
    assert K2Config.from_json(tmp_path / "again.json") == loaded


def test_presets_validate_and_small_matches_the_issue_anchor():
    for name in ("tiny", "small", "k2"):
        K2Config.preset(name)
    small = K2Config.preset("small").param_counts()
    assert abs(small["total"] - 28.6e6) / 28.6e6 < 0.01
    assert abs(small["active"] - 15.4e6) / 15.4e6 < 0.01
    with pytest.raises(ValueError, match="unknown preset"):
        K2Config.preset("huge")


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok"),
        (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(first_k_dense_replace=7), "first_k_dense_replace"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(topk_method="magic"), "topk_method"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ],
)
def test_contradictions_name_the_field(change, field):
    data = K2Config.preset("tiny").to_dict()
    data.update(change)
    with pytest.raises(ValueError, match=field):
        K2Config.from_dict(data)


def test_transformers5_spellings_are_accepted():
    transformers = pytest.importorskip("transformers")
    tiny = K2Config.preset("tiny").replace(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        rope_theta=12345.0, num_nextn_predict_layers=0,
    )
    hf = transformers.DeepseekV3Config(**{k: v for k, v in tiny.to_dict().items() if k != "model_type"})
    written = json.loads(hf.to_json_string())
    assert "rope_parameters" in written and "rope_scaling" not in written  # the spelling we must accept
    back = K2Config.from_dict(written)
    assert back.rope_theta == 12345.0
    assert back.rope_scaling["type"] == "yarn" and back.rope_scaling["factor"] == 4.0
    assert back.rope_scaling["mscale_all_dim"] == 0.707
    for name in ("hidden_size", "q_lora_rank", "kv_lora_rank", "n_routed_experts", "num_experts_per_tok",
                 "first_k_dense_replace", "rope_interleave", "num_nextn_predict_layers"):
        assert getattr(back, name) == getattr(tiny, name), name
    # default rope (no scaling) comes back as rope_scaling None
    plain = json.loads(transformers.DeepseekV3Config(**{k: v for k, v in K2Config.preset("tiny").to_dict().items()
                                                         if k != "model_type"}).to_json_string())
    assert K2Config.from_dict(plain).rope_scaling is None
    # a derived key that disagrees is a contradiction
    written["qk_head_dim"] = 999
    with pytest.raises(ValueError, match="qk_head_dim"):
        K2Config.from_dict(written)


def test_k2_counts_match_the_paper():
    cfg = K2Config.preset("k2")
    counts = cfg.param_counts()
    # The pre-training shape has one MTP module: Table 2's 1.04T total / 32.6B activated, Table 4's 1043B base model.
    assert cfg.num_nextn_predict_layers == 1
    assert abs(counts["total"] - 1.04e12) / 1.04e12 < 0.01
    assert abs(counts["total"] - 1043e9) / 1043e9 < 1e-3
    assert abs(counts["active"] - 32.6e9) / 32.6e9 < 0.01
    # Without it (the released Instruct config: num_nextn_predict_layers 0) it is 1.0264T; activated is the same,
    # since the MTP module is not on the per-token path of the model that serves (as DeepSeek-V3's 37B).
    released = cfg.replace(num_nextn_predict_layers=0).param_counts()
    assert abs(counts["total_without_mtp"] - 1.0264e12) / 1.0264e12 < 1e-3
    assert released["total"] == released["total_without_mtp"] == counts["total_without_mtp"]
    assert released["active"] == counts["active"] and released["mtp_total"] == 0
    assert counts["total"] - counts["total_without_mtp"] == counts["mtp_total"] == counts["mtp_module"]


def test_param_counts_match_instantiated_model_and_k2_on_meta():
    from openk2.model import K2ForCausalLM

    for name in ("tiny", "small", "k2"):
        cfg = K2Config.preset(name)
        with torch.device("meta"):
            model = K2ForCausalLM(cfg)
        counts = cfg.param_counts()
        assert sum(p.numel() for p in model.parameters()) == counts["total"], name
        attn = sum(p.numel() for p in model.model.layers[0].self_attn.parameters())
        assert attn == counts["attention_per_layer"]
        main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
        assert main == counts["total_without_mtp"], name
        for module in model.mtp:  # the embedding and lm_head are shared, not counted again
            assert sum(p.numel() for p in module.parameters()) == counts["mtp_module"], name
    for variant in (dict(q_lora_rank=None), dict(attention_bias=True), dict(n_shared_experts=2),
                    dict(num_nextn_predict_layers=2)):
        cfg = K2Config.preset("tiny").replace(**variant)
        model = K2ForCausalLM(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.param_counts()["total"], variant


def test_flops_per_token_formula():
    cfg = K2Config.preset("small")
    counts = cfg.param_counts()
    expected = 6 * (counts["active"] - counts["embed"] - counts["norms"])
    expected += 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 1024 / 2
    assert flops_per_token(cfg, 1024) == expected


def test_flops_per_token_counts_the_mtp_modules_matmuls():
    """Each MTP module adds, per token: its matmul weights on the token's path (from the instantiated module:
    everything but its norms, routed experts at k of E) and one more lm_head pass, x6; plus one attention term.
    (As in the main-model formula, the two small latent norms inside MLA are counted with the attention weights.)"""
    from openk2.model import K2ForCausalLM, RMSNorm

    cfg = K2Config.preset("tiny").replace(num_nextn_predict_layers=2)
    model = K2ForCausalLM(cfg)
    matmul = 0.0
    for module in model.mtp:
        norms = {id(p) for name, m in module.named_modules() if isinstance(m, RMSNorm) and "self_attn" not in name
                 for p in m.parameters()}
        for name, p in module.named_parameters():
            if id(p) in norms:
                continue
            share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".experts." in name else 1.0
            matmul += p.numel() * share
        matmul += model.lm_head.weight.numel()
    attention = 6 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 64 / 2
    base = flops_per_token(cfg.replace(num_nextn_predict_layers=0), 64)
    assert flops_per_token(cfg, 64) == pytest.approx(base + 6 * matmul + 2 * attention, rel=1e-12)


def test_info_cli(capsys, tmp_path):
    assert main(["--preset", "k2"]) == 0
    out = capsys.readouterr().out
    assert "1.044T" in out and "with MTP" in out and "active" in out
    assert "1.026T" in out and "without MTP" in out  # the released (MTP-free) shape
    path = tmp_path / "config.json"
    K2Config.preset("tiny").save_json(path)
    assert main(["--config", str(path)]) == 0
    assert "249,984" in capsys.readouterr().out
