"""Quantization math as pure functions: parameters, codes, round trips, scale search, packing, GPTQ's sweep."""

import itertools

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.quant.gptq import GPTQConfig, gptq_quantize, layer_objective, refit_params
from slmkit.quant.scheme import (QScheme, dequantize_weight, fp16_round, grouped, pack, packed_width, qparams,
                                 quantize_per_tensor, quantize_weight, search_qparams, unpack)

SCHEMES = [QScheme(b, g, s) for b, g, s in itertools.product(range(2, 9), (0, 16, 32), (True, False))]


def weights(out=24, inp=64, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_round_trip_error_is_bounded_by_half_a_step(scheme):
    w = weights()
    codes, scale, offset = quantize_weight(w, scheme, search=False)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= scheme.qmax
    assert scale.shape == (24, 64 // scheme.width(64))
    err = (dequantize_weight(codes, scale, offset, scheme) - w).abs()
    step = grouped(scale.abs()[..., None].expand(-1, -1, scheme.width(64)).reshape(24, 64), 64)[:, 0]
    # symmetric grids saturate the side opposite the peak at one step short of it: allow one full step there
    assert (err <= step * (1.0 if scheme.symmetric else 0.5) + 1e-6).all()


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_peak_maps_exactly_onto_the_lowest_code(bits):
    scheme = QScheme(bits, 32, True)
    w = weights(4, 32)
    codes, scale, _ = quantize_weight(w, scheme, search=False)
    peak = w.abs().argmax(1)
    assert (codes[torch.arange(4), peak] == 0).all()  # the largest magnitude uses the extreme code
    assert torch.equal(scale, fp16_round(scale))  # scales are exactly representable in float16


def test_asymmetric_covers_min_and_max_and_offsets_are_fp16():
    scheme = QScheme(4, 32, False)
    w = weights(4, 32) + 3.0  # all positive: a symmetric grid would waste half its codes
    codes, scale, offset = quantize_weight(w, scheme, search=False)
    assert torch.equal(offset, fp16_round(offset)) and codes.min() == 0 and codes.max() == 15
    sym = quantize_weight(w, QScheme(4, 32, True), search=False)
    err = lambda c, s, o, sch: (dequantize_weight(c, s, o, sch) - w).pow(2).mean()  # noqa: E731
    assert err(codes, scale, offset, scheme) < 0.5 * err(*sym, QScheme(4, 32, True))


def test_zero_group_gets_a_unit_scale_and_stays_zero():
    w = torch.zeros(2, 32)
    for sym in (True, False):
        codes, scale, offset = quantize_weight(w, QScheme(4, 32, sym))
        assert torch.equal(dequantize_weight(codes, scale, offset, QScheme(4, 32, sym)), w)
        assert (scale == 1).all()


def test_per_tensor_uses_one_scale():
    w = weights()
    codes, scale, offset = quantize_per_tensor(w, QScheme(8, 0, True))
    assert scale.shape == (1,) and offset is None and codes.shape == w.shape
    assert ((scale * (codes.float() - 128) - w).abs() <= scale.abs()).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_search_never_worse_than_rtn_and_usually_better(bits):
    scheme = QScheme(bits, 32, True)
    torch.manual_seed(3)
    w = torch.distributions.Laplace(0.0, 1.0).sample((64, 128))  # heavy-ish tails, like trained weights
    g = grouped(w, 32)
    base = (dequantize_weight(*quantize_weight(w, scheme, search=False), scheme) - w).pow(2).sum(-1)
    found = (dequantize_weight(*quantize_weight(w, scheme, search=True), scheme) - w).pow(2).sum(-1)
    assert (found <= base + 1e-6).all() and found.sum() < 0.94 * base.sum()  # measured 0.83 / 0.87 / 0.93
    s, o = search_qparams(g, scheme)
    assert s.shape == (64, 4, 1) and o is None


def test_importance_weighting_protects_important_columns():
    scheme = QScheme(3, 32, True)
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(4)) ** 3
    importance = torch.ones(32)
    importance[:4] = 100.0
    err = lambda imp: (dequantize_weight(*quantize_weight(w, scheme, imp), scheme) - w)[:, :4].pow(2).sum()  # noqa
    assert err(importance) < err(None)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip_and_bytes(bits):
    codes = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 64 * bits // 8) == (5, packed_width(64, bits))  # exactly `bits` bits a code
    assert torch.equal(unpack(packed, bits), codes)


def test_three_bit_stream_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(c << (3 * k) for k, c in enumerate(codes[0].tolist()))
    assert pack(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]
    with pytest.raises(SlmError, match="multiple of 8"):
        pack(torch.zeros(1, 12, dtype=torch.uint8), 3)


def test_four_bit_layout_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43]]


def test_bad_schemes_are_refused():
    for bad in (QScheme(1, 32), QScheme(9, 32), QScheme(4, -1)):
        with pytest.raises(SlmError, match="bits|group"):
            bad.validate()
    with pytest.raises(SlmError, match="does not divide"):
        QScheme(4, 48).validate(64)


def test_qparams_shapes():
    s, o = qparams(torch.randn(3, 2, 8), QScheme(4, 8, False))
    assert s.shape == o.shape == (3, 2, 1)


# ---- GPTQ's core -------------------------------------------------------------------------------------
def correlated_inputs(n=2048, width=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen) / width ** 0.5 + torch.eye(width)
    X = torch.randn(n, width, generator=gen) @ mix
    X[:, :3] *= 8  # a few outlier channels, as real activations have
    return X


def output_error(W, X, codes, scale, offset, scheme):
    return ((X @ W.T - X @ dequantize_weight(codes, scale, offset, scheme).T) ** 2).mean().item()


