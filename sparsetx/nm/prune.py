"""One-shot N:M pruning of a model: ``sparsify(model, NMConfig("2:4"))``."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .mask import activation_scores, apply_mask, group_nonzeros, magnitude_scores, nm_mask
from .pattern import NMPattern
from .select import resolve_layers

CRITERIA = ("magnitude", "activation")


@dataclass
class NMConfig:
    """What to prune and how.

    pattern: default N:M for every selected layer.
    criterion: "magnitude" (|W|) or "activation" (|W| * ||X||, Wanda; needs calibration batches).
    include / exclude: regexes over Linear names (default: every Linear in the Transformer blocks).
    overrides: {regex or layer name: pattern} for layers with their own pattern.
    """

    pattern: str = "2:4"
    criterion: str = "magnitude"
    include: list[str] | None = None
    exclude: list[str] | None = None
    overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        NMPattern.parse(self.pattern)
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}; valid: {', '.join(CRITERIA)}")

    def layers(self, model: nn.Module) -> dict[str, NMPattern]:
        return resolve_layers(model, self.pattern, self.include, self.exclude, self.overrides)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def input_norms(model: nn.Module, names: Iterable[str], batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """||X_j||_2 over every calibration token, for each input feature j of the named Linears."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        def hook(_mod, args, _out, name=name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"calibration never reached layers {missing[:3]}")
    return {n: s.sqrt() for n, s in sums.items()}


@torch.no_grad()
def sparsify(model: nn.Module, config: NMConfig, calibration: Iterable[dict] | None = None) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place to N:M; returns {layer name: bool mask}.

    Records the patterns in ``model.config.sparsetx`` so that a saved model can be packed later.
    """
    layers = config.layers(model)
    for name in layers:   # a NaN would win or lose every magnitude comparison: a silent wrong mask
        weight = model.get_submodule(name).weight
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{name}: {int((~torch.isfinite(weight)).sum())} NaN or infinite weight(s); "
                             "refusing to prune a diverged model")
    norms = None
    if config.criterion == "activation":
        if calibration is None:
            raise ValueError("criterion 'activation' needs calibration batches")
        norms = input_norms(model, list(layers), calibration)
    masks = {}
    for name, pattern in layers.items():
        linear = model.get_submodule(name)
        scores = magnitude_scores(linear.weight) if norms is None else activation_scores(linear.weight, norms[name])
        masks[name] = nm_mask(scores, pattern)
        linear.weight.copy_(apply_mask(linear.weight, masks[name]))
    record_patterns(model, {n: str(p) for n, p in layers.items()})
    return masks


def record_patterns(model: nn.Module, patterns: dict[str, str]) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        config.sparsetx = {"patterns": dict(patterns)}


def recorded_patterns(model: nn.Module) -> dict[str, NMPattern]:
    meta = getattr(getattr(model, "config", None), "sparsetx", None) or {}
    return {n: NMPattern.parse(p) for n, p in meta.get("patterns", {}).items()}


def sparsity_report(model: nn.Module, patterns: dict[str, NMPattern] | None = None) -> list[dict]:
    """Per layer: pattern, shape, kept fraction and whether every group really is N:M."""
    patterns = patterns if patterns is not None else recorded_patterns(model)
    rows = []
    for name, pattern in patterns.items():
        weight = model.get_submodule(name).weight.detach()
        counts = group_nonzeros(weight, pattern)
        rows.append({
            "layer": name, "pattern": str(pattern), "shape": list(weight.shape),
            "kept": float((weight != 0).float().mean()), "max_per_group": int(counts.max()),
            "nm_ok": bool(counts.max() <= pattern.n),
        })
    return rows
