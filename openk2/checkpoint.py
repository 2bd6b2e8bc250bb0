"""Checkpoints in the Hugging Face / released Kimi-K2 layout.

A checkpoint directory holds `config.json` and either one `model.safetensors` or shards
`model-0000i-of-0000N.safetensors` listed in `model.safetensors.index.json` (`metadata.total_size`,
`weight_map`: tensor name -> file). Tensor names are the released ones.

Our model differs from the file layout in one place: each MoE layer's routed experts are stacked 3-D
parameters (`model.layers.{i}.mlp.experts.gate_proj` [E, I, H], `.up_proj` [E, I, H], `.down_proj` [E, H, I]),
while files hold one 2-D tensor per expert (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight` [I, H], ...).
Multi-token-prediction modules (our `mtp.{k}.*`, k = 0..D-1) are stored as DeepSeek-V3 stores them: under
`model.layers.{num_hidden_layers + k}.` (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, then the usual block
keys). DeepSeek-V3 also stores copies of the shared tensors there (`embed_tokens.weight`,
`shared_head.head.weight`); saving writes them (serving stacks load the MTP head from them), loading accepts
files with or without them and refuses a copy that differs from the main tensor (our model has one shared
tensor; silently dropping a different trained head would be a half-load). A checkpoint whose config names MTP
layers but holds none of their tensors (transformers writes `num_nextn_predict_layers: 1` by default and saves
no MTP weights) loads as the main model alone; one holding some but not all MTP tensors is an error.
Every other name is identical. This module maps between the two, in memory and on disk, and handles the
block-FP8 format of the released weights (spec §1.4): a quantized Linear weight `W` is stored as
`float8_e4m3fn` next to `W_scale_inv` (fp32, one value per 128x128 block), and `W = W_fp8 * scale_inv`.

Memory discipline: saving materializes at most one shard's worth of tensors; loading builds the model on the
meta device, allocates it once and copies tensor by tensor from memory-mapped shards, so the weights never
exist twice. Every problem with the input raises `CheckpointError` naming the tensor and the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from openk2.fileio import atomic_write, fsync_dir, fsync_file

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
LATEST_POINTER = "latest"  # RUN_DIR/checkpoints/latest names the newest complete checkpoint subdirectory
SCALE_SUFFIX = "_scale_inv"

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
DEFAULT_FP8_BLOCK = (128, 128)
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": list(DEFAULT_FP8_BLOCK),
}

ARCHITECTURE = "DeepseekV3ForCausalLM"  # the released K2 config.json names the DeepSeek-V3 code path
# Saved checkpoints say model_type "deepseek_v3" (the released K2 says "kimi_k2" and ships remote code):
# transformers picks its per-expert -> fused-expert key conversion by config.model_type, so with "kimi_k2"
# its native DeepseekV3ForCausalLM would load our files with the routed experts silently left random.
SAVED_MODEL_TYPE = "deepseek_v3"

_STACKED_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_INDEX_RE = re.compile(r"^model\.layers\.(\d+)\.")
_OUR_MTP_RE = re.compile(r"^mtp\.(\d+)\.(.*)$")
# Copies of the shared tensors inside an MTP layer of the released layout -> the main model's name
_MTP_SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
# The Linear weights that DeepSeek-V3 / K2 store in block FP8: attention projections and every SwiGLU
# projection (dense, shared expert, routed experts). Norms, the router gate, e_score_correction_bias,
# the embedding and lm_head stay in high precision.
_FP8_WEIGHT_RE = re.compile(
    r"^model\.layers\.\d+\.(?:"
    r"self_attn\.(?:q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(?:shared_experts\.|experts\.\d+\.)?(?:gate_proj|up_proj|down_proj)"
    r")\.weight$"
)
# Tensors that stay fp32 whatever dtype the rest of the model is saved or loaded in.
_FP32_TENSOR_RE = re.compile(r"\.e_score_correction_bias$")


class CheckpointError(ValueError):
    """A checkpoint (directory, file or state dict) does not match the model; the message names tensors and files."""


# ----------------------------------------------------------------------------------------------------------
# In-memory key adapter: our stacked experts <-> released per-expert names
# ----------------------------------------------------------------------------------------------------------


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our persistent tensors (parameters + persistent buffers) by name, without copying."""
    return dict(model.state_dict(keep_vars=True))


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_hidden_layers", None)


def _to_hf_name(name: str, num_hidden_layers: int | None) -> str:
    """Our parameter name -> released name, before the per-expert split (`mtp.{k}.x` -> `model.layers.{L+k}.x`)."""
    match = _OUR_MTP_RE.match(name)
    if match is None:
        return name
    if num_hidden_layers is None:
        raise CheckpointError(f"{name}: an MTP tensor, but the model has no config.num_hidden_layers to place it")
    depth, rest = match.groups()
    return f"model.layers.{num_hidden_layers + int(depth)}.{rest}"


def iter_hf_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) one by one, in our module order; expert tensors are views of the stacked parameter.
    MTP modules come out under `model.layers.{num_hidden_layers + k}.` (without the shared-tensor copies)."""
    num_hidden_layers = _num_hidden_layers(model)
    for name, tensor in _model_tensors(model).items():
        tensor = tensor.detach()
        name = _to_hf_name(name, num_hidden_layers)
        match = _STACKED_EXPERT_RE.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, projection = match.groups()
        for expert in range(tensor.shape[0]):
            yield f"{prefix}.{expert}.{projection}.weight", tensor[expert]


def hf_tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """HF name -> shape the model expects (touches no tensor data, so it works on meta models)."""
    return {name: tuple(t.shape) for name, t in iter_hf_tensors(model)}


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the released key names (experts split per expert; views, not copies)."""
    return dict(iter_hf_tensors(model))


