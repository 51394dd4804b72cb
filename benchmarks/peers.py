"""sparsetx side by side with the CPU runtimes users pick instead, in one run on this machine.

Encoder: the MiniLM sentiment classifier (a fine-tuned dense model and its IDP N:M candidates from
``sparsetx compare``) at 128 and 512 tokens, batch 1 and 8, 1 and 2
threads. Contenders: Hugging Face dense fp32 (eager and sdpa: the faster one is "HF dense"),
ONNX Runtime on the dense model exported with ``torch.onnx.export`` (graph optimisations on; fp32,
and ``quantize_dynamic`` int8), OpenVINO (dense, f32), DeepSparse (recorded with its install
error when it cannot install), and sparsetx: 2:8 and 1:8 on the N:M kernel, each also with
SpAtten cascade token pruning (keep 1.0 in layer 0, then 0.5).

Decoder: SmolLM2-135M, 64 new tokens after a 512- and a 2048-token prompt: HF dense fp32,
llama.cpp (llama-cpp-python) on the original Q4_1 GGUF, sparsetx with the SpAtten KV cache at 25 %:
the dense model, and each packed N:M SmolLM2 of --decoder-models with its LM head in int8 (one-shot,
activation-aware: 6:8 with down_proj and layers 0, 1, 29 at 7:8, int8 values, the sparsest mix
measured within the perplexity target), e.g.
    sparsetx prune --model smollm2 --method oneshot --criterion activation --pattern 6:8 \
        --layer 'down_proj=7:8' --layer 'layers\.(0|1|29)\.=7:8' --value-dtype int8 --out runs/smol-68

Every contender's output is checked against its PyTorch model before it is timed (cosine of the
logits; > 0.999 required of exact contenders, reported for int8). Cases of a setting are
interleaved, one warm-up each, then the median (min, max) of --repeats. Accuracy beside speed:
sentiment test accuracy for every encoder contender, perplexity on the Wikipedia excerpt for every
decoder contender.

    bash benchmarks/setup_peers.sh
    sparsetx demo                                   # a fine-tuned dense classifier (runs/demo/compare)
    sparsetx prune --method idp --model runs/demo/compare/dense/candidate-dense --series 2:8,1:8 \
        --steps 150 --lr 1e-4 --value-dtype int8 --out runs/peers-idp8
    benchmarks/.venv-peers/bin/python benchmarks/peers.py --models runs/peers-idp8 \
        --dense runs/demo/compare/dense/candidate-dense --decoder-models runs/smol-68
Results: benchmarks/results/peers/peers.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import allow_recompiles, interleaved_stats  # noqa: E402
OUT = ROOT / "benchmarks" / "results" / "peers"
SPATTEN_KEEP = 0.5
TARGETS = {"2:8": 1.5, "1:8": 2.0}     # issue 12: end-to-end ratio over the fastest dense peer


# --- helpers --------------------------------------------------------------------------------------

def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


SETTLE_S = 0.1   # idle time before each timed call: other runtimes' worker threads stop spinning


def timed(cases: dict, repeats: int) -> dict[str, dict]:
    """Interleaved, the order rotated every round, each call after SETTLE_S of idle time: ONNX
    Runtime's worker threads spin for a while after a call (at 2 threads, 128 x 1: about 45 ms of
    CPU time) and would slow whichever case follows."""
    return interleaved_stats(cases, repeats, settle=SETTLE_S, rotate=True)


def install_errors() -> dict[str, str]:
    """What benchmarks/setup_peers.sh recorded for contenders that failed to install."""
    log = OUT / "install.log"
    if not log.exists():
        return {}
    errors, name, lines = {}, None, []
    for line in log.read_text().splitlines():
        if ": FAILED:" in line:
            name, lines = line.split(":")[0], [line]
            errors[name] = ""
        elif ": installed" in line:
            name = None
        elif name:
            lines.append(line)
            errors[name] = "\n".join(lines[-12:])
    return errors


# --- encoder contenders ---------------------------------------------------------------------------

def sparse_candidates(models: Path) -> dict[str, Path]:
    """{pattern: candidate folder} of a ``sparsetx compare`` output folder (``idp/candidate-2_8``,
    ``idp/candidate-1_8``) or a ``sparsetx prune --method idp`` one (``candidate-2_8``, ...)."""
    sparse = {}
    for p in ("2:8", "1:8"):
        name = f"candidate-{p.replace(':', '_')}"
        found = [d for d in (models / "idp" / name, models / name) if (d / "config.json").exists()]
        if found:
            sparse[p] = found[0]
    return sparse


def dense_classifier_dir(models: Path, dense_dir: Path | None = None) -> Path:
    """The dense fine-tuned classifier: ``--dense``, or a ``sparsetx compare`` folder's
    ``dense/candidate-dense``."""
    dense_dir = dense_dir or models / "dense" / "candidate-dense"
    if not (dense_dir / "config.json").exists():
        raise SystemExit(f"no fine-tuned dense classifier at {dense_dir}; run `sparsetx compare` (or `sparsetx "
                         f"demo`) and pass --models, or pass --dense")
    return dense_dir


def load_encoders(models: Path, dense_dir: Path | None = None):
    """(dense classifier folder, the model loaded, {pattern: candidate folder})."""
    from sparsetx.models import load_model

    dense_dir = dense_classifier_dir(models, dense_dir)
    return dense_dir, load_model(dense_dir, task="sentiment"), sparse_candidates(models)


class Contender:
    """One runtime on one model: ``run(ids, mask) -> logits`` (numpy), its reference PyTorch model,
    and whether it computes the same function exactly (fp32) or approximately (int8)."""

    def __init__(self, name, run, reference, exact=True, note=""):
        self.name, self.run, self.reference, self.exact, self.note = name, run, reference, exact, note


def torch_runner(model, ctx=None):
    def run(ids, mask):
        with torch.inference_mode(), (ctx() if ctx else nullcontext()):
            return model(input_ids=ids, attention_mask=mask).logits.float().numpy()
    return run


def export_onnx(model, folder: Path) -> Path:
    """The dense classifier as ONNX (dynamic batch and length), exported by torch.onnx.export."""
    path = folder / "minilm_fp32.onnx"
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    ids = torch.ones(2, 16, dtype=torch.long)
    with torch.inference_mode():
        torch.onnx.export(eager, (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                        "logits": {0: "batch"}})
    return path


def ort_runner(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(ids, mask):
        return sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    return run


def openvino_runner(path: Path, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                   "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()

    def run(ids, mask):
        return req.infer({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[compiled.output(0)].copy()
    return run


def encoder_contenders(dense, sparse_dirs: dict, onnx: dict, threads: int, activation_bits: int = 8):
    from sparsetx.attention.encoder import SpAttenConfig, spatten
    from sparsetx.models import load_model

    layers = dense.config.num_hidden_layers
    keep = SpAttenConfig(token_keep=[1.0] + [SPATTEN_KEEP] * (layers - 1))
    ref = torch_runner(dense)
    sdpa = copy.deepcopy(dense)
    sdpa.config._attn_implementation = "sdpa"
    eager = copy.deepcopy(dense)
    eager.config._attn_implementation = "eager"
    out = [Contender("HF eager", torch_runner(eager), ref), Contender("HF sdpa", torch_runner(sdpa), ref)]
    if "fp32" in onnx:
        out.append(Contender("ORT fp32", ort_runner(onnx["fp32"], threads), ref))
        out.append(Contender("ORT int8", ort_runner(onnx["int8"], threads), ref, exact=False))
    if onnx.get("openvino"):
        out.append(Contender("OpenVINO f32", openvino_runner(onnx["fp32"], threads), ref))
    exact = activation_bits == 16   # int8 activations round like ORT int8's: cosine reported, not required
    for pattern, folder in sparse_dirs.items():
        fast = load_model(folder, task="sentiment", fast=True, activation_bits=activation_bits)
        slow = load_model(folder, task="sentiment")          # the same weights on PyTorch's dense path
        sref = torch_runner(slow)
        out.append(Contender(f"sparsetx {pattern}", torch_runner(fast), sref, exact=exact))
        compiled = load_model(folder, task="sentiment", fast=True, compile=True, activation_bits=activation_bits)
        out.append(Contender(f"sparsetx {pattern} compiled", torch_runner(compiled), sref, exact=exact,
                             note="torch.compile (inductor) with the N:M kernel as a custom operator"))
        out.append(Contender(f"sparsetx {pattern} + tokens {SPATTEN_KEEP:.0%}",
                             torch_runner(fast, lambda m=fast: spatten(m, keep)), sref, exact=False,
                             note="token pruning changes the function: accuracy reported"))
    out.append(Contender(f"sparsetx dense + tokens {SPATTEN_KEEP:.0%}", torch_runner(dense, lambda: spatten(dense, keep)),
                         ref, exact=False, note="token pruning changes the function: accuracy reported"))
    return out


def encoder_inputs(tokenizer, length: int, batch: int):
    """``batch`` different rows of exactly ``length`` tokens of held-out Shakespeare (no padding)."""
    from sparsetx.data.text import shakespeare_plays

    plays = shakespeare_plays()["heldout"]
    text = " ".join(plays[k] for k in sorted(plays))
    ids = tokenizer(text[:400_000], add_special_tokens=False).input_ids
    body = length - 2
    rows = [[tokenizer.cls_token_id] + ids[i * body:(i + 1) * body] + [tokenizer.sep_token_id] for i in range(batch)]
    t = torch.tensor(rows, dtype=torch.long)
    return t, torch.ones_like(t)


def test_accuracy(c: Contender, tokenizer, data, batch_size: int = 32) -> float:
    correct = 0
    for i in range(0, len(data.texts), batch_size):
        enc = tokenizer(data.texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=128)
        logits = c.run(enc.input_ids, enc.attention_mask)
        correct += int((logits.argmax(-1) == np.asarray(data.labels[i:i + batch_size])).sum())
    return correct / len(data.texts)


def encoder_part(args, errors: dict) -> dict:
    from sparsetx.data.sentiment import sentiment_splits
    from sparsetx.models import load_tokenizer

    dense_dir, dense, sparse_dirs = load_encoders(Path(args.models), args.dense)
    tok = load_tokenizer(dense_dir)
    skipped = {}
    onnx = {}
    work = Path(tempfile.mkdtemp(prefix="sparsetx-peers-"))
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic

        onnx["fp32"] = export_onnx(dense, work)
        onnx["int8"] = work / "minilm_int8.onnx"
        quantize_dynamic(str(onnx["fp32"]), str(onnx["int8"]), weight_type=QuantType.QInt8)
    except Exception as err:  # recorded, not fatal: the other contenders still run
        skipped["ONNX Runtime"] = f"{type(err).__name__}: {err}"
    try:
        import openvino  # noqa: F401
        onnx["openvino"] = "fp32" in onnx
    except Exception as err:
        skipped["OpenVINO"] = f"{type(err).__name__}: {err}"
    for name, err in errors.items():
        skipped.setdefault(name, err)

    result = {"models": {"dense": str(dense_dir), **{p: str(d) for p, d in sparse_dirs.items()}},
              "skipped": skipped, "settings": [], "accuracy": {}, "checks": {},
              "activation_bits": args.activation_bits}
    test = sentiment_splits()["test"].subset(args.test_limit)
    for threads in args.threads:
        torch.set_num_threads(threads)
        contenders = encoder_contenders(dense, sparse_dirs, onnx, threads, args.activation_bits)
        # outputs first: every contender against its PyTorch model, on a real 128-token batch
        ids, mask = encoder_inputs(tok, 128, 2)
        for c in contenders:
            got, want = c.run(ids, mask), c.reference(ids, mask)
            cos = cosine(got, want)
            ok = cos > 0.999 if c.exact else True
            result["checks"].setdefault(c.name, {})[f"{threads}t"] = {
                "cosine": cos, "max_abs_diff": float(np.abs(np.asarray(got) - np.asarray(want)).max()),
                "same_argmax": bool((np.asarray(got).argmax(-1) == np.asarray(want).argmax(-1)).all()),
                "exact": c.exact, "ok": ok}
            if not ok:
                raise SystemExit(f"{c.name}: logits cosine {cos:.6f} <= 0.999 against its PyTorch model; not timed")
        if threads == args.threads[-1]:
            for c in contenders:
                result["accuracy"][c.name] = test_accuracy(c, tok, test)
                print(f"  accuracy {c.name}: {result['accuracy'][c.name]:.4f}", flush=True)
        for length in args.lengths:
            for batch in args.batches:
                ids, mask = encoder_inputs(tok, length, batch)
                cases = {c.name: (lambda c=c: c.run(ids, mask)) for c in contenders}
                t = timed(cases, args.repeats)
                setting = {"threads": threads, "tokens": length, "batch": batch, "times": t}
                hf = min(t["HF eager"]["median_s"], t["HF sdpa"]["median_s"])
                peers = {k: v["median_s"] for k, v in t.items() if k.startswith(("HF", "ORT", "OpenVINO"))}
                fastest = min(peers, key=peers.get)
                setting["hf_dense_s"] = hf
                setting["fastest_dense_peer"] = fastest
                setting["ratio_vs_fastest_peer"] = {k: peers[fastest] / v["median_s"] for k, v in t.items()}
                result["settings"].append(setting)
                print(f"{threads}t {length} tok x{batch}: " + ", ".join(
                    f"{k} {v['median_s'] * 1e3:.1f} ms" for k, v in t.items()) + f" | fastest peer {fastest}", flush=True)
        del contenders
        gc.collect()
    return result


# --- decoder contenders ---------------------------------------------------------------------------

def wiki_ids(tokenizer, n: int) -> list[int]:
    from sparsetx.data.text import wikipedia_articles

    text = "\n".join(wikipedia_articles().values())
    ids = tokenizer(text[:2_000_000], add_special_tokens=False).input_ids
    if len(ids) < n:
        raise SystemExit(f"the Wikipedia excerpt has {len(ids)} tokens, {n} needed")
    return ids[:n]


class LlamaCpp:
    """llama.cpp through llama-cpp-python on the package's own Q4_1 GGUF, fed our token ids."""

    def __init__(self, threads: int, n_ctx: int, logits_all: bool = False):
        from llama_cpp import Llama

        from sparsetx.data.assets import package_file
        from sparsetx.models import SMOLLM2_GGUF

        self.llm = Llama(model_path=str(package_file(*SMOLLM2_GGUF)), n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, logits_all=logits_all, verbose=False)

    def prefill(self, prompt: list[int]):
        self.llm.reset()
        self.llm.eval(prompt)

    def generate(self, prompt: list[int], new: int, clock: list | None = None) -> list[int]:
        """Greedy tokens; ``clock`` gets the time each token was chosen (as StepClock does for HF)."""
        self.prefill(prompt)
        out = []
        for i in range(new):
            # greedy, by llama.cpp's own sampler (0.3.x keeps no scores unless logits_all)
            tok = int(self.llm.sample(temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0))
            out.append(tok)
            if clock is not None:
                clock.append(time.perf_counter())
            if i + 1 < new:
                self.llm.eval([tok])
        return out

    def nll(self, window: list[int], start: int) -> list[float]:
        self.prefill(window)
        logits = np.asarray(self.llm.scores[:len(window)], dtype=np.float64)
        out = []
        for t in range(start, len(window)):
            row = logits[t - 1]
            out.append(float(np.logaddexp.reduce(row) - row[window[t]]))
        return out