@pytest.mark.parametrize("act_order,static,sym", [(True, False, True), (False, False, True), (False, True, True),
                                                   (True, False, False), (False, False, False)])
def test_gptq_beats_rtn_on_the_layer_objective(act_order, static, sym):
    scheme = QScheme(3, 16, sym)
    W, X = weights(48, 64, seed=5), correlated_inputs()
    H = 2 * X.T @ X / len(X)
    rtn = output_error(W, X, *quantize_weight(W, scheme), scheme)
    gptq = output_error(W, X, *gptq_quantize(W, H, GPTQConfig(scheme, act_order=act_order,
                                                        static_groups=static, block_size=32)), scheme)
    assert gptq < 0.75 * rtn


def test_gptq_with_identity_hessian_is_rtn():
    scheme = QScheme(4, 16, True)
    W = weights(8, 32, seed=6)
    codes, scale, _ = gptq_quantize(W, torch.eye(32), GPTQConfig(scheme, damp=0.0, act_order=False))
    rtn_codes, rtn_scale, _ = quantize_weight(W, scheme, search=False)
    assert torch.equal(codes, rtn_codes) and torch.equal(scale, rtn_scale)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_search_weighs_the_hessian_diagonal(act_order):
    """With a diagonal Hessian no error moves between columns, so GPTQ's scale search is RTN's search weighted
    by that diagonal (an imatrix): the same codes, and a weighted error no larger than the range's scales."""
    scheme = QScheme(4, 16, True)
    W = weights(8, 64, seed=8)
    d = torch.rand(64, generator=torch.Generator().manual_seed(2)) * 4 + 0.1
    codes, scale, _ = gptq_quantize(W, torch.diag(d), GPTQConfig(scheme, damp=0.0, act_order=act_order, search=True))
    want_codes, want_scale, _ = quantize_weight(W, scheme, importance=d, search=True)
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
    plain = gptq_quantize(W, torch.diag(d), GPTQConfig(scheme, damp=0.0, act_order=act_order))
    weighted = lambda c, s: (d * (dequantize_weight(c, s, None, scheme) - W) ** 2).sum()  # noqa: E731
    assert weighted(codes, scale) < weighted(plain[0], plain[1])


@pytest.mark.parametrize("sym", [True, False])
def test_refit_solves_each_rows_least_squares_exactly(sym):
    """refit_params against an explicit weighted least squares over one row's basis (before float16 rounding,
    which moves each parameter by at most half a float16 step)."""
    scheme = QScheme(3, 16, sym)
    W, X = weights(6, 64, seed=9), correlated_inputs()
    H = 2 * X.T @ X / len(X)
    codes, scales, offsets = quantize_weight(W, scheme, search=False)
    new_s, new_o = refit_params(W, H, codes, scales, offsets, scheme, rows=4)  # two row chunks
    L = torch.linalg.cholesky(H.double())  # objective = |L^T (w - V p)|^2
    for r in range(6):
        V = torch.zeros(64, 4 * (1 if sym else 2), dtype=torch.float64)  # [n, parameters]
        for g in range(4):
            cols = slice(16 * g, 16 * g + 16)
            if sym:
                V[cols, g] = codes[r, cols].double() - scheme.mid
            else:
                V[cols, 2 * g], V[cols, 2 * g + 1] = codes[r, cols].double(), 1.0
        p = torch.linalg.lstsq(L.T @ V, L.T @ W[r].double()[:, None]).solution[:, 0]
        got = new_s[r] if sym else torch.stack([new_s[r], new_o[r]], -1).reshape(-1)
        assert torch.allclose(got.double(), p, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_refit_rounds_never_raise_the_layer_objective(sym):
    scheme = QScheme(4, 16, sym)
    W, X = weights(32, 64, seed=10), correlated_inputs()
    H = 2 * X.T @ X / len(X)
    errors = []
    for rounds in (0, 1, 3):
        cfg = GPTQConfig(scheme, refit=rounds)
        damped = H + cfg.damp * torch.diag(H).mean() * torch.eye(64)
        errors.append(layer_objective(W, damped, gptq_quantize(W, H, cfg), scheme))
    assert errors[2] <= errors[1] < 0.99 * errors[0]  # measured: 2-5% lower with 1 round


def test_gptq_refit_keeps_pruned_zeros():
    scheme = QScheme(4, 16, True)
    W, X = weights(8, 32, seed=11), correlated_inputs(512, 32)
    keep = torch.rand(8, 32, generator=torch.Generator().manual_seed(3)) < 0.5
    codes, scale, _ = gptq_quantize(W, 2 * X.T @ X / len(X), GPTQConfig(scheme, refit=2), keep_zero=keep)
    assert (dequantize_weight(codes, scale, None, scheme)[keep] == 0).all()


def test_gptq_dead_inputs_and_keep_zero():
    scheme = QScheme(4, 16, True)
    W, X = weights(8, 32, seed=7), correlated_inputs(512, 32)
    X[:, 5] = 0  # an input that is never active
    keep = torch.rand(8, 32, generator=torch.Generator().manual_seed(1)) < 0.5
    codes, scale, _ = gptq_quantize(W, 2 * X.T @ X / len(X), GPTQConfig(scheme), keep_zero=keep)
    deq = dequantize_weight(codes, scale, None, scheme)
    assert (deq[keep] == 0).all() and (deq[:, 5] == 0).all()
    with pytest.raises(SlmError, match="symmetric"):
        gptq_quantize(W, torch.eye(32), GPTQConfig(QScheme(4, 16, False)), keep_zero=keep)
