"""openk2.checkpoint: HF-layout files, block FP8, bad input, atomic writes, transformers interop."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from openk2 import checkpoint as ckpt
from openk2.checkpoint import (
    CheckpointError,
    dequantize_fp8_blockwise,
    load_pretrained,
    quantize_fp8_blockwise,
    resolve_checkpoint_dir,
    save_pretrained,
    to_hf_state_dict,
)
from openk2.config import K2Config

# e4m3 keeps 3 mantissa bits: round-to-nearest of a normal value x has |error| <= 2^-4 |x| (half an ulp,
# ulp = 2^(e-3) for x in [2^e, 2^(e+1))). Below the smallest normal (2^-6, in units of the block scale s)
# the spacing is 2^-9, so the absolute error is <= 2^-10 * s. Hence per element
#     |dequant(quant(x)) - x| <= 2^-4 |x| + 2^-10 s,   s = max|block| / 448,
# and per block the error relative to the block's max is <= 2^-4 + 2^-10/448 < 2^-3. The fp32 divide and
# multiply add relative errors of ~2^-24, covered by the (1 + 2^-20) slack.
E4M3_REL = 2.0**-4
E4M3_SUBNORMAL_ABS = 2.0**-10
SLACK = 1 + 2.0**-20


def tiny_config(**changes) -> K2Config:
    return K2Config.preset("tiny").replace(**changes)


def make_model(cfg: K2Config | None = None, dtype: torch.dtype = torch.float32):
    from openk2.model import K2ForCausalLM

    model = K2ForCausalLM(cfg or tiny_config()).to(dtype)
    ckpt.fp32_buffers(model)  # the router bias stays fp32 (what load_pretrained gives too)
    with torch.no_grad():  # a non-zero router bias, so losing it on the way would show
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("e_score_correction_bias"):
                tensor.uniform_(0.0, 0.1)
    return model.eval()


def assert_same_weights(a, b, exact: bool = True) -> None:
    sa, sb = to_hf_state_dict(a), to_hf_state_dict(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def file_of(directory: Path, name: str) -> Path:
    index = directory / ckpt.INDEX_NAME
    if index.exists():
        return directory / json.loads(index.read_text())["weight_map"][name]
    return directory / ckpt.SINGLE_FILE_NAME


def rewrite_file(file: Path, edit) -> None:
    """Load a shard, let `edit(dict)` change it, write it back (test helper for corrupting checkpoints)."""
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def headers(directory: Path) -> dict[str, str]:
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


# --------------------------------------------------------------------------------------------------------------
# Block FP8
# --------------------------------------------------------------------------------------------------------------


def test_dequantize_matches_spec_formula_on_hand_made_case():
    # 2x2 blocks on a 3x5 weight: partial blocks on both edges.
    values = torch.tensor([[1.0, -2.0, 0.5, 4.0, -448.0],
                           [3.0, 0.25, -1.5, 8.0, 6.0],
                           [-0.125, 7.0, 2.0, -3.0, 1.0]])
    w_fp8 = values.to(torch.float8_e4m3fn)  # all exactly representable
    scale_inv = torch.tensor([[0.5, 2.0, 10.0],
                              [-1.0, 3.0, 0.25]])
    expected = torch.tensor([[0.5, -1.0, 1.0, 8.0, -4480.0],
                             [1.5, 0.125, -3.0, 16.0, 60.0],
                             [0.125, -7.0, 6.0, -9.0, 0.25]])
    assert torch.equal(dequantize_fp8_blockwise(w_fp8, scale_inv, block=(2, 2)), expected)


@pytest.mark.parametrize("rows, cols", [(300, 131), (256, 384)])  # partial edge blocks; whole blocks only
def test_dequantize_matches_spec_formula_at_128_blocks(rows, cols):
    g = torch.Generator().manual_seed(1)
    w_fp8 = (torch.randn(rows, cols, generator=g) * 100).to(torch.float8_e4m3fn)
    grid = (-(-rows // 128), -(-cols // 128))
    scale_inv = torch.rand(*grid, generator=g) + 0.01
    out = dequantize_fp8_blockwise(w_fp8, scale_inv)
    i = torch.arange(rows)[:, None]
    j = torch.arange(cols)[None, :]
    reference = w_fp8.float() * scale_inv[i // 128, j // 128]  # W[i,j] = W_fp8[i,j] * scale_inv[i//128, j//128]
    assert out.shape == (rows, cols) and out.dtype == torch.float32
    assert torch.equal(out, reference)
    assert dequantize_fp8_blockwise(w_fp8, scale_inv, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=rf"\[{grid[0]}, {grid[1]}\]"):
        dequantize_fp8_blockwise(w_fp8, scale_inv[:1])


@pytest.mark.parametrize("shape", [(128, 128), (300, 131), (7, 200)])
def test_quantize_error_within_e4m3_bound(shape):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(*shape, generator=g)
    w *= torch.logspace(-6, 3, shape[1])[None, :]  # wildly different magnitudes across blocks and inside them
    w[:64, :64] = 0.0  # an all-zero block (for shapes that have one)
    w_fp8, scale_inv = quantize_fp8_blockwise(w)
    grid = ((shape[0] + 127) // 128, (shape[1] + 127) // 128)
    assert w_fp8.dtype == torch.float8_e4m3fn and w_fp8.shape == w.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == grid
    i = torch.arange(shape[0])[:, None] // 128
    j = torch.arange(shape[1])[None, :] // 128
    s = scale_inv[i, j]
    # s = max|x| / 448 per block, so each block's largest element lands exactly on +-448
    for bi in range(grid[0]):
        for bj in range(grid[1]):
            block = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            assert scale_inv[bi, bj] == block.abs().max() / 448
    err = (dequantize_fp8_blockwise(w_fp8, scale_inv) - w).abs()
    bound = (E4M3_REL * w.abs() + E4M3_SUBNORMAL_ABS * s) * SLACK
    assert (err <= bound).all(), (err - bound).max()
    block_max = (w.abs().amax() if w.numel() else 1.0)
    assert err.max() <= 2.0**-3 * block_max
    if shape == (128, 128):
        assert torch.equal(dequantize_fp8_blockwise(w_fp8, scale_inv)[:64, :64], torch.zeros(64, 64))


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), block_rows=st.integers(1, 130),
       block_cols=st.integers(1, 130), log_scale=st.floats(-20, 20), seed=st.integers(0, 2**31 - 1))
def test_fp8_round_trip_bound_and_formula_property(rows, cols, block_rows, block_cols, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 2.0**log_scale
    block = (block_rows, block_cols)
    w_fp8, scale_inv = quantize_fp8_blockwise(w, block)
    i = torch.arange(rows)[:, None] // block_rows
    j = torch.arange(cols)[None, :] // block_cols
    restored = dequantize_fp8_blockwise(w_fp8, scale_inv, block)
    assert torch.equal(restored, w_fp8.float() * scale_inv[i, j])
    bound = (E4M3_REL * w.abs() + E4M3_SUBNORMAL_ABS * scale_inv[i, j]) * SLACK
    assert ((restored - w).abs() <= bound).all()


def test_fp8_tensor_selection_follows_deepseek_convention():
    quantized = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_b_proj.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
                 "model.layers.1.mlp.experts.17.up_proj.weight"]
    kept = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_a_layernorm.weight",
            "model.layers.0.self_attn.kv_a_layernorm.weight"]
    assert all(ckpt.is_fp8_quantizable(n) for n in quantized)
    assert not any(ckpt.is_fp8_quantizable(n) for n in kept)


def test_parse_size():
    assert ckpt.parse_size("5GB") == 5 * 10**9
    assert ckpt.parse_size("2GiB") == 2**31
    assert ckpt.parse_size("100KB") == 100_000
    assert ckpt.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="5 parsecs"):
        ckpt.parse_size("5 parsecs")


# --------------------------------------------------------------------------------------------------------------
# Save / load round trips
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_round_trip_is_bit_exact(tmp_path, dtype):
    model = make_model(dtype=dtype)
    out = save_pretrained(model, tmp_path / "ckpt", max_shard_size="100KB")
    index = json.loads((out / ckpt.INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / ckpt.SINGLE_FILE_NAME).exists()

    # index: exactly the HF keys, each in the file it names, total_size = tensor bytes
    hf = to_hf_state_dict(model)
    assert set(index["weight_map"]) == set(hf)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    total = 0
    for file in files:
        with safe_open(str(out / file), "pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == file}
            for k in keys:
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
        # greedy packing: a shard over the limit holds a single tensor
        if (out / file).stat().st_size > 100_000 + 10_000:
            assert len(keys) == 1
    assert index["metadata"]["total_size"] == total

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert "quantization_config" not in config

    loaded = load_pretrained(out)  # dtype from config.json
    assert_same_weights(model, loaded)
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_single_file_when_one_shard_and_dtype_override(tmp_path):
    model = make_model()
    out = save_pretrained(model, tmp_path / "single")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(out, dtype=torch.bfloat16)
    sd = to_hf_state_dict(loaded)
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert torch.equal(sd["lm_head.weight"], to_hf_state_dict(model)["lm_head.weight"].bfloat16())

    # saving with a dtype cast keeps the router bias in fp32 on disk
    out_bf16 = save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    dtypes = headers(out_bf16)
    assert dtypes["lm_head.weight"] == "BF16" and dtypes["model.layers.2.mlp.gate.e_score_correction_bias"] == "F32"
    assert json.loads((out_bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_load_into_existing_model_in_place(tmp_path):
    source, target = make_model(), make_model(tiny_config())
    save_pretrained(source, tmp_path / "c", max_shard_size="50KB")
    ckpt.load_hf_state_dict_from_dir(target, tmp_path / "c")
    assert_same_weights(source, target)


def test_save_extras_tokenizer_and_trainer_state(tmp_path):
    class FakeTokenizer:  # only the save(dir) protocol matters here
        def save(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{}")

    out = save_pretrained(make_model(), tmp_path / "x", tokenizer=FakeTokenizer(),
                          before_publish=lambda d: (d / "trainer_state.pt").write_bytes(b"state"))
    assert (out / "tokenizer.json").exists() and (out / "trainer_state.pt").read_bytes() == b"state"


# --------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------

CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from openk2.config import K2Config
    from openk2.model import K2ForCausalLM
    from openk2 import checkpoint
    from safetensors import torch as st

    real_save_file, calls = st.save_file, []
    def save_then_die(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        calls.append(filename)
        if len(calls) == 2:
            os._exit(3)  # a hard crash: no exception handlers, no cleanup
    checkpoint.save_file = save_then_die
    torch.manual_seed(1)
    checkpoint.save_pretrained(K2ForCausalLM(K2Config.preset("tiny")), sys.argv[1], max_shard_size="100KB")
""")