def hf_nll(model, window: list[int], start: int) -> list[float]:
    ids = torch.tensor([window])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[start - 1:-1], -1)
    return (-lp.gather(1, ids[0, start:].unsqueeze(1))).squeeze(1).tolist()


class StepClock:
    """A stopping criterion that never stops: it notes when each new token was chosen, so a decode
    rate is read inside one generate() call, without the prompt's time."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def decode_rate(times: list[float]) -> float:
    """Tokens a second after the first token: (tokens - 1) / (last time - first time)."""
    return (len(times) - 1) / max(times[-1] - times[0], 1e-9)


def sparse_decoders(folders: list[str]) -> dict[str, Path]:
    """Label -> packed SmolLM2 folder: its patterns (most layers first) and value type."""
    from collections import Counter

    out = {}
    for folder in folders:
        cfg = json.loads((Path(folder) / "config.json").read_text())
        patterns = Counter((cfg.get("sparsetx") or {}).get("patterns", {}).values())
        if not patterns:
            raise SystemExit(f"{folder}: not a packed N:M folder (no sparsetx patterns in config.json)")
        label = "/".join(p for p, _ in patterns.most_common())
        out[f"sparsetx {label} {_value_dtype(folder)}"] = Path(folder)
    return out


def decoder_part(args, errors: dict) -> dict:
    from sparsetx.attention.decoder import DecoderConfig, spatten_decoder
    from sparsetx.attention.decoder_eval import streaming_pass
    from sparsetx.models import load_model, load_tokenizer

    dense = load_model("smollm2")
    tok = load_tokenizer("smollm2")
    res = {"skipped": {}, "settings": [], "perplexity": {}, "checks": {}, "kv_keep": args.kv_keep}
    try:
        import llama_cpp  # noqa: F401
        have_cpp = True
    except Exception as err:
        have_cpp = False
        res["skipped"]["llama.cpp"] = errors.get("llama-cpp-python") or f"{type(err).__name__}: {err}"
    # perplexity: the same token windows for every contender; tokens start..end-1 scored
    win, start = args.ppl_window, args.ppl_window // 4
    ids = wiki_ids(tok, win * args.ppl_windows + max(args.prompts) + 8)
    windows = [ids[i * win:(i + 1) * win] for i in range(args.ppl_windows)]
    torch.set_num_threads(max(args.threads))
    kv_name = f"sparsetx dense + KV {args.kv_keep:.0%}"
    models = {kv_name: dense}
    folders = {f"{label}, int8 head": folder for label, folder in sparse_decoders(args.decoder_models).items()}
    for label, folder in folders.items():   # the LM head in int8 too (kernels/int8_linear.py)
        models[f"{label} + KV {args.kv_keep:.0%}"] = load_model(folder, fast=True, int8_head=True)
    nll = {"HF dense": [], **{name: [] for name in models}}
    budget = int(win * args.kv_keep)
    for w in windows:
        nll["HF dense"] += hf_nll(dense, w, start)
        for name, model in models.items():
            nll[name] += streaming_pass(model, torch.tensor([w]), DecoderConfig(kv_budget=budget), start).nll
    if have_cpp:
        cpp = LlamaCpp(max(args.threads), n_ctx=win, logits_all=True)
        nll["llama.cpp Q4_1"] = [x for w in windows for x in cpp.nll(w, start)]
        del cpp
    res["perplexity"] = {k: math.exp(statistics.fmean(v)) for k, v in nll.items()}
    res["perplexity_protocol"] = (f"{args.ppl_windows} Wikipedia windows of {win} tokens; tokens {start}..{win - 1} scored; "
                                  f"KV budget {budget} tokens ({args.kv_keep:.0%} of the window) after a {start}-token prefill")
    res["decoder_models"] = {label: str(folder) for label, folder in folders.items()}
    print("perplexity:", {k: round(v, 3) for k, v in res["perplexity"].items()}, flush=True)

    for threads in args.threads:
        torch.set_num_threads(threads)
        cpp = LlamaCpp(threads, n_ctx=max(args.prompts) + args.new_tokens + 8) if have_cpp else None
        for prompt_len in args.prompts:
            prompt = ids[-prompt_len:]     # after the perplexity windows: not scored text
            pt = torch.tensor([prompt])
            cfg = DecoderConfig(kv_budget=int(prompt_len * args.kv_keep))

            def hf(model, runtime: bool):
                def run():
                    clock = StepClock()
                    with torch.inference_mode(), spatten_decoder(model, cfg) if runtime else nullcontext():
                        out = model.generate(input_ids=pt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                             do_sample=False, stopping_criteria=[clock])
                    return out[0, prompt_len:].tolist(), clock.times
                return run

            runs = {"HF dense": hf(dense, False), **{name: hf(model, True) for name, model in models.items()}}
            if cpp:
                def cpp_run():
                    clock = []
                    return cpp.generate(prompt, args.new_tokens, clock), clock
                runs["llama.cpp Q4_1"] = cpp_run
            ref = runs["HF dense"]()[0]
            for k, fn in runs.items():   # greedy tokens against HF dense's (Q4_1 and KV pruning may differ); warm-up
                got = fn()[0]
                same = sum(a == b for a, b in zip(got, ref))
                res["checks"].setdefault(k, {})[f"{threads}t {prompt_len}"] = {"tokens_equal_to_hf": same, "of": len(ref)}
            rates = {k: [] for k in runs}
            order = list(runs)
            for r in range(args.decoder_repeats):   # interleaved, the order rotated every round
                for k in order[r % len(order):] + order[:r % len(order)]:
                    time.sleep(SETTLE_S)
                    rates[k].append(decode_rate(runs[k]()[1]))
            stats = {k: {"median_tok_s": statistics.median(v), "min_tok_s": min(v), "max_tok_s": max(v), "runs": len(v)}
                     for k, v in rates.items()}
            res["settings"].append({"threads": threads, "prompt": prompt_len, "new_tokens": args.new_tokens,
                                    "decode": stats, "decode_tokens_per_s": {k: v["median_tok_s"] for k, v in stats.items()}})
            print(f"decoder {threads}t prompt {prompt_len}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in
                                                                          res["settings"][-1]["decode_tokens_per_s"].items()),
                  flush=True)
        del cpp
        gc.collect()
    return res


def decoder_targets(res: dict) -> list[str]:
    """Issue 12: a sparsetx contender with the KV cache at 25 % >= llama.cpp's tokens/s after the
    longest prompt, at a perplexity within 20 % of the dense model's (each sparsetx row judged)."""
    if "llama.cpp Q4_1" not in res["perplexity"]:
        return ["(llama.cpp did not run: the decode target cannot be judged)"]
    dense = res["perplexity"]["HF dense"]
    longest = max(s["prompt"] for s in res["settings"])
    out = ["| contender | setting | sparsetx tok/s | llama.cpp tok/s | ratio | ppl within 20 % of dense | target |",
           "|---|---|---|---|---|---|---|"]
    for kv in (k for k in res["perplexity"] if "KV" in k):
        ppl = res["perplexity"][kv]
        for s in res["settings"]:
            if s["prompt"] != longest:
                continue
            a, b = s["decode_tokens_per_s"][kv], s["decode_tokens_per_s"]["llama.cpp Q4_1"]
            out.append(f"| {kv} | {s['threads']}t, {longest}-token prompt | {a:.1f} | {b:.1f} | x{a / b:.2f} | "
                       f"{'yes' if ppl <= 1.2 * dense else 'no'} ({ppl:.2f} vs {dense:.2f}) | "
                       f"{'met' if a >= b and ppl <= 1.2 * dense else 'not met'} |")
    return out


