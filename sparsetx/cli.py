"""The ``sparsetx`` command: thin subcommands over the library (``main(argv)`` is testable)."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from dataclasses import asdict, fields
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .atomic import out_lock

console = Console()
errors = Console(stderr=True, soft_wrap=True)   # an error is one line, however long


# --- flag values, checked at the door: a bad one is one line naming the flag and the valid range ---

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one line, without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bad(text: str, valid: str):
    raise argparse.ArgumentTypeError(f"{text!r} is not valid; {valid}")


def _number(kind, ok, valid: str, name: str):
    """A flag checker: ``kind(text)`` that passes ``ok`` (false for NaN too), else an error saying ``valid``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            _bad(text, valid)
        if not ok(value):
            _bad(text, valid)
        return value
    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _number(int, lambda v: v >= 1, "expected a whole number >= 1", "positive_int")
nonneg_int = _number(int, lambda v: v >= 0, "expected a whole number >= 0", "nonneg_int")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "expected a positive, finite number",
                         "positive_float")
ratio = _number(float, lambda v: 0 < v <= 1, "expected a ratio 0 < r <= 1", "ratio")           # a keep ratio
probability = _number(float, lambda v: 0 <= v <= 1, "expected a number in [0, 1]", "probability")


def listed(item):
    """A comma-separated list of ``item`` values, kept as the text the commands split themselves."""
    def parse(text: str) -> str:
        parts = [x.strip() for x in str(text).split(",")]
        if not all(parts):
            _bad(text, "expected comma-separated values without empty entries")
        for part in parts:
            try:
                item(part)
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentTypeError(f"in {text!r}: {err}") from None
        return text
    return parse


def pattern_arg(text: str) -> str:
    from .nm.pattern import MAX_M, NMPattern

    try:
        NMPattern.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err} (valid: N:M with 1 <= N < M <= {MAX_M})") from None
    return text


def series_arg(text: str) -> str:
    from .nm.pattern import parse_series

    try:
        parse_series(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def pattern_or_dense(text: str) -> str:
    return text if text == "dense" else pattern_arg(text)


def regex_arg(text: str) -> str:
    try:
        re.compile(text)
    except re.error as err:
        _bad(text, f"not a regular expression ({err})")
    return text


def layer_arg(text: str) -> str:
    name, sep, pat = text.rpartition("=")
    if not sep or not name:
        _bad(text, "expected NAME_REGEX=N:M, e.g. 'attention\\.self=1:8'")
    regex_arg(name)
    pattern_arg(pat)
    return text


def model_arg(text: str) -> str:
    """'minilm', 'smollm2', or a model folder (with a config.json)."""
    from .models import DEFAULT_MODEL, SMOLLM2

    if text in (DEFAULT_MODEL, SMOLLM2):
        return text
    path = Path(text)
    if not path.is_dir():
        _bad(text, f"no such folder; expected a model folder, {DEFAULT_MODEL!r} or {SMOLLM2!r}")
    if not (path / "config.json").is_file():
        _bad(text, "the folder has no config.json; expected a Hugging Face model folder")
    return text


def out_arg(text: str) -> str:
    """An output folder: not an existing file, and somewhere this user can write."""
    if not text.strip():
        _bad(text, "expected a folder path")
    path = Path(text)
    if path.exists() and not path.is_dir():
        _bad(text, "it is an existing file; expected a folder (new, or with --overwrite an old one)")
    parent = path if path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        _bad(text, f"{parent} is not writable")
    return text


def out_file(text: str) -> str:
    """An output file: not an existing folder, in a writable place."""
    path = Path(text)
    if path.is_dir():
        _bad(text, "it is a folder; expected a file path")
    out_arg(str(path.parent) if str(path.parent) else ".")
    return text


def prompt_arg(text: str) -> str:
    if not text.strip():
        _bad(text, "the prompt is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the prompt is not valid UTF-8") from None
    return text


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        _bad(text, "no such file")
    return text


def _train_config(args: argparse.Namespace):
    from .train import TrainConfig

    kw = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    return TrainConfig(**kw)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (SR-STE / IDP / fine-tuning)")
    g.add_argument("--steps", type=positive_int, help="optimizer steps (per stage for IDP)")
    g.add_argument("--batch-size", dest="batch_size", type=positive_int)
    g.add_argument("--lr", type=positive_float)
    g.add_argument("--lambda-w", dest="lambda_w", type=probability, help="SR-STE decay on pruned weights (default 2e-4)")
    g.add_argument("--mask-every", dest="mask_every", type=positive_int, help="recompute masks every k steps (default 1)")
    g.add_argument("--unnested", dest="nested", action="store_false", default=None,
                   help="IDP: choose each stage's mask freely instead of inside the previous one")
    g.add_argument("--max-length", dest="max_length", type=positive_int)
    g.add_argument("--seed", type=int)
    g.add_argument("--checkpoint-every", dest="checkpoint_every", type=positive_int)
    g.add_argument("--eval-examples", dest="eval_examples", type=positive_int, help="cap dev/test examples per evaluation")
    g.add_argument("--train-examples", dest="train_examples", type=positive_int)


def _layer_config(args: argparse.Namespace, pattern: str):
    from .nm.prune import NMConfig

    overrides = {}
    for item in args.layer or []:
        name, sep, pat = item.rpartition("=")
        if not sep:
            raise ValueError(f"--layer {item!r}: expected NAME_REGEX=N:M")
        overrides[name] = pat
    return NMConfig(pattern, criterion=args.criterion, include=args.include, exclude=args.exclude, overrides=overrides)


def _rows_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    for key in rows[0] if rows else []:
        table.add_column(key)
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()])
    return table


