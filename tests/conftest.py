"""Shared test helpers: offline hub, two torch threads, a tiny word-level tokenizer, random weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers  # noqa: E402

from slmkit.tokenizer import Tokenizer  # noqa: E402

torch.set_num_threads(2)

VOCAB = 300
SPECIALS = ("<unk>", "<s>", "</s>")


def tiny_backend(vocab_size: int = VOCAB) -> HFTokenizer:
    """A word-level tokenizer over "<unk> <s> </s> w3 w4 ...", one id per model vocabulary row."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIALS))
    return backend


def save_tiny_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """tokenizer.json + tokenizer_config.json, as a Hugging Face model folder has them."""
    tiny_backend(vocab_size).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture
def tokenizer() -> Tokenizer:
    return Tokenizer(tiny_backend(), bos_token_id=1, eos_token_id=2)


@torch.no_grad()
def randomize(module: torch.nn.Module, norm_center: float = 1.0, seed: int = 0) -> None:
    """Replace every parameter with random values large enough that masks, RoPE and norm offsets all matter:
    matrices N(0, 1.5/sqrt(fan_in)), vectors (biases, norm weights) around `norm_center`/0 with spread 0.3."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 1.0 if "embed" in name else 1.5 / p.shape[1] ** 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        else:
            center = norm_center if "norm" in name else 0.0
            p.copy_(center + 0.3 * torch.randn(p.shape, generator=gen))


def tokens(n: int, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    """A fixed random token sequence [1, n]."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- tiny random Hugging Face models, one per supported family ----------------------------------
SEQ = 24  # test sequence length; every sliding window below is shorter
WINDOW = 8
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
HF_FAMILIES = {
    # name: (transformers config class name, config fields, slmkit family)
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, num_key_value_heads=4, tie_word_embeddings=False,
                                  rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=16)), "llama"),
    "smollm": ("LlamaConfig", dict(num_hidden_layers=3, tie_word_embeddings=True,
                                   rope_parameters=dict(rope_type="default", rope_theta=100000.0)), "llama"),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, tie_word_embeddings=False,
                                  rope_parameters=dict(rope_type="default", rope_theta=1e6)), "qwen2"),
    "qwen2-sliding": ("Qwen2Config", dict(num_hidden_layers=3, tie_word_embeddings=True, use_sliding_window=True,
                                          sliding_window=WINDOW, max_window_layers=1), "qwen2"),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, head_dim=32, sliding_window=WINDOW,
                                      tie_word_embeddings=False), "mistral"),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24,
                                        sliding_window=WINDOW, hidden_activation="gelu_pytorch_tanh",
                                        layer_types=["sliding_attention", "full_attention",
                                                     "sliding_attention", "sliding_attention"],
                                        rope_parameters={"full_attention": dict(rope_type="default", rope_theta=2000.0),
                                                         "sliding_attention": dict(rope_type="default",
                                                                                   rope_theta=50.0)},
                                        tie_word_embeddings=True), "gemma3"),
}


def hf_model(name: str):
    """A tiny random transformers model of family `name` (fp32, eval mode, every weight randomised)."""
    import transformers

    config_cls, fields, family = HF_FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**_COMMON, **fields})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize(model, norm_center=0.0 if family == "gemma3" else 1.0)  # Gemma stores norm weights as w - 1
    return model.eval()


def hf_folder(name: str, folder: Path):
    """Save hf_model(name) with a tiny tokenizer into `folder`; return the transformers model."""
    model = hf_model(name)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return model