def _rate_cell(s: dict, name: str) -> str:
    """One setting's decode rate: median (min-max) tokens/s; older results kept generate seconds."""
    if "decode" in s:
        d = s["decode"][name]
        return f"{d['median_tok_s']:.1f} ({d['min_tok_s']:.1f}-{d['max_tok_s']:.1f})"
    return f"{s['decode_tokens_per_s'][name]:.1f} ({s['generate'][name]['median_s']:.2f} s)"


def decoder_table(res: dict) -> list[str]:
    if not res["settings"]:
        return []
    names = list(res["settings"][0]["decode_tokens_per_s"])
    lines = ["| contender | Wikipedia ppl | " + " | ".join(f"{s['threads']}t, {s['prompt']}-token prompt" for s in res["settings"]) + " |",
             "|---|---|" + "---|" * len(res["settings"])]
    for n in names:
        ppl = res["perplexity"].get(n)
        lines.append(f"| {n} | {'-' if ppl is None else f'{ppl:.2f}'} | " + " | ".join(_rate_cell(s, n) for s in res["settings"]) + " |")
    return lines


# --- peak memory --------------------------------------------------------------------------------

MEMORY_PROBE = """
import gc, json, sys
import torch, transformers  # noqa: F401  (imported before the baseline is read)
from sparsetx.kernels.allocator import trim_heap, tune_allocator
from sparsetx.models import load_model, model_class
path, task, fast, warm = sys.argv[1], sys.argv[2] or None, sys.argv[3] == "1", sys.argv[4] == "1"
bits = int(sys.argv[5])
torch.set_num_threads(1)
tune_allocator()   # the same allocator for every model measured (a fast load would set it anyway)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

if warm:   # what every model pays, paid first: the architecture's code imported, torch's first forward
    from sparsetx.formats.packed import pack_nm
    from sparsetx.kernels.attention import use_encoder_attention
    from sparsetx.kernels.nm_linear import SparseLinear
    from sparsetx.nm.pattern import NMPattern
    import copy
    cfg = copy.deepcopy(transformers.AutoConfig.from_pretrained(path))
    cfg.num_hidden_layers, cfg.vocab_size = 1, 128
    tiny = model_class(cfg, task).from_config(cfg).eval()
    if fast:
        use_encoder_attention(tiny)   # the attention a fast load switches an encoder to
    with torch.inference_mode():
        tiny(input_ids=torch.ones(1, 128, dtype=torch.long))
        lin = torch.nn.Linear(64, 8)
        lin.weight.data[:, 2:].zero_()   # 2 kept of the first group of 8, the others empty: 2:8
        for dtype in (torch.float32, torch.int8):   # both many-token engines (fp32 / fp16 values, int8)
            SparseLinear.from_packed(pack_nm(lin.weight.data, NMPattern(2, 8), dtype), None, bits)(torch.ones(128, 64))
    del tiny
    gc.collect()
trim_heap()   # what the warm-up freed goes back to the OS: a load must not count on reusing it
open("/proc/self/clear_refs", "w").write("5")   # reset the high-water mark (VmHWM) to the current RSS
base = status("VmRSS")
model = load_model(path, task=task, fast=fast, activation_bits=bits)
loaded = status("VmHWM")
with torch.inference_mode():
    model(input_ids=torch.ones(1, 128, dtype=torch.long))
print(json.dumps({"base_kib": base, "after_load_kib": loaded, "peak_kib": status("VmHWM")}))
"""


