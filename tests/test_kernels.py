"""Triton dequant-matmul kernels against the PyTorch reference: in Triton's interpreter on CPU tensors
(small shapes, every schedule and layout, fp16 activations: Triton 3.9's interpreter miscasts bf16, so
bf16 is checked by the CUDA test), and compiled on a GPU where one is present."""
from __future__ import annotations

import pytest
import torch

from qforge.kernels import QuantLinear, matmul_reference
from qforge.kernels import triton_matmul as tm
from test_formats import random_quant

pytestmark = pytest.mark.skipif(not tm.available(), reason="triton is not installed")

# (M, N, K, bits, group, sym, act_order): both schedules (M <= 16 split-K, M > 16 GEMM), in-order groups
# and act-order, per-channel, ragged M/N/K edges (N and K multiples of 32 as packing needs)
CASES = [
    (1, 64, 128, 4, 32, False, False),
    (3, 96, 256, 4, 64, True, False),
    (16, 64, 192, 4, 32, False, True),
    (17, 160, 96, 4, -1, False, False),
    (40, 64, 128, 8, 32, True, False),
    (5, 32, 320, 8, 64, False, True),
    (33, 96, 160, 4, 32, True, True),
]


def _packed(N, K, bits, group, sym, act_order, seed=0):
    m = QuantLinear.from_quant(random_quant(N, K, bits, group, sym, act_order, seed=seed))
    return m.qweight, m.qzeros, m.scales, m.g_idx


@pytest.mark.parametrize("M,N,K,bits,group,sym,act_order", CASES)
def test_interpreted_kernel_matches_the_reference(M, N, K, bits, group, sym, act_order):
    qw, qz, s, g = _packed(N, K, bits, group, sym, act_order, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).half()
    gs = tm.in_order_group_size(g, K)
    assert (gs == 0) == act_order
    want = matmul_reference(x.float(), qw, qz, s, g, bits)              # fp32: what the fp16 tiles approximate
    got = tm.triton_matmul(x, qw, qz, s, g, bits, gs, interpret=True)
    assert got.dtype == torch.float16 and got.shape == (M, N)
    assert torch.allclose(got.float(), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    if gs:                                  # the same result when the kernel reads g_idx row by row
        by_row = tm.triton_matmul(x, qw, qz, s, g, bits, 0, interpret=True)
        assert torch.allclose(by_row.float(), got.float(), rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_plan_picks_split_k_for_decoding_and_tiles_that_respect_groups():
    small, big = tm.plan(1, 4096, 4096, 128), tm.plan(256, 4096, 4096, 128)
    assert small["split"] > 1 and small["BLOCK_M"] == 16 and big["split"] == 1
    for p, group in ((small, 128), (big, 128), (tm.plan(4, 576, 576, 64), 64)):
        assert p["k_per_split"] % p["BLOCK_K"] == 0 and group % p["BLOCK_K"] == 0   # a K tile never spans two groups
    assert tm.plan(1, 576, 576, 32)["BLOCK_K"] == 32


def test_in_order_group_size_detection():
    K = 576
    assert tm.in_order_group_size(torch.arange(K, dtype=torch.int32) // 64, K) == 64
    assert tm.in_order_group_size(torch.arange(K, dtype=torch.int32) // 128, K) == 128    # ragged last group
    assert tm.in_order_group_size(torch.zeros(K, dtype=torch.int32), K) >= K               # one group
    assert tm.in_order_group_size(torch.arange(K, dtype=torch.int32) // 24, K) == 0        # not a multiple of 16
    assert tm.in_order_group_size((torch.arange(K, dtype=torch.int32) // 64).flip(0), K) == 0


def test_other_widths_are_refused_by_the_kernel():
    qw, qz, s, g = _packed(32, 64, 3, 32, True, False)
    with pytest.raises(ValueError, match="bits"):
        tm.triton_matmul(torch.randn(2, 64).half(), qw, qz, s, g, 3, interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
def test_compiled_kernel_matches_the_reference_on_cuda(M, dtype, act_order):
    q = random_quant(1024, 768, 4, 128, False, act_order)
    m = QuantLinear.from_quant(q, torch.randn(1024)).cuda()
    x = torch.randn(M, 768, device="cuda", dtype=dtype)
    want = matmul_reference(x.float(), m.qweight, m.qzeros, m.scales, m.g_idx, 4, m.bias)
    got = m(x)                                                          # QuantLinear picks the kernel on CUDA
    assert got.dtype == dtype
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