def hf_name_to_target(name: str, num_hidden_layers: int | None = None) -> tuple[str, int | None]:
    """Map an HF tensor name to (our state-dict name, expert index or None). With `num_hidden_layers`, layers at
    or past it are MTP modules (`model.layers.{L+k}.x` -> `mtp.{k}.x`)."""
    expert = None
    match = _PER_EXPERT_RE.match(name)
    if match is not None:
        prefix, expert_text, projection = match.groups()
        name, expert = f"{prefix}.{projection}", int(expert_text)
    layer = _layer_index(name)
    if num_hidden_layers is not None and layer is not None and layer >= num_hidden_layers:
        name = f"mtp.{layer - num_hidden_layers}." + name[len(f"model.layers.{layer}."):]
    return name, expert


def mtp_shared_copy_source(name: str, num_hidden_layers: int) -> str | None:
    """For a released-layout copy of a shared tensor inside an MTP layer (`model.layers.{L+k}.embed_tokens.weight`,
    `...shared_head.head.weight`), the main tensor it copies; else None."""
    layer = _layer_index(name)
    if layer is None or layer < num_hidden_layers:
        return None
    return _MTP_SHARED_COPIES.get(name[len(f"model.layers.{layer}."):])


def _describe_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                       where: Mapping[str, str] | None = None, *, strict: bool = True) -> list[str]:
    """Human-readable lines for missing / unexpected / misshaped tensors (empty when everything matches)."""
    def at(name: str) -> str:
        return f" (in {where[name]})" if where and name in where else ""

    missing = sorted(set(expected) - set(found)) if strict else []
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{name}{at(name)}: checkpoint {list(found[name])} vs model {list(expected[name])}"
        for name in sorted(found)
        if name in expected and tuple(found[name]) != tuple(expected[name])
    ]
    def listing(items: list[str], separator: str = ", ", limit: int = 20) -> str:
        shown = separator.join(items[:limit])
        return shown + (f"{separator}... and {len(items) - limit} more" if len(items) > limit else "")

    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): " + listing(missing))
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): " + listing([n + at(n) for n in unexpected]))
    if misshaped:
        problems.append(f"misshaped ({len(misshaped)}): " + listing(misshaped, "; "))
    return problems


