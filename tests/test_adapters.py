"""Adapters on tiny models: LoRA's math, its verbs and refusals; QLoRA on packed bases (no float copy kept, the
gradient through the dequantized product); prompt tuning through the KV cache; merging; PEFT parity both ways
(transformers + peft against slmkit, logits within 1e-4) on every family the converter tables hold."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slmkit.adapters import (LoRAConfig, LoRALinear, PromptTuningConfig, apply_lora_, apply_prompt_tuning_,
                             load_adapted, load_adapter_, lora_modules, merge_lora_, save_adapter, targets)
from slmkit.adapters.lora import lora_delta
from slmkit.adapters.merge import merge_measured_
from slmkit.backends import load
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.model import Decoder
from slmkit.modules import LayerFilter
from slmkit.quant import RTNConfig
from slmkit.quant.packed import PackedProduct, QuantLinear
from slmkit.quant.scheme import QScheme
from slmkit.train.init import init_weights_

from conftest import hf_folder, tokens

VOCAB = 64


def tiny(seed: int = 0, **kw) -> Decoder:
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                max_seq_len=64), **kw})
    return init_weights_(Decoder(cfg), seed).eval()


def randomize_lora_(model, seed: int = 1, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name == "prompt":
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def ids(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


# ---- LoRA math and verbs -------------------------------------------------------------------------
def test_lora_linear_is_base_plus_scaled_low_rank_product():
    base = torch.nn.Linear(16, 24, bias=True)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    randomize_lora_(layer)
    x = torch.randn(3, 5, 16)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = base(x) + 2.0 * (x @ A.T) @ B.T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(lora_delta(A, B, 2.0), 2.0 * B @ A)
    assert LoRALinear(base, 4, 8.0, rslora=True).scaling == pytest.approx(8.0 / 2.0)
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_fresh_adapters_leave_the_model_unchanged_and_only_they_train():
    model = tiny()
    x = ids()
    before = model(x)
    names = apply_lora_(model, LoRAConfig(rank=4))
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(model(x), before)  # B starts at zero
    model.train()
    (model(x[:, :-1], labels=x[:, 1:])).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_" in n for n in trained)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("lora_B.weight"))


def test_targets_select_by_the_layer_filter():
    model = tiny()
    names = apply_lora_(model, LoRAConfig(rank=2, layers=targets("q_proj,v_proj")))
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    model = tiny()
    assert apply_lora_(model, LoRAConfig(rank=2, layers=LayerFilter(("blocks.1.mlp.*",)))) == [
        "blocks.1.mlp.gate_proj", "blocks.1.mlp.up_proj", "blocks.1.mlp.down_proj"]


@pytest.mark.parametrize("cfg, message", [
    (LoRAConfig(rank=0), "positive integer"),
    (LoRAConfig(rank=17), r"exceeds blocks.0.attn.k_proj's smaller side \(16\)"),
    (LoRAConfig(rank=2, layers=targets("qkv_proj")), "match no linear layer"),
    (LoRAConfig(rank=2, alpha=-1.0), "alpha must be positive"),
    (LoRAConfig(rank=2, dropout=1.0), "dropout"),
])
def test_lora_refusals(cfg, message):
    model = tiny()
    with pytest.raises(SlmError, match=message):
        apply_lora_(model, cfg)
    assert not lora_modules(model)


def test_adapters_are_not_stacked():
    model = tiny()
    apply_lora_(model, LoRAConfig(rank=2))
    with pytest.raises(SlmError, match="already has LoRA"):
        apply_lora_(model, LoRAConfig(rank=2))


def test_merge_into_a_float_base_is_exact():
    model = tiny()
    apply_lora_(model, LoRAConfig(rank=4))
    randomize_lora_(model)
    x = ids()
    with torch.no_grad():
        adapted = model(x)
        merged_names = merge_lora_(model)
        merged = model(x)
    assert len(merged_names) == 14 and not lora_modules(model)
    assert all(type(model.get_submodule(n)).__name__ == "Linear" for n in merged_names)
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=1e-5)


# ---- QLoRA: LoRA on packed weights ------------------------------------------------------------------
def packed_tiny(bits: int = 4) -> Decoder:
    model = tiny()
    RTNConfig(scheme=QScheme(bits, 16), embedding=None).apply_(model, None)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_keeps_the_base_packed_and_trains_through_it(bits):
    model = packed_tiny(bits)
    packed_bytes = sum(b.numel() for b in model.buffers())
    apply_lora_(model, LoRAConfig(rank=4))
    assert all(isinstance(m.base, QuantLinear) for _, m in lora_modules(model))
    assert sum(b.numel() for b in model.buffers()) == packed_bytes  # nothing dequantized and kept
    assert not any(p.dim() == 2 and p.shape[0] in (32, 64) and "lora" not in n and "embed" not in n
                   for n, p in model.named_parameters())  # no float block matrix anywhere
    model.train()
    x = ids()
    model(x[:, :-1], labels=x[:, 1:]).backward()
    assert all(m.lora_B.weight.grad is not None and m.lora_B.weight.grad.abs().sum() > 0 for _, m in lora_modules(model))


def test_packed_product_gradient_equals_the_dequantized_matmul_and_saves_no_matrix():
    model = packed_tiny()
    layer = model.blocks[0].mlp.up_proj  # [64, 32], packed
    W = layer.dequantize()
    x = torch.randn(3, 7, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert tuple(W.shape) not in saved  # autograd keeps the module, not a float copy of its matrix
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, W).backward(g)
    assert torch.allclose(y, F.linear(x.detach(), W), atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = PackedProduct.apply(x, layer)
    assert yb.dtype == torch.bfloat16


def test_merge_into_a_packed_base_requantizes_in_its_scheme_and_measures_the_cost():
    model = packed_tiny(4)
    apply_lora_(model, LoRAConfig(rank=4))
    randomize_lora_(model, scale=0.05)
    x = ids(16)
    result = merge_measured_(model, x)
    up = model.blocks[0].mlp.up_proj
    assert isinstance(up, QuantLinear) and up.scheme == QScheme(4, 16)
    assert result["modules"] == 14 and result["packed_bases"] == 14 and result["kl_tokens"] == x.numel()
    assert 0 < result["kl_mean"] < 0.05 and result["top1_agreement"] > 0.8


# ---- prompt tuning ------------------------------------------------------------------------------
def test_prompt_tuning_prepends_virtual_tokens_and_the_cache_agrees():
    model = tiny()
    apply_prompt_tuning_(model, PromptTuningConfig(5))
    randomize_lora_(model)
    x = ids(10)
    with torch.no_grad():
        out = model(x)  # [2, 10, V]
        # the same computation by hand: the virtual rows before the embedded tokens, outputs after them
        h = torch.cat([model.prompt.expand(2, -1, -1), model.embed(x)], 1)
        h = model.norm(model.run_blocks(h, None, 0))[:, 5:]
        assert torch.allclose(out, model.project(h), atol=1e-5)
        cache = model.new_cache(2, 10)
        steps = [model(x[:, :6], cache, 0)] + [model(x[:, i:i + 1], cache, i) for i in range(6, 10)]
        assert torch.allclose(torch.cat(steps, 1), out, atol=1e-5)
    assert cache.max_len == 15


def test_only_the_prompt_trains():
    model = tiny()
    apply_prompt_tuning_(model, PromptTuningConfig(3))
    model.train()
    x = ids()
    for p in model.parameters():
        p.requires_grad_(False)
    model.prompt.requires_grad_(True)
    model(x[:, :-1], labels=x[:, 1:]).backward()
    assert model.prompt.grad.abs().sum() > 0
    with pytest.raises(SlmError, match="positive number"):
        apply_prompt_tuning_(tiny(), PromptTuningConfig(0))


# ---- PEFT parity (transformers + peft on the same base) ------------------------------------------------
FAMILIES = ["smollm", "llama", "qwen2", "gemma3"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    for name in FAMILIES:
        hf_folder(name, root / name)
    return {name: root / name for name in FAMILIES}


def fresh_hf(folder: Path):
    """transformers' model of the folder, loaded anew (PEFT changes the model it wraps in place)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


