"""KV-cache eviction policies of the decoder runtime: one small class each (as kvpress's presses).

A policy scores the tokens a layer's cache holds; the runtime keeps the ``budget`` highest, never
the current forward's own tokens nor, with ``recent`` > 0, the ``recent`` newest ones. ``cascade``
policies also drop from layer i every token layer i - 1 no longer holds (SpAtten's cascade).

    DecoderConfig(kv_budget=256, policy=Cascade(normalize=True, recent=16))
    DecoderConfig(kv_budget=256, policy="h2o")          # a name takes the policy's defaults
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class Policy:
    """What every policy holds: ``recent`` newest tokens always kept (0: only the current ones)."""

    recent: int = 0
    name: ClassVar[str] = ""
    cascade: ClassVar[bool] = False
    layer_scores: ClassVar[bool] = False   # scores differ by layer (the runtime then cuts each layer alone)

    def __post_init__(self) -> None:
        if self.recent < 0:
            raise ValueError(f"{self.name}: recent window {self.recent} must be >= 0 tokens")

    def scores(self, runtime, layer: int, pos: torch.Tensor) -> torch.Tensor:
        """Keep scores (higher = kept) of the cached tokens at positions ``pos`` of ``layer``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Cascade(Policy):
    """SpAtten: s[t] += sum over heads and queries of P[h, q, t], over every layer and step; a
    token dropped at layer i is gone from every later layer. ``normalize`` (the default) ranks by
    s[t] divided by the number of queries that saw t: an older token has had more queries to
    collect probability from, and the raw sum (``normalize=False``, the paper's score) keeps old
    tokens over recent ones. Measured on SmolLM2 (benchmarks/kv_peers.py --ablation): the raw
    sum costs 0.2-0.35 nats of NLL at 50-12.5 % of a 1024-token context against this."""

    normalize: bool = True
    name: ClassVar[str] = "cascade"
    cascade: ClassVar[bool] = True

    def scores(self, runtime, layer, pos):
        s = runtime.importance[pos]
        return s / runtime.query_count[pos].clamp_min(1) if self.normalize else s


@dataclass(frozen=True)
class H2O(Policy):
    """Heavy hitters (H2O): attention accumulated per layer over steps, no cascade across layers."""

    normalize: bool = False
    name: ClassVar[str] = "h2o"
    layer_scores: ClassVar[bool] = True

    def scores(self, runtime, layer, pos):
        s = runtime.layer_importance[layer][pos]
        return s / runtime.layer_query_count[layer][pos].clamp_min(1) if self.normalize else s


@dataclass(frozen=True)
class Window(Policy):
    """The most recent tokens."""

    name: ClassVar[str] = "window"

    def scores(self, runtime, layer, pos):
        return pos.double()


@dataclass(frozen=True)
class Sink(Policy):
    """StreamingLLM: the first ``sink_tokens`` (attention sinks) and the most recent."""

    sink_tokens: int = 4
    name: ClassVar[str] = "sink"

    def scores(self, runtime, layer, pos):
        return torch.where(pos < self.sink_tokens, torch.inf, pos.double())


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Cascade, H2O, Window, Sink)}


def resolve_policy(policy: str | Policy, sink_tokens: int = 4) -> Policy:
    """A policy object, or the named one with its defaults (``sink_tokens`` for "sink")."""
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)} (or a Policy object)")
    return Sink(sink_tokens=sink_tokens) if policy == "sink" else POLICIES[policy]()
