"""Training on the real default model (SmolLM2-135M-Instruct): full fp32 fine-tuning matches transformers'
LlamaForCausalLM trained with torch's AdamW on the same batches, and supervised masks on its own chat template."""

import json

import pytest
import torch
import torch.nn.functional as F

from slmkit.loader import default_model_path, load
from slmkit.train import NextTokenLoss, TrainConfig, train
from slmkit.train.data import Sequences, TrainData, load_data, supervised_tokens, text_sequences
from slmkit.train.objectives import IGNORE

pytestmark = pytest.mark.slow
STEPS, BATCH, SEQ = 10, 2, 64


def test_ten_fp32_steps_match_transformers_with_torch_adamw():
    transformers = pytest.importorskip("transformers")
    ours = load()
    seqs, _ = text_sequences("wikitext2-valid", ours.tokenizer, SEQ)
    data = TrainData(Sequences(seqs.ids[:STEPS * BATCH]), None, {"digest": "fixed"})
    cfg = TrainConfig(lr=1e-4, schedule="constant", clip=None, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
                      micro_batch=BATCH, seq_len=SEQ, max_steps=STEPS, seed=0)
    batches = [data.step_batches(step * BATCH, BATCH, 1, seed=cfg.seed)[0] for step in range(STEPS)]
    mine = [row[1] for row in train(ours.model, data, cfg, show=False).loss_curve]
    del ours
    path = default_model_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32, attn_implementation="sdpa")
    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0)
    theirs = []
    for batch in batches:
        logits = ref(input_ids=batch.inputs).logits  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        theirs.append(loss.item())
    assert theirs[-1] < theirs[0]  # it trains: the check below compares two moving trajectories
    rel = [abs(a - b) / b for a, b in zip(mine, theirs)]
    assert max(rel) < 1e-3, list(zip(mine, theirs))


def test_supervised_masks_on_the_default_chat_template(tmp_path):
    tok = load().tokenizer
    end = tok.eos_token_id
    assert tok.stop_ids() == {end} and tok.token(end) == "<|im_end|>"  # EOS ends the turn and pads the batch
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    ids, mask = supervised_tokens(tok, messages, tok.stop_ids())
    trained = tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m], skip_special=False)
    assert trained == "Hello! How can I help?<|im_end|>Blue.<|im_end|>"
    assert ids.tolist() == tok.encode(tok.render_chat(messages, add_generation_prompt=False))
    records = [{"messages": messages}, {"messages": messages[:2]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    data = load_data(str(tmp_path / "c.jsonl"), tok, 256, eval_spec=str(tmp_path / "c.jsonl"))
    batch = data.train.batch([0, 1])  # row 1 is shorter: padded with EOS ids that do not count
    assert (batch.inputs[1, len(data.train.ids[1]) - 1:] == end).all()
    assert (batch.labels == end).sum(1).tolist() == [2, 1]  # each reply's <|im_end|> counts, padding never
