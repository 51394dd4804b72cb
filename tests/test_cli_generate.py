"""``sparsetx generate`` on a tiny Llama folder: the policy flags reach the runtime, bad ones fail."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import needs_minilm
from sparsetx.cli import main


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsetx.models import load_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=48)).save_pretrained(folder)
    load_tokenizer("minilm").save_pretrained(folder)   # any tokenizer whose ids fit the vocabulary
    return folder


@needs_minilm
def test_generate_policy_flags(tiny_llama, tmp_path):
    stats = tmp_path / "s.json"
    argv = ["generate", "--model", str(tiny_llama), "--prompt", "one two three four five six seven eight nine",
            "--max-new-tokens", "4", "--spatten", "--kv-budget", "6", "--normalize", "--recent", "2",
            "--evict-after", "forward", "--stats", str(stats)]
    assert main(argv) == 0
    doc = json.loads(stats.read_text())
    assert doc["config"]["policy"] == {"recent": 2, "normalize": True} and doc["config"]["evict_after"] == "forward"
    assert all(s["tokens_after"] <= 6 for step in doc["steps"] for s in step)
    assert main(argv[:-2] + ["--policy", "window"]) == 2           # window takes no --normalize
    assert main(argv[:-2] + ["--policy", "lru"]) == 2