def test_crash_mid_save_never_leaves_a_checkpoint_at_the_target(tmp_path):
    target = tmp_path / "run" / "checkpoints" / "step_000002"
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(target)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3, result.stderr
    assert not target.exists()
    leftovers = list(target.parent.glob(".step_000002.tmp-*"))
    assert leftovers and any(leftovers[0].glob("*.safetensors"))  # the crash happened mid-way
    with pytest.raises(CheckpointError, match="step_000002"):
        load_pretrained(target)

    # an existing checkpoint at the target survives a crash while being overwritten; the next save to the
    # same target removes the dead writer's temp dir
    model = make_model()
    save_pretrained(model, target)
    assert not any(p.exists() for p in leftovers)
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(target)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3, result.stderr
    assert_same_weights(model, load_pretrained(target))


def test_failed_save_cleans_up_and_leaves_no_target(tmp_path):
    def fail(_tmp_dir):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(make_model(), tmp_path / "ckpt", before_publish=fail)
    assert list(tmp_path.iterdir()) == []


def test_resolve_checkpoint_dir(tmp_path):
    hf_dir = save_pretrained(make_model(), tmp_path / "run" / "checkpoints" / "step_000300")
    assert resolve_checkpoint_dir(hf_dir) == hf_dir
    with pytest.raises(CheckpointError, match="no checkpoints/latest"):
        resolve_checkpoint_dir(tmp_path / "run")
    ckpt.write_latest_pointer(tmp_path / "run" / "checkpoints", "step_000300")
    assert resolve_checkpoint_dir(tmp_path / "run") == hf_dir
    assert resolve_checkpoint_dir(tmp_path / "run" / "checkpoints") == hf_dir
    assert load_pretrained(tmp_path / "run") is not None
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000400\n")
    with pytest.raises(CheckpointError, match="step_000400"):
        resolve_checkpoint_dir(tmp_path / "run")
    with pytest.raises(CheckpointError, match="nowhere"):
        resolve_checkpoint_dir(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------------------
# FP8 save / load
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [(128, 128), (16, 16)])
def test_fp8_save_load_within_e4m3_bounds(tmp_path, block):
    model = make_model()
    out = save_pretrained(model, tmp_path / "fp8", fp8=True, fp8_block=block, max_shard_size="60KB")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": list(block)}
    dtypes = headers(out)
    original = to_hf_state_dict(model)
    for name in original:
        if ckpt.is_fp8_quantizable(name):
            assert dtypes[name] == "F8_E4M3" and dtypes[name + "_scale_inv"] == "F32", name
        else:
            assert dtypes[name] == "F32" and name + "_scale_inv" not in dtypes, name
    assert "model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv" in dtypes
    index = json.loads((out / ckpt.INDEX_NAME).read_text())
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" in index["weight_map"]

    loaded = load_pretrained(out, dtype=torch.float32)  # block size taken from quantization_config
    restored = to_hf_state_dict(loaded)
    for name, w in original.items():
        if not ckpt.is_fp8_quantizable(name):
            assert torch.equal(restored[name], w), name
            continue
        # per-block max via scatter_reduce (the quantizer computes it differently: padded view + amax)
        grid_i = torch.arange(w.shape[0])[:, None] // block[0]
        grid_j = torch.arange(w.shape[1])[None, :] // block[1]
        n_cols = int(grid_j.max()) + 1
        block_ids = (grid_i * n_cols + grid_j).expand_as(w).reshape(-1)
        block_max = torch.zeros(int(block_ids.max()) + 1).scatter_reduce(0, block_ids, w.abs().reshape(-1), "amax")
        s = (block_max / 448)[block_ids].view_as(w)
        err = (restored[name] - w).abs()
        assert (err <= (E4M3_REL * w.abs() + E4M3_SUBNORMAL_ABS * s) * SLACK).all(), name
        assert not torch.equal(restored[name], w) or w.abs().max() == 0, name  # it really went through fp8
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        diff = (model(ids).logits - loaded(ids).logits).abs().max()
    assert 0 < diff < 0.1