def peak_memory(path, task: str | None, fast: bool, warm: bool = False, activation_bits: int = 16) -> dict:
    """Peak RSS above the imports (torch, transformers) of loading ``path`` and running one 128-token
    forward, in a fresh process (Linux VmHWM, reset through /proc/self/clear_refs). ``warm``: first
    build and run a one-layer, 128-word model of the same architecture (on the attention a fast load
    gives it) and one call of each many-token N:M kernel, so what any model of it costs (its code,
    torch's first-forward buffers) is out of the figure. ``activation_bits``: the fast load's (int8
    activations store the smaller select layout where the CPU runs that kernel)."""
    import subprocess

    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), task or "", "1" if fast else "0", "1" if warm else "0",
                          str(activation_bits)],
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"memory probe of {path} failed:\n{run.stderr[-2000:]}")
    r = json.loads(run.stdout.strip().splitlines()[-1])
    return {"load_mib": (r["after_load_kib"] - r["base_kib"]) / 1024, "peak_mib": (r["peak_kib"] - r["base_kib"]) / 1024}


def peak_memory_stats(path, task: str | None, fast: bool, warm: bool, repeats: int, activation_bits: int = 16) -> dict:
    """:func:`peak_memory` in ``repeats`` fresh processes: medians, and the peak's min and max (the
    peak moves by a few MiB from process to process with where the allocator places things)."""
    runs = [peak_memory(path, task, fast, warm, activation_bits) for _ in range(repeats)]
    peaks = [r["peak_mib"] for r in runs]
    return {"load_mib": statistics.median(r["load_mib"] for r in runs), "peak_mib": statistics.median(peaks),
            "peak_min_mib": min(peaks), "peak_max_mib": max(peaks), "runs": repeats}


