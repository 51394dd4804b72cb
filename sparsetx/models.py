"""Loading Hugging Face models offline: the embedded MiniLM, any model folder, or a packed folder."""
from __future__ import annotations

import os
from pathlib import Path

# Nothing is ever fetched from a hub: every load below is from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel  # noqa: E402

from .data.assets import minilm_path  # noqa: E402

DEFAULT_MODEL = "minilm"


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """``None`` or ``"minilm"`` -> the embedded all-MiniLM-L6-v2 folder; anything else is a folder."""
    if model is None or str(model) == DEFAULT_MODEL:
        return minilm_path()
    path = Path(model)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json); "
                                f"pass a folder or {DEFAULT_MODEL!r} for the embedded default")
    return path


def model_class(config: PretrainedConfig, task: str | None = None):
    """The transformers class that the config names, or the Auto class for ``task``."""
    if task == "sentiment":
        return transformers.AutoModelForSequenceClassification
    if task == "causal-lm":
        return transformers.AutoModelForCausalLM
    for arch in config.architectures or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    return transformers.AutoModel


def load_model(model: str | os.PathLike | None = None, task: str | None = None, num_labels: int = 2,
               **kwargs) -> PreTrainedModel:
    """Load a dense or packed (sparsetx) model folder on the CPU in fp32, eval mode."""
    from .formats.folder import is_packed_folder, load_packed

    path = resolve_model_path(model)
    if is_packed_folder(path):
        return load_packed(path)
    config = AutoConfig.from_pretrained(path)
    cls = model_class(config, task)
    extra = {"num_labels": num_labels} if task == "sentiment" else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a fresh task head is expected, not a warning
    transformers.logging.disable_progress_bar()
    try:
        loaded = cls.from_pretrained(path, dtype=torch.float32, **extra, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    return loaded.eval()


def load_tokenizer(model: str | os.PathLike | None = None):
    path = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return AutoTokenizer.from_pretrained(minilm_path())