def test_released_style_fp8_checkpoint(tmp_path):
    """The released K2 layout: model_type kimi_k2 + auto_map, rope_scaling spelling, torch_dtype bfloat16, FP8."""
    model = make_model(tiny_config(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                                 "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
                                                 "mscale_all_dim": 1.0}))
    out = save_pretrained(model, tmp_path / "k2", fp8=True, dtype=torch.bfloat16, max_shard_size="60KB")
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(out)  # dtype from torch_dtype
    weights = to_hf_state_dict(loaded)
    assert weights["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    assert loaded.config.rope_scaling["factor"] == 4.0 and loaded.config.extra["auto_map"]
    reference = dequantize_fp8_blockwise(*quantize_fp8_blockwise(
        to_hf_state_dict(model)["model.layers.2.mlp.experts.6.down_proj.weight"]), dtype=torch.bfloat16)
    assert torch.equal(weights["model.layers.2.mlp.experts.6.down_proj.weight"], reference)
    resaved = json.loads((save_pretrained(loaded, tmp_path / "resaved") / "config.json").read_text())
    assert "auto_map" not in resaved and "quantization_config" not in resaved

    config["quantization_config"] = {"quant_method": "compressed-tensors"}  # e.g. INT4 K2-Thinking
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="compressed-tensors"):
        load_pretrained(out)


