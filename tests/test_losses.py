"""slmkit.losses.linear_cross_entropy against the plain projection + F.cross_entropy it replaces."""

import pytest
import torch
import torch.nn.functional as F

from slmkit.losses import IGNORE, linear_cross_entropy


def reference(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE, reduction="sum")


def inputs(n=37, c=16, v=101, seed=0, masked=(3, 4, 20)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(v, c, generator=gen)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[list(masked)] = IGNORE
    return hidden, weight, labels


def grads(fn, hidden, weight, labels):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, labels)
    (2.5 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 1000])
def test_loss_and_gradients_equal_the_plain_projection_and_cross_entropy(chunk):
    hidden, weight, labels = inputs()
    ref = grads(reference, hidden, weight, labels)
    got = grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk), hidden, weight, labels)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_masked_rows_get_no_gradient_and_add_no_loss():
    hidden, weight, labels = inputs(masked=(0, 1, 2))
    _, grad_h, _ = grads(lambda h, w, y: linear_cross_entropy(h, w, y, 4), hidden, weight, labels)
    assert torch.count_nonzero(grad_h[:3]) == 0 and torch.count_nonzero(grad_h[3:]) > 0
    all_masked = torch.full_like(labels, IGNORE)
    assert linear_cross_entropy(hidden, weight, all_masked).item() == 0.0


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_builds_no_graph():
    hidden, weight, labels = inputs()
    h = hidden.detach().clone().requires_grad_()
    linear_cross_entropy(h, weight.detach(), labels).backward()
    torch.testing.assert_close(h.grad, torch.autograd.grad(reference(hidden, weight.detach(), labels), hidden)[0],
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden, weight, labels).detach(), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_autocast_reference_within_bf16_precision():
    hidden, weight, labels = inputs(n=64, c=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads(reference, hidden, weight, labels)
        got = grads(lambda h, w, y: linear_cross_entropy(h, w, y, 16), hidden, weight, labels)
    assert all(t.dtype == torch.float32 for t in got)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(got[1:], ref[1:]):
        assert (a - b).norm() / b.norm() < 2e-2


@pytest.mark.parametrize("fields", [dict(), dict(tie_embeddings=False), dict(sliding_window=4, sliding_layers=[True, False])])
def test_decoder_loss_with_labels_equals_cross_entropy_of_its_logits(fields):
    from slmkit.config import ModelConfig
    from slmkit.model import Decoder

    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                max_seq_len=64, **fields))
    tokens = torch.randint(0, 97, (3, 12))
    labels = torch.randint(0, 97, (3, 12))
    labels[0, :5] = IGNORE
    ref = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(model(tokens, labels=labels), ref, rtol=1e-5, atol=1e-5)
