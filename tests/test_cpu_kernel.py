"""The CPU weight-only matmuls (kernels/cpu_matmul.py) against the PyTorch reference: random codes, scales and
zeros, every 4-bit grouping that maps onto tinygemm's (in-order, per-channel, a short last group, act-order) and
per-channel 8-bit, fp32, bf16 and fp16 activations, and the layers that must keep the reference."""
from __future__ import annotations

import pytest
import torch

from qforge.kernels import QuantLinear, cpu_matmul, matmul_reference
from test_formats import random_quant

pytestmark = pytest.mark.skipif(not (cpu_matmul.available(4) and cpu_matmul.available(8)),
                                reason="this PyTorch has no CPU weight-only matmuls")

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 1.5e-3}   # of max |y| vs fp32 (the reference in
# bf16 itself is 3-6e-3 off, in fp16 4-7e-4)


def _layer(N, K, group, sym, act_order, seed=0, bias=True, bits=4, **kw):
    b = torch.randn(N, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    return QuantLinear.from_quant(random_quant(N, K, bits, group, sym, act_order, seed=seed), b, **kw)


# (M, N, K, group, sym, act_order, tinygemm group): groups of every tinygemm size, per-channel over K = 576 (nine
# runs of 64), groups of 128 over 576 (a last group of 64), act-order with whole and short groups, batch 1-33
CASES = [
    (1, 64, 256, 32, False, False, 32),
    (3, 64, 512, 256, True, False, 256),
    (16, 96, 576, -1, False, False, 64),
    (1, 64, 576, 128, False, False, 64),
    (33, 32, 384, 128, True, False, 128),
    (5, 64, 512, 64, False, True, 64),
    (2, 96, 576, 128, True, True, 64),
    (1, 1536, 576, 64, False, False, 64),
]


@pytest.mark.parametrize("M,N,K,group,sym,act_order,gs", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_int4_matches_the_reference(M, N, K, group, sym, act_order, gs, dtype):
    m = _layer(N, K, group, sym, act_order, seed=M + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K))
    want = matmul_reference(x, m.qweight, m.qzeros, m.scales, m.g_idx, 4, m.bias.float())
    w4 = cpu_matmul.prepare(m.qweight, m.qzeros, m.scales, m.g_idx, 4, dtype)
    assert w4 is not None and w4.group_size == gs and (w4.perm is not None) == act_order
    got = cpu_matmul.matmul(x.to(dtype), w4, m.bias)
    assert got.dtype == dtype and got.shape == (M, N)
    err = float((got.float() - want).abs().max() / want.abs().max())
    assert err < TOL[dtype], err


@pytest.mark.parametrize("M,N,K,sym,act_order", [(1, 96, 576, True, False), (5, 64, 256, False, True),
                                                 (33, 32, 160, False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_int8_matches_the_reference_per_channel(M, N, K, sym, act_order, dtype):
    m = _layer(N, K, -1, sym, act_order, seed=M + N, bits=8)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K))
    want = matmul_reference(x, m.qweight, m.qzeros, m.scales, m.g_idx, 8, m.bias.float())
    w8 = cpu_matmul.prepare(m.qweight, m.qzeros, m.scales, m.g_idx, 8, dtype)
    assert isinstance(w8, cpu_matmul.Int8Weight) and (w8.offset is None) == sym
    got = cpu_matmul.matmul(x.to(dtype), w8, m.bias)
    assert got.dtype == dtype and got.shape == (M, N)
    err = float((got.float() - want).abs().max() / want.abs().max())
    assert err < TOL[dtype], err


def test_grouped_8_bit_layers_keep_the_reference():
    m = _layer(64, 256, 64, True, False, bits=8)
    assert cpu_matmul.prepare(m.qweight, m.qzeros, m.scales, m.g_idx, 8, torch.bfloat16) is None
    x = torch.randn(2, 256).bfloat16()
    assert torch.equal(m(x), matmul_reference(x, m.qweight, m.qzeros, m.scales, m.g_idx, 8, m.bias))
    assert m._cpu_weight is False


def test_quant_linear_takes_the_cpu_int4_path_for_bf16_and_keeps_its_state_dict():
    m = _layer(64, 256, 64, False, True)
    keys = set(m.state_dict())
    x = torch.randn(2, 3, 256)
    want = matmul_reference(x, m.qweight, m.qzeros, m.scales, m.g_idx, 4, m.bias.float())
    assert torch.equal(m(x), want) and m._cpu_weight is None           # fp32: PyTorch's fp32 int4 matmul is scalar
    y = m(x.bfloat16())
    assert isinstance(m._cpu_weight, cpu_matmul.Int4Weight) and m._cpu_weight.dtype == torch.bfloat16
    assert m._w_cache is None
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 64)
    assert float((y.float() - want).abs().max()) < TOL[torch.bfloat16] * float(want.abs().max())
    assert set(m.state_dict()) == keys                                  # the 4-bit copy is not saved
    m.to(torch.float32)
    assert m._cpu_weight is None
    off = _layer(64, 256, 64, False, True, cpu_kernel=False)
    off(x.bfloat16())
    assert off._cpu_weight is None                                            # cpu_kernel=False: the reference


@pytest.mark.parametrize("native", [True, False])
def test_with_a_dense_cache_only_small_batches_take_the_int4_path(native, monkeypatch):
    """Where the CPU multiplies bf16 natively a kept dense copy serves prefill-sized inputs; where torch emulates
    bf16 GEMMs (AVX2-only CPUs) the int4 matmul serves every input and no dense copy is made."""
    monkeypatch.setattr(cpu_matmul, "dense_bf16_native", lambda: native)
    m = _layer(64, 256, 64, True, False, cache=True)
    m(torch.randn(1, 8, 256).bfloat16())                                # decoding-sized: int4, no dense copy
    assert m._cpu_weight and m._w_cache is None
    y = m(torch.randn(1, 9, 256).bfloat16())                            # prefill-sized: the dense copy, if native
    assert (m._w_cache is not None) == native and y.dtype == torch.bfloat16
    if native:
        assert m._w_cache.dtype == torch.bfloat16
    assert cpu_matmul.worth_it(torch.zeros(64, 256, dtype=torch.bfloat16), dense_kept=False)


def test_inputs_that_need_a_gradient_keep_the_differentiable_reference():
    m = _layer(64, 256, 64, False, False)
    x = torch.randn(2, 256, dtype=torch.bfloat16, requires_grad=True)
    m(x).sum().backward()                                                # the int4 op has no backward
    assert x.grad is not None and x.grad.shape == x.shape and m._cpu_weight is None


@pytest.mark.parametrize("N,K,group,act_order", [(64, 256, 16, False),   # groups smaller than 32
                                                 (64, 288, 96, True)])   # groups of 96: runs of 32 fit
def test_layers_that_do_not_fit_keep_the_reference(N, K, group, act_order):
    m = _layer(N, K, group, True, act_order)
    fits = cpu_matmul.plan(m.g_idx, N) is not None
    assert fits == (group % 32 == 0)
    x = torch.randn(3, K).bfloat16()
    want = matmul_reference(x.float(), m.qweight, m.qzeros, m.scales, m.g_idx, 4, m.bias.float())
    assert float((m(x).float() - want).abs().max()) < TOL[torch.bfloat16] * float(want.abs().max())
    assert (m._cpu_weight is False) == (not fits)


def test_uneven_groups_and_odd_widths_do_not_fit():
    g_idx = torch.cat([torch.zeros(40), torch.ones(24), torch.full((64,), 2)]).int()   # runs of 32 straddle 0|1
    assert cpu_matmul.plan(g_idx, 64) is None
    assert cpu_matmul.plan(g_idx[torch.randperm(128)], 64) is None
    assert cpu_matmul.plan(torch.arange(128).int() // 64, 40) is None      # outputs not a multiple of 16


def test_other_widths_keep_the_reference():
    m = QuantLinear.from_quant(random_quant(64, 256, 3, 64, False), None)
    x = torch.randn(2, 256)
    assert torch.equal(m(x), matmul_reference(x, m.qweight, m.qzeros, m.scales, m.g_idx, 3)) and m._cpu_weight is None


@pytest.mark.parametrize("fmt,bits,group,sym", [("gptq", 4, 32, True), ("awq", 4, 32, False),
                                               ("compressed-tensors", 8, -1, False)])
def test_a_loaded_checkpoint_decodes_in_bf16_through_the_cpu_matmuls(tiny_llama_dir, tmp_path, fmt, bits, group,
                                                                     sym):
    """qforge.load of an export, in bf16: decoding-sized inputs take the CPU matmul in every packed layer, and the
    logits stay as close to the fp32 model's as the reference path's bf16 logits are."""
    import qforge

    m = qforge.load(tiny_llama_dir, qforge.QuantizeConfig(method="rtn", bits=bits, group_size=group, sym=sym))
    m.quantize(None)
    m.export(tmp_path / fmt, fmt)
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    fp32 = qforge.load(tmp_path / fmt).model
    with torch.no_grad():
        want = fp32(input_ids=ids).logits
        errs = {}
        for kernel in (True, False):
            model = qforge.load(tmp_path / fmt).model.to(torch.bfloat16)
            layers = [mod for mod in model.modules() if isinstance(mod, QuantLinear)]
            for mod in layers:
                mod.cpu_kernel = kernel
            got = model(input_ids=ids).logits.float()
            errs[kernel] = float((got - want).norm() / want.norm())
            assert all(bool(mod._cpu_weight) == kernel for mod in layers) and layers
    assert errs[True] < 2 * errs[False] + 1e-3, errs


def test_without_a_dense_cache_a_loaded_checkpoint_keeps_only_its_packed_weights(tiny_llama_dir, tmp_path):
    """qforge.load(dense_cache=False) / generate --no-dense-cache: a prompt-sized input builds no dequantized copy;
    fp32 gives the cached model's logits, bf16 takes the int4 matmul at any number of rows."""
    import qforge
    from qforge.cli.main import main

    m = qforge.load(tiny_llama_dir, qforge.QuantizeConfig(method="rtn", bits=4, group_size=32))
    m.quantize(None)
    m.export(tmp_path / "gptq", "gptq")
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = qforge.load(tmp_path / "gptq").model
        want = cached(input_ids=ids).logits
        assert all(mod._w_cache is not None for mod in cached.modules() if isinstance(mod, QuantLinear))
        lean = qforge.load(tmp_path / "gptq", dense_cache=False).model
        torch.testing.assert_close(lean(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        lean.to(torch.bfloat16)(input_ids=ids)
    layers = [mod for mod in lean.modules() if isinstance(mod, QuantLinear)]
    assert layers and all(mod._w_cache is None and mod._cpu_weight for mod in layers)
    assert main(["-q", "generate", str(tmp_path / "gptq"), "--prompt", "def main(): return", "--max-new-tokens",
                 "3", "--dtype", "bfloat16", "--no-dense-cache"]) == 0


def test_a_layer_converted_in_pieces_is_the_whole_conversion(monkeypatch):
    """prepare() converts WEIGHTS_PER_CONVERSION weights at a time (the int32 codes it needs are 4 bytes a
    weight); pieces of 128 rows and a shorter last piece give the one-piece conversion bit for bit."""
    m = _layer(320, 256, 64, True, True)
    args = (m.qweight, m.qzeros, m.scales, m.g_idx, 4, torch.bfloat16)
    whole = cpu_matmul.prepare(*args)
    monkeypatch.setattr(cpu_matmul, "WEIGHTS_PER_CONVERSION", 128 * 256 + 100)   # 128 rows of K = 256
    pieces = cpu_matmul.prepare(*args)
    assert whole.perm is not None and torch.equal(whole.perm, pieces.perm)
    assert torch.equal(whole.packed, pieces.packed) and torch.equal(whole.scales_and_zeros, pieces.scales_and_zeros)