def test_convert_cli_quantizes_and_dequantizes(tmp_path, capsys):
    model = make_model()
    src = save_pretrained(model, tmp_path / "src", max_shard_size="80KB")
    (src / "tokenizer.json").write_text("{}")
    (src / "trainer_state.pt").write_bytes(b"optimizer state")
    assert ckpt.main([str(src), str(tmp_path / "q"), "--fp8", "--max-shard-size", "50KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "q" / "tokenizer.json").exists() and not (tmp_path / "q" / "trainer_state.pt").exists()
    assert headers(tmp_path / "q")["model.layers.0.self_attn.q_b_proj.weight"] == "F8_E4M3"
    from_file = load_pretrained(tmp_path / "q", dtype=torch.float32)
    from_memory = load_pretrained(save_pretrained(model, tmp_path / "q2", fp8=True), dtype=torch.float32)
    assert_same_weights(from_file, from_memory)  # file-level quantization == quantizing the model

    assert ckpt.main([str(tmp_path / "q"), str(tmp_path / "bf16"), "--bf16"]) == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    dtypes = headers(tmp_path / "bf16")
    assert dtypes["model.layers.0.self_attn.q_b_proj.weight"] == "BF16"
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert not any(k.endswith("_scale_inv") for k in dtypes)
    dequantized = load_pretrained(tmp_path / "bf16", dtype=torch.float32)
    for name, w in to_hf_state_dict(from_file).items():
        expected = w if name.endswith("e_score_correction_bias") else w.bfloat16().float()
        assert torch.equal(to_hf_state_dict(dequantized)[name], expected), name

    assert ckpt.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1


# --------------------------------------------------------------------------------------------------------------
# Bad input: every case names the tensor and the file
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path) -> Path:
    return save_pretrained(make_model(), tmp_path / "ckpt", max_shard_size="100KB")


def expect_error(directory: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_pretrained(directory)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    return message


def test_missing_tensor(sharded):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    rewrite_file(file_of(sharded, name), lambda t: t.pop(name))
    index = json.loads((sharded / ckpt.INDEX_NAME).read_text())
    file = index["weight_map"][name]
    expect_error(sharded, name, file)  # the index still names it: the file lacks it
    del index["weight_map"][name]
    (sharded / ckpt.INDEX_NAME).write_text(json.dumps(index))
    expect_error(sharded, "missing", name)


def test_unexpected_tensor(sharded):
    file = file_of(sharded, "model.norm.weight")
    rewrite_file(file, lambda t: t.update({"model.layers.0.mlp.bogus.weight": torch.zeros(3)}))
    index = json.loads((sharded / ckpt.INDEX_NAME).read_text())
    index["weight_map"]["model.layers.0.mlp.bogus.weight"] = file.name
    (sharded / ckpt.INDEX_NAME).write_text(json.dumps(index))
    expect_error(sharded, "unexpected", "model.layers.0.mlp.bogus.weight", file.name)


def test_misshaped_tensor(sharded):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    file = file_of(sharded, name)
    rewrite_file(file, lambda t: t.update({name: torch.zeros(7, 7)}))
    expect_error(sharded, "misshaped", name, file.name, "[7, 7]")


def test_config_contradicting_weights(sharded):
    config = json.loads((sharded / "config.json").read_text())
    (sharded / "config.json").write_text(json.dumps({**config, "vocab_size": 1024}))
    expect_error(sharded, "model.embed_tokens.weight", "lm_head.weight", file_of(sharded, "lm_head.weight").name,
                 "vocab_size=1024")
    (sharded / "config.json").write_text(json.dumps({**config, "n_routed_experts": 4}))
    expect_error(sharded, "model.layers.1.mlp.experts.4.gate_proj.weight", "model.layers.1.mlp.gate.weight",
                 "n_routed_experts=4")
    (sharded / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 99}))
    expect_error(sharded, "config.json", "num_experts_per_tok")


