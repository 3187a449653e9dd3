"""Triton dequant-matmul kernels against the PyTorch reference: in Triton's interpreter on CPU tensors
(small shapes, every schedule a Tuner may pick, fp16 activations: Triton 3.9's interpreter miscasts bf16,
so bf16 is checked by the CUDA test), and compiled on a GPU where one is present."""
from __future__ import annotations

import pytest
import torch

from qforge.kernels import QuantLinear, dequantize_packed, matmul_reference, use_tuner
from qforge.kernels import aot
from qforge.kernels import triton_matmul as tm
from qforge.kernels import tuning
from test_formats import random_quant

pytestmark = pytest.mark.skipif(not tm.available(), reason="triton is not installed")

# (M, N, K, bits, group, sym, act_order): both schedules (M <= 16 split-K, M > 16 GEMM), in-order groups
# and act-order, per-channel, ragged M/N/K edges (N and K multiples of 32 as packing needs)
CASES = [
    (1, 64, 128, 4, 32, False, False),
    (3, 96, 128, 4, 64, True, False),
    (16, 64, 192, 4, 32, False, True),
    (17, 160, 96, 4, -1, False, False),
    (40, 64, 128, 8, 32, True, False),
    (5, 32, 320, 8, 64, False, True),
    (33, 96, 160, 4, 32, True, True),
    (2, 64, 256, 4, 128, False, False),     # K tiles of 128 rows: the interleaved products (word_load 2) fit
    (20, 96, 384, 8, 64, True, False),
    (1, 96, 256, 8, 64, True, False),       # 8-bit and per-channel GEMVs (both word loads)
    (2, 160, 96, 4, -1, False, False),
]


def _layer(N, K, bits, group, sym, act_order, seed=0):
    return QuantLinear.from_quant(random_quant(N, K, bits, group, sym, act_order, seed=seed),
                                  torch.randn(N, generator=torch.Generator().manual_seed(seed)))


def _packed(N, K, bits, group, sym, act_order, seed=0):
    m = _layer(N, K, bits, group, sym, act_order, seed)
    return m.qweight, m.qzeros, m.scales, m.g_idx


@pytest.mark.parametrize("M,N,K,bits,group,sym,act_order", CASES)
def test_interpreted_kernel_matches_the_reference(M, N, K, bits, group, sym, act_order):
    """The heuristic's schedule and every one a Tuner may pick (split-K or not, tensor-core tiles or GEMV,
    words loaded once or per code), with a bias, and in-order groups also read through g_idx."""
    m = _layer(N, K, bits, group, sym, act_order, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).half()
    gs = tm.in_order_group_size(m.g_idx, K)
    assert (gs == 0) == act_order
    args = (m.qweight, m.qzeros, m.scales, m.g_idx, bits)
    want = matmul_reference(x.float(), *args, m.bias.float())           # fp32: what the fp16 tiles approximate
    configs = tuning.candidates(M, N, K, gs, n_sm=2, bits=bits)             # 2 SMs: small shapes still split K
    assert configs[0] == tm.plan(M, N, K, gs, n_sm=2)
    assert any(c.split > 1 for c in configs) == (M <= tm.SMALL_M)
    assert any(c.word_load == 2 for c in configs) == (gs > 0 and any(not c.dot or c.block_k * bits >= 512 for c in configs))
    for c in configs:
        for group_size in (g for g in {gs, 0} if c.fits(bits, g)):      # 0: read g_idx row by row
            got = tm.triton_matmul(x, *args, group_size, m.bias, config=c)
            assert got.dtype == torch.float16 and got.shape == (M, N)
            err = float((got.float() - want).abs().max() / want.abs().max())
            assert err < 2e-3, (c, group_size, err)


def test_kernel_without_bias_and_on_batched_input():
    m = _layer(64, 128, 4, 32, False, False)
    x = torch.randn(2, 3, 128).half()
    got = tm.triton_matmul(x, m.qweight, m.qzeros, m.scales, m.g_idx, 4, 32)
    want = matmul_reference(x.float(), m.qweight, m.qzeros, m.scales, m.g_idx, 4)
    assert got.shape == (2, 3, 64) and torch.allclose(got.float(), want, atol=2e-3 * float(want.abs().max()))


def test_plan_picks_split_k_for_decoding_and_tiles_that_respect_groups():
    gemv, small, big = tm.plan(1, 4096, 4096, 128), tm.plan(4, 4096, 4096, 128), tm.plan(256, 4096, 4096, 128)
    assert gemv.split > 1 and not gemv.dot and small.split > 1 and small.block_m == 16 and big.split == 1
    assert small.word_load == 2 and tm.plan(4, 4096, 4096, 0).word_load == 1   # act-order: words loaded once
    assert tm.plan(1, 4096, 4096, 0).dot                                      # act-order: no GEMV (it spills)
    for M, group in ((1, 128), (4, 64), (256, 128), (300, 32)):
        for c in tuning.candidates(M, 576 * 4, 576, group):
            assert group % c.block_k == 0                               # a K tile never spans two groups
    assert tm.plan(1, 576, 576, 32).block_k == 32


