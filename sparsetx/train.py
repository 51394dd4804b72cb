"""Fine-tuning on the sentiment task: dense, SR-STE (dynamic N:M) and IDP series, one loop.

A run is a list of stages. A dense run has one stage without a pattern; SR-STE has one sparse
stage; IDP has one sparse stage per pattern, each continuing from the previous stage's dense
shadow weights, optimizer state and (by default, nested) mask. After each stage the candidate
(W * E) is evaluated and saved as a packed folder. Checkpoints (safetensors + JSON, no pickle) are
written every ``checkpoint_every`` steps and at every stage end; a rerun with the same output
folder resumes from the last one and reproduces the uninterrupted run bit for bit.
Under ``torchrun --nproc_per_node K`` the global batch is split over K gloo processes (DDP).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn

from .data.sentiment import sentiment_splits
from .evaluate import accuracy
from .atomic import atomic_dir, atomic_path, recover_dir
from .formats.folder import save_packed
from .models import load_model, load_tokenizer, quiet_transformers
from .nm.pattern import NMPattern
from .nm.prune import NMConfig, record_patterns
from .nm.srste import attach_srste, detach_srste, refresh_masks, srste_layers

console = Console(stderr=True)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every stage (steps are optimizer steps of the global batch)."""

    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 10
    max_length: int = 64
    seed: int = 0
    lambda_w: float = 2e-4          # SR-STE decay on pruned weights (0 = plain STE)
    mask_every: int = 1             # recompute dynamic masks every k steps
    nested: bool = True             # IDP: next mask chosen inside the previous one
    checkpoint_every: int = 50
    eval_examples: int | None = None  # cap on dev/test examples per evaluation (None = all)
    train_examples: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "mask_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.lambda_w < 0:
            raise ValueError(f"lr must be > 0 and lambda_w >= 0, got lr={self.lr}, lambda_w={self.lambda_w}")


@dataclass
class Stage:
    pattern: str | None  # None: dense fine-tuning
    steps: int

    @property
    def name(self) -> str:
        return "dense" if self.pattern is None else self.pattern.replace(":", "_")


@dataclass
class RunSpec:
    model: str                     # model folder (or "minilm")
    out: str                       # output folder (checkpoints, candidates, results.json)
    stages: list[Stage]
    train: TrainConfig = field(default_factory=TrainConfig)
    layers: NMConfig = field(default_factory=NMConfig)  # layer selection (its pattern is per stage)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a run needs at least one stage")
        sparse = [s.pattern is not None for s in self.stages]
        if any(sparse) and not all(sparse):
            raise ValueError("stages must be all sparse (SR-STE / IDP) or a single dense stage")
        if not any(sparse) and len(self.stages) > 1:
            raise ValueError("a dense run has exactly one stage")
        for s in self.stages:
            if s.steps < 1:
                raise ValueError(f"stage {s.name}: steps must be >= 1, got {s.steps}")
            if s.pattern is not None:
                NMPattern.parse(s.pattern)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> int:
        end = 0
        for i, s in enumerate(self.stages):
            end += s.steps
            if step < end:
                return i
        return len(self.stages) - 1

    def stage_start(self, index: int) -> int:
        return sum(s.steps for s in self.stages[:index])

    def to_dict(self) -> dict:
        return {"model": self.model, "stages": [asdict(s) for s in self.stages], "train": asdict(self.train),
                "layers": self.layers.to_dict()}


