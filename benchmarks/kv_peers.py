"""SpAtten's cascade against the KV-cache presses users pick (NVIDIA kvpress) on SmolLM2-135M.

Identical weights, identical token windows, one process (kvpress pins transformers < 5.3, so this
runs in its own venv; sparsetx supports that transformers too):

    bash benchmarks/setup_kvpress.sh
    benchmarks/.venv-kvpress/bin/python benchmarks/kv_peers.py            # ~2 h on 2 cores
    benchmarks/.venv-kvpress/bin/python benchmarks/kv_peers.py --quick    # a smoke run

Two settings, each on Wikipedia (gensim's articles) and the held-out Shakespeare plays:

* prefill compression (what every press supports): a 1024-token context is prefilled and its
  cache cut to 50 / 25 / 12.5 %; then the next 128 tokens are teacher-forced through the cut cache
  (all at their true positions) and their perplexity taken. Windows are evenly spaced, disjoint.
  kvpress presses compress each layer right after its attention during the prefill, from that
  layer's inputs; that prefill is run once per window on an eager-attention model (ObservedAttention
  needs the weights) and every press's ``compress`` is called on the same inputs its hook would
  get (checked equal to the hook path on the first window). The sparsetx policies run their own
  prefill under the SpAtten runtime.
* decode-time eviction (streamed at a fixed budget): 64 tokens prefilled, the next 192 fed one at
  a time with the cache held at 32 / 64 / 128 tokens (12.5 / 25 / 50 % of 256), teacher-forced.
  Each decoding step reads all 135 M weights (~0.1 s here), so this setting gets 1 window per text
  (about 16 min each); pass ``--decode-windows`` for more.
  kvpress: ``DecodingPress(press, compression_interval=1, target_size=budget)``; presses that
  cannot run this way are recorded with their error.

Reported per method and budget: perplexity exp(mean NLL) with a 95 % t-interval over windows, the
paired difference in NLL to the cascade (negative: better than the cascade) with its interval, and
wall time per window measured in the same run (median over windows; kvpress rows: one real run of
the press with its own hooks, after a warm-up). Results accumulate in a JSONL file as each window
finishes, so an interrupted run resumes where it stopped; JSON, markdown and a plot at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine  # noqa: E402

# The sparsetx methods: name -> DecoderConfig keyword arguments (besides the budget).
KEEPS = (0.5, 0.25, 0.125)


def pyramid(budget: int, layers: int) -> list[int]:
    """PyramidKV-like per-layer budgets with the mean ``budget``: 1.5x at layer 0 falling linearly
    to 0.5x at the last layer (decreasing, so the cascade's nested sets fit)."""
    return [max(2, round(budget * (1.5 - i / (layers - 1)))) for i in range(layers)]


def sparsetx_methods(ablation: bool = False) -> dict:
    """name -> DecoderConfig keywords (besides the budget); ``pyramid``: per-layer budgets.
    ``ablation``: the cascade's SpAtten-faithful variants instead of the four policies."""
    from sparsetx.attention.policies import Cascade, H2O, Sink, Window

    if ablation:
        out = {"sparsetx cascade": dict(policy=Cascade(normalize=False), evict_after="layer")}   # the paper's
        for fwd in (False, True):
            for norm in (False, True):
                for recent in (0, 64):
                    if (fwd, norm, recent) == (False, False, 0):
                        continue
                    name = ", ".join(x for x in ("after forward" if fwd else "", "normalised" if norm else "",
                                                 f"recent {recent}" if recent else "") if x)
                    out[f"cascade: {name}"] = dict(policy=Cascade(normalize=norm, recent=recent),
                                                   evict_after="forward" if fwd else "layer")
        out["cascade: per-layer budgets"] = dict(policy=Cascade(normalize=False), evict_after="layer", pyramid=True)
        return out
    return {"sparsetx cascade": dict(policy=Cascade()),      # the default: per-query importance, cut after the forward
            "sparsetx cascade, paper score": dict(policy=Cascade(normalize=False), evict_after="layer"),
            "sparsetx h2o": dict(policy=H2O()), "sparsetx window": dict(policy=Window()),
            "sparsetx sink": dict(policy=Sink(sink_tokens=4))}


def decoder_config(kw: dict, budget: int, layers: int):
    from sparsetx.attention.decoder import DecoderConfig

    rest = {k: v for k, v in kw.items() if k != "pyramid"}
    return DecoderConfig(kv_budget=pyramid(budget, layers) if kw.get("pyramid") else budget, **rest)


def kvpress_presses() -> dict:
    import kvpress as kp

    return {"kvpress StreamingLLM": kp.StreamingLLMPress, "kvpress SnapKV": kp.SnapKVPress,
            "kvpress ObservedAttention (H2O)": kp.ObservedAttentionPress, "kvpress TOVA": kp.TOVAPress,
            "kvpress Knorm": kp.KnormPress, "kvpress ExpectedAttention": kp.ExpectedAttentionPress,
            "kvpress KeyDiff": kp.KeyDiffPress}


# --- statistics -----------------------------------------------------------------------------------

def t_quantile(df: int, p: float = 0.975) -> float:
    """Student's t quantile (Cornish-Fisher expansion around the normal; < 1e-3 off for df >= 3)."""
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, m, m
    h = t_quantile(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - h, m + h


# --- the two settings -----------------------------------------------------------------------------

def windows(ids: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """``count`` disjoint windows of ``length`` tokens spread evenly over ``ids``."""
    if count * length > ids.numel():
        raise ValueError(f"{count} windows of {length} tokens do not fit in {ids.numel()} tokens")
    step = (ids.numel() - length) // max(count - 1, 1)
    return [ids[i * step:i * step + length].unsqueeze(0) for i in range(count)]


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)))


