"""slmkit's C kernels for packed 8- and 4-bit weights (kernels.packed_matmul) against torch on the dequantized
matrix, and when they step aside."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slmkit import kernels
from slmkit.quant.packed import quantized_linear
from slmkit.quant.scheme import QScheme, dequantize_weight, quantize_weight

IN = 384  # divisible by every group size below
GROUPS = (32, 64, 128, 0, 24, 6)  # 0 = per channel; 24 and 6 are not multiples of the kernel's 16-byte step
OUTS = (37, 131)  # odd: rows split unevenly between threads
SCHEMES = [QScheme(b, g, s) for b, g, s in itertools.product((8, 4), GROUPS, (True, False))]

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: slmkit's kernels unavailable")


def packed_layer(scheme: QScheme, out: int, inp: int = IN, seed: int = 0):
    torch.manual_seed(seed)
    linear = nn.Linear(inp, out, bias=False)
    return quantized_linear(linear, *quantize_weight(linear.weight.data, scheme, search=False), scheme)


def inputs(rows: int, inp: int = IN, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, inp, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    """Run with 1 or 2 threads, with the parallel threshold lowered so these small layers really use 2."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_WEIGHTS", 0)
    yield request.param
    torch.set_num_threads(old)


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
@torch.no_grad()
def test_kernel_matches_torch_on_the_dequantized_matrix(scheme, threads):
    for out in OUTS:
        layer = packed_layer(scheme, out)
        w = layer.dequantize()
        for rows in range(1, kernels.MAX_ROWS + 1):
            x = inputs(rows)
            y = kernels.packed_matmul(x, layer)
            assert y is not None and y.shape == (rows, out) and y.dtype == torch.float32
            torch.testing.assert_close(y, F.linear(x, w), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_c_dequantizer_is_torchs_bit_for_bit(scheme, threads):
    """kernels.dequantize (prefill's matrix) equals scheme.dequantize_weight exactly; 3 bits step aside."""
    for out in OUTS:
        layer = packed_layer(scheme, out)
        want = dequantize_weight(layer.codes(), layer.scales, layer.offsets, scheme)
        got = kernels.dequantize(layer)
        assert got is not None and got.dtype == torch.float32 and torch.equal(got, want)
    assert kernels.dequantize(packed_layer(QScheme(3, 32, True), 5)) is None


@needs_kernels
@pytest.mark.parametrize("scheme", [QScheme(8, 32, True), QScheme(4, 32, False), QScheme(4, 0, True)],
                         ids=lambda s: s.describe().replace(" ", "-"))
@torch.no_grad()
def test_library_disabled_gives_the_same_result(scheme, monkeypatch):
    layer, x = packed_layer(scheme, 37), inputs(3)[None]  # [1, 3, in]
    fast = layer.matmul(x)
    monkeypatch.setattr(kernels, "library", lambda: None)  # what SLMKIT_KERNELS=0 gives
    assert kernels.packed_matmul(x, layer) is None
    torch.testing.assert_close(fast, layer.matmul(x), rtol=1e-4, atol=1e-4)
    assert fast.shape == (1, 3, 37)


@needs_kernels
@torch.no_grad()
def test_keeps_leading_dims_and_dtype():
    layer = packed_layer(QScheme(4, 32, True), 37)
    x = inputs(4).reshape(2, 2, IN).to(torch.bfloat16)
    y = kernels.packed_matmul(x, layer)
    assert y.shape == (2, 2, 37) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.float(), layer.dequantize()).to(torch.bfloat16))
    strided = inputs(3, 2 * IN)[:, ::2]  # not contiguous
    torch.testing.assert_close(kernels.packed_matmul(strided, layer), F.linear(strided, layer.dequantize()),
                               rtol=1e-4, atol=1e-4)


@needs_kernels
def test_steps_aside_where_it_does_not_apply():
    layer = packed_layer(QScheme(8, 32, True), 37)
    with torch.no_grad():
        assert kernels.packed_matmul(inputs(kernels.MAX_ROWS + 1), layer) is None  # prefill: torch's GEMM
        assert kernels.packed_matmul(inputs(1, IN + 2), layer) is None  # wrong width: torch raises, not the kernel
        with pytest.raises(RuntimeError):
            layer.matmul(inputs(1, IN + 2))
        for bits in (2, 3):  # no kernel for these widths
            assert kernels.packed_matmul(inputs(1), packed_layer(QScheme(bits, 32, True), 37)) is None
        half = packed_layer(QScheme(8, 32, True), 37).to(torch.bfloat16)  # a model-wide cast converts the scales
        assert half.scales.dtype == torch.bfloat16 and kernels.packed_matmul(inputs(1), half) is None
    x = inputs(1).requires_grad_()
    assert kernels.packed_matmul(x, layer) is None  # autograd through the product
    assert torch.isfinite(layer.matmul(x)).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_small_matmul_still_matches_torch(dtype, threads):
    w = torch.randn(37, IN).to(dtype)
    most = kernels.MAX_ROWS_BF16 if dtype == torch.bfloat16 else kernels.MAX_ROWS
    for rows in (1, 5, kernels.MAX_ROWS, most):
        x = inputs(rows)[None]
        y = kernels.small_matmul(x, w)
        assert y.shape == (1, rows, 37)
        torch.testing.assert_close(y, F.linear(x, w.float()), rtol=1e-4, atol=1e-4)
    assert kernels.small_matmul(inputs(most + 1), w) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(dtype):
    """Rows go through the float kernel in groups of 8, 4 and 1; each row's result is bit for bit the same in
    any group (continuous batching and speculative verification rely on it: a request's logits do not change
    with what else is in the batch)."""
    from slmkit import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler")
    W = torch.randn(300, 577).to(dtype)  # 577: a tail past the last full group of lanes
    x = torch.randn(8, 577)
    full = kernels.small_matmul(x, W)
    for m in range(1, 9):
        assert torch.equal(kernels.small_matmul(x[:m].clone(), W), full[:m])
    alone = torch.stack([kernels.small_matmul(x[i:i + 1].clone(), W)[0] for i in range(8)])
    assert torch.equal(alone, full)