# --- subcommands ---------------------------------------------------------------------------------

def cmd_data(args):
    from .data.card import data_card

    card = data_card()
    console.print_json(json.dumps(card))
    return card


def cmd_finetune(args):
    from .train import RunSpec, Stage, run

    cfg = _train_config(args)
    result = run(RunSpec(args.model, args.out, [Stage(None, args.steps or 400)], cfg))
    console.print(_rows_table("dense fine-tuning", result["stages"]))
    return result


def cmd_prune(args):
    from .formats.folder import save_packed
    from .models import load_model, load_tokenizer
    from .nm.pattern import parse_series
    from .nm.prune import recorded_patterns, sparsify, sparsity_report
    from .train import RunSpec, Stage, run

    if args.method == "idp":
        if not args.series:
            raise ValueError("--method idp needs --series, e.g. 4:8,2:8,1:8")
        stages = [Stage(str(p), args.steps or 100) for p in parse_series(args.series)]
        result = run(RunSpec(args.model, args.out, stages, _train_config(args), _layer_config(args, stages[0].pattern)))
        console.print(_rows_table("IDP candidates", result["stages"]))
        _repack_candidates(args, [f"candidate-{s.name}" for s in stages])
        return result
    if not args.pattern:
        raise ValueError(f"--method {args.method} needs --pattern, e.g. 2:4")
    if args.method == "srste":
        stage = Stage(args.pattern, args.steps or 100)
        result = run(RunSpec(args.model, args.out, [stage], _train_config(args), _layer_config(args, args.pattern)))
        console.print(_rows_table("SR-STE", result["stages"]))
        _repack_candidates(args, [f"candidate-{stage.name}"])
        return result
    # one-shot
    from .adapters import model_task
    from .data.sentiment import sentiment_splits
    from .train import calibration_batches, lm_calibration_batches

    config = _layer_config(args, args.pattern)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    calib = None
    if config.criterion == "activation" and model_task(model) == "causal-lm":   # LM text for an LM
        calib = lm_calibration_batches(tok, args.calibration_batches)
    elif config.criterion == "activation":
        calib = calibration_batches(tok, sentiment_splits()["train"].texts, args.calibration_batches)
    sparsify(model, config, calibration=calib)
    report = sparsity_report(model)
    console.print(_rows_table(f"one-shot {config.criterion} N:M", report))
    if not all(r["nm_ok"] for r in report):
        raise RuntimeError("a pruned layer is not N:M: this is a bug")
    save_packed(model, args.out, recorded_patterns(model), args.value_dtype or "float16", args.encoding, tokenizer=tok,
                overwrite=args.overwrite, clamp=args.clamp_values)
    console.print(f"saved packed model to {args.out}")
    return report


def _repack_candidates(args, names: list[str]) -> None:
    """Trained candidates are written with fp32 values (what a resumed run compares against); an
    explicit --value-dtype re-packs each finished one in place in that dtype."""
    if args.value_dtype in (None, "float32"):
        return
    from .formats.folder import save_packed
    from .models import load_model, load_tokenizer
    from .nm.prune import recorded_patterns

    for name in names:
        folder = Path(args.out) / name
        model = load_model(folder)
        save_packed(model, folder, recorded_patterns(model), args.value_dtype, args.encoding,
                    tokenizer=load_tokenizer(folder), overwrite=True, clamp=args.clamp_values)
        console.print(f"re-packed {folder} with {args.value_dtype} values")