class PressReplay:
    """Calls every press's ``compress`` on the inputs its hook would see, layer by layer, during one
    prefill (kvpress's hook calls ``compress`` with exactly these, then writes the result into the
    cache, which nothing reads again during the prefill); keeps each press's cut K and V."""

    def __init__(self, model, presses: dict):
        self.model, self.presses = model, presses
        self.cut: dict[str, list] = {name: [] for name in presses}
        for press in presses.values():
            press.post_init_from_model(model)

    def hook(self, module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        for name, press in self.presses.items():
            self.cut[name].append(press.compress(module, kwargs["hidden_states"], layer.keys, layer.values,
                                                 output[1], kwargs))
        return output

    @contextlib.contextmanager
    def __call__(self):
        body = self.model.model
        for layer in body.layers:   # as kvpress's own context manager does (ExpectedAttention reads it)
            layer.self_attn.rotary_emb = body.rotary_emb
        handles = [layer.self_attn.register_forward_hook(self.hook, with_kwargs=True) for layer in body.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def cache_from(layers: list) -> object:
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


@torch.no_grad()
def continuation_nll(model, cache, ids, context: int) -> float:
    """Teacher-forced NLL of ids[context + 1:] from ids[context:-1] over a cut cache, true positions."""
    pos = torch.arange(context, ids.shape[1] - 1).unsqueeze(0)
    from sparsetx.adapters import family_of

    kw = family_of(model).cache_kwargs(model, cache)
    logits = model(input_ids=ids[:, context:-1], position_ids=pos, use_cache=True, **kw).logits
    return nll(logits, ids[:, context + 1:])


@torch.no_grad()
def prefill_window(models, ids, context: int, ours: dict, presses: dict, layers: int) -> dict:
    """One window of the prefill-compression setting: {method: {keep: {"nll", "seconds"}}}."""
    from transformers import DynamicCache

    from sparsetx.adapters import family_of
    from sparsetx.attention.decoder import spatten_decoder

    sdpa, eager = models
    out = {}
    t = time.perf_counter()
    logits = sdpa(input_ids=ids[:, :-1]).logits[:, context:]
    out["dense"] = {"1.0": {"nll": nll(logits, ids[:, context + 1:]), "seconds": time.perf_counter() - t}}
    for name, kw in ours.items():
        out[name] = {}
        for keep in KEEPS:
            cfg = decoder_config(kw, int(context * keep), layers)
            cache = DynamicCache()
            t = time.perf_counter()
            with spatten_decoder(sdpa, cfg) as rt:
                sdpa(input_ids=ids[:, :context], use_cache=True, **family_of(sdpa).cache_kwargs(sdpa, cache))
                rt.evicting = False   # the continuation attends to the cut context, cut no further
                value = continuation_nll(sdpa, cache, ids, context)
            kept = sum(len(p) for p in rt.positions) / layers
            out[name][str(keep)] = {"nll": value, "seconds": time.perf_counter() - t, "kept_tokens": kept}
    instances = {(name, keep): cls(compression_ratio=1 - keep) for name, cls in presses.items() for keep in KEEPS}
    replay = PressReplay(eager, {f"{n}|{k}": p for (n, k), p in instances.items()})
    t = time.perf_counter()
    with replay():
        eager(input_ids=ids[:, :context], past_key_values=DynamicCache(), use_cache=True)
    shared = time.perf_counter() - t
    for (name, keep) in instances:
        cut = replay.cut[f"{name}|{keep}"]
        t = time.perf_counter()
        value = continuation_nll(sdpa, cache_from(cut), ids, context)
        out.setdefault(name, {})[str(keep)] = {"nll": value, "seconds": time.perf_counter() - t,
                                               "kept_tokens": float(cut[0][0].shape[-2]),
                                               "shared_prefill_seconds": shared}
    return out


@torch.no_grad()
def press_wall_time(models, ids, context: int, presses: dict, keep: float) -> dict:
    """Seconds of one real kvpress prefill (its hooks, sdpa model; eager for ObservedAttention) plus
    the continuation, per press: what a user of each press waits for a window."""
    from transformers import DynamicCache

    sdpa, eager = models
    times = {}
    for name, cls in presses.items():
        model = eager if "Observed" in name else sdpa
        press = cls(compression_ratio=1 - keep)
        cache = DynamicCache()
        t = time.perf_counter()
        with press(model):
            model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
        continuation_nll(sdpa, cache, ids, context)
        times[name] = time.perf_counter() - t
    return times


def check_replay(models, ids, context: int, presses: dict) -> None:
    """The replayed compress calls give each press exactly the cache its own hooks give."""
    from transformers import DynamicCache

    _, eager = models
    instances = {name: cls(compression_ratio=0.75) for name, cls in presses.items()}
    replay = PressReplay(eager, instances)
    with torch.no_grad(), replay():
        eager(input_ids=ids[:, :context], past_key_values=DynamicCache(), use_cache=True)
    for name, cls in presses.items():
        cache = DynamicCache()
        with torch.no_grad(), cls(compression_ratio=0.75)(eager):
            eager(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
        for i, (k, v) in enumerate(replay.cut[name]):
            if not (torch.equal(cache.layers[i].keys, k) and torch.equal(cache.layers[i].values, v)):
                raise AssertionError(f"{name}: replayed compression differs from the press's hook at layer {i}")


@torch.no_grad()
def decode_window(models, ids, prefill: int, ours: dict, presses: dict, budgets: list[int], layers: int) -> dict:
    """One window of the decode-time setting: {method: {budget: {"nll", "seconds"}}} (or "error").
    ObservedAttention reads attention weights, so it decodes on the eager-attention model."""
    model, eager = models
    import kvpress as kp

    from sparsetx.attention.decoder_eval import streaming_pass

    out = {}
    t = time.perf_counter()
    dense = streaming_pass(model, ids, None, prefill)
    out["dense"] = {"full": {"nll": statistics.fmean(dense.nll), "seconds": time.perf_counter() - t}}
    for name, kw in ours.items():
        out[name] = {}
        for b in budgets:
            cfg = decoder_config(kw, b, layers)
            t = time.perf_counter()
            r = streaming_pass(model, ids, cfg, prefill)
            out[name][str(b)] = {"nll": statistics.fmean(r.nll), "seconds": time.perf_counter() - t}
    for name, cls in presses.items():
        out[name] = {}
        for b in budgets:
            press = kp.DecodingPress(base_press=cls(), compression_interval=1, target_size=b)
            runner = eager if "Observed" in name else model
            t = time.perf_counter()
            try:
                r = streaming_pass(runner, ids, None, prefill, within=press(runner))
            except Exception as err:  # recorded: a press that cannot evict while decoding
                out[name][str(b)] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
                continue
            out[name][str(b)] = {"nll": statistics.fmean(r.nll), "seconds": time.perf_counter() - t}
    return out


# --- reporting ------------------------------------------------------------------------------------

def summarise(records: list[dict]) -> list[dict]:
    """Rows (setting, text, method, budget): perplexity and paired NLL difference to the cascade."""
    rows = []
    keys = {(r["setting"], r["text"]) for r in records}
    for setting, text in sorted(keys):
        recs = [r for r in records if r["setting"] == setting and r["text"] == text]
        methods = list(dict.fromkeys(m for r in recs for m in r["result"]))
        for method in methods:
            budgets = list(dict.fromkeys(b for r in recs for b in r["result"].get(method, {})))
            for b in budgets:
                cells = [r["result"][method][b] for r in recs if b in r["result"].get(method, {})]
                errors = [c["error"] for c in cells if "error" in c]
                if errors:
                    rows.append({"setting": setting, "text": text, "method": method, "budget": b, "error": errors[0]})
                    continue
                nlls = [c["nll"] for c in cells]
                m, lo, hi = mean_ci(nlls)
                row = {"setting": setting, "text": text, "method": method, "budget": b, "windows": len(nlls),
                       "perplexity": math.exp(m), "ci95": [math.exp(lo), math.exp(hi)],
                       "seconds": statistics.median(c["seconds"] for c in cells)}   # robust to a busy spell
                if "kept_tokens" in cells[0]:
                    row["kept_tokens"] = statistics.fmean(c["kept_tokens"] for c in cells)
                ref = [r["result"].get("sparsetx cascade", {}).get(b) for r in recs if b in r["result"].get(method, {})]
                if method != "sparsetx cascade" and all(x and "nll" in x for x in ref) and ref:
                    diffs = [c["nll"] - x["nll"] for c, x in zip(cells, ref)]
                    d, dlo, dhi = mean_ci(diffs)
                    row["nll_vs_cascade"] = [d, dlo, dhi]
                    row["windows_better_than_cascade"] = sum(x < 0 for x in diffs)
                rows.append(row)
    return rows


def markdown(rows: list[dict], wall: dict) -> str:
    out = []
    for (setting, text) in dict.fromkeys((r["setting"], r["text"]) for r in rows):
        sub = [r for r in rows if r["setting"] == setting and r["text"] == text]
        n = max(r.get("windows", 0) for r in sub)
        head = ("prefill compression: 1024-token context cut to the kept fraction, next 128 tokens "
                "teacher-forced" if setting == "prefill" else
                "decode-time eviction: 64 tokens prefilled, 192 streamed at a fixed cache budget")
        out.append(f"\n**{text}, {head}** ({n} windows; perplexity with 95 % interval; "
                   "Δ NLL vs cascade < 0 means better than the cascade)\n")
        budgets = list(dict.fromkeys(r["budget"] for r in sub if r["method"] != "dense"))
        label = "kept" if setting == "prefill" else "budget"
        out.append(f"| method | " + " | ".join(f"{label} {b}" for b in budgets) + " | s / window |")
        out.append("|---" * (len(budgets) + 2) + "|")
        dense = next((r for r in sub if r["method"] == "dense"), None)
        if dense:
            out.append(f"| dense | " + " | ".join(f"{dense['perplexity']:.2f}" for _ in budgets)
                       + f" | {dense['seconds']:.2f} |")
        for method in dict.fromkeys(r["method"] for r in sub if r["method"] != "dense"):
            cells, secs = [], []
            for b in budgets:
                r = next((x for x in sub if x["method"] == method and x["budget"] == b), None)
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    cells.append("n/a")
                else:
                    cell = f"{r['perplexity']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
                    if "nll_vs_cascade" in r:
                        d, lo, hi = r["nll_vs_cascade"]
                        cell += f" Δ {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                    cells.append(cell)
                    secs.append(r["seconds"])
            t = wall.get(setting, {}).get(text, {}).get(method)
            sec = f"{t:.2f}" if t is not None else (f"{statistics.fmean(secs):.2f}" if secs else "-")
            out.append(f"| {method} | " + " | ".join(cells) + f" | {sec} |")
    errors = [r for r in rows if "error" in r]
    if errors:
        out.append("\nNot run (the press raised while decoding):\n")
        for r in dict((r["method"], r) for r in errors).values():
            out.append(f"- {r['method']}: `{r['error']}`")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["setting"], r["text"]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.5), squeeze=False)
    for ax, (setting, text) in zip(axes[0], groups):
        sub = [r for r in rows if r["setting"] == setting and r["text"] == text and "error" not in r]
        dense = next((r for r in sub if r["method"] == "dense"), None)
        if dense:
            ax.axhline(dense["perplexity"], color="gray", ls="--", label="dense")
        for method in dict.fromkeys(r["method"] for r in sub if r["method"] != "dense"):
            pts = sorted((float(r["budget"]), r["perplexity"]) for r in sub if r["method"] == method)
            style = "-" if method.startswith(("sparsetx", "cascade")) else ":"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("kept fraction of the context" if setting == "prefill" else "KV budget (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{text}: {setting}")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=24, help="prefill-compression windows per text")
    p.add_argument("--decode-windows", type=int, help="decode-time windows per text (default 1; 0 with --ablation)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="2 windows, a few methods: a smoke run")
    p.add_argument("--only", help="method names to run, separated by | (default: all)")
    p.add_argument("--ablation", action="store_true",
                   help="the cascade's variants (prefill setting) against SnapKV and Knorm, instead of the peers")
    p.add_argument("--limit", type=int, help="run only the first N windows of each text (the spacing stays)")
    p.add_argument("--setting", choices=("prefill", "decode"),
                   help="run only this setting's windows (e.g. two processes, one per setting, on one JSONL)")
    p.add_argument("--report", action="store_true",
                   help="only summarise the windows already in the JSONL file (e.g. of an interrupted run)")
    p.add_argument("--out", default="benchmarks/results/kv_peers")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    from rich.progress import Progress

    from sparsetx.data.text import lm_eval_texts
    from sparsetx.models import load_model, load_tokenizer, smollm2_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sdpa = load_model("smollm2")
    eager = load_model("smollm2", attn_implementation="eager")
    tok = load_tokenizer("smollm2")
    layers = sdpa.config.num_hidden_layers
    ours, presses = sparsetx_methods(args.ablation), kvpress_presses()
    if args.ablation:
        presses = {k: v for k, v in presses.items() if k in ("kvpress SnapKV", "kvpress Knorm")}
    if args.decode_windows is None:
        args.decode_windows = 0 if args.ablation else 1
    if args.quick:
        args.windows, args.decode_windows = 2, 1
        ours = {k: v for k, v in ours.items() if k in ("sparsetx cascade", "sparsetx window")}
        presses = {k: v for k, v in presses.items() if k in ("kvpress SnapKV", "kvpress Knorm")}
    if args.only:
        keep = set(args.only.split("|"))
        ours = {k: v for k, v in ours.items() if k in keep or k == "sparsetx cascade"}
        presses = {k: v for k, v in presses.items() if k in keep}
    settings = {"windows": args.windows, "decode_windows": args.decode_windows, "context": 1024, "continuation": 128,
                "keeps": KEEPS, "decode_prefill": 64, "decode_length": 256, "decode_budgets": [32, 64, 128],
                "methods": list(ours) + list(presses), "model": str(smollm2_path()), "quick": args.quick}
    name = "kv_peers" + (".quick" if args.quick else "") + (".ablation" if args.ablation else "")
    partial = out / f"{name}.jsonl"
    records = [json.loads(line) for line in partial.read_text().splitlines()] if partial.exists() else []
    settings = json.loads(json.dumps(settings))   # as the JSONL holds it (tuples become lists): resumable
    unique = {}
    for r in records:   # the first record of each window (a window rerun by a killed run is not counted twice)
        if r.get("settings") == settings:
            unique.setdefault((r["setting"], r["text"], r["window"]), r)
    records = list(unique.values())
    done = set(unique)
    texts = {name: tok(text, return_tensors="pt").input_ids[0] for name, text in lm_eval_texts().items()}
    limit = lambda n: min(n, args.limit) if args.limit else n  # noqa: E731
    jobs = [("prefill", t, i) for t in texts for i in range(limit(args.windows))]
    jobs += [("decode", t, i) for t in texts for i in range(limit(args.decode_windows))]
    wall = {"prefill": {}}
    if args.setting:
        jobs = [j for j in jobs if j[0] == args.setting]
    if args.report:
        jobs = []
    with Progress() as bar:
        task = bar.add_task("kv peers", total=len(jobs), completed=len(done & set(jobs)))
        for setting, text, i in jobs:
            if (setting, text, i) in done:
                continue
            bar.update(task, description=f"{setting} {text} window {i + 1}")
            if setting == "prefill":
                ids = windows(texts[text], args.windows, 1024 + 129)[i]
                if i == 0 and text == "wikipedia":
                    check_replay((sdpa, eager), ids, 1024, presses)
                result = prefill_window((sdpa, eager), ids, 1024, ours, presses, layers)
            else:
                ids = windows(texts[text], args.decode_windows, settings["decode_length"])[i]
                result = decode_window((sdpa, eager), ids, 64, ours, presses, settings["decode_budgets"], layers)
            record = {"setting": setting, "text": text, "window": i, "settings": settings, "result": result}
            with open(partial, "a") as f:
                f.write(json.dumps(record) + "\n")
            records.append(record)
            bar.advance(task)
        for text in texts if not (args.ablation or args.report or args.setting == "decode") else []:
            # a user's wait (real hooks), 25 % kept
            ids = windows(texts[text], args.windows, 1024 + 129)[0]
            press_wall_time((sdpa, eager), ids, 1024, presses, 0.25)  # warm-up
            wall["prefill"][text] = press_wall_time((sdpa, eager), ids, 1024, presses, 0.25)
    previous = out / f"{name}.json"
    if args.report and previous.exists():   # keep the real press runs' wall times of the full run
        wall = json.loads(previous.read_text()).get("wall_seconds_real_press_runs_at_25pct", wall)
    rows = summarise(records)
    for r in rows:   # kvpress rows: the time of a real press run, not of the shared replay
        if r["setting"] == "prefill" and r["method"] in wall["prefill"].get(r["text"], {}):
            r["seconds"] = wall["prefill"][r["text"]][r["method"]]
    result = {"settings": settings, "machine": {**machine(args.threads), "transformers": transformers.__version__,
                                                "kvpress": __import__("importlib.metadata").metadata.version("kvpress")},
              "rows": rows, "wall_seconds_real_press_runs_at_25pct": wall}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(rows, {}))
    plot(rows, out / f"{name}.png")
    print((out / f"{name}.md").read_text())
    print(f"wrote {out}/{name}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
