"""Checkpoints in the Hugging Face / released Kimi-K2 layout.

Our model stores each MoE layer's routed experts as stacked 3-D parameters
(`model.layers.{i}.mlp.experts.gate_proj` [E, I, H], `.up_proj` [E, I, H], `.down_proj` [E, H, I]);
the released checkpoints store one 2-D tensor per expert
(`model.layers.{i}.mlp.experts.{e}.gate_proj.weight` [I, H], ...). Every other name is identical.
This module maps between the two, in memory and on disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

# The three stacked expert projections and their per-expert HF name suffix.
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_STACKED_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint (file or state dict) does not match the model; the message names tensors and files."""


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our persistent tensors (parameters + persistent buffers) by name, without copying."""
    return dict(model.state_dict(keep_vars=True))


def iter_hf_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) pairs one by one; expert slices are views of the stacked parameter."""
    for name, tensor in _model_tensors(model).items():
        tensor = tensor.detach()
        match = _STACKED_EXPERT_RE.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, projection = match.groups()
        for expert in range(tensor.shape[0]):
            yield f"{prefix}.{expert}.{projection}.weight", tensor[expert]


def hf_tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The HF name -> shape map the model expects (no tensor data touched; works on meta models)."""
    return {name: tuple(t.shape) for name, t in iter_hf_tensors(model)}


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the released key names (experts split per expert; views, not copies)."""
    return dict(iter_hf_tensors(model))


def hf_name_to_target(name: str) -> tuple[str, int | None]:
    """Map an HF tensor name to (our parameter name, expert index or None)."""
    match = _PER_EXPERT_RE.match(name)
    if match is None:
        return name, None
    prefix, expert, projection = match.groups()
    return f"{prefix}.{projection}", int(expert)


def load_hf_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy HF-named tensors into the model (per-expert tensors into their stacked slice).

    All keys are checked before anything is copied: missing (when strict), unexpected and misshaped keys are
    reported together in one CheckpointError, and the model is left untouched in that case.
    """
    expected = hf_tensor_shapes(model)
    missing = sorted(set(expected) - set(state_dict)) if strict else []
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{name}: checkpoint {tuple(t.shape)} vs model {expected[name]}"
        for name, t in state_dict.items()
        if name in expected and tuple(t.shape) != expected[name]
    ]
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if misshaped:
        problems.append(f"misshaped ({len(misshaped)}): " + "; ".join(misshaped))
    if problems:
        raise CheckpointError("state dict does not match the model:\n  " + "\n  ".join(problems))

    targets = _model_tensors(model)
    with torch.no_grad():
        for name, tensor in state_dict.items():
            target_name, expert = hf_name_to_target(name)
            target = targets[target_name]
            destination = target if expert is None else target[expert]
            destination.copy_(tensor)
