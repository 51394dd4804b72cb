"""Tile-level event timing: jobs (tiles) made of stages on units (DRAM, compute engines, softmax,
top-k), each unit serving one stage at a time, so overlap and stalls fall out of the schedule rather
than a roofline formula.

A job's stages run in order. A stage occupies its unit for ``cycles`` and completes ``latency``
cycles later (a pipelined unit: the next stage may enter after ``cycles``). Extra dependencies give
double buffering (a fetch waits until the stage that frees its buffer, ``depth`` jobs back, is done)
and data dependencies between operations. When a unit is free it starts the ready stage of the
earliest job (list scheduling in program order), so a later job's fetch fills idle DRAM time while
compute works on an earlier one.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Stage:
    unit: str
    cycles: float
    op: str = ""            # what the report groups it under (e.g. "qk", "fetch_k")
    latency: float = 0.0
    after: list[tuple[int, int]] = field(default_factory=list)  # extra (job, stage) dependencies


@dataclass
class Schedule:
    start: list[list[float]]
    end: list[list[float]]
    makespan: float
    busy: dict[str, float]       # cycles each unit worked
    by_op: dict[str, float]      # cycles of work per op name

    def utilisation(self, unit: str) -> float:
        return self.busy.get(unit, 0.0) / self.makespan if self.makespan else 0.0


def buffer_deps(jobs: list[list[Stage]], fetch: int, frees: int, depth: int = 2) -> None:
    """Double (``depth``) buffering: stage ``fetch`` of job j waits for stage ``frees`` of job j - depth."""
    for j in range(depth, len(jobs)):
        jobs[j][fetch].after.append((j - depth, frees))


def simulate(jobs: list[list[Stage]]) -> Schedule:
    """Event-driven list schedule of ``jobs``; returns start/end cycles of every stage."""
    n_deps: dict[tuple[int, int], int] = {}
    children: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for j, job in enumerate(jobs):
        for s, st in enumerate(job):
            if st.cycles < 0 or st.latency < 0:
                raise ValueError(f"job {j} stage {s} ({st.op}): negative cycles")
            deps = ([(j, s - 1)] if s else []) + list(st.after)
            for d in deps:
                if not (0 <= d[0] < len(jobs) and 0 <= d[1] < len(jobs[d[0]])):
                    raise ValueError(f"job {j} stage {s} depends on a missing stage {d}")
                children[d].append((j, s))
            n_deps[(j, s)] = len(deps)
    start = [[0.0] * len(job) for job in jobs]
    end = [[0.0] * len(job) for job in jobs]
    ready_at: dict[tuple[int, int], float] = defaultdict(float)
    queues: dict[str, list] = defaultdict(list)        # unit -> heap of (job, stage) ready to start
    free_at: dict[str, float] = defaultdict(float)
    busy: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    events: list = []                                  # (time, kind, payload)
    for key, n in n_deps.items():
        if n == 0:
            heapq.heappush(events, (0.0, 1, key))
    done = 0
    total = len(n_deps)
    while events:
        t, kind, key = heapq.heappop(events)
        if kind == 0:                                  # a stage completed: release its dependents
            done += 1
            for c in children[key]:
                n_deps[c] -= 1
                ready_at[c] = max(ready_at[c], t)
                if n_deps[c] == 0:
                    heapq.heappush(events, (ready_at[c], 1, c))
            continue
        if kind == 1:                                  # a stage became ready: queue it on its unit
            j, s = key
            heapq.heappush(queues[jobs[j][s].unit], (j, s))
            unit = jobs[j][s].unit
        else:                                          # kind 2: a unit became free
            unit = key
        if free_at[unit] > t or not queues[unit]:
            continue
        j, s = heapq.heappop(queues[unit])
        st = jobs[j][s]
        start[j][s] = t
        free_at[unit] = t + st.cycles
        end[j][s] = t + st.cycles + st.latency
        busy[unit] += st.cycles
        by_op[st.op or unit] += st.cycles
        heapq.heappush(events, (end[j][s], 0, (j, s)))
        heapq.heappush(events, (free_at[unit], 2, unit))
    if done != total:
        raise ValueError(f"schedule deadlocked: {total - done} stages never became ready (a dependency cycle)")
    makespan = max((max(e) for e in end if e), default=0.0)
    return Schedule(start, end, makespan, dict(busy), dict(by_op))


def span_by(schedule: Schedule, keys: list) -> dict:
    """Cycles from the first start to the last end of the jobs sharing a key (e.g. (step, layer)),
    summed per key[-1] (the layer). Spans of neighbouring layers overlap where the pipeline does."""
    first: dict = {}
    last: dict = {}
    for key, s, e in zip(keys, schedule.start, schedule.end):
        if not s:
            continue
        first[key] = min(first.get(key, float("inf")), min(s))
        last[key] = max(last.get(key, 0.0), max(e))
    out: dict = {}
    for key in first:
        layer = key[-1] if isinstance(key, tuple) else key
        out[layer] = out.get(layer, 0.0) + last[key] - first[key]
    return dict(sorted(out.items()))