def load_hf_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy HF-named tensors into the model (per-expert tensors into their slice of the stacked parameter).

    Every key is checked before anything is copied: missing (when strict), unexpected and misshaped keys are
    reported together in one CheckpointError and the model is left untouched.
    """
    num_hidden_layers = _num_hidden_layers(model)
    expected = hf_tensor_shapes(model)
    copies = {}
    if num_hidden_layers is not None and any(_OUR_MTP_RE.match(n) for n in _model_tensors(model)):
        copies = {name: source for name in state_dict
                  if (source := mtp_shared_copy_source(name, num_hidden_layers)) is not None}
    problems = _describe_mismatch(expected, {k: tuple(v.shape) for k, v in state_dict.items() if k not in copies},
                                  strict=strict)
    for name, source in copies.items():
        if source in state_dict and not torch.equal(state_dict[name], state_dict[source]):
            problems.append(f"{name} differs from {source}: the model shares one tensor; they must be equal")
    if problems:
        raise CheckpointError("state dict does not match the model:\n  " + "\n  ".join(problems))
    targets = _model_tensors(model)
    with torch.no_grad():
        for name, tensor in state_dict.items():
            if name in copies:
                continue
            target_name, expert = hf_name_to_target(name, num_hidden_layers)
            target = targets[target_name]
            (target if expert is None else target[expert]).copy_(tensor)


# ----------------------------------------------------------------------------------------------------------
# Block FP8 (spec §1.4)
# ----------------------------------------------------------------------------------------------------------


def _block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def quantize_fp8_blockwise(w: torch.Tensor, block: tuple[int, int] = DEFAULT_FP8_BLOCK
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to float8_e4m3fn per block: s = max|x| / 448 per block, y = x / s.

    Returns (w_fp8 [M, N] float8_e4m3fn, scale_inv fp32 [ceil(M/bm), ceil(N/bn)]); `scale_inv` is the
    multiplier that dequantizes (the released checkpoints' naming). Edge blocks of non-multiple shapes are
    partial blocks; an all-zero block gets scale 0 (and dequantizes to exactly 0).
    """
    if w.ndim != 2:
        raise ValueError(f"block-FP8 quantization needs a 2-D weight, got shape {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("block-FP8 quantization: the weight has non-finite values")
    rows, cols = w.shape
    bm, bn = block
    grid_rows, grid_cols = _block_grid((rows, cols), block)
    padded = torch.zeros(grid_rows * bm, grid_cols * bn, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(grid_rows, bm, grid_cols, bn)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = (blocks / safe_scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    w_fp8 = scaled.view(grid_rows * bm, grid_cols * bn)[:rows, :cols].to(FP8_DTYPE).contiguous()
    return w_fp8, scale.contiguous()


def dequantize_fp8_blockwise(w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                             block: tuple[int, int] = DEFAULT_FP8_BLOCK,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[i, j] = W_fp8[i, j] * scale_inv[i // bm, j // bn], computed in fp32, returned in `dtype`."""
    if w_fp8.ndim != 2:
        raise ValueError(f"block-FP8 weight must be 2-D, got shape {list(w_fp8.shape)}")
    expected_grid = _block_grid(tuple(w_fp8.shape), block)
    if tuple(scale_inv.shape) != expected_grid:
        raise ValueError(f"scale_inv shape {list(scale_inv.shape)} does not fit weight {list(w_fp8.shape)} "
                         f"with {block[0]}x{block[1]} blocks (expected {list(expected_grid)})")
    rows, cols = w_fp8.shape
    grid_rows, grid_cols = expected_grid
    scale_inv = scale_inv.float()
    if rows % block[0] == 0 and cols % block[1] == 0:  # the common case: broadcast over a block view
        blocks = w_fp8.float().view(grid_rows, block[0], grid_cols, block[1]) * scale_inv[:, None, :, None]
        return blocks.view(rows, cols).to(dtype)
    scale = scale_inv.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return (w_fp8.float() * scale).to(dtype)


def is_fp8_quantizable(name: str) -> bool:
    """True for the Linear weights the DeepSeek-V3 / K2 convention stores in block FP8."""
    return _FP8_WEIGHT_RE.match(name) is not None


def _fp8_block_size(config: Mapping[str, Any]) -> tuple[int, int]:
    """The FP8 block size from config.json's quantization_config (128x128 when there is none)."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method", "fp8")
    if method != "fp8":
        raise CheckpointError(f"quantization_config.quant_method={method!r} is not supported (only block 'fp8'); "
                              f"convert the checkpoint to bf16 first")
    block = quant.get("weight_block_size") or DEFAULT_FP8_BLOCK
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}")
    return int(block[0]), int(block[1])


# ----------------------------------------------------------------------------------------------------------
# Writing: plan shards from sizes, then materialize one shard at a time, into a temp dir renamed at the end
# ----------------------------------------------------------------------------------------------------------


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as in transformers), '2GiB' -> 2**31, ints pass through."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if match is None or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


@dataclass
class _Entry:
    """One logical tensor to write: its name, bytes on disk, and how to produce it (plus any `_scale_inv`)."""

    name: str
    nbytes: int
    produce: Callable[[], dict[str, torch.Tensor]]


def _fp8_nbytes(shape: tuple[int, ...], block: tuple[int, int]) -> int:
    grid = _block_grid((shape[0], shape[1]), block)
    return math.prod(shape) * 1 + grid[0] * grid[1] * 4


def _plan_shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Greedy in order; a tensor larger than the limit gets a shard of its own (as transformers does)."""
    shards: list[list[_Entry]] = []
    current: list[_Entry] = []
    current_bytes = 0
    for entry in entries:
        if current and current_bytes + entry.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += entry.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory bottom-up. Files already synced cost next to nothing,
    so this also covers files that writers outside this module (tokenizer, torch.save, DCP) left unsynced."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def publish_aside_path(path: str | os.PathLike) -> Path:
    """Where `publish_dir` keeps the directory it replaces at `path` until the new one is in place: a fixed
    name, so that a crash between its two renames is recoverable (`restore_interrupted_publish`)."""
    path = Path(path)
    return path.with_name(f".old-{path.name}")


def restore_interrupted_publish(path: str | os.PathLike) -> bool:
    """Undo a `publish_dir` cut between its renames: `path` is missing and the directory it replaced is aside
    (`.old-<name>`); rename that back. The new one, left in its temp dir, is dropped like any interrupted save.
    Returns True if this call restored it; safe to call from every rank of a job at once (one rename wins)."""
    path = Path(path)
    old = publish_aside_path(path)
    if path.exists() or not old.is_dir():
        return False
    try:
        old.rename(path)
    except OSError:  # another rank restored it first
        return False
    fsync_dir(path.parent)
    return True


def publish_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make the complete directory `tmp` visible as `path` (a sibling) by renaming it, durably.

    Every file under `tmp` is fsynced first. A directory already at `path` is renamed aside (`.old-<name>`)
    first and deleted last, so a crash at any moment leaves `path` complete (old or new), or missing with the
    old one aside for `restore_interrupted_publish` (which this calls first, so an earlier such crash loses
    nothing either). The parent directory is fsynced after the renames, before the old one is deleted.
    """
    tmp, path = Path(tmp), Path(path)
    _fsync_tree(tmp)
    old = publish_aside_path(path)
    restore_interrupted_publish(path)
    if old.exists():
        shutil.rmtree(old)  # left by a crash after the new directory was in place
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temp_dirs(path: Path) -> None:
    """Delete temp dirs of earlier saves to `path` whose writer process is gone (it crashed mid-save)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        match = re.fullmatch(rf"\.{re.escape(path.name)}\.tmp-(\d+)-[0-9a-f]+", stale.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)


def _check_replaceable(path: Path) -> None:
    """Saving replaces the directory at `path` wholesale: refuse unless it is missing, empty or a checkpoint,
    rather than delete files that are not ours."""
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory; refusing to replace it with a checkpoint")
    if (path / CONFIG_NAME).is_file() or not any(path.iterdir()):
        return
    shown = sorted(p.name for p in path.iterdir())
    listing = ", ".join(shown[:5]) + (f", ... ({len(shown)} entries)" if len(shown) > 5 else "")
    raise CheckpointError(f"{path}: exists, is not empty ({listing}) and is not a checkpoint directory (no "
                          f"{CONFIG_NAME}); saving would delete it. Choose another path or remove it first")


def _write_checkpoint(path: str | os.PathLike, config: dict[str, Any], entries: list[_Entry],
                      max_shard_size: int | str, before_publish: Callable[[Path], None] | None = None) -> Path:
    path = Path(path)
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(path)
    shards = _plan_shards(entries, parse_size(max_shard_size))
    tmp_dir = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        weight_map: dict[str, str] = {}
        total_size = 0
        for index, shard in enumerate(shards, start=1):
            file_name = SINGLE_FILE_NAME if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for entry in shard:
                tensors.update(entry.produce())
            for name, tensor in tensors.items():
                weight_map[name] = file_name
                total_size += tensor.numel() * tensor.element_size()
            save_file(tensors, str(tmp_dir / file_name), metadata={"format": "pt"})
            fsync_file(tmp_dir / file_name)  # now, while it is fresh: bounds the unsynced data to one shard
            del tensors  # one shard's worth at a time
        if len(shards) > 1:
            _write_json(tmp_dir / INDEX_NAME, {"metadata": {"total_size": total_size},
                                               "weight_map": dict(sorted(weight_map.items()))})
        _write_json(tmp_dir / CONFIG_NAME, config)
        if before_publish is not None:
            before_publish(tmp_dir)
        publish_dir(tmp_dir, path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return path


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checkpoint_config(config_dict: dict[str, Any], *, fp8: bool, fp8_block: tuple[int, int],
                       weights_dtype: torch.dtype) -> dict[str, Any]:
    config = dict(config_dict)
    config["architectures"] = [ARCHITECTURE]
    config["model_type"] = SAVED_MODEL_TYPE
    config.pop("auto_map", None)  # points at remote modeling code that our checkpoints do not ship
    config["torch_dtype"] = _dtype_name(weights_dtype)
    config.pop("dtype", None)  # transformers 5.x spelling of torch_dtype; keep one
    if fp8:
        config["quantization_config"] = {**FP8_QUANTIZATION_CONFIG, "weight_block_size": list(fp8_block)}
    else:
        config.pop("quantization_config", None)
    return {k: v for k, v in config.items() if not (k == "quantization_config" and v is None)}


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    for method in ("save_pretrained", "save"):
        if hasattr(tokenizer, method):
            getattr(tokenizer, method)(str(directory))
            return
    raise TypeError(f"tokenizer {type(tokenizer).__name__} has neither save_pretrained(dir) nor save(dir)")


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                    fp8: bool = False, fp8_block: tuple[int, int] = DEFAULT_FP8_BLOCK,
                    dtype: torch.dtype | None = None, tokenizer: Any = None,
                    before_publish: Callable[[Path], None] | None = None, mtp_shared_copies: bool = True) -> Path:
    """Write `model` as an HF-layout checkpoint at `path` (atomically: temp dir next to it, then rename).

    - `dtype`: cast floating tensors on the way out (default: keep the model's); the router's
      e_score_correction_bias always stays fp32.
    - `fp8=True`: attention / MLP / expert Linear weights as float8_e4m3fn + `<name>_scale_inv`, with
      `quantization_config` in config.json (DeepSeek-V3 convention); other tensors as `dtype`.
    - `tokenizer`: an object with `save_pretrained(dir)` or `save(dir)`, written into the same checkpoint.
    - `before_publish(tmp_dir)`: add more files (e.g. trainer state) before the checkpoint becomes visible.
    - `mtp_shared_copies`: with MTP modules, also write each one's copies of the embedding and lm_head
      (`model.layers.{L+k}.embed_tokens.weight`, `.shared_head.head.weight`), as DeepSeek-V3 does.
    Returns the checkpoint path.
    """
    entries: list[_Entry] = []
    for name, tensor in _tensors_to_save(model, mtp_shared_copies):
        if tensor.is_meta:
            raise CheckpointError(f"cannot save {name}: it is on the meta device (not materialized)")
        out_dtype = tensor.dtype
        if _FP32_TENSOR_RE.search(name):
            out_dtype = torch.float32
        elif dtype is not None and tensor.is_floating_point():
            out_dtype = dtype
        if fp8 and is_fp8_quantizable(name):
            def produce(name: str = name, tensor: torch.Tensor = tensor) -> dict[str, torch.Tensor]:
                try:
                    w_fp8, scale_inv = quantize_fp8_blockwise(tensor, fp8_block)  # on the model's device
                except ValueError as exc:
                    raise CheckpointError(f"cannot quantize {name}: {exc}") from exc
                return {name: w_fp8.cpu(), name + SCALE_SUFFIX: scale_inv.cpu()}
            entries.append(_Entry(name, _fp8_nbytes(tuple(tensor.shape), fp8_block), produce))
        else:
            def produce(name: str = name, tensor: torch.Tensor = tensor, out_dtype: torch.dtype = out_dtype
                        ) -> dict[str, torch.Tensor]:
                # clone: expert slices share storage, which safetensors refuses to write
                return {name: tensor.to(device="cpu", dtype=out_dtype, copy=True).contiguous()}
            entries.append(_Entry(name, tensor.numel() * out_dtype.itemsize, produce))

    weights_dtype = dtype or _dominant_dtype(model)
    config = _checkpoint_config(model.config.to_dict(), fp8=fp8, fp8_block=fp8_block, weights_dtype=weights_dtype)

    def add_extras(tmp_dir: Path) -> None:
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp_dir)
        if before_publish is not None:
            before_publish(tmp_dir)

    return _write_checkpoint(path, config, entries, max_shard_size, add_extras)


def _tensors_to_save(model: nn.Module, mtp_shared_copies: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """iter_hf_tensors, plus the MTP layers' copies of the shared embedding / lm_head right after each MTP layer's
    own tensors (so a copy lands in the same shard region as its layer)."""
    num_hidden_layers = _num_hidden_layers(model)
    shared = {}
    tensors = _model_tensors(model)
    if mtp_shared_copies and num_hidden_layers is not None and any(_OUR_MTP_RE.match(n) for n in tensors):
        shared = {source: tensors[source].detach() for source in _MTP_SHARED_COPIES.values() if source in tensors}
    previous_layer = None
    for name, tensor in iter_hf_tensors(model):
        layer = _layer_index(name)
        if shared and previous_layer is not None and layer != previous_layer and previous_layer >= num_hidden_layers:
            yield from _shared_copies(previous_layer, shared)
        previous_layer = layer
        yield name, tensor
    if shared and previous_layer is not None and previous_layer >= num_hidden_layers:
        yield from _shared_copies(previous_layer, shared)


def _shared_copies(layer: int, shared: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for suffix, source in _MTP_SHARED_COPIES.items():
        if source in shared:
            yield f"model.layers.{layer}.{suffix}", shared[source]


def _dominant_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most parameter elements have (what config.json's torch_dtype should say)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


# ----------------------------------------------------------------------------------------------------------
# Reading: locate files, read headers, validate everything, then copy tensor by tensor
# ----------------------------------------------------------------------------------------------------------


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """An HF-layout checkpoint directory from either that directory or a training run directory.

    `path/config.json` exists -> `path`. Otherwise `path/checkpoints/latest` (or `path/latest`) is a text file
    naming the newest complete checkpoint subdirectory of that checkpoints directory.
    """
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    for checkpoints_dir in (path / "checkpoints", path):
        pointer = checkpoints_dir / LATEST_POINTER
        if pointer.is_file():
            name = pointer.read_text().strip()
            target = checkpoints_dir / name
            if not name or not (target / CONFIG_NAME).is_file():
                raise CheckpointError(f"{pointer} names {name!r}, but {target} is not a checkpoint (no {CONFIG_NAME})")
            return target
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    raise CheckpointError(f"{path}: neither a checkpoint directory (no {CONFIG_NAME}) nor a run directory "
                          f"(no checkpoints/{LATEST_POINTER})")


def write_latest_pointer(checkpoints_dir: str | os.PathLike, name: str) -> None:
    """Atomically and durably point `checkpoints_dir/latest` at the complete checkpoint subdirectory `name` (the
    replace is on disk before anything relies on it, e.g. pruning)."""
    atomic_write(Path(checkpoints_dir) / LATEST_POINTER, name + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


@dataclass
class _TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "F32", "BF16", "F8_E4M3"


def _checkpoint_files(directory: Path) -> list[Path]:
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no weight_map")
        by_file: dict[str, list[str]] = {}
        for tensor_name, file_name in weight_map.items():
            by_file.setdefault(file_name, []).append(tensor_name)
        for file_name, names in by_file.items():
            if not (directory / file_name).is_file():
                shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
                raise CheckpointError(f"{index_path} maps {len(names)} tensors ({shown}) to {directory / file_name}, "
                                      f"which does not exist")
        return [directory / f for f in sorted(by_file)]
    if (directory / SINGLE_FILE_NAME).is_file():
        return [directory / SINGLE_FILE_NAME]
    raise CheckpointError(f"{directory}: no {INDEX_NAME} and no {SINGLE_FILE_NAME}")


def read_checkpoint_headers(directory: Path) -> dict[str, _TensorInfo]:
    """Name -> (file, shape, dtype) from the safetensors headers only; cross-checked against the index."""
    infos: dict[str, _TensorInfo] = {}
    for file in _checkpoint_files(directory):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor_slice = f.get_slice(name)
                    if name in infos:
                        raise CheckpointError(f"{name} is stored twice: in {infos[name].file} and in {file}")
                    infos[name] = _TensorInfo(file, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {exc}") from None
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        for name, file_name in _read_json(index_path)["weight_map"].items():
            if name not in infos:
                raise CheckpointError(f"{index_path} maps {name} to {directory / file_name}, but that file "
                                      f"has no tensor {name}")
            if infos[name].file.name != file_name:
                raise CheckpointError(f"{index_path} maps {name} to {file_name}, but it is in {infos[name].file}")
    return infos


def _is_float8(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith("F8")


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX_RE.match(name)
    return int(match.group(1)) if match else None


def _mtp_layers(config: Mapping[str, Any]) -> range:
    """Layer indices of the multi-token-prediction modules the config declares (after the regular layers)."""
    num_layers = int(config.get("num_hidden_layers", 0))
    extra = config.get("num_nextn_predict_layers", config.get("num_mtp_layers", 0)) or 0
    return range(num_layers, num_layers + int(extra))


def _plan_load(infos: Mapping[str, _TensorInfo], expected: Mapping[str, tuple[int, ...]],
               config: Mapping[str, Any], directory: Path) -> tuple[dict[str, str], int]:
    """Validate the whole checkpoint against the model before touching data.

    MTP layers the model does not hold are skipped; in those it holds, the copies of the shared embedding /
    lm_head are compared with the main tensors (chunk by chunk, from the files) instead of being loaded.
    Returns ({weight name: scale_inv name or ''}, number of skipped MTP tensors).
    """
    mtp = _mtp_layers(config)
    block = _fp8_block_size(config)
    model_layers = {layer for name in expected if (layer := _layer_index(name)) is not None}
    found: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    scale_of: dict[str, str] = {}
    copies: dict[str, str] = {}
    skipped = 0
    problems: list[str] = []
    for name, info in infos.items():
        layer = _layer_index(name)
        if layer is not None and layer in mtp and layer not in model_layers:
            skipped += 1  # an MTP module the model does not build
            continue
        source = mtp_shared_copy_source(name, mtp.start) if layer in mtp else None
        if source is not None:
            copies[name] = source
            continue
        if name.endswith(SCALE_SUFFIX):
            weight = name[: -len(SCALE_SUFFIX)]
            if weight not in infos or not _is_float8(infos[weight].dtype):
                problems.append(f"{name} (in {info.file}) scales no float8 tensor")
            continue
        found[name], where[name] = info.shape, str(info.file)
        scale_of[name] = ""
        if _is_float8(info.dtype):
            scale_name = name + SCALE_SUFFIX
            if scale_name not in infos:
                problems.append(f"{name} (in {info.file}) is {info.dtype} but {scale_name} is missing")
                continue
            expected_grid = _block_grid((info.shape[0], info.shape[1]), block) if len(info.shape) == 2 else None
            if expected_grid is None or infos[scale_name].shape != expected_grid:
                problems.append(f"{scale_name} (in {infos[scale_name].file}) has shape {list(infos[scale_name].shape)}, "
                                f"but {name} {list(info.shape)} with {block[0]}x{block[1]} blocks needs "
                                f"{list(expected_grid) if expected_grid else '(a 2-D weight)'}")
            scale_of[name] = scale_name
    problems += _describe_mismatch(expected, found, where)
    problems += _check_shared_copies(copies, infos)
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config / the model:\n  "
                              + "\n  ".join(problems) + _config_hint(problems, config))
    return scale_of, skipped


def _check_shared_copies(copies: Mapping[str, str], infos: Mapping[str, _TensorInfo],
                         chunk_elements: int = 1 << 24) -> list[str]:
    """Problems for MTP-layer copies of the embedding / lm_head that differ from the main tensor (compared in row
    chunks of about `chunk_elements`, so no full extra copy is ever in memory)."""
    problems = []
    for name, source in sorted(copies.items()):
        copy_info, main_info = infos[name], infos.get(source)
        if main_info is None:
            continue  # the missing main tensor is reported by the name check
        if copy_info.shape != main_info.shape:
            problems.append(f"{name} (in {copy_info.file}) has shape {list(copy_info.shape)} but the {source} it "
                            f"copies has {list(main_info.shape)}")
            continue
        rows = copy_info.shape[0] if copy_info.shape else 1
        step = max(1, chunk_elements // max(1, math.prod(copy_info.shape[1:])))
        try:
            with safe_open(str(copy_info.file), framework="pt") as f_copy, \
                    safe_open(str(main_info.file), framework="pt") as f_main:
                copy_slice, main_slice = f_copy.get_slice(name), f_main.get_slice(source)
                for start in range(0, rows, step):
                    a, b = copy_slice[start:start + step].float(), main_slice[start:start + step].float()
                    if not torch.equal(a, b):
                        diff = float((a - b).abs().max())
                        problems.append(
                            f"{name} (in {copy_info.file}) differs from {source} (in {main_info.file}) "
                            f"(max |diff| {diff:.3g} in rows {start}..{min(rows, start + step) - 1}): openk2's MTP "
                            f"modules share the main model's embedding and lm_head, so a stored copy must equal it; "
                            f"remove or fix the copy")
                        break
        except SafetensorError as exc:
            problems.append(f"{name}: failed comparing with {source} ({exc})")
    return problems


def _config_hint(problems: list[str], config: Mapping[str, Any]) -> str:
    text = "\n".join(problems)
    hints = []
    if "embed_tokens" in text or "lm_head" in text:
        hints.append(f"vocab_size={config.get('vocab_size')}")
    if "experts." in text or "mlp.gate." in text:
        hints.append(f"n_routed_experts={config.get('n_routed_experts')}")
    if "model.layers." in text:
        hints.append(f"num_hidden_layers={config.get('num_hidden_layers')}")
        if len(_mtp_layers(config)):
            hints.append(f"num_nextn_predict_layers={len(_mtp_layers(config))}: layers from "
                         f"{config.get('num_hidden_layers')} on are multi-token-prediction modules")
    return f"\n  ({CONFIG_NAME} says {', '.join(hints)})" if hints else ""


def _build_empty_model(config: Any, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model allocated once on `device` in `dtype`, weights uninitialized (they are loaded next)."""
    from openk2.model import K2ForCausalLM

    with torch.device("meta"):
        model = K2ForCausalLM(config)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    fp32_buffers(model)
    # Non-persistent buffers are not in the checkpoint and to_empty left them uninitialized: they are
    # counters (the router's per-expert load), so they start at zero, as in a freshly built model.
    with torch.no_grad():
        for module in model.modules():
            for buffer_name in getattr(module, "_non_persistent_buffers_set", ()):
                buffer = getattr(module, buffer_name, None)
                if isinstance(buffer, torch.Tensor):
                    buffer.zero_()
    reset = getattr(model, "reset_non_persistent_buffers", None)
    if callable(reset):  # a model whose non-persistent buffers need computed values provides this hook
        reset()
    return model


def fp32_buffers(model: nn.Module) -> None:
    """Put tensors that must stay fp32 (router bias) back to fp32 after a blanket dtype cast."""
    for module in model.modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if _FP32_TENSOR_RE.search("." + buffer_name) and buffer is not None and buffer.dtype != torch.float32:
                setattr(module, buffer_name, buffer.float())


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, *, mtp: bool = True) -> nn.Module:
    """Load an HF-layout checkpoint (or a run directory's latest checkpoint) into a new K2ForCausalLM. A
    distributed (DCP) checkpoint written under torchrun loads too, in this one process.

    `dtype`: the model's floating dtype (default: config.json's torch_dtype / dtype, else float32; block-FP8
    weights are dequantized into it). The router's e_score_correction_bias stays fp32. The model is built on
    the meta device and allocated once; the checkpoint is validated from its file headers before any data is
    read, then copied tensor by tensor, so either the complete model is returned or CheckpointError is raised.
    `mtp=False` builds the model without its multi-token-prediction modules (inference never runs them) and skips
    their tensors.
    """
    from openk2.config import K2Config

    directory = resolve_checkpoint_dir(path)
    config_path = directory / CONFIG_NAME
    config_dict = _read_json(config_path)
    try:
        config = K2Config.from_dict(config_dict)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    dtype = dtype or _config_dtype(config_dict)
    device = torch.device(device) if device is not None else torch.device("cpu")
    from openk2.parallel import is_distributed_checkpoint, load_distributed_weights

    if is_distributed_checkpoint(directory):  # written under torchrun: read its DCP shards in this one process
        model = _build_empty_model(config.replace(num_nextn_predict_layers=0) if not mtp else config, dtype, device)
        load_distributed_weights(model, directory)
        return model.eval()
    infos = read_checkpoint_headers(directory)  # fail on unreadable files before allocating the model
    declared_mtp = _mtp_layers(config_dict)
    if len(declared_mtp) and not any(_layer_index(name) in declared_mtp for name in infos):
        # transformers writes num_nextn_predict_layers: 1 by default without MTP weights: the main model alone.
        log.info("%s: %s says num_nextn_predict_layers=%d but the checkpoint holds no MTP tensors; loading the "
                 "model without MTP modules", directory, CONFIG_NAME, len(declared_mtp))
        config = config.replace(num_nextn_predict_layers=0)
    if not mtp:
        config = config.replace(num_nextn_predict_layers=0)
    model = _build_empty_model(config, dtype, device)
    load_hf_state_dict_from_dir(model, directory)
    model.eval()
    return model


def load_hf_state_dict_from_dir(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint directory's weights into an existing model, in place (e.g. to resume training).

    The checkpoint's config.json decides FP8 block size and which layers are MTP (loaded into the model's MTP
    modules; skipped when the model has fewer, e.g. none; missing when it has more). Every name, shape
    and scale is validated from the file headers before any data is copied; a read error after that (a file
    changed underneath us) raises CheckpointError and the model must be discarded.
    """
    directory = resolve_checkpoint_dir(path)
    config_dict = _read_json(directory / CONFIG_NAME)
    infos = read_checkpoint_headers(directory)
    scale_of, skipped = _plan_load(infos, hf_tensor_shapes(model), config_dict, directory)
    if skipped:
        log.info("%s: skipped %d multi-token-prediction tensors (layers >= num_hidden_layers=%s that the model does "
                 "not build)", directory, skipped, config_dict.get("num_hidden_layers"))
    num_hidden_layers = _num_hidden_layers(model)
    block = _fp8_block_size(config_dict)
    targets = _model_tensors(model)
    by_file: dict[Path, list[str]] = {}
    for name in scale_of:
        by_file.setdefault(infos[name].file, []).append(name)
    with torch.no_grad():
        for file, names in sorted(by_file.items()):
            handles: dict[Path, Any] = {}
            reading = file
            try:
                handles[file] = safe_open(str(file), framework="pt", device="cpu")
                for name in names:
                    reading = file
                    tensor = handles[file].get_tensor(name)
                    scale_name = scale_of[name]
                    if scale_name:
                        reading = infos[scale_name].file
                        if reading not in handles:
                            handles[reading] = safe_open(str(reading), framework="pt", device="cpu")
                        tensor = dequantize_fp8_blockwise(tensor, handles[reading].get_tensor(scale_name), block)
                    target_name, expert = hf_name_to_target(name, num_hidden_layers)
                    target = targets[target_name]
                    (target if expert is None else target[expert]).copy_(tensor)
                    del tensor
            except SafetensorError as exc:
                raise CheckpointError(f"{reading}: failed reading tensor data ({exc})") from None
            finally:
                handles.clear()


def _config_dtype(config_dict: Mapping[str, Any]) -> torch.dtype:
    name = config_dict.get("torch_dtype") or config_dict.get("dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        return torch.float32
    return dtype


# ----------------------------------------------------------------------------------------------------------
# `openk2 convert SRC DST [--fp8 | --bf16] [--max-shard-size]`: file to file, tensor by tensor
# ----------------------------------------------------------------------------------------------------------


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, fp8: bool = False, bf16: bool = False,
                       max_shard_size: int | str = "5GB") -> Path:
    """Re-shard a checkpoint; `fp8` quantizes the Linear weights, `bf16` dequantizes FP8 and casts to bf16.

    Works on the files alone (no model is built): each output shard is produced from memory-mapped input
    tensors, one shard's worth at a time.
    """
    if fp8 and bf16:
        raise ValueError("choose at most one of fp8 / bf16")
    src_dir = resolve_checkpoint_dir(src)
    config = _read_json(src_dir / CONFIG_NAME)
    infos = read_checkpoint_headers(src_dir)
    in_block = _fp8_block_size(config)
    out_block = tuple(FP8_QUANTIZATION_CONFIG["weight_block_size"])
    was_fp8 = any(_is_float8(info.dtype) for info in infos.values())
    handles: dict[Path, Any] = {}

    def read(name: str) -> torch.Tensor:
        file = infos[name].file
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt", device="cpu")
        try:
            return handles[file].get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: failed reading {name} ({exc})") from None

    def read_high_precision(name: str) -> torch.Tensor:
        tensor = read(name)
        if _is_float8(infos[name].dtype):
            scale_name = name + SCALE_SUFFIX
            if scale_name not in infos:
                raise CheckpointError(f"{name} (in {infos[name].file}) is float8 but {scale_name} is missing")
            tensor = dequantize_fp8_blockwise(tensor, read(scale_name), in_block, dtype=torch.float32)
        return tensor

    entries: list[_Entry] = []
    for name, info in infos.items():
        if name.endswith(SCALE_SUFFIX):
            continue  # travels with its weight
        numel = math.prod(info.shape)
        if fp8 and is_fp8_quantizable(name) and len(info.shape) == 2:
            def produce(name: str = name) -> dict[str, torch.Tensor]:
                w_fp8, scale_inv = quantize_fp8_blockwise(read_high_precision(name), out_block)
                return {name: w_fp8, name + SCALE_SUFFIX: scale_inv}
            entries.append(_Entry(name, _fp8_nbytes(info.shape, out_block), produce))
        elif bf16 or (fp8 and _is_float8(info.dtype)):
            out_dtype = torch.float32 if _FP32_TENSOR_RE.search(name) else torch.bfloat16
            def produce(name: str = name, out_dtype: torch.dtype = out_dtype) -> dict[str, torch.Tensor]:
                tensor = read_high_precision(name)
                return {name: tensor.to(out_dtype) if tensor.is_floating_point() else tensor}
            entries.append(_Entry(name, numel * (4 if out_dtype == torch.float32 else 2), produce))
        else:  # copied as stored (fp8 weights keep their scale)
            def produce(name: str = name) -> dict[str, torch.Tensor]:
                out = {name: read(name)}
                if _is_float8(infos[name].dtype):
                    out[name + SCALE_SUFFIX] = read(name + SCALE_SUFFIX)
                return out
            scale_bytes = 0
            if _is_float8(info.dtype) and name + SCALE_SUFFIX in infos:
                scale_bytes = math.prod(infos[name + SCALE_SUFFIX].shape) * 4
            entries.append(_Entry(name, numel * _safetensors_itemsize(info.dtype) + scale_bytes, produce))

    out_config = dict(config)
    if fp8:
        out_config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        out_config.setdefault("torch_dtype", "bfloat16")
    elif bf16:
        out_config.pop("quantization_config", None)
        out_config["torch_dtype"] = "bfloat16"
        out_config.pop("dtype", None)
    elif not was_fp8:
        out_config.pop("quantization_config", None)
    try:
        return _write_checkpoint(dst, out_config, entries, max_shard_size, _copy_side_files(src_dir))
    finally:
        handles.clear()


_SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                         "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def _safetensors_itemsize(dtype: str) -> int:
    return _SAFETENSORS_ITEMSIZE.get(dtype, 4)


# Files of a training checkpoint that a converted model checkpoint does not carry (optimizer / data state).
_TRAINING_ONLY_SUFFIXES = (".pt", ".pth", ".bin")
_TRAINING_ONLY_NAMES = ("train_config.json",)


def _copy_side_files(src_dir: Path) -> Callable[[Path], None]:
    """Copy tokenizer files, generation config and the like along with a conversion (not weights, not
    trainer state)."""
    def copy(tmp_dir: Path) -> None:
        for item in src_dir.iterdir():
            skip = (item.name in (CONFIG_NAME, INDEX_NAME, *_TRAINING_ONLY_NAMES) or item.name.startswith(".")
                    or item.suffix in (".safetensors", *_TRAINING_ONLY_SUFFIXES) or not item.is_file())
            if not skip:
                shutil.copy2(item, tmp_dir / item.name)
    return copy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openk2 convert", description=(
        "Convert an HF-layout checkpoint (or a run directory's latest checkpoint): re-shard, quantize the "
        "Linear weights to block FP8 (--fp8), or dequantize to bf16 (--bf16). Works shard by shard."))
    parser.add_argument("src", help="checkpoint directory or training run directory")
    parser.add_argument("dst", help="output checkpoint directory (written atomically)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp8", action="store_true", help="store attention/MLP/expert weights as block FP8")
    precision.add_argument("--bf16", action="store_true", help="dequantize FP8 and store everything in bf16")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard (default 5GB; e.g. 500MB, 2GiB)")
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.src, args.dst, fp8=args.fp8, bf16=args.bf16, max_shard_size=args.max_shard_size)
    except (CheckpointError, ValueError) as exc:
        print(f"openk2 convert: error: {exc}")
        return 1
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out} ({len(files)} files: {', '.join(files)})")
    return 0