def test_kernel_config_refuses_impossible_schedules():
    with pytest.raises(ValueError, match="power of two"):
        tm.KernelConfig(16, 96, 64)
    with pytest.raises(ValueError, match="block_m >= 16"):
        tm.KernelConfig(4, 64, 64)
    with pytest.raises(ValueError, match="GEMV"):
        tm.KernelConfig(16, 64, 64, dot=False)
    with pytest.raises(ValueError, match="block_k"):
        tm.KernelConfig(16, 64, 8)
    with pytest.raises(ValueError, match="split"):
        tm.KernelConfig(16, 64, 64, split=0)
    with pytest.raises(ValueError, match="word_load"):
        tm.KernelConfig(1, 64, 64, dot=False, word_load=3)
    assert tm.KernelConfig(1, 64, 32, dot=False, word_load=2).fits(4, 32)    # the GEMV's: any K tile, in-order
    assert not tm.KernelConfig(1, 64, 32, dot=False, word_load=2).fits(4, 0)
    interleaved = tm.KernelConfig(16, 64, 128, word_load=2)
    assert interleaved.fits(4, 128) and interleaved.fits(8, 32) and not interleaved.fits(4, 0)
    assert not tm.KernelConfig(16, 64, 64, word_load=2).fits(4, 64)    # 64 / 8 = 8 rows: under the MMA's 16
    m = _layer(64, 128, 4, 32, False, False)
    with pytest.raises(ValueError, match="does not fit"):
        tm.triton_matmul(torch.randn(2, 128).half(), m.qweight, m.qzeros, m.scales, m.g_idx, 4, 0, config=interleaved)


def test_tuner_keeps_the_fastest_correct_config_per_shape_bucket():
    m = _layer(64, 128, 4, 32, True, False)
    args = (m.qweight, m.qzeros, m.scales, m.g_idx, 4, 32, m.bias)
    timed = []

    def timer(fn):                                  # a fake clock: the later a config is timed, the faster
        timed.append(fn.keywords["config"])
        return 1.0 / len(timed)

    tuner = tuning.Tuner(timer=timer)
    x = torch.randn(3, 128).half()
    best = tuner.config(x, *args)
    assert timed == tuning.candidates(3, 64, 128, 32) and best == timed[-1]
    assert tuner.config(torch.randn(4, 128).half(), *args) == best and len(timed) == len(tuning.candidates(3, 64, 128, 32))
    tuner.config(torch.randn(5, 128).half(), *args)                     # M 5 is another bucket (<= 8)
    assert len(timed) > len(tuning.candidates(3, 64, 128, 32))
    assert tuner.rejected == []
    strict = tuning.Tuner(timer=timer, tol=0.0)
    with pytest.raises(RuntimeError, match="no kernel config ran correctly"):
        strict.config(x, *args)                                         # every config is checked first
    assert len(strict.rejected) == len(tuning.candidates(3, 64, 128, 32))
    assert all(r["why"].startswith("off the reference") for r in strict.rejected)


def test_use_tuner_reaches_every_quant_linear():
    model = torch.nn.Sequential(_layer(64, 128, 4, 32, True, False), torch.nn.ReLU(), _layer(32, 64, 4, 32, True, False))
    tuner = tuning.Tuner()
    assert use_tuner(model, tuner) == 2 and model[0].tuner is tuner and model[2].tuner is tuner
    assert use_tuner(model, None) == 2 and model[0].tuner is None


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
        tm.triton_matmul(torch.randn(2, 64).half(), qw, qz, s, g, 3)


hopper = pytest.mark.skipif(not aot.available(), reason="needs triton's NVIDIA backend tools (ptxas, cuobjdump)")


@hopper
@pytest.mark.parametrize("M,group,bits,dtype,bias", [
    (1, 128, 4, torch.float16, False), (4, 0, 4, torch.float16, True), (16, 128, 8, torch.bfloat16, False),
    (64, 0, 4, torch.bfloat16, True), (256, 128, 4, torch.float16, False), (300, 1 << 30, 8, torch.float16, False),
])
def test_heuristic_schedules_compile_for_hopper_without_spills(M, group, bits, dtype, bias):
    """Built for sm_90 here, without a GPU (kernels/aot.py): the kernel the JIT would build for this call."""
    r = aot.matmul_report(tm.plan(M, 4096, 4096, group), M, 4096, 4096, bits=bits, group_size=group, dtype=dtype,
                          bias=bias)
    assert r["stack"] <= 64 and r["local"] == 0 and r["regs"] <= 255
    assert r["shared_static"] <= 227 * 1024                            # what one program may take on sm_90