def cmd_eval(args):
    from .adapters import model_task
    from .data.sentiment import sentiment_splits
    from .data.text import lm_eval_texts
    from .evaluate import accuracy, embedding_similarity, perplexity, text_passages
    from .models import load_model, load_tokenizer

    model = load_model(args.model, fast=True, int8_head=args.int8_head, activation_bits=args.activation_bits)  # packed: N:M kernel
    tok = load_tokenizer(args.model)
    task = model_task(model)
    rows = []
    if task == "classifier":
        data = sentiment_splits()[args.split].subset(args.examples)
        rows.append({"metric": f"sentiment accuracy ({args.split}, {len(data)} examples)",
                     "value": accuracy(model, tok, data)})
    if not args.no_lm:
        texts = lm_eval_texts()
        if task == "causal-lm":
            for name, text in texts.items():
                rows.append({"metric": f"perplexity ({name})", "value": perplexity(model, tok, text, progress=True)})
        else:
            reference = load_model(args.reference)
            for name, text in texts.items():
                passages = text_passages(text, limit=args.passages)
                rows.append({"metric": f"embedding cosine vs {args.reference} ({name}, {len(passages)} passages)",
                             "value": embedding_similarity(model, reference, tok, passages, progress=True)})
    console.print(_rows_table(f"evaluation of {args.model}", rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def cmd_pack(args):
    from .formats.folder import save_packed
    from .models import load_model, load_tokenizer
    from .nm.prune import NMConfig, recorded_patterns

    model = load_model(args.model)
    patterns = NMConfig(args.pattern).layers(model) if args.pattern else recorded_patterns(model)
    if not patterns:
        raise ValueError(f"{args.model} records no N:M patterns; pass --pattern N:M")
    save_packed(model, args.out, patterns, args.value_dtype, args.encoding, tokenizer=load_tokenizer(args.model),
                overwrite=args.overwrite, clamp=args.clamp_values)
    return cmd_info(argparse.Namespace(folder=args.out, json=None))


def cmd_unpack(args):
    from .atomic import atomic_dir
    from .formats.folder import is_packed_folder
    from .models import load_model, load_tokenizer, quiet_transformers

    if not is_packed_folder(args.model):
        raise ValueError(f"{args.model} is not a packed sparsetx folder")
    model = load_model(args.model)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite")
    tok = load_tokenizer(args.model)
    with atomic_dir(out) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    console.print(f"wrote dense Hugging Face folder {out}")


def cmd_info(args):
    from .formats.folder import folder_report

    rep = folder_report(args.folder)
    h = rep["header"]
    console.print(f"{args.folder}: {h['format']} v{h['version']}, values {h['value_dtype']}, indices {h['encoding']}")
    table = Table(title="packed layers")
    for col in ("layer", "pattern", "shape", "packed", "vs fp32", "vs fp16"):
        table.add_column(col)
    for r in rep["layers"]:
        table.add_row(r["layer"], r["pattern"], "x".join(map(str, r["shape"])), f"{r['packed_bytes']:,}",
                      f"{r['fp32_bytes'] / r['packed_bytes']:.2f}x", f"{r['fp16_bytes'] / r['packed_bytes']:.2f}x")
    console.print(table)
    for scope in ("pruned_layers", "model"):
        b = rep[scope]
        console.print(f"{scope}: packed {b['packed']:,} B; dense fp32 {b['fp32']:,} B ({b['fp32'] / b['packed']:.2f}x); "
                      f"dense fp16 {b['fp16']:,} B ({b['fp16'] / b['packed']:.2f}x)")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(rep, indent=1))
    return rep


def cmd_compare(args):
    from .compare import CompareConfig, compare, comparison_table, table_markdown

    cfg = CompareConfig(model=args.model, out=args.out, dense=args.dense, dense_steps=args.dense_steps,
                        patterns=tuple(args.patterns.split(",")), series=args.series, steps=args.steps or 100,
                        unnested=not args.no_unnested,
                        train=_train_config(argparse.Namespace(**{**vars(args), "steps": None})))
    result = compare(cfg)
    Path(args.out, "resolved_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    console.print(comparison_table(result))
    (Path(args.out) / "table.md").write_text(table_markdown(result) + "\n")
    console.print(f"results: {args.out}/results.json, table.md, accuracy_vs_sparsity.png")
    return result


def cmd_attention_eval(args):
    from .attention.evaluate import EncoderEvalConfig, encoder_eval, encoder_table

    floats = lambda text: tuple(float(x) for x in text.split(","))  # noqa: E731
    if args.decoder:
        from .attention.decoder_eval import DecoderEvalConfig, decoder_eval, decoder_tables

        cfg = DecoderEvalConfig(model=args.decoder, context=args.context, prefill=args.prefill,
                                budgets=tuple(int(b) for b in args.kv_budgets.split(",")), out=args.out,
                                policies=tuple(args.decoder_policies.split(",")),
                                thresholds=floats(args.thresholds))
        result = decoder_eval(cfg)
        for table in decoder_tables(result):
            console.print(table)
        console.print(f"wrote {args.out}/decoder_eval.json and decoder_eval.png")
        return result
    cfg = EncoderEvalConfig(classifier=args.classifier, encoder=args.model, token_keeps=floats(args.token_keep),
                            head_keeps=floats(args.head_keep), policies=tuple(args.policies.split(",")),
                            examples=args.examples, passages=args.passages, out=args.out)
    result = encoder_eval(cfg)
    console.print(encoder_table(result))
    console.print(f"wrote {args.out}/encoder_eval.json and encoder_eval.png")
    return result


def cmd_generate(args):
    import torch

    from .attention.decoder import DecoderConfig, spatten_decoder
    from .models import load_model, load_tokenizer

    model, tok = load_model(args.model, fast=True, int8_head=args.int8_head), load_tokenizer(args.model)
    enc = tok(args.prompt, return_tensors="pt")
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}   # no token_type_ids for an LM
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    length = inputs["input_ids"].shape[1]
    if length == 0:
        raise ValueError("--prompt: the prompt has no tokens")
    if positions and length + args.max_new_tokens > positions:
        raise ValueError(f"--prompt: {length} tokens + --max-new-tokens {args.max_new_tokens} exceed the model's "
                         f"{positions} positions")
    if args.kv_budget and positions and args.kv_budget > positions:
        raise ValueError(f"--kv-budget {args.kv_budget}: larger than the model's context of {positions} tokens "
                         f"(valid: 1 to {positions})")
    torch.manual_seed(args.seed)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, top_k=50 if args.sample else None)
    if not args.spatten:
        if args.stats or args.trace:
            raise ValueError("--stats and --trace need --spatten")
        out = model.generate(**inputs, **kw)
        console.print(tok.decode(out[0], skip_special_tokens=True))
        return out
    from .attention.policies import POLICIES

    if args.policy not in POLICIES:
        raise ValueError(f"unknown policy {args.policy!r}; valid: {', '.join(POLICIES)}")
    if args.raw_importance and args.policy != "cascade":
        raise ValueError("--raw-importance is a cascade setting")
    extra = {k: v for k, v in (("recent", args.recent), ("normalize", args.normalize)) if v}
    if args.raw_importance:
        extra["normalize"] = False
    if args.policy == "sink":
        extra["sink_tokens"] = args.sink_tokens
    try:
        policy = POLICIES[args.policy](**extra)
    except TypeError:
        raise ValueError(f"policy {args.policy!r} takes none of --normalize") from None
    cfg = DecoderConfig(kv_budget=args.kv_budget, token_keep=args.token_keep, head_keep=args.head_keep,
                        value_topk=args.value_topk, policy=policy, evict_after=args.evict_after,
                        requant_threshold=args.threshold, **({"k_bits": 12} if args.quant else {}))
    with spatten_decoder(model, cfg) as rt:
        out = model.generate(**inputs, **kw)
    console.print(tok.decode(out[0], skip_special_tokens=True))
    last = rt.stats[-1]
    console.print(f"cache after the last step: {[s['tokens_after'] for s in last]} tokens per layer "
                  f"(of {inputs['input_ids'].shape[1] + len(rt.stats) - 1} seen)")
    if args.stats:
        from .attention.trace import write_stats
        write_stats(args.stats, rt.stats_document())
    if args.trace:
        from .attention.trace import decoder_trace_rows, write_spatten_csv
        write_spatten_csv(args.trace, decoder_trace_rows(rt.stats_document()), f"sparsetx:{args.model}:{cfg}")
    return out


