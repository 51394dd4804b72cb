"""``sparsetx demo``: a few minutes end to end on the embedded all-MiniLM-L6-v2.

Data card -> dense fine-tune (short) -> one-shot 2:4 and 2:8 (magnitude and activation-aware) ->
SR-STE per pattern and a short IDP series 2:4 -> 2:8 -> the comparison table, JSON and plot ->
pack the IDP 2:8 candidate with fp16 values -> reload -> verify -> its speed on the N:M CPU kernel
(and with int8 values and int8 activations on the integer kernel) and on the simulated STA
accelerator -> SpAtten token and KV-cache pruning.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .compare import CompareConfig, compare, comparison_table, table_markdown
from .data.card import data_card
from .formats.folder import folder_report, load_packed, save_packed
from .models import load_tokenizer
from .nm.prune import recorded_patterns, sparsity_report
from .train import TrainConfig

console = Console()


def _card_table(card: dict) -> Table:
    t = Table(title="data card")
    t.add_column("set")
    t.add_column("size")
    t.add_column("split / rule")
    s = card["sentiment"]
    t.add_row("Rotten Tomatoes sentiment", f"train {s['train']['examples']}, dev {s['dev']['examples']}, test {s['test']['examples']}"
              f" (test: {s['test']['fresh']} fresh / {s['test']['rotten']} rotten)", s["split"])
    t.add_row("Wikipedia (gensim test data)", f"{card['wikipedia']['articles']} articles, {card['wikipedia']['words']:,} words", "all for evaluation")
    sh = card["shakespeare"]
    t.add_row("Shakespeare plays", f"{sh['train_plays']} train plays, {len(sh['heldout_plays'])} held out ({sh['heldout_words']:,} words)", sh["rule"])
    t.add_row("Milton (2nd author)", f"{card['milton']['texts']} texts, {card['milton']['words']:,} words", "evaluation only")
    return t


def spatten_section(classifier: Path, quick: bool) -> dict:
    """SpAtten in one screen: cascade token pruning on the classifier, KV-cache pruning on SmolLM2."""
    from .attention.decoder import DecoderConfig, spatten_decoder
    from .attention.encoder import SpAttenConfig, spatten
    from .data.sentiment import sentiment_splits
    from .evaluate import accuracy
    from .models import load_model

    console.rule("SpAtten: cascade token pruning (encoder) and KV-cache pruning (decoder)")
    model, tok = load_model(classifier), load_tokenizer(classifier)
    data = sentiment_splits()["test"].subset(32 if quick else 256)
    table = Table(title=f"fine-tuned MiniLM, {len(data)} test snippets")
    for col in ("tokens kept (last layer)", "heads kept", "accuracy"):
        table.add_column(col, justify="right")
    enc_rows = []
    for keep, heads in ((1.0, 1.0), (0.5, 1.0), (0.3, 1.0), (1.0, 0.5)):
        with spatten(model, SpAttenConfig(token_keep=keep, head_keep=heads)):
            acc = accuracy(model, tok, data, progress=False)
        enc_rows.append({"token_keep": keep, "head_keep": heads, "accuracy": acc})
        table.add_row(f"{keep:.0%}", f"{heads:.0%}", f"{acc:.4f}")
    console.print(table)
    if quick:
        return {"encoder": enc_rows}
    lm, lm_tok = load_model("smollm2"), load_tokenizer("smollm2")
    prompt = ("The castle stood on a hill above the river, and every evening the old keeper climbed the tower "
              "to light the lamp. One night, a stranger knocked at the gate and asked")
    ids = lm_tok(prompt, return_tensors="pt")
    dense = lm.generate(**ids, max_new_tokens=24, do_sample=False)
    n_prompt = ids.input_ids.shape[1]
    new = dense.shape[1] - n_prompt
    console.print(f"SmolLM2-135M, greedy, prompt of {n_prompt} tokens:")
    console.print(f"  dense           : {lm_tok.decode(dense[0, -new:])!r}")
    dec_rows = []
    for budget in (3 * n_prompt // 4, n_prompt // 2):
        with spatten_decoder(lm, DecoderConfig(kv_budget=budget)) as rt:
            pruned = lm.generate(**ids, max_new_tokens=24, do_sample=False)
        agree = float((dense[0, -new:] == pruned[0, -new:]).float().mean())
        console.print(f"  KV cache <= {budget:3d} : {lm_tok.decode(pruned[0, -new:])!r} (same token at {agree:.0%} of positions;"
                      " free-running text diverges after the first different token)")
        dec_rows.append({"kv_budget": budget, "agreement": agree, "cache_after": [s["tokens_after"] for s in rt.stats[-1]]})
    return {"encoder": enc_rows, "decoder": dec_rows}


def speed_section(packed_dir: Path, quick: bool, int8_dir: Path | None = None) -> dict:
    """The packed 2:8 model on the N:M kernel against its dense twin on PyTorch, measured in the
    same run (and, from ``int8_dir``, the same candidate with int8 values on the integer kernel
    with int8 activations), and the same model on the simulated STA accelerator."""
    import statistics
    import time

    from .hw.run import SimConfig, run as simulate

    console.rule("speed: the packed 2:8 model on the CPU kernel, and on a simulated STA accelerator")
    dense, fast = load_packed(packed_dir), load_packed(packed_dir, fast=True)
    cases = [("dense (F.linear)", dense), ("2:8 (SparseLinear)", fast)]
    if int8_dir is not None:
        cases.append(("2:8 int8 (int8 activations)", load_packed(int8_dir, fast=True, activation_bits=8)))
    tok = load_tokenizer(packed_dir)
    enc = tok(["a gripping, beautifully acted film that never lets go of you"] * 8, return_tensors="pt",
              padding="max_length", max_length=128, truncation=True)
    times = {name: [] for name, _ in cases}
    with torch.no_grad():
        same = float((fast(**enc).logits - dense(**enc).logits).abs().max())
        near = float((cases[-1][1](**enc).logits - dense(**enc).logits).abs().max()) if int8_dir else None
        for _ in range(2 if quick else 7):  # interleaved; the first round warms up
            for name, m in cases:
                t = time.perf_counter()
                m(**enc)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    speedup = med["dense (F.linear)"] / med["2:8 (SparseLinear)"]
    console.print(f"8 x 128 tokens, {torch.get_num_threads()} threads: dense {med['dense (F.linear)'] * 1e3:.1f} ms, "
                  f"2:8 {med['2:8 (SparseLinear)'] * 1e3:.1f} ms (x{speedup:.2f}); max |logit difference| {same:.1e}")
    int8 = {}
    if int8_dir is not None:
        t8 = med["2:8 int8 (int8 activations)"]
        int8 = {"cpu_speedup_int8": med["dense (F.linear)"] / t8, "max_logit_diff_int8": near}
        console.print(f"  the same candidate with int8 values and int8 activations: {t8 * 1e3:.1f} ms "
                      f"(x{int8['cpu_speedup_int8']:.2f}); max |logit difference| {near:.1e} (rounding to 8 bits)")
    sims = {}
    for pattern in (None, "2:8"):
        r = simulate(SimConfig(arch="sta", model=str(packed_dir), tokens=128, pattern=pattern))
        sims[pattern or "dense"] = {"ms": r["seconds"] * 1e3, "dram_bytes": r["dram_bytes_total"], "uj": r["energy_j"] * 1e6}
    d, s = sims["dense"], sims["2:8"]
    console.print(f"simulated STA (assumed 200 MHz, 16x16 PEs), 128 tokens: dense {d['ms']:.2f} ms, 2:8 {s['ms']:.2f} ms "
                  f"(x{d['ms'] / s['ms']:.2f}), DRAM {d['dram_bytes'] / s['dram_bytes']:.2f}x less, energy "
                  f"{d['uj'] / s['uj']:.2f}x less (sparsetx sim run --help for more)")
    return {"cpu_ms": {k: v * 1e3 for k, v in med.items()}, "cpu_speedup": speedup, "max_logit_diff": same, **int8,
            "sta": sims}


def demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    out = Path(out)
    console.rule("sparsetx demo: N:M sparsity with inherited dynamic pruning on all-MiniLM-L6-v2")
    console.print(_card_table(data_card()))

    cfg = CompareConfig(out=str(out / "compare"), patterns=("2:4", "2:8"), series="2:4,2:8",
                        dense_steps=4 if quick else 60, steps=2 if quick else 20, unnested=False,
                        train=TrainConfig(eval_examples=32 if quick else 512, train_examples=256 if quick else None,
                                          batch_size=8 if quick else 32, lr=1e-4))
    result = compare(cfg)
    console.print(comparison_table(result))
    (out / "compare" / "table.md").write_text(table_markdown(result) + "\n")

    # Pack the IDP 2:8 candidate with fp16 values, reload it, verify.
    src = out / "compare" / "idp" / "candidate-2_8"
    model = load_packed(src)
    patterns = recorded_patterns(model)
    packed_dir = save_packed(model, out / "packed-2_8-fp16", patterns, "float16", tokenizer=load_tokenizer(src),
                             overwrite=True)
    report = folder_report(packed_dir)
    reloaded = load_packed(packed_dir)
    exact = all(torch.equal(reloaded.state_dict()[f"{n}.weight"], model.state_dict()[f"{n}.weight"].half().float())
                for n in patterns)
    nm_ok = all(r["nm_ok"] for r in sparsity_report(reloaded))
    tok = load_tokenizer(src)
    enc = tok(["a gripping, beautifully acted film", "a dull and lifeless mess"], return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = float((reloaded(**enc).logits - model(**enc).logits).abs().max())
    pl = report["pruned_layers"]
    console.print(f"packed 2:8 (fp16 values + 3-bit indices): pruned layers {pl['packed']:,} B vs dense fp32 "
                  f"{pl['fp32']:,} B ({pl['fp32'] / pl['packed']:.2f}x) and fp16 {pl['fp16']:,} B ({pl['fp16'] / pl['packed']:.2f}x)")
    console.print(f"reload: weights bit-identical to the fp16-rounded candidate: {exact}; every group 2:8: {nm_ok}; "
                  f"max |logit difference| vs fp32 candidate: {diff:.2e}")
    summary = {"comparison": result["rows"], "packed": {"folder": str(packed_dir), "bytes": report["pruned_layers"],
               "model_bytes": report["model"], "bit_identical": exact, "nm_ok": nm_ok, "max_logit_diff": diff},
               "speed": speed_section(packed_dir, quick, save_packed(model, out / "packed-2_8-int8", patterns, "int8",
                                                                     tokenizer=tok, overwrite=True)),
               "spatten": spatten_section(out / "compare" / "dense" / "candidate-dense", quick)}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    console.print(f"wrote {out}/demo.json, {out}/compare/results.json, {out}/compare/accuracy_vs_sparsity.png")
    if not (exact and nm_ok):
        raise RuntimeError("packed model verification failed")
    return summary
