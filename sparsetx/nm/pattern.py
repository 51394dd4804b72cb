"""N:M patterns: parsing and validation at the door."""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_M = 32

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class NMPattern:
    """At most ``n`` non-zeros in every group of ``m`` consecutive weights along the input dim."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise ValueError(f"N:M pattern needs integers, got n={self.n!r}, m={self.m!r}")
        if self.m < 2 or self.m > MAX_M:
            raise ValueError(f"N:M pattern {self.n}:{self.m}: M must be in [2, {MAX_M}]")
        if self.n < 1:
            raise ValueError(f"N:M pattern {self.n}:{self.m}: N must be >= 1")
        if self.n >= self.m:
            raise ValueError(
                f"N:M pattern {self.n}:{self.m}: N must be smaller than M (valid: 1 <= N < M); "
                "N = M would be dense"
            )

    @classmethod
    def parse(cls, text: str | NMPattern) -> NMPattern:
        """``"2:4"`` -> NMPattern(2, 4); raises ValueError naming the text if it does not parse."""
        if isinstance(text, NMPattern):
            return text
        match = _PATTERN_RE.match(str(text))
        if not match:
            raise ValueError(f"cannot parse N:M pattern {text!r}: expected 'N:M' such as '2:4' or '1:8'")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_series(text: str) -> list[NMPattern]:
    """``"4:8,2:8,1:8"`` -> patterns, checked to get strictly sparser along the series."""
    patterns = [NMPattern.parse(p) for p in str(text).split(",") if p.strip()]
    if not patterns:
        raise ValueError(f"empty pattern series {text!r}")
    for prev, nxt in zip(patterns, patterns[1:]):
        if nxt.density > prev.density:
            raise ValueError(
                f"pattern series {text!r}: {nxt} is denser than {prev}; an IDP series goes from dense to sparse"
            )
    return patterns