def _print_tables(tables) -> None:
    for title, rows in tables:
        if rows:
            console.print(_rows_table(title, rows))


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_sim_run(args):
    from .hw.run import SimConfig, plot, report_tables, run, write_json

    cfg = SimConfig(arch=args.arch, model=args.model, tokens=args.tokens, pattern=args.pattern,
                    token_keep=args.token_keep, head_keep=args.head_keep, value_keep=args.value_keep,
                    trace=args.trace, semantics=args.semantics, stats=args.stats, arch_config=args.arch_config,
                    measure=args.measure)
    with console.status("simulating"):
        result = run(cfg)
    _print_tables(report_tables(result))
    if args.json:
        write_json(result, args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        console.print(f"wrote {args.plot}")


def cmd_sim_validate(args):
    from .hw.run import write_json
    from .hw.validate import reproduce

    with console.status("reproducing the papers' figures") as status:
        rows = reproduce(progress=lambda msg: status.update(f"simulating: {msg}"))
    titles = {"independent": "independent figures: what the papers measured (goal: within the tolerance; "
                             "n/a = cannot be reproduced here)",
              "self-check": "self-checks: numbers our own formulas or the trace determine (plumbing, not reproduction)"}
    number = {id(r): i for i, r in enumerate(rows, 1)}
    for kind, title in titles.items():
        table = Table(title=title)
        for col in ("#", "figure", "paper", "ours", "ratio", "tolerance", "status"):
            table.add_column(col, overflow="fold")
        for r in (r for r in rows if r["kind"] == kind):
            ours = "-" if r["ours"] is None else f"{r['ours']:.4g}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            color = {"ok": "green", "off": "yellow", "n/a": "dim"}[r["status"]]
            table.add_row(str(number[id(r)]), f"{r['paper']}: {r['what']}", f"{r['value']:g} {r['unit']}", ours, ratio,
                          f"{r['tolerance']:.0%}", f"[{color}]{r['status']}[/{color}]")
        console.print(table)
    console.print("how each figure was computed, or why it cannot be:")
    for i, r in enumerate(rows, 1):
        console.print(f"  {i:2d}. {r['how']} (source: {r['source']})", highlight=False, markup=False)
    for kind in titles:
        counts = {s: sum(r["status"] == s for r in rows if r["kind"] == kind) for s in ("ok", "off", "n/a")}
        label = "independent figures: reproduced" if kind == "independent" else "self-checks: consistent"
        console.print(f"{label} {counts['ok']}, outside the tolerance {counts['off']}, "
                      f"not reproducible here {counts['n/a']}")
    if args.json:
        write_json(rows, args.json)
        console.print(f"wrote {args.json}")


def cmd_sim_sweep(args):
    from rich.progress import Progress

    from .hw.run import write_json
    from .hw.sweep import plot_pareto, sweep

    patterns = [None if p == "dense" else p for p in args.patterns.split(",")]
    defaults = {"nm_results": "runs/compare/results.json", "attention_results": "runs/attention-eval/encoder_eval.json"}
    for key, path in defaults.items():
        if getattr(args, key) is None and Path(path).exists():
            setattr(args, key, path)
    if args.nm_results is None or args.attention_results is None:
        console.print("note: without both accuracy files (run `sparsetx compare` and `sparsetx attention-eval`), "
                      "points lack an accuracy and the Pareto front covers only those that have one")
    with Progress(console=console) as progress:
        task = progress.add_task("sweep", total=None)
        rows = sweep(args.model, args.tokens, patterns, _floats(args.token_keep), _floats(args.head_keep),
                     [int(x) for x in _floats(args.pe)], args.nm_results, args.attention_results,
                     progress=lambda i, n: progress.update(task, completed=i, total=n))
    console.print(_rows_table(f"co-design sweep: {args.model}, {args.tokens} tokens (STA engine + SpAtten pruning)",
                              [r for r in rows if r["pareto"]] if args.pareto_only else rows))
    out = Path(args.out)
    write_json({k: v for k, v in vars(args).items() if k != "fn"}, out / "config.json")  # the resolved settings
    write_json(rows, out / "sweep.json")
    plot_pareto(rows, out / "pareto.png")
    console.print(f"wrote {out}/sweep.json and {out}/pareto.png ({sum(r['pareto'] for r in rows)} Pareto points)")


def cmd_demo(args):
    from .demo import demo

    return demo(args.out, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sparsetx", description="N:M sparse Transformers (STA) and sparse attention (SpAtten).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("data", help="print the data card of the offline corpora")
    s.set_defaults(fn=cmd_data)

    s = sub.add_parser("finetune", help="fine-tune the dense model on the sentiment task (the dense reference)")
    s.add_argument("--model", default="minilm", type=model_arg)
    s.add_argument("--out", required=True, type=out_arg)
    _add_train_flags(s)
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("prune", help="N:M pruning: one-shot, SR-STE, or an IDP series; writes packed folders")
    s.add_argument("--model", default="minilm", type=model_arg, help="model folder (a fine-tuned classifier for srste/idp) or 'minilm'")
    s.add_argument("--method", choices=("oneshot", "srste", "idp"), default="oneshot")
    s.add_argument("--pattern", type=pattern_arg, help="N:M for every selected layer, e.g. 2:4")
    s.add_argument("--series", type=series_arg, help="IDP: patterns from dense to sparse, e.g. 4:8,2:8,1:8")
    s.add_argument("--criterion", choices=("magnitude", "activation"), default="magnitude")
    s.add_argument("--calibration-batches", type=positive_int, default=8,
                   help="activation criterion: batches of 32 sentiment texts (a classifier) or of 8 Wikipedia "
                        "windows of 512 tokens from the end of the excerpt (a causal LM)")
    s.add_argument("--include", action="append", type=regex_arg, help="regex of Linear names to prune (replaces the default block Linears)")
    s.add_argument("--exclude", action="append", type=regex_arg, help="regex of Linear names to leave dense")
    s.add_argument("--layer", action="append", type=layer_arg, help="per-layer pattern, NAME_REGEX=N:M (repeatable)")
    s.add_argument("--value-dtype", default=None, choices=("float32", "float16", "bfloat16", "int8"),
                   help="values of the packed output: one-shot default float16; srste/idp candidates are written "
                        "float32 and, when this is given, re-packed in this dtype once trained. int8: symmetric "
                        "per-row scales, error at most 1/254 of the row's largest weight (formats/packed.py)")
    s.add_argument("--encoding", default="index", choices=("index", "rank"))
    s.add_argument("--clamp-values", action="store_true",
                   help="clamp weights beyond the value dtype's range (reported) instead of refusing them")
    s.add_argument("--out", required=True, type=out_arg)
    s.add_argument("--overwrite", action="store_true")
    _add_train_flags(s)
    s.set_defaults(fn=cmd_prune)

    s = sub.add_parser("eval", help="task accuracy and LM metric of a dense or packed model folder")
    s.add_argument("--model", default="minilm", type=model_arg)
    s.add_argument("--split", default="test", choices=("train", "dev", "test"))
    s.add_argument("--examples", type=positive_int)
    s.add_argument("--reference", default="minilm", type=model_arg, help="dense reference for the embedding metric of encoders")
    s.add_argument("--passages", type=positive_int, default=128)
    s.add_argument("--no-lm", action="store_true")
    s.add_argument("--int8-head", action="store_true", help="a causal LM's head weight in int8, per-row scales")
    s.add_argument("--activation-bits", type=int, choices=(8, 16), default=16,
                   help="int8-packed models: activations rounded per token to int16 (default) or int8 (the select "
                        "kernel, and a BERT encoder's attention on int8 Q, K, V; as peers.py times it)")
    s.add_argument("--json", type=out_file)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("pack", help="pack a pruned dense folder")
    s.add_argument("--model", required=True, type=model_arg)
    s.add_argument("--out", required=True, type=out_arg)
    s.add_argument("--pattern", type=pattern_arg, help="pattern if the folder does not record one")
    s.add_argument("--value-dtype", default="float16", choices=("float32", "float16", "bfloat16", "int8"),
                   help="int8: symmetric per-row scales, error at most 1/254 of the row's largest weight (formats/packed.py)")
    s.add_argument("--encoding", default="index", choices=("index", "rank"))
    s.add_argument("--clamp-values", action="store_true",
                   help="clamp weights beyond the value dtype's range (reported) instead of refusing them")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_pack)

    s = sub.add_parser("unpack", help="write a packed folder back as a dense Hugging Face folder")
    s.add_argument("--model", required=True, type=model_arg)
    s.add_argument("--out", required=True, type=out_arg)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_unpack)

    s = sub.add_parser("info", help="inspect a packed folder: patterns and bytes per layer")
    s.add_argument("folder", type=model_arg)
    s.add_argument("--json", type=out_file)
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("compare", help="dense vs one-shot vs SR-STE vs IDP on the sentiment task")
    s.add_argument("--model", default="minilm", type=model_arg)
    s.add_argument("--out", default="runs/compare", type=out_arg)
    s.add_argument("--dense", type=model_arg, help="an already fine-tuned dense folder")
    s.add_argument("--dense-steps", type=positive_int, default=400)
    s.add_argument("--patterns", default="2:4,4:8,2:8,1:8", type=listed(pattern_arg))
    s.add_argument("--series", default="4:8,2:4,2:8,1:8")
    s.add_argument("--no-unnested", action="store_true", help="skip the unnested IDP variant")
    _add_train_flags(s)
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("attention-eval", help="SpAtten token/head pruning on encoders vs same-budget baselines")
    s.add_argument("--model", default="minilm", type=model_arg, help="sentence encoder for the embedding-fidelity metric")
    s.add_argument("--classifier", type=model_arg, help="fine-tuned classifier folder for accuracy (e.g. runs/compare/dense/candidate-dense)")
    s.add_argument("--token-keep", default="1.0,0.75,0.5,0.3", type=listed(ratio))
    s.add_argument("--head-keep", default="1.0,0.75,0.5", type=listed(ratio))
    s.add_argument("--policies", default="cascade,local,random,first")
    s.add_argument("--examples", type=positive_int, default=512)
    s.add_argument("--passages", type=positive_int, default=64)
    s.add_argument("--out", default="runs/attention-eval", type=out_arg)
    d = s.add_argument_group("decoders (instead of the encoder evaluation)")
    d.add_argument("--decoder", type=model_arg, help="evaluate a causal LM instead, e.g. smollm2")
    d.add_argument("--context", type=positive_int, default=512, help="tokens per text")
    d.add_argument("--prefill", type=positive_int, default=64)
    d.add_argument("--kv-budgets", default="64,128,256", type=listed(positive_int))
    d.add_argument("--decoder-policies", default="cascade,h2o,window,sink")
    d.add_argument("--thresholds", default="0.05,0.1,0.2", type=listed(probability), help="progressive quantization thresholds")
    s.set_defaults(fn=cmd_attention_eval)

    s = sub.add_parser("generate", help="generate text, optionally with SpAtten KV-cache pruning")
    s.add_argument("--model", default="smollm2", type=model_arg)
    s.add_argument("--prompt", required=True, type=prompt_arg)
    s.add_argument("--max-new-tokens", type=positive_int, default=32)
    s.add_argument("--sample", action="store_true", help="sample (top-k 50) instead of greedy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--int8-head", action="store_true", help="the LM head's weight in int8, per-row scales (kernels/int8_linear.py)")
    s.add_argument("--spatten", action="store_true", help="prune the KV cache with SpAtten")
    s.add_argument("--kv-budget", type=positive_int)
    s.add_argument("--token-keep", type=ratio, default=1.0, help="fraction of seen tokens kept at the last layer")
    s.add_argument("--head-keep", type=ratio, default=1.0, help="fraction of KV heads kept at the last layer")
    s.add_argument("--value-topk", type=ratio, help="local value pruning: fraction of keys whose V rows are read")
    s.add_argument("--policy", default="cascade", help="cascade (SpAtten), h2o, window or sink")
    s.add_argument("--recent", type=nonneg_int, default=0, help="always keep the newest N tokens")
    s.add_argument("--raw-importance", action="store_true",
                   help="cascade: rank by the raw importance sum (the paper's), not per query that saw the token")
    s.add_argument("--normalize", action="store_true", help="h2o: rank by attention per query that saw the token")
    s.add_argument("--sink-tokens", type=nonneg_int, default=4, help="sink: the first N tokens always kept")
    s.add_argument("--evict-after", choices=("layer", "forward"), default="forward",
                   help="cut each layer's cache after its attention, or all after the whole forward")
    s.add_argument("--quant", action="store_true", help="progressive quantization (K 8+4 bits, V 8 bits)")
    s.add_argument("--threshold", type=probability, default=0.1)
    s.add_argument("--stats", type=out_file, help="write the per-layer statistics JSON here")
    s.add_argument("--trace", type=out_file, help="write the official SpAtten trace CSV here")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("sim", help="cycle-level simulators of the STA and SpAtten accelerators")
    simsub = s.add_subparsers(dest="sim_command", required=True)
    r = simsub.add_parser("run", help="simulate one workload and print the report")
    r.add_argument("--arch", choices=["sta", "spatten"], default="sta")
    r.add_argument("--model", default="bert-base",
                   help="preset (bert-base, bert-large, gpt2, gpt2-medium, vit-base, deit-small, minilm), a "
                        "config.json or a model folder")
    r.add_argument("--tokens", type=positive_int, default=128)
    r.add_argument("--pattern", type=pattern_arg, help="N:M of the linear layers (sta)")
    r.add_argument("--token-keep", type=ratio, default=1.0, help="token keep ratio at the last layer (cascade ramp)")
    r.add_argument("--head-keep", type=ratio, default=1.0)
    r.add_argument("--value-keep", type=ratio, default=1.0, help="local value pruning (spatten)")
    r.add_argument("--trace", type=existing_file, help="official SpAtten trace CSV (spatten)")
    r.add_argument("--semantics", choices=("official", "paper"), default="official",
                   help="how a trace is read: as the official RTL simulator does (default) or as the paper reads")
    r.add_argument("--stats", type=existing_file, help="stats JSON of a SpAtten runtime run, e.g. from generate --stats (spatten)")
    r.add_argument("--arch-config", type=existing_file, help="YAML/JSON file overriding architecture parameters")
    r.add_argument("--measure", action="store_true", help="also time the workload on this CPU")
    r.add_argument("--json", type=out_file, help="write the full result here")
    r.add_argument("--plot", type=out_file, help="write latency / DRAM / speedup plots here (.png)")
    r.set_defaults(fn=cmd_sim_run)
    v = simsub.add_parser("validate", help="the papers' headline figures next to the simulators'")
    v.add_argument("--json", type=out_file, help="write the rows here")
    v.set_defaults(fn=cmd_sim_validate)
    w = simsub.add_parser("sweep", help="N:M x token keep x head keep x PE array, with accuracy, Pareto plot")
    w.add_argument("--model", default="minilm")
    w.add_argument("--tokens", type=positive_int, default=128)
    w.add_argument("--patterns", default="dense,2:4,4:8,2:8,1:8", type=listed(pattern_or_dense))
    w.add_argument("--token-keep", default="1.0,0.75,0.5,0.25", type=listed(ratio))
    w.add_argument("--head-keep", default="1.0,0.75", type=listed(ratio))
    w.add_argument("--pe", default="8,16,32", type=listed(positive_int), help="PE array sides (an 8 means 8x8)")
    w.add_argument("--nm-results", type=existing_file, help="sparsetx compare's results.json (default: runs/compare/results.json if present)")
    w.add_argument("--attention-results", type=existing_file,
                   help="sparsetx attention-eval's JSON (default: runs/attention-eval/encoder_eval.json if present)")
    w.add_argument("--pareto-only", action="store_true", help="print only the Pareto points")
    w.add_argument("--out", default="runs/sweep", type=out_arg)
    w.set_defaults(fn=cmd_sim_sweep)

    s = sub.add_parser("demo", help="a few minutes end to end on the embedded MiniLM")
    s.add_argument("--out", default="runs/demo", type=out_arg)
    s.add_argument("--quick", action="store_true", help="tiny budgets (for tests)")
    s.set_defaults(fn=cmd_demo)

    p._subcommands = dict(sub.choices)
    for name in ("finetune", "prune", "compare"):
        p._subcommands[name].add_argument("--config", type=existing_file, help="YAML or JSON file of option defaults (flags override)")
    return p


