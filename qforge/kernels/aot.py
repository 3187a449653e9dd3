"""Compile qforge's Triton kernels for a GPU target on a machine without a GPU, for the compiler's report.

Triton's wheel ships ptxas and cuobjdump, so `triton.compile` builds the same cubin the JIT would build
for a launch (argument kinds, 16-divisible arguments and constexprs as the launch would specialise
them) without a device. `cuobjdump -res-usage` then gives registers, stack frame, local and shared
memory per thread/program (a stack frame or local memory means spills), and `cuobjdump -sass` the
machine code, of which a few instruction counts are kept (I2F conversions, scalar 16-bit shared stores).
The tests compile every schedule this way, so a kernel that cannot build for Hopper fails in CI rather
than on a lent GPU; benchmarks/kernel_resources.py prints the table for every candidate.
"""
from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from . import triton_matmul

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _tools() -> Path:
    import triton.backends.nvidia as nv

    return Path(nv.__file__).parent / "bin"


def available() -> bool:
    """Whether triton and its NVIDIA backend tools (ptxas, cuobjdump) are installed."""
    return triton_matmul.available() and (_tools() / "ptxas").exists() and (_tools() / "cuobjdump").exists()


def compile_report(fn, signature: dict[str, str], constexprs: dict, aligned: set[str], num_warps: int = 4,
                   num_stages: int = 3, capability: int = 90, **options) -> dict:
    """Build `fn` (a plain function, as triton.jit would take it) for sm_`capability`; returns
    {"regs", "stack", "local", "shared"} from the cubin (bytes, except regs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = triton.jit(fn)
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in jit.arg_names}
    kernel = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = lambda flag: subprocess.run([str(_tools() / "cuobjdump"), flag, f.name], capture_output=True,
                                           text=True, check=True).stdout
        usage, sass = dump("-res-usage"), dump("-sass")
    found = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    return {"regs": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"]),
            "shared": int(found["SHARED"]), "shared_static": kernel.metadata.shared, "instructions": len(ops),
            # per program, static counts: int->float conversions, 16-bit and 16-byte shared stores
            "i2f": sum(o.startswith("I2F") for o in ops), "sts16": sum(o.startswith("STS.U16") for o in ops),
            "sts128": sum(o.startswith("STS.128") for o in ops)}


def matmul_report(c: "triton_matmul.KernelConfig", M: int, N: int, K: int, bits: int = 4, group_size: int = 128,
                  dtype: torch.dtype = torch.float16, scale_dtype: torch.dtype = torch.float16, bias: bool = False,
                  capability: int = 90) -> dict:
    """compile_report of the dequant-matmul kernel as triton_matmul would launch it for this call."""
    if not available():
        raise RuntimeError("compiling for a GPU target needs triton with its NVIDIA backend tools")
    split = triton_matmul.launch_split(c, K)
    y = _TYPES[triton_matmul.atomic_dtype(dtype) if split > 1 else dtype]
    t, s = _TYPES[dtype], _TYPES[scale_dtype]
    signature = dict(x_ptr=f"*{t}", qw_ptr="*i32", qz_ptr="*i32", s_ptr=f"*{s}", g_ptr="*i32",
                     b_ptr=f"*{t}" if bias else f"*{y}", y_ptr=f"*{y}", M="i32", N="i32", K="i32",
                     stride_xm="i32", stride_ym="i32", k_per_split="i32")
    k_per_split = triton_matmul.k_per_split(c, K)
    ints = dict(M=M, N=N, K=K, stride_xm=K, stride_ym=N, k_per_split=k_per_split)
    constexprs = dict(BITS=bits, GROUP_SIZE=group_size, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                      ATOMIC=split > 1, DOT=c.dot, WORD_LOAD=c.word_load, HAS_BIAS=bias,
                      MAGIC=triton_matmul.magic_bits(dtype, bits), PREFETCH=c.prefetch)
    constexprs.update({n: 1 for n, v in ints.items() if v == 1})           # the JIT specialises ints equal to 1
    aligned = {n for n in signature if n.endswith("_ptr")} | {n for n, v in ints.items() if v % 16 == 0}
    return dict(_matmul_build(tuple(signature.items()), tuple(sorted(constexprs.items())),
                              frozenset(aligned - set(constexprs)), c.num_warps, c.num_stages, capability))


@functools.cache
def _matmul_build(signature: tuple, constexprs: tuple, aligned: frozenset, num_warps: int, num_stages: int,
                  capability: int) -> dict:
    """One build per distinct compilation: configs that differ only in what the JIT does not specialise on (the
    split count beyond split > 1, M, N, K other than 1 and their divisibility by 16) build the same cubin."""
    return compile_report(triton_matmul._body, dict(signature), dict(constexprs), set(aligned), num_warps,
                          num_stages, capability, enable_fp_fusion=True)


def gptq_loop_report(b: int, grid_bits: int = 4, sym: bool = False, fit: bool = True, search: bool = True,
                     block_r: int = 16, capability: int = 90, gptaq: bool = False) -> dict:
    """compile_report of the GPTQ column-loop kernel for a block of b columns (`gptaq`: with GPTAQ's P1 term)."""
    from . import gptq_loop

    if not available():
        raise RuntimeError("compiling for a GPU target needs triton with its NVIDIA backend tools")

    gptq_loop._kernel(False)                        # binds the module's triton globals
    bb = gptq_loop.block_width(b)
    signature = {n: "*fp32" for n in ("w_ptr", "u_ptr", "s_ptr", "z_ptr", "c_ptr", "p_ptr", "codes_ptr", "q_ptr",
                                      "e_ptr", "p1_ptr")} | dict(R="i32", b="i32", gs="i32")
    constexprs = dict(MAXQ=2**grid_bits - 1, SYM=sym, FIT=fit, SEARCH=search, STEPS=gptq_loop.SEARCH_STEPS,
                      BLOCK_R=block_r, BB=bb, HAS_P=gptaq)
    aligned = {n for n in signature if n.endswith("_ptr")} | {"R", "b"}
    return compile_report(gptq_loop._body, signature, constexprs, aligned, gptq_loop.num_warps(bb), 1, capability,
                          enable_fp_fusion=False)