def test_truncated_and_corrupt_shards(sharded):
    file = file_of(sharded, "model.layers.1.mlp.gate.weight")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    expect_error(sharded, file.name, "truncated or corrupt")
    file.write_bytes(b"\x00" * 7)
    expect_error(sharded, file.name)


def test_index_pointing_to_missing_file(sharded):
    index = json.loads((sharded / ckpt.INDEX_NAME).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (sharded / ckpt.INDEX_NAME).write_text(json.dumps(index))
    expect_error(sharded, "model-00099-of-00099.safetensors", "model.norm.weight")


def test_no_weights_at_all(tmp_path):
    out = save_pretrained(make_model(), tmp_path / "c")
    (out / "model.safetensors").unlink()
    expect_error(out, "model.safetensors")


def test_fp8_scale_inv_missing_or_misshaped(tmp_path):
    out = save_pretrained(make_model(), tmp_path / "fp8", fp8=True, max_shard_size="100KB")
    name = "model.layers.0.self_attn.o_proj.weight"
    file = file_of(out, name + "_scale_inv")
    rewrite_file(file, lambda t: t.update({name + "_scale_inv": torch.ones(2, 2)}))
    expect_error(out, name + "_scale_inv", file.name, "[2, 2]")
    rewrite_file(file, lambda t: t.pop(name + "_scale_inv"))
    index = json.loads((out / ckpt.INDEX_NAME).read_text())
    del index["weight_map"][name + "_scale_inv"]
    (out / ckpt.INDEX_NAME).write_text(json.dumps(index))
    expect_error(out, name + "_scale_inv", "missing", file_of(out, name).name)


# --------------------------------------------------------------------------------------------------------------
# Multi-token-prediction modules: DeepSeek-V3 layout (model.layers.{L + k}.*), shared-tensor copies
# --------------------------------------------------------------------------------------------------------------

MTP_KEYS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "input_layernorm.weight",
            "self_attn.kv_b_proj.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
            "mlp.experts.7.down_proj.weight", "mlp.shared_experts.up_proj.weight")
COPY_KEYS = ("embed_tokens.weight", "shared_head.head.weight")


def test_mtp_round_trip_in_the_deepseek_v3_layout(tmp_path):
    model = make_model(tiny_config(num_nextn_predict_layers=2))
    out = save_pretrained(model, tmp_path / "mtp", max_shard_size="100KB")
    stored = headers(out)
    layers = model.config.num_hidden_layers
    for layer in (layers, layers + 1):
        for key in MTP_KEYS + COPY_KEYS:
            assert f"model.layers.{layer}.{key}" in stored, key
    assert not any(name.startswith("mtp.") for name in stored)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 2
    copy = load_file(str(file_of(out, f"model.layers.{layers}.shared_head.head.weight")))
    assert torch.equal(copy[f"model.layers.{layers}.shared_head.head.weight"], model.lm_head.weight)

    loaded = load_pretrained(out)
    assert loaded.config.num_nextn_predict_layers == 2 and len(loaded.mtp) == 2
    assert_same_weights(model, loaded)
    for_inference = load_pretrained(out, mtp=False)  # the MTP modules are skipped, the main model is the same
    assert len(for_inference.mtp) == 0
    full, main = to_hf_state_dict(model), to_hf_state_dict(for_inference)
    assert set(full) - set(main) == {k for k in full if k.startswith((f"model.layers.{layers}.",
                                                                      f"model.layers.{layers + 1}."))}
    assert all(torch.equal(full[k], v) for k, v in main.items())
    in_place = make_model(tiny_config(num_nextn_predict_layers=2, initializer_range=0.5))  # resume path
    ckpt.load_hf_state_dict_from_dir(in_place, out)
    assert_same_weights(model, in_place)
    in_memory = make_model(tiny_config(num_nextn_predict_layers=2, initializer_range=0.5))
    ckpt.load_hf_state_dict(in_memory, to_hf_state_dict(model))
    assert_same_weights(model, in_memory)

    # without the copies (optional on save, accepted on load)
    bare = save_pretrained(model, tmp_path / "bare", mtp_shared_copies=False)
    assert not any(f".{key}" in name and name.startswith(f"model.layers.{layers}.")
                   for name in headers(bare) for key in COPY_KEYS)
    assert_same_weights(model, load_pretrained(bare))
    # block FP8 covers the MTP block's projections as it does the main layers' (eh_proj stays high precision)
    fp8 = headers(save_pretrained(model, tmp_path / "fp8", fp8=True))
    assert fp8[f"model.layers.{layers}.self_attn.kv_b_proj.weight"] == "F8_E4M3"
    assert fp8[f"model.layers.{layers}.eh_proj.weight"] == "F32"
    assert len(load_pretrained(tmp_path / "fp8").mtp) == 2