def _value_dtype(folder) -> str:
    from sparsetx.formats.folder import read_header

    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8"}[read_header(folder)["value_dtype"]]


def memory_part(args) -> dict:
    dense_dir = dense_classifier_dir(Path(args.models), args.dense)
    folders = [(pattern, folder) for models in [args.models, *args.memory_extra]
               for pattern, folder in sparse_candidates(Path(models)).items()]
    rows = {}
    for tag, warm in (("", False), (" (warmed)", True)):
        n = args.memory_repeats
        group = {"MiniLM dense fp32 (HF)" + tag: peak_memory_stats(dense_dir, "sentiment", False, warm, n)}
        for pattern, folder in folders:
            bits = args.activation_bits if _value_dtype(folder) == "int8" else 16
            act = ", int8 activations" if bits == 8 else ""
            group[f"MiniLM {pattern} packed ({_value_dtype(folder)}{act}), N:M kernel{tag}"] = peak_memory_stats(
                folder, "sentiment", True, warm, n, bits)
        base = group["MiniLM dense fp32 (HF)" + tag]["peak_mib"]
        for r in group.values():
            r["vs_dense"] = r["peak_mib"] / base
        rows.update(group)
    print("peak memory:", {k: round(v["peak_mib"], 1) for k, v in rows.items()}, flush=True)
    return rows


