"""Adapters on the real default model (SmolLM2-135M-Instruct): our LoRA folder gives PEFT on transformers'
LlamaForCausalLM (read from the same GGUF) our logits within 1e-4, and PEFT's own adapter gives slmkit its
logits; LoRA trained on the packed int4 base keeps the base packed."""

import pytest
import torch

from slmkit.adapters import LoRAConfig, apply_lora_, load_adapted, save_adapter
from slmkit.loader import default_model_path, load

pytestmark = pytest.mark.slow


def reference():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32, attn_implementation="sdpa").eval()


def randomize_lora_(model, scale: float = 0.02) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def test_lora_on_the_default_model_matches_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    lm = load()
    apply_lora_(lm.model, LoRAConfig(rank=8, alpha=16.0))
    randomize_lora_(lm.model)
    folder = save_adapter(lm.model, tmp_path / "ours", None, [])
    x = torch.tensor([lm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        ours = lm.model(x)
        theirs = peft.PeftModel.from_pretrained(reference(), str(folder)).eval()(input_ids=x).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - lm.model(torch.zeros_like(x))).abs().max() > 1  # the logits depend on the input at all
    made = peft.get_peft_model(reference(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            task_type="CAUSAL_LM"))
    randomize_lora_(made)
    made.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = made(input_ids=x).logits
        got = load_adapted(tmp_path / "peft", base="smollm2-135m").model(x)
    assert (got - expected).abs().max() < 1e-4