def test_mtp_copy_that_differs_from_the_main_tensor_is_an_error(tmp_path):
    model = make_model(tiny_config(num_nextn_predict_layers=1))
    out = save_pretrained(model, tmp_path / "mtp")
    name = f"model.layers.{model.config.num_hidden_layers}.shared_head.head.weight"

    def nudge(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][300] += 1e-3

    rewrite_file(out / "model.safetensors", nudge)
    expect_error(out, name, "differs from lm_head.weight", "rows 0..511", "model.safetensors")
    with pytest.raises(CheckpointError, match="must be equal"):  # the in-memory adapter checks it too
        ckpt.load_hf_state_dict(make_model(tiny_config(num_nextn_predict_layers=1)), load_file(str(out / "model.safetensors")))


def test_mtp_tensors_all_or_nothing(tmp_path, caplog):
    model = make_model(tiny_config(num_nextn_predict_layers=1))
    out = save_pretrained(model, tmp_path / "mtp")
    layers = model.config.num_hidden_layers
    # some MTP tensors missing: an error naming them (and the config key that declares the module)
    partial = f"model.layers.{layers}.self_attn.kv_b_proj.weight"
    rewrite_file(out / "model.safetensors", lambda t: t.pop(partial))
    expect_error(out, "missing (1)", partial, "num_nextn_predict_layers=1")
    # none at all (what transformers writes: num_nextn_predict_layers 1, no MTP weights): the main model alone
    rewrite_file(out / "model.safetensors", lambda t: [t.pop(k) for k in list(t) if k.startswith(f"model.layers.{layers}.")])
    with caplog.at_level(logging.INFO, logger="openk2.checkpoint"):
        main_only = load_pretrained(out)
    assert "holds no MTP tensors" in caplog.text and len(main_only.mtp) == 0
    assert main_only.config.num_nextn_predict_layers == 0
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(main_only(ids).logits, model(ids).logits)
    # ...but a model that has an MTP module and loads those files in place (resume) is missing its tensors
    with pytest.raises(CheckpointError, match=rf"missing .*model\.layers\.{layers}\.eh_proj\.weight"):
        ckpt.load_hf_state_dict_from_dir(make_model(tiny_config(num_nextn_predict_layers=1)), out)


def test_mtp_layers_the_model_does_not_build_are_skipped_with_a_note(tmp_path, caplog):
    trained = make_model(tiny_config(num_nextn_predict_layers=1))
    out = save_pretrained(trained, tmp_path / "mtp")
    released_shape = make_model()  # no MTP: e.g. fine-tuning only the main model
    with caplog.at_level(logging.INFO, logger="openk2.checkpoint"):
        ckpt.load_hf_state_dict_from_dir(released_shape, out)
    assert "skipped" in caplog.text and "multi-token-prediction tensors" in caplog.text
    mtp_prefix = f"model.layers.{trained.config.num_hidden_layers}."
    main = {k: v for k, v in to_hf_state_dict(trained).items() if not k.startswith(mtp_prefix)}
    assert main.keys() == to_hf_state_dict(released_shape).keys()
    assert all(torch.equal(v, to_hf_state_dict(released_shape)[k]) for k, v in main.items())
    # a file MTP layer that the config does not declare is unexpected, as any unknown tensor
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    expect_error(out, "unexpected", "model.layers.3.eh_proj.weight")