def memory_table(rows: dict) -> list[str]:
    lines = ["| model | after load (MiB) | peak, load + one 128-token forward (MiB; min-max) | vs dense, medians "
             "(target <= 0.35x) |", "|---|---|---|---|"]
    for k, r in rows.items():
        spread = f" ({r['peak_min_mib']:.1f}-{r['peak_max_mib']:.1f})" if "peak_min_mib" in r else ""
        lines.append(f"| {k} | {r['load_mib']:.1f} | {r['peak_mib']:.1f}{spread} | x{r['vs_dense']:.2f} |")
    return lines


# --- report ---------------------------------------------------------------------------------------

def encoder_table(res: dict) -> list[str]:
    names = list(res["settings"][0]["times"]) if res["settings"] else []
    lines = ["| contender | test acc | " + " | ".join(f"{s['threads']}t {s['tokens']}x{s['batch']}" for s in res["settings"]) + " |",
             "|---|---|" + "---|" * len(res["settings"])]
    for n in names:
        acc = res["accuracy"].get(n)
        cells = []
        for s in res["settings"]:
            t = s["times"][n]
            cells.append(f"{t['median_s'] * 1e3:.1f} ms (x{s['ratio_vs_fastest_peer'][n]:.2f})")
        lines.append(f"| {n} | {'-' if acc is None else f'{acc:.4f}'} | " + " | ".join(cells) + " |")
    return lines