def _peft_logits(base: Path, folder: Path, x: torch.Tensor, skip: int = 0) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(fresh_hf(base), str(folder)).eval()(input_ids=x).logits[:, skip:]


@pytest.mark.parametrize("family", FAMILIES)
def test_our_lora_files_give_peft_our_logits(family, bases, tmp_path):
    pytest.importorskip("peft")
    folder = bases[family]
    lm = load(str(folder))
    apply_lora_(lm.model, LoRAConfig(rank=4, alpha=6.0))
    randomize_lora_(lm.model, scale=0.1)
    out = save_adapter(lm.model, tmp_path / "lora", str(folder), [])
    x = tokens(14)
    with torch.no_grad():
        ours = lm.model(x)
    assert torch.allclose(ours, _peft_logits(folder, out, x), atol=1e-4, rtol=0)
    reloaded = load(str(out))  # base + adapter, through the loader's folder readers
    with torch.no_grad():
        assert torch.equal(reloaded.model(x), ours)
        cache = reloaded.model.new_cache(1, 14)  # and through the KV cache
        stepwise = torch.cat([reloaded.model(x[:, :9], cache, 0)] +
                             [reloaded.model(x[:, i:i + 1], cache, i) for i in range(9, 14)], 1)
    assert torch.allclose(stepwise, ours, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_adapter_peft_made_gives_slmkit_its_logits(family, bases, tmp_path):
    peft = pytest.importorskip("peft")
    folder = bases[family]
    model = peft.get_peft_model(fresh_hf(folder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                                                    task_type="CAUSAL_LM", use_rslora=family == "llama"))
    randomize_lora_(model, scale=0.1)
    model.save_pretrained(tmp_path / "peft")
    x = tokens(14)
    with torch.no_grad():
        theirs = model(input_ids=x).logits
    ours = load_adapted(tmp_path / "peft", base=str(folder))
    with torch.no_grad():
        assert torch.allclose(ours.model(x), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["smollm", "gemma3"])
def test_prompt_tuning_files_match_peft_both_ways(family, bases, tmp_path):
    peft = pytest.importorskip("peft")
    folder = bases[family]
    lm = load(str(folder))
    apply_prompt_tuning_(lm.model, PromptTuningConfig(4))
    out = save_adapter(lm.model, tmp_path / "pt", str(folder), [])
    x = tokens(10)
    with torch.no_grad():
        assert torch.allclose(lm.model(x), _peft_logits(folder, out, x, skip=4), atol=1e-4, rtol=0)
    theirs = peft.get_peft_model(fresh_hf(folder), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    theirs.save_pretrained(tmp_path / "peft-pt")
    with torch.no_grad():
        expected = theirs.eval()(input_ids=x).logits[:, 3:]
        assert torch.allclose(load_adapted(tmp_path / "peft-pt", base=str(folder)).model(x), expected, atol=1e-4)


def test_an_adapter_for_another_base_is_refused(bases, tmp_path):
    lm = load(str(bases["smollm"]))
    apply_lora_(lm.model, LoRAConfig(rank=2))
    out = save_adapter(lm.model, tmp_path / "a", str(bases["smollm"]), [])
    other = load(str(bases["qwen2"])).model
    with pytest.raises(SlmError, match="made for another base"):
        load_adapter_(other, out)
    (out / "slmkit_adapter.json").unlink()  # as PEFT would have written it: shapes decide
    with pytest.raises(SlmError, match="another base"):
        load_adapter_(tiny(dim=64, n_layers=3, vocab_size=300), out)
    with pytest.raises(SlmError, match="made for another base|fits no module"):
        load_adapter_(load(str(bases["qwen2"])).model, out)


def test_corrupt_adapter_files_are_one_line_errors(bases, tmp_path):
    lm = load(str(bases["smollm"]))
    apply_lora_(lm.model, LoRAConfig(rank=2))
    out = save_adapter(lm.model, tmp_path / "a", str(bases["smollm"]), [])
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SlmError, match="corrupt or truncated"):
        load(str(out))
    (out / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(SlmError, match="not valid JSON"):
        load(str(out))


# ---- DoRA -------------------------------------------------------------------------------------------
def test_dora_starts_at_the_base_merges_exactly_and_trains_its_magnitude():
    model = tiny()
    x = ids()
    with torch.no_grad():
        before = model(x)
    apply_lora_(model, LoRAConfig(rank=4, dora=True))
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)  # m = ||W||: the fresh adapter changes nothing
    randomize_lora_(model)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_magnitude_vector.mul_(1.3)
    model.train()
    model(x[:, :-1], labels=x[:, 1:]).backward()
    assert all(m.lora_magnitude_vector.grad is not None for _, m in lora_modules(model))
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        merge_lora_(model)
        assert torch.allclose(model(x), adapted, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", ["smollm", "qwen2"])
def test_dora_files_match_peft_both_ways(family, bases, tmp_path):
    peft = pytest.importorskip("peft")
    folder = bases[family]
    lm = load(str(folder))
    apply_lora_(lm.model, LoRAConfig(rank=4, alpha=8.0, dora=True))
    randomize_lora_(lm.model, scale=0.1)
    out = save_adapter(lm.model, tmp_path / "dora", str(folder), [])
    x = tokens(12)
    with torch.no_grad():
        assert torch.allclose(lm.model(x), _peft_logits(folder, out, x), atol=1e-4, rtol=0)
    made = peft.get_peft_model(fresh_hf(folder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"],
                                                                  task_type="CAUSAL_LM", use_dora=True))
    randomize_lora_(made, scale=0.1)
    made.save_pretrained(tmp_path / "peft-dora")
    with torch.no_grad():
        expected = made(input_ids=x).logits
        assert torch.allclose(load_adapted(tmp_path / "peft-dora", base=str(folder)).model(x), expected, atol=1e-4)
