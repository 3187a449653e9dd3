"""What vLLM's CPU W8A8 path computes, op by op, against exact int8 arithmetic (run it in vLLM's venv, which has no
qforge: `bash scripts/setup_vllm.sh`):

    .venv-vllm/bin/python benchmarks/vllm_int8_gemm_cpu.py

vLLM quantizes a W8A8 layer's input per token (`onednn_scaled_int8_quant`) and multiplies the int8 codes with the
int8 weights in oneDNN (`onednn_scaled_mm`). The first must be qforge's rule (scale max|x| / 127, round, clamp);
the second should be the exact integer product times both scales. On a CPU without AVX-512 VNNI / AVX-VNNI, oneDNN
multiplies with vpmaddubsw, which adds pairs of u8 x s8 products (the inputs shifted by 128) into int16 with
saturation: where a token has outlier channels, pair sums overflow and the product is wrong. Printed per case: the
input codes that differ from qforge's rule, and the relative error (Frobenius) of vLLM's output against the exact
int8 GEMM, against a model of the saturating pair sums, and of the exact GEMM's bf16 rounding alone.
"""
from __future__ import annotations

import torch


def case(M: int, K: int, N: int, outliers: float, seed: int = 0) -> list[str]:
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(seed)
    gain = torch.where(torch.rand(K, generator=g) < 0.01, outliers, 1.0)      # ~1% of channels `outliers` x larger
    x = (torch.randn(M, K, generator=g) * gain).to(torch.bfloat16)
    w = torch.randn(N, K, generator=g) * 0.05
    ws = w.abs().amax(1, keepdim=True) / 127
    wq = torch.round(w / ws).clamp(-128, 127).to(torch.int8)
    xq, xs, _ = ops.onednn_scaled_int8_quant(x)
    xf = x.float()
    ours = torch.round(xf / (xf.abs().amax(1, keepdim=True) / 127)).clamp(-128, 127)
    handler = ops.create_onednn_scaled_mm(wq.t(), ws.flatten().float(), torch.bfloat16, True, False, 32)
    out = torch.empty(M, N, dtype=torch.bfloat16)
    ops.onednn_scaled_mm(handler, xq, out, xs, None, None, None)
    exact = (xq.float() @ wq.float().t()) * xs * ws.t()
    pairs = ((xq.float() + 128)[:, None, :] * wq.float()[None]).reshape(M, N, K // 2, 2).sum(-1)   # u8 x s8 pairs
    saturating = (pairs.clamp(-32768, 32767).sum(-1) - 128 * wq.float().sum(1)) * xs * ws.t()

    def rel(a):
        return f"{float((a - exact).norm() / exact.norm()):.4f}"

    return [f"{M}x{K} @ {K}x{N}", f"{outliers:g}", str(int((xq.float() != ours).sum())), rel(out.float()),
            f"{float((out.float() - saturating).norm() / exact.norm()):.4f}", rel(exact.bfloat16().float()),
            f"{float((pairs.abs() > 32767).float().mean()):.1e}"]


def main() -> None:
    torch.set_num_threads(2)
    flags = open("/proc/cpuinfo").read()
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    rows = [case(M, K, N, o) for (M, K, N) in ((16, 576, 1536), (16, 1536, 576)) for o in (1, 10, 30)]
    head = ["shape", "outlier gain", "input codes != qforge's", "vLLM vs exact", "vLLM vs saturating model",
            "bf16 rounding alone", "pair sums saturated"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print(f"vLLM CPU int8 GEMM (oneDNN) on this CPU: VNNI {'yes' if vnni else 'no'}\n")
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