def encoder_targets(res: dict) -> list[str]:
    out = ["| setting | fastest dense peer | " + " | ".join(f"sparsetx {p}, eager or compiled (target x{x})"
                                                          for p, x in TARGETS.items()) + " |",
           "|---|---|" + "---|" * len(TARGETS)]
    for s in res["settings"]:
        cells = []
        for p, x in TARGETS.items():   # the faster of eager and compiled
            found = [s["ratio_vs_fastest_peer"][k] for k in (f"sparsetx {p}", f"sparsetx {p} compiled")
                     if k in s["ratio_vs_fastest_peer"]]
            r = max(found) if found else None
            cells.append("-" if r is None else f"x{r:.2f} {'met' if r >= x else 'not met'}")
        out.append(f"| {s['threads']}t, {s['tokens']} tokens, batch {s['batch']} | {s['fastest_dense_peer']} | "
                   + " | ".join(cells) + " |")
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = res["settings"]
    names = list(settings[0]["times"])
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(settings)), 5))
    w = 0.8 / len(names)
    colours = plt.get_cmap("tab20").colors   # one colour a contender (tab10 repeats after ten)
    for i, n in enumerate(names):
        ax.bar([j + i * w for j in range(len(settings))], [s["ratio_vs_fastest_peer"][n] for s in settings], w, label=n,
               color=colours[i % len(colours)])
    ax.axhline(1.0, color="k", lw=0.8)
    for pattern, y in TARGETS.items():
        ax.axhline(y, color="0.4", lw=0.8, ls="--")
        ax.annotate(f"{pattern} target", (len(settings) - 0.2, y), fontsize=7, va="bottom", ha="right", color="0.3")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(settings))],
                  [f"{s['threads']}t\n{s['tokens']}x{s['batch']}" for s in settings])
    ax.set_ylabel("speed vs the fastest dense peer (higher is faster)")
    ax.set_title("MiniLM classifier on this CPU: sparsetx vs ONNX Runtime / OpenVINO / HF")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _decoder_protocol(dec: dict, args) -> str:
    """How the decode rates were read, as the result records them (a carried part keeps its own)."""
    new = dec["settings"][0]["new_tokens"] if dec["settings"] else args.new_tokens
    for setting in dec["settings"]:
        if "decode" in setting:
            runs = next(iter(setting["decode"].values()))["runs"]
            return (f"{new} new tokens, greedy; each run's rate is (new - 1) / (time of the last token - time of the "
                    f"first), both noted inside the run; median (min-max) of {runs} interleaved runs")
        runs = next(iter(setting["generate"].values()))["runs"]
        return (f"{new} new tokens, greedy: (new - 1) / (generate time - first-token time), medians of {runs}; "
                "the cell's seconds are the whole generate")
    return ""