def test_load_hf_state_dict_reports_all_problems_and_changes_nothing():
    model = make_model()
    before = {k: v.clone() for k, v in to_hf_state_dict(model).items()}
    sd = {k: torch.zeros_like(v) for k, v in before.items()}
    sd.pop("model.layers.1.mlp.experts.0.up_proj.weight")
    sd["model.layers.1.mlp.gate.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_hf_state_dict(model, sd)
    for fragment in ("model.layers.1.mlp.experts.0.up_proj.weight", "model.layers.1.mlp.gate.weight", "extra.weight"):
        assert fragment in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in to_hf_state_dict(model).items())


# --------------------------------------------------------------------------------------------------------------
# File-level interop with transformers' DeepseekV3ForCausalLM (fp32)
# --------------------------------------------------------------------------------------------------------------

INTEROP_CONFIGS = {
    # q LoRA, YaRN, group-limited routing (2 groups, keep 1), 2 dense layers, norm_topk_prob on
    "qlora_yarn_groups": dict(
        vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        first_k_dense_replace=2, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, num_attention_heads=3, num_key_value_heads=3,
        rope_theta=10000.0, max_position_embeddings=512, rope_interleave=True,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # no q LoRA, no YaRN, all layers MoE, norm_topk_prob off
    "plain_moe": dict(
        vocab_size=80, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=0, n_routed_experts=6, num_experts_per_tok=3, n_shared_experts=1, n_group=1,
        topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_attention_heads=2, num_key_value_heads=2,
        rope_theta=5000.0, max_position_embeddings=256, rope_interleave=True, rope_scaling=None,
    ),
}
COMMON = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2, rms_norm_eps=1e-6,
              tie_word_embeddings=False)


def transformers_config(fields: dict):
    from transformers import DeepseekV3Config

    fields = {**fields, **COMMON}
    scaling = fields.pop("rope_scaling")
    rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    if scaling:
        rope.update({k: v for k, v in scaling.items() if k != "type"}, rope_type="yarn")
    # transformers defaults num_mtp_layers to 1 (written as num_nextn_predict_layers: 1) yet saves no MTP
    # weights; keep that default for one config so the loader sees that case too.
    mtp = {} if fields["first_k_dense_replace"] == 0 else {"num_mtp_layers": 0}
    return DeepseekV3Config(**fields, rope_parameters=rope, **mtp)


def randomize_router_bias(state: dict) -> None:
    # Positive biases: transformers fills unselected groups with 0 rather than -inf, which cannot then be picked
    # over any selected-group expert, since every sigmoid score + bias in a kept group is > 0.
    with torch.no_grad():
        for name, tensor in state.items():
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.rand_like(tensor) * 0.2)


@pytest.mark.parametrize("config_name", sorted(INTEROP_CONFIGS))
def test_transformers_save_then_our_load(tmp_path, config_name):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(3)
    theirs = DeepseekV3ForCausalLM(transformers_config(INTEROP_CONFIGS[config_name])).eval()
    randomize_router_bias(dict(theirs.named_buffers()))
    theirs.save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_parameters" in written and "dtype" in written  # the transformers-5 spellings
    ours = load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, INTEROP_CONFIGS[config_name]["vocab_size"], (2, 17))
    with torch.no_grad():
        expected, got = theirs(ids).logits, ours(ids).logits
    assert expected.abs().max() > 0.1  # logits large enough that 1e-4 means something
    assert (expected - got).abs().max() <= 1e-4


@pytest.mark.parametrize("config_name", sorted(INTEROP_CONFIGS))
def test_our_save_then_transformers_load(tmp_path, config_name):
    from transformers import DeepseekV3ForCausalLM

    ours = make_model(K2Config.from_dict({**INTEROP_CONFIGS[config_name], **COMMON, "torch_dtype": "float32"}))
    randomize_router_bias(to_hf_state_dict(ours))
    save_pretrained(ours, tmp_path / "ours", max_shard_size="40KB")
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = torch.randint(0, INTEROP_CONFIGS[config_name]["vocab_size"], (2, 17))
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs(ids).logits
    assert expected.abs().max() > 0.1
    assert (expected - got).abs().max() <= 1e-4


def test_transformers_loads_our_mtp_checkpoint_ignoring_the_mtp_layer(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    fields = {**INTEROP_CONFIGS["qlora_yarn_groups"], **COMMON, "torch_dtype": "float32", "num_nextn_predict_layers": 1}
    ours = make_model(K2Config.from_dict(fields))
    randomize_router_bias(to_hf_state_dict(ours))
    save_pretrained(ours, tmp_path / "ours")
    theirs, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                                         output_loading_info=True)
    layers = fields["num_hidden_layers"]
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{layers}.") for k in info["unexpected_keys"])
    ids = torch.randint(0, fields["vocab_size"], (2, 17))
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs.eval()(ids).logits
    assert expected.abs().max() > 0.1
    assert (expected - got).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------------------------------
