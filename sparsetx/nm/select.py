"""Which Linear layers get which N:M pattern."""
from __future__ import annotations

import re

from torch import nn

from ..adapters import find_family
from .pattern import NMPattern


def block_linears(model: nn.Module) -> list[str]:
    """Names of every nn.Linear inside the Transformer blocks.

    That is Q, K, V, attention output and the FFN layers; embeddings, pooler and task heads sit
    outside the block list and are left dense. The block list is the family adapter's
    (:mod:`sparsetx.adapters`); a model of another family is still pruned (N:M needs only its
    Linear weights), with the largest ``nn.ModuleList`` taken as its blocks.
    """
    family = find_family(model)
    if family is not None:
        blocks_name, blocks = family.block_list(model)
    else:
        lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)]
        if not lists:
            raise ValueError(f"{type(model).__name__} has no list of Transformer blocks (no nn.ModuleList)")
        blocks_name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    names = [f"{blocks_name}.{name}" for name, mod in blocks.named_modules() if isinstance(mod, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear in its blocks ({blocks_name}) to prune; "
                         "GPT-2's Conv1D layers are not supported")
    return names


def resolve_layers(model: nn.Module, pattern: NMPattern | str, include: list[str] | None = None,
                   exclude: list[str] | None = None, overrides: dict[str, str] | None = None) -> dict[str, NMPattern]:
    """Layer name -> pattern.

    include: regexes (``re.search``) over Linear names, replacing the default block Linears.
    exclude: regexes removing layers.
    overrides: {regex or exact name: pattern} giving some layers their own pattern.
    Each regex must match at least one Linear (a typo is an error, not a silent no-op).
    """
    linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to prune")

    def matching(regex: str, where: list[str], what: str) -> list[str]:
        hits = [n for n in where if n == regex or re.search(regex, n)]
        if not hits:
            raise ValueError(f"{what} {regex!r} matches no Linear layer of {type(model).__name__} "
                             f"(examples: {', '.join(linears[:4])})")
        return hits

    names = sorted({n for r in include for n in matching(r, linears, "include regex (--include)")}, key=linears.index) \
        if include else block_linears(model)
    for regex in exclude or []:
        dropped = set(matching(regex, linears, "exclude regex (--exclude)"))
        names = [n for n in names if n not in dropped]
    default = NMPattern.parse(pattern)
    chosen = {n: default for n in names}
    for regex, pat in (overrides or {}).items():
        try:
            parsed = NMPattern.parse(pat)
        except ValueError as err:
            raise ValueError(f"--layer {regex!r}: {err}") from None
        for n in matching(regex, linears, "layer regex (--layer)"):
            chosen[n] = parsed
    for name, pat in chosen.items():
        weight = model.get_submodule(name).weight
        if weight.shape[1] % pat.m:
            raise ValueError(f"layer {name}: input size {weight.shape[1]} is not divisible by M={pat.m} "
                             f"(pattern {pat}); give it another pattern or exclude it")
    return chosen