def cpu_name() -> str:
    """The CPU's model name and its widest SIMD (the kernels sparsetx builds depend on it), e.g.
    'AMD EPYC; AVX2, no AVX-512'."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return name
    simd = ("AVX-512 VBMI + VNNI" if {"avx512vbmi", "avx512_vnni"} <= flags else "AVX-512" if "avx512f" in flags
            else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2")
    return f"{name}; {simd}"


def report(result: dict, args) -> list[str]:
    """The markdown of a result: one section a part, each saying which run it comes from."""
    carried = result.get("carried", {})

    def source(part):
        return [f"(Carried from an earlier run of this script: {carried[part]}.)", ""] if part in carried else []

    machine = result.get("machine", {})
    md = [f"# sparsetx vs CPU runtimes ({result['date']}; {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores)", ""]
    if "encoder" in result:
        enc = result["encoder"]
        md += ["## MiniLM sentiment classifier", "", *source("encoder"),
               "Median ms per forward (speed ratio vs the fastest dense peer of that setting; higher is faster). "
               + ("sparsetx rows: int8 values, activations rounded per token to int8 (`activation_bits=8`: the "
                  "select kernel: vpermb + vpdpbusd on AVX-512 VBMI + VNNI, vpshufb + vpmaddubsw on AVX2) and the "
                  "attention on int8 Q, K, V with "
                  "14-bit probabilities." if enc.get("activation_bits", 16) == 8 else
                  "sparsetx rows: int8 values, activations rounded per token to int16."), "",
               *encoder_table(enc), "", "Targets (issue 12):", "", *encoder_targets(enc), ""]
        if enc["skipped"]:
            md += ["Not run:", ""] + [f"- {k}: `{_first_error(v)}`" for k, v in enc["skipped"].items()] + [""]
    if "memory" in result:
        md += ["## Peak memory (RSS above the imports, fresh process each; medians of several)", "", *source("memory"),
               "Warmed: after a one-layer, 128-word model of the same architecture (on the attention a fast load "
               "gives it) and one call of each many-token N:M kernel (fp32 and int8 values) have run, so the code "
               "and torch's first-forward buffers every model of it needs are out of the figure.", "",
               *memory_table(result["memory"]), ""]
    if "decoder" in result:
        dec = result["decoder"]
        md += ["## SmolLM2-135M decode", "", *source("decoder"),
               f"Decode tokens/s ({_decoder_protocol(dec, args)}); perplexity: {dec['perplexity_protocol']}.",
               *([f"Sparse SmolLM2 folders: {', '.join(f'{k}: `{v}`' for k, v in dec['decoder_models'].items())}."]
                 if dec.get("decoder_models") else []),
               "", *decoder_table(dec), "", "Target (issue 12):", "",
               *decoder_targets(dec), ""]
        if dec["skipped"]:
            md += ["Not run:", ""] + [f"- {k}: `{_first_error(v)}`" for k, v in dec["skipped"].items()] + [""]
    return md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="runs/peers-idp", help="a `sparsetx prune --method idp` or `compare` output folder")
    ap.add_argument("--dense", type=Path, default=None, help="the fine-tuned dense classifier (default: "
                    "MODELS/dense/candidate-dense)")
    ap.add_argument("--threads", default="1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--lengths", default="128,512", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--batches", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--activation-bits", type=int, default=8, choices=(8, 16),
                    help="sparsetx's int8 models: activations rounded per token to int8 (the select kernel; the "
                         "encoder's attention on int8 Q, K, V) or int16")
    ap.add_argument("--test-limit", type=int, default=None, help="first N test snippets only (default: all)")
    ap.add_argument("--part", default="encoder,memory,decoder", type=lambda s: s.split(","))
    ap.add_argument("--memory-repeats", type=int, default=5, help="fresh processes per memory figure (median)")
    ap.add_argument("--memory-extra", default=[], type=lambda s: [x for x in s.split(",") if x],
                    help="more packed model folders (same layout as --models) to measure in the memory part")
    ap.add_argument("--prompts", default="512,2048", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--kv-keep", type=float, default=0.25)
    ap.add_argument("--decoder-repeats", type=int, default=10)
    ap.add_argument("--decoder-models", default=[], type=lambda s: [x for x in s.split(",") if x],
                    help="packed SmolLM2 folders (sparsetx prune --model smollm2 ...) timed with the KV cache pruned")
    ap.add_argument("--ppl-window", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    from sparsetx.kernels.allocator import tune_allocator

    # a fast sparsetx load sets glibc's malloc thresholds for the whole process: set them first, so
    # every contender (HF's included) runs under the same allocator from its first call
    allocator = tune_allocator()
    allow_recompiles()   # one compiled model a pattern and thread count, each seeing several shapes
    if args.repeats < 10:
        print("note: fewer than 10 repeats: not the benchmark's standard", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    errors = install_errors()
    import platform
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "versions": _versions(), "repeats": args.repeats}
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["allocator"] = ("glibc mmap threshold 64 MiB, trim threshold 128 MiB (sparsetx.kernels.allocator), "
                           "for every contender in the process" if allocator else "glibc defaults")
    from sparsetx.atomic import atomic_path

    def write(path: Path, text: str) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(text)

    # each finished part goes to peers.partial.json at once, so a run cut later (a session's end,
    # Ctrl-C) keeps what it measured; the published files change only when the whole run is done
    partial = out / "peers.partial.json"
    parts = {"encoder": lambda: encoder_part(args, errors), "memory": lambda: memory_part(args),
             "decoder": lambda: decoder_part(args, errors)}
    for part, run in parts.items():
        if part in args.part:
            result[part] = run()
            write(partial, json.dumps(result, indent=1) + "\n")
    previous = out / "peers.json"
    if previous.exists():   # parts not run this time: kept from the file, marked with that run's date
        old = json.loads(previous.read_text())
        for part in ("encoder", "memory", "decoder"):
            if part not in result and part in old:
                result[part] = old[part]
                result.setdefault("carried", {})[part] = old.get("carried", {}).get(part) or old.get("date", "before 2026-11-30")
    md = report(result, args)
    if "encoder" in args.part:
        with atomic_path(out / "peers.png") as tmp:
            plot(result["encoder"], tmp)
    write(out / "peers.json", json.dumps(result, indent=1) + "\n")
    write(out / "peers.md", "\n".join(md) + "\n")
    partial.unlink(missing_ok=True)
    print("\n".join(md))
    print(f"wrote {out}/peers.json, peers.md" + (", peers.png" if "encoder" in args.part else ""))


def _first_error(text: str) -> str:
    """The most telling line of a pip or import failure."""
    lines = [ln.strip(" |│") for ln in (text or "failed").splitlines() if ln.strip(" |│")]
    for test in (lambda ln: "end-of-life" in ln, lambda ln: ln.startswith("ERROR:"), lambda ln: "error" in ln.lower()):
        hit = next((ln for ln in lines if test(ln) and "FAILED" not in ln), None)
        if hit:
            return hit[:200]
    return lines[0][:200]


def _versions() -> dict:
    import importlib

    out = {}
    for m in ("transformers", "onnxruntime", "openvino", "llama_cpp", "deepsparse"):
        try:
            out[m] = getattr(importlib.import_module(m), "__version__", "?")
        except Exception as err:
            out[m] = f"unavailable ({type(err).__name__})"
    return out


if __name__ == "__main__":
    main()