# Memory: loading holds one copy of the weights, saving one shard's worth on top of the model
# --------------------------------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, sys, torch
    from openk2 import checkpoint

    def status_kib(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    # warm-up: the first meta-device model pulls in ~70 MB of torch's Python meta kernels, once per process
    from openk2.config import K2Config
    checkpoint._build_empty_model(K2Config.preset("tiny"), torch.float32, torch.device("cpu"))
    before = status_kib("VmRSS")
    model = checkpoint.load_pretrained(sys.argv[1])
    load_growth = (status_kib("VmHWM") - before) * 1024
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark
    before = status_kib("VmRSS")
    checkpoint.save_pretrained(model, sys.argv[2], max_shard_size="8MB")
    save_growth = (status_kib("VmHWM") - before) * 1024
    print(json.dumps({"weights": weights, "load_growth": load_growth, "save_growth": save_growth}))
""")


def test_peak_memory_of_load_and_save(tmp_path):
    from openk2.model import K2ForCausalLM

    config = K2Config.preset("small").replace(num_hidden_layers=4, vocab_size=2048)  # ~63 MB of fp32 weights
    source = save_pretrained(K2ForCausalLM(config), tmp_path / "small", max_shard_size="8MB")
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(source), str(tmp_path / "again")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    weights = figures["weights"]
    # One copy of the weights plus at most one mapped shard (8 MB) and one tensor in flight; two copies would
    # be >= 2x. Saving adds about two shards' worth (the tensors + safetensors' serialized buffer), not a copy
    # of the model.
    assert figures["load_growth"] < 1.4 * weights, figures
    assert figures["save_growth"] < 0.4 * weights, figures


# --------------------------------------------------------------------------------------------------------------
# Publishing: one rename mechanism, durable, never deleting what is not a checkpoint
# --------------------------------------------------------------------------------------------------------------


def test_a_save_cut_between_its_renames_is_recoverable(tmp_path):
    """Replacing a checkpoint moves it to the fixed name `.old-<name>` before the new one takes its place: after a
    crash between the two renames, restore_interrupted_publish (or the next save) puts it back."""
    path = tmp_path / "ckpt"
    model = make_model()
    save_pretrained(model, path)
    aside = ckpt.publish_aside_path(path)
    assert aside == tmp_path / ".old-ckpt"
    path.rename(aside)  # the state a crash between the renames leaves
    assert ckpt.restore_interrupted_publish(path) and not ckpt.restore_interrupted_publish(path)
    assert_same_weights(model, load_pretrained(path))
    path.rename(aside)
    save_pretrained(make_model(), path)  # the next save restores it, then replaces it whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_fsyncs_every_file_before_publishing(tmp_path, monkeypatch):
    """safetensors shards, config, index, tokenizer and before_publish files reach the disk before the rename that
    publishes them; the parent directory is synced after it."""
    import os

    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst)

    class FakeTokenizer:
        def save(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    out = save_pretrained(make_model(), tmp_path / "x", max_shard_size="100KB", tokenizer=FakeTokenizer(),
                          before_publish=lambda d: (d / "trainer_state.pt").write_bytes(b"state"))
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out))
    tmp_dir = Path(events[publish][1])
    synced_before = {Path(e[1]) for e in events[:publish] if e[0] == "fsync"}
    files = sorted(p.name for p in out.iterdir())
    assert len(files) > 4 and "tokenizer.json" in files and "trainer_state.pt" in files
    assert {tmp_dir / name for name in files} <= synced_before, files
    assert tmp_dir in synced_before
    assert ("fsync", str(tmp_path)) in events[publish:]


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    """Saving replaces the destination wholesale: a non-empty directory without config.json is someone's files,
    not an older checkpoint, and is left alone with a clear error (save_pretrained and convert alike)."""
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    model = make_model()
    with pytest.raises(CheckpointError, match=rf"{mine}: exists, is not empty \(notes.txt\) and is not a checkpoint"):
        save_pretrained(model, mine)
    source = save_pretrained(model, tmp_path / "src")
    with pytest.raises(CheckpointError, match=str(mine)):
        ckpt.convert_checkpoint(source, mine, bf16=True)
    assert ckpt.main([str(source), str(mine)]) == 1
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_pretrained(model, tmp_path / "afile")
    # an empty directory, or an earlier checkpoint, is replaced as before
    (tmp_path / "empty").mkdir()
    save_pretrained(model, tmp_path / "empty")
    ckpt.convert_checkpoint(source, tmp_path / "empty", bf16=True)
    assert json.loads((tmp_path / "empty" / ckpt.CONFIG_NAME).read_text())["torch_dtype"] == "bfloat16"