def lr_at(step_in_stage: int, stage_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up then linear decay to 0, restarted at every stage."""
    warm = min(cfg.warmup_steps, max(stage_steps // 2, 1))
    if step_in_stage < warm:
        return cfg.lr * (step_in_stage + 1) / warm
    return cfg.lr * max(0.0, (stage_steps - step_in_stage) / max(stage_steps - warm, 1))


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


# --- checkpoints: tensors in safetensors, everything else in JSON --------------------------------

def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, history: list) -> None:
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state = opt.state_dict()
    for pid, st in state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = v.detach().clone().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": state["param_groups"], "history": history,
            "opt_keys": {str(pid): sorted(st) for pid, st in state["state"].items()}}
    with atomic_dir(path) as tmp:   # the previous checkpoint or this one, whole, whenever a kill lands
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list]:
    meta = json.loads((path / "trainer.json").read_text())
    tensors = load_file(path / "state.safetensors")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = {int(pid): {k: tensors[f"opt.{pid}.{k}"] for k in keys} for pid, keys in meta["opt_keys"].items()}
    opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return meta["step"], meta["history"]


# --- the loop -------------------------------------------------------------------------------------

def _encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def _collate(ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        attention[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


def calibration_batches(tokenizer, texts: list[str], batches: int, batch_size: int = 32,
                        max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """The first ``batches * batch_size`` texts as padded batches (activation-aware pruning)."""
    ids = _encode(tokenizer, texts[: batches * batch_size], max_length)
    return [_collate(ids[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(ids), batch_size)]


def lm_calibration_batches(tokenizer, batches: int, batch_size: int = 8, length: int = 512) -> list[dict[str, torch.Tensor]]:
    """``batches`` batches of ``batch_size`` windows of ``length`` tokens from the end of the Wikipedia
    excerpt (activation-aware pruning of a causal LM). The perplexity evaluations read the excerpt's
    beginning (16 windows of 512 tokens at most, benchmarks/peers.py fewer), so the two never meet."""
    from .data.text import wikipedia_text

    text = wikipedia_text()
    need = batches * batch_size * length
    tail = text[-min(len(text) // 2, 8 * need):]         # ~4-5 characters a token: enough, in the second half
    ids = tokenizer(tail, add_special_tokens=False).input_ids[-need:]
    if len(ids) < need:
        raise ValueError(f"the second half of the Wikipedia excerpt has {len(ids)} tokens; "
                         f"{batches} x {batch_size} windows of {length} need {need}")
    t = torch.tensor(ids).view(batches, batch_size, length)
    return [{"input_ids": b} for b in t]


def batch_indices(step: int, n: int, cfg: TrainConfig) -> list[int]:
    """Global batch of ``step``: epoch-wise permutations seeded by (seed, epoch), last partial batch dropped."""
    per_epoch = n // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} is larger than the {n} training examples")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    return perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()


def candidate(model: nn.Module) -> tuple[nn.Module, dict[str, NMPattern]]:
    """A deployable copy: SR-STE layers replaced by Linears holding W * E (masks refreshed first),
    and the patterns those layers had (empty for a dense model)."""
    model = copy.deepcopy(model)
    patterns = {n: layer.pattern for n, layer in srste_layers(model).items()}
    if patterns:
        refresh_masks(model)
        detach_srste(model)
        record_patterns(model, {n: str(p) for n, p in patterns.items()})
    return model.eval(), patterns


def run(spec: RunSpec, progress: bool = True) -> dict:
    """Train the stages of ``spec``; returns {"stages": [...per-stage metrics...], ...}."""
    cfg = spec.train
    rank, world = _dist()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = load_model(spec.model, task="sentiment")
    tokenizer = load_tokenizer(spec.model)
    splits = sentiment_splits()
    train = splits["train"].subset(cfg.train_examples)
    dev, test = splits["dev"].subset(cfg.eval_examples), splits["test"].subset(cfg.eval_examples)
    train_ids = _encode(tokenizer, train.texts, cfg.max_length)
    labels = torch.tensor(train.labels)

    first = spec.stages[0]
    sparse = first.pattern is not None
    if sparse:
        attach_srste(model, dataclasses.replace(spec.layers, pattern=first.pattern).layers(model), cfg.lambda_w)
    opt = _optimizer(model, cfg)

    step, history = 0, []
    ckpt = out / "checkpoint"
    for folder in [ckpt, *(out / f"candidate-{stage.name}" for stage in spec.stages)]:
        recover_dir(folder)   # a kill during a write: back to the last whole folder, leftovers deleted
    if ckpt.exists():
        resume_stage = spec.stage_at(json.loads((ckpt / "trainer.json").read_text())["step"])
        for layer in srste_layers(model).values():  # masks and parents come with the state dict
            layer.pattern = NMPattern.parse(spec.stages[resume_stage].pattern)
        step, history = load_checkpoint(ckpt, model, opt)
        if rank == 0:
            console.print(f"resumed {out} at step {step}/{spec.total_steps}")
    if rank == 0:
        with atomic_path(out / "run.json") as tmp:
            tmp.write_text(json.dumps({**spec.to_dict(), "world_size": world}, indent=1))
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    model.train()

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress or rank != 0) as bar:
        task = bar.add_task("train", total=spec.total_steps, completed=step, info="")
        stage_time = time.perf_counter()
        while step < spec.total_steps:
            s = spec.stage_at(step)
            stage = spec.stages[s]
            start = spec.stage_start(s)
            flips = refresh_masks(model) if sparse and step % cfg.mask_every == 0 else 0
            for group in opt.param_groups:
                group["lr"] = lr_at(step - start, stage.steps, cfg)
            idx = batch_indices(step, len(train), cfg)[rank::world]
            batch = _collate([train_ids[i] for i in idx], tokenizer.pad_token_id)
            loss = nn.functional.cross_entropy(ddp(**batch).logits, labels[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(task, advance=1, description=f"train {stage.name}", info=f"loss {loss.item():.3f} flips {flips}")

            stage_end = step == start + stage.steps
            if stage_end:  # evaluate, save the candidate, inherit
                elapsed = time.perf_counter() - stage_time
                if rank == 0:
                    cand, patterns = candidate(model)
                    folder = out / f"candidate-{stage.name}"
                    metrics = {"stage": stage.name, "pattern": stage.pattern, "steps": stage.steps,
                               "train_seconds": round(elapsed, 1), "end_step": step,
                               "dev_acc": accuracy(cand, tokenizer, dev, progress=False),
                               "test_acc": accuracy(cand, tokenizer, test, progress=False)}
                    if patterns:
                        save_packed(cand, folder, patterns, "float32", tokenizer=tokenizer, overwrite=True)
                    else:
                        with atomic_dir(folder) as tmp, quiet_transformers():
                            cand.save_pretrained(tmp)
                            tokenizer.save_pretrained(tmp)
                    history.append(metrics)
                    bar.console.print(f"stage {stage.name}: dev {metrics['dev_acc']:.4f} test {metrics['test_acc']:.4f} "
                                      f"({elapsed:.0f} s)")
                if s + 1 < len(spec.stages):
                    nxt = NMPattern.parse(spec.stages[s + 1].pattern)
                    inside = [layer.inherit(nxt, nested=cfg.nested) for layer in srste_layers(model).values()]
                    if rank == 0:
                        history[-1]["next_mask_inside"] = sum(inside) / len(inside)
                stage_time = time.perf_counter()
            if stage_end or step % cfg.checkpoint_every == 0:
                if rank == 0:
                    save_checkpoint(ckpt, model, opt, step, history)
                if world > 1:
                    dist.barrier()
    result = {"run": spec.to_dict(), "world_size": world, "stages": history}
    if rank == 0:
        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result