@hopper
@pytest.mark.parametrize("M", [1, 256])            # M=1's candidates hold the M=16 ones (block_m 16, dot)
def test_every_tuner_candidate_compiles_for_hopper(M):
    for c in tuning.candidates(M, 4096, 14336, 128):
        r = aot.matmul_report(c, M, 4096, 14336)
        assert r["regs"] <= 255 and r["shared_static"] <= 227 * 1024, c


@hopper
@pytest.mark.parametrize("bits,sym,fit,search,b,gptaq", [
    (4, False, True, True, 128, False), (3, True, True, False, 128, False), (2, True, False, False, 64, False),
    (8, False, True, True, 256, False), (4, True, True, True, 128, True)])
def test_gptq_loop_kernel_compiles_for_hopper_without_spills(bits, sym, fit, search, b, gptaq):
    r = aot.gptq_loop_report(b, bits, sym, fit, search, gptaq=gptaq)
    assert r["stack"] <= 64 and r["local"] == 0                         # (Triton 3.6 keeps 8 bytes in one case)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M,act_order", [(1, False), (3, True)])    # larger M: benchmarks/kernels.py's Tuner
def test_every_tuner_candidate_is_right_on_cuda(M, act_order, caplog):
    """The Tuner checks each candidate against the reference before timing it: none may be dropped."""
    m = QuantLinear.from_quant(random_quant(2048, 1024, 4, 128, False, act_order), torch.randn(2048)).cuda()
    m.tuner = tuning.Tuner(warmup_ms=1, rep_ms=2)
    x = torch.randn(M, 1024, device="cuda", dtype=torch.float16)
    with caplog.at_level("WARNING", logger=tuning.__name__):
        got = m(x)
    assert not [r for r in caplog.records if "off the reference" in r.getMessage()]
    want = matmul_reference(x.float(), m.qweight, m.qzeros, m.scales, m.g_idx, 4, m.bias)
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    assert len(m.tuner.best) == 1


def test_tune_kernels_gives_packed_layers_one_tuner(caplog):
    import qforge

    model = torch.nn.Sequential(_layer(64, 128, 4, 32, True, False), _layer(32, 64, 4, 32, True, False))
    tuner = qforge.tune_kernels(model, "cuda", picks="no/such/file.json")
    assert model[0].tuner is model[1].tuner is tuner and tuner.best == {}
    with caplog.at_level("WARNING"):
        qforge.tune_kernels(torch.nn.Linear(4, 4), "cuda")
    assert "no packed layers to tune" in caplog.text
    with pytest.raises(qforge.QForgeError, match="CUDA device"):
        qforge.tune_kernels(model, "cpu")


@pytest.mark.parametrize("text", ["{not json", '[{"m_bucket": 1}]'])
def test_a_file_that_is_not_kernel_picks_is_refused_clearly(tmp_path, text):
    import qforge

    (tmp_path / "picks.json").write_text(text)
    with pytest.raises(qforge.QForgeError, match="not a file of kernel picks"):
        qforge.tune_kernels(torch.nn.Sequential(_layer(64, 128, 4, 32, True, False)), "cuda", tmp_path / "picks.json")


def test_tuner_picks_save_and_load(tmp_path):
    m = _layer(64, 128, 4, 32, True, False)
    args = (m.qweight, m.qzeros, m.scales, m.g_idx, 4, 32, m.bias)
    tuner = tuning.Tuner(timer=lambda fn: 1e-6 * (1 + len(str(fn.keywords["config"]))))
    best = tuner.config(torch.randn(2, 128).half(), *args)
    tuner.save(tmp_path / "picks.json")
    again = tuning.Tuner(timer=lambda fn: pytest.fail("a loaded pick is not timed again"))
    assert again.load(tmp_path / "picks.json", "cpu") == 1 and again.load(tmp_path / "picks.json", "cuda") == 0
    assert again.config(torch.randn(2, 128).half(), *args) == best


@pytest.mark.parametrize("bits", [3, 4])
def test_dequantize_packed_by_row_chunks_is_the_formula_bit_for_bit(bits):
    from qforge.formats.bitpack import pack_int32

    in_f, out_f, G = 2048, 2048, 16                       # more input rows than one chunk of 2^20 values
    codes = torch.randint(0, 1 << bits, (in_f, out_f))
    zeros = torch.randint(0, 1 << bits, (G, out_f))
    scales = (torch.rand(G, out_f) + 0.1).half()
    g_idx = torch.randint(0, G, (in_f,), dtype=torch.int32)   # act-order: any group per row
    W = dequantize_packed(pack_int32(codes, bits, dim=0), pack_int32(zeros, bits, dim=1), scales, g_idx, bits,
                          torch.float32)
    g = g_idx.long()
    assert torch.equal(W, scales.float()[g] * (codes - zeros[g]).float())
