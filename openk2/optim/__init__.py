"""MuonClip optimizer: Muon (Newton-Schulz orthogonalized momentum) + AdamW + per-head QK-Clip, and WSD.
User guide: docs/muonclip.md."""

from openk2.optim.muon import (
    Muon,
    MuonClip,
    default_muon_filter,
    split_params_for_muonclip,
    update_scale,
    zeropower_via_newtonschulz,
)
from openk2.optim.qk_clip import apply_qk_clip, clip_gamma, clip_mha_, clip_mla_, find_attention_modules, gqa_scales
from openk2.optim.schedule import WSDSchedule, lr_multiplier, set_lr, wsd_lr_multiplier

__all__ = [
    "Muon", "MuonClip", "default_muon_filter", "split_params_for_muonclip", "update_scale",
    "zeropower_via_newtonschulz", "apply_qk_clip", "clip_gamma", "clip_mha_", "clip_mla_",
    "find_attention_modules", "gqa_scales", "WSDSchedule", "lr_multiplier", "set_lr", "wsd_lr_multiplier",
]