def _with_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``--config FILE`` (YAML or JSON, keys = flag names with underscores) sets defaults; flags win.
    Each value is checked as its flag would be."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    import yaml

    path = Path(args.config)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path}: not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    sub = parser._subcommands[args.command]
    actions = {a.dest: a for a in sub._actions}
    unknown = sorted(set(map(str, values)) - set(actions))
    if unknown:
        raise ValueError(f"--config {path}: unknown options {unknown} for '{args.command}'")
    for key, value in values.items():
        check = actions[key].type
        if check is None or value is None:
            continue
        try:
            for item in value if isinstance(value, list) else [value]:
                check(str(item))
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--config {path}: {key}: {err}") from None
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for a bad flag value or input, with one line
    on stderr naming it; 130 when interrupted)."""
    parser = build_parser()
    try:
        args = _with_config_file(parser, argv)
        out = getattr(args, "out", None)
        primary = os.environ.get("RANK", "0") == "0"   # under torchrun only rank 0 writes --out
        with out_lock(out) if out and primary else contextlib.nullcontext():
            args.fn(args)
    except SystemExit as done:   # argparse: --help, or a bad flag value (already printed, one line)
        return done.code if isinstance(done.code, int) else 2
    except KeyboardInterrupt:
        errors.print("interrupted")
        return 130
    except (ValueError, OSError) as err:   # bad input, missing/unwritable paths, corrupt files
        errors.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
