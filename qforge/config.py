"""Frozen, validated configuration objects. Each is saved as JSON beside the outputs it produced."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import QForgeError

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
NEEDS_CALIBRATION = {"rtn": False, "gptq": True, "awq": True, "awq+gptq": True}
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
HESSIAN_DTYPES = ("float32", "bfloat16")
BPW_UNITS = ("fused", "linear")     # mixed precision: what takes one scheme (QuantizeConfig.bpw_units)
ACT_OBSERVERS = ("max", "mse")      # how a static input scale is chosen (QuantizeConfig.act_observer)
ROTATIONS = ("hadamard", "orthogonal")   # QuantizeConfig.rotation (solvers/hadamard.py)
KV_CACHES = ("fp8",)                # the KV caches QuantizeConfig.kv_cache calibrates scales for
# llm-compressor's preset scheme names (compressed-tensors' PRESET_SCHEMES), as QuantizeConfig fields: the weights'
# grid and the inputs' quantization; QuantizeConfig.from_scheme and `--scheme` start from them
SCHEMES = {
    "W4A16": dict(bits=4, group_size=128, sym=True),
    "W4A16_ASYM": dict(bits=4, group_size=128, sym=False),
    "W8A16": dict(bits=8, group_size=-1, sym=True),
    "W8A8": dict(bits=8, group_size=-1, sym=True, act_bits=8),
    "FP8_DYNAMIC": dict(bits=8, group_size=-1, sym=True, fp8=True, act_bits=8),
    "FP8_BLOCK": dict(bits=8, group_size=128, sym=True, fp8=True, fp8_block=True, act_bits=8),
    "NVFP4A16": dict(bits=4, group_size=16, sym=True, nvfp4=True),
    "NVFP4": dict(bits=4, group_size=16, sym=True, nvfp4=True, act_bits=4, act_static=True),
    "MXFP4A16": dict(bits=4, group_size=32, sym=True, mx=True),
    "MXFP8A16": dict(bits=8, group_size=32, sym=True, fp8=True, mx=True),
    "MXFP4": dict(bits=4, group_size=32, sym=True, mx=True, act_bits=4),
    "MXFP8": dict(bits=8, group_size=32, sym=True, fp8=True, mx=True, act_bits=8),
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise QForgeError(msg)


class _JsonMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        _check(not unknown, f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class QuantizeConfig(_JsonMixin):
    """What to quantize and how. `group_size=-1` means one group per output channel (per-channel).

    A group size that does not divide a layer's input width leaves a smaller last group (ragged);
    the run records which layers have one.
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool | None = None    # None: asymmetric for AWQ methods (AutoAWQ's zero_point), symmetric otherwise
    # GPTQ options (used by method gptq / awq+gptq)
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    # groups stay column ranges (in-order g_idx) but are visited most sensitive first, and each group's
    # columns in decreasing Hessian diagonal (GAR; GPTQModel's act_group_aware). None: on for GPTQ methods
    # with groups and without act_order (GPTQModel's default; BENCHMARKS.md shows why), off otherwise
    act_group_aware: bool | None = None
    # True: each linear group's statistics come from inputs that passed through the already quantized
    # earlier groups of its block (GPTQ's "true sequential"); False: one pass over the unquantized block
    # collects every group's statistics (llm-compressor's schedule; fewer passes)
    true_sequential: bool = True
    # GPTQ: shrink each group's range to minimise its rounding error weighted by each column's cost in the
    # GPTQ loss (the reference code's `mse` option, weighted) instead of the plain min-max range.
    # None: on for GPTQ methods (BENCHMARKS.md shows why); RTN and AWQ keep min-max (AWQ has its own clip)
    scale_search: bool | None = None
    # dtype of the calibration forward passes (activations and the block copy they run through) and, for
    # bfloat16, of each batch's Hessian products (accumulated in fp32 across batches); solvers always read
    # the fp32 weights. bfloat16 is how GPTQModel and llm-compressor run a bf16 checkpoint, and its matmuls are
    # 3.5x faster than fp32 on CPUs with AVX512-BF16, but 8x slower on CPUs without (emulated; BENCHMARKS.md);
    # float32 is exact. "auto" (default): bfloat16 where the device multiplies it natively (CUDA with bf16,
    # CPUs with AVX512-BF16 or AMX), float32 elsewhere; quantize() records the dtype it resolved to
    compute_dtype: str = "auto"
    # with bfloat16 passes, how each batch's Hessian products are summed: "bfloat16" rounds every panel of
    # products to bf16 once (fast on CPUs with AVX512-BF16), which can leave H slightly indefinite where the
    # inputs are nearly dependent (o_proj behind grouped-query attention: damping then has to be raised);
    # "float32" sums the same exact products in fp32 (H is the Gram matrix of the bf16 activations, PSD)
    hessian_dtype: str = "bfloat16"
    # AWQ options (methods awq / awq+gptq): α grid points in [0, 1), duo scaling (x^α / w^(1-α), as
    # AutoAWQ and llm-compressor) or x^α alone, clipping search, and saved results to apply instead of searching.
    # awq_clip None: on for awq; for awq+gptq only without scale_search (the two range shrinks stack and
    # together cost 6-13% ppl at W3, BENCHMARKS.md)
    awq_grid: int = 20
    awq_duo_scaling: bool = True
    awq_clip: bool | None = None
    # awq+gptq: judge each candidate α with the weights GPTQ would solve on the scaled input's Hessian (and
    # "no scaling" as one more candidate) instead of rounded weights. None: on for awq+gptq
    awq_gptq_aware: bool | None = None
    awq_from: str = ""
    # mixed precision (method gptq): one scheme per linear chosen from a measurement so that the average
    # stored bits per weight of the quantized linears, counted as `bpw_format` stores them, is <= bpw;
    # `measurement` is the measurement file to reuse, or to write (and resume) when it is not finished
    bpw: float | None = None
    measurement: str = ""
    bpw_format: str = "gptq"
    # "linear": each linear its own scheme; "fused": the linears a serving engine fuses into one module (a block's
    # q/k/v, gate/up, DeepSeek's q_a/kv_a, a MoE block's experts; models/fused.py) take one, so vLLM loads the
    # result. Per linear by default: tying cost SmolLM2 7% wiki ppl at 3.0 bpw (BENCHMARKS.md, session 36)
    bpw_units: str = "linear"
    # the widths the allocation may use (empty: every width bpw_format stores); a new measurement measures only these,
    # a reused one is cut to them (vLLM's kernels: 4 and 8 bits)
    bpw_bits: tuple[int, ...] = ()
    # > 0: after planning, each block is quantized on its own at its allocated schemes and the model run over
    # this many calibration sequences (mixed/verify.py); a block that alone costs more than the whole
    # allocation's predicted KL on one of them has its lowest width raised and the budget re-planned.
    # Off by default: on SmolLM2 it did not see the one failure known (BENCHMARKS.md), and costs minutes
    verify_samples: int = 0
    # > 0: after planning, this many generations of evolutionary search (mixed/search.py) improve the
    # allocation, judged by the whole model's KL on the first `search_samples` calibration sequences;
    # each generation scores `search_offspring` mutants; a linear may move `search_span` levels (measured
    # options no cheaper one beats) either side of the plan's pick. Off by default: it costs minutes
    search_generations: int = 0
    search_samples: int = 16
    search_offspring: int = 8
    search_span: int = 2
    # modules kept in full precision, as glob patterns on full module names (lm_head / embeddings
    # are never block linears: they stay unquantized; quantize_lm_head=True is refused, not implemented)
    skip: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    # W8A8 (llm-compressor's int8 scheme, which vLLM runs on int8 GEMMs): the input of every quantized linear is
    # quantized too, per token, dynamically (symmetric int8 with one scale per token, computed as it runs), in
    # evaluation and in the exported checkpoint (compressed-tensors "int-quantized"). Needs 8-bit symmetric
    # per-channel weights. `smoothquant` (alpha, W8A8 only): SmoothQuant scales folded into each block before its
    # weights are solved, from the per-channel maxima of its inputs (the fp block computes the same function;
    # outlier channels move from the activations into the weights)
    act_bits: int | None = None
    smoothquant: float | None = None
    # FP8 (llm-compressor's FP8_DYNAMIC with act_bits 8, its W8A16 FP8 without): weights on an E4M3 grid with one
    # scale per output channel (absmax / 448; solvers/grid.py), and with act_bits 8 every quantized linear's input
    # quantized to E4M3 per token, dynamically (max|x| / 448). Exported as compressed-tensors "float-quantized",
    # which vLLM runs on FP8 GEMMs (Hopper, Ada) or as W8A16 (Marlin) on older GPUs. Needs bits 8, group_size -1
    fp8: bool = False
    # FP8 in blocks (with fp8; llm-compressor's FP8_BLOCK, DeepSeek-V3's weight_block_size at group_size 128): one
    # weight scale per group_size x group_size tile instead of per output channel, and with act_bits 8 the inputs
    # quantized per token in groups of group_size channels (vLLM's per-token-group FP8 GEMMs). Needs group_size > 0
    fp8_block: bool = False
    # NVFP4 weights (llm-compressor's NVFP4A16; vLLM runs them with FP4 GEMMs on Blackwell, Marlin elsewhere): E2M1
    # codes in groups of 16 with E4M3 group scales over one fp32 global scale per tensor (solvers/grid.py), shared by
    # the linears engines fuse (q/k/v, gate/up). Needs bits 4, group_size 16, sym. With act_bits 4 and act_static
    # (llm-compressor's NVFP4, W4A4) the inputs are NVFP4 too: each linear's global input scale 448 · 6 / max|x| fixed
    # from the calibration set, the E4M3 scales of each token's groups of 16 computed as the model runs
    nvfp4: bool = False
    # MX weights (the OCP microscaling formats; llm-compressor's MXFP4A16 with bits 4, MXFP8A16 with bits 8 and fp8):
    # E2M1 (bits 4) or E4M3 (fp8) codes in groups of 32, each group's scale a power of two (one E8M0 byte), no global
    # scale (solvers/grid.py). Needs group_size 32, sym. With act_bits (4 for MXFP4, 8 for MXFP8: llm-compressor's
    # MXFP4 and MXFP8 schemes) the inputs are MX too: per token in groups of 32, a power-of-two scale each, dynamic
    mx: bool = False
    # static input scales (with act_bits 8; llm-compressor's `dynamic: false` activations, its "FP8" scheme's): one
    # scale per quantized linear for all tokens, fixed at quantization time from its inputs over the calibration set
    # (the largest |x| the quantized model gives it, / 127 for int8, / 448 for FP8) instead of computed per token as
    # the model runs; saved as each linear's input_scale. Cheaper to serve (no per-token max), less exact
    act_static: bool = False
    # how the static scale is chosen (solvers/input_scale.py): "max", the largest |x| / qmax (nothing clipped; llm-
    # compressor's FP8 scheme's observer), or "mse", that times the clip ratio in 1.0 .. 0.1 with the least squared
    # error over the calibration inputs (one more pass per block). SmolLM2 (BENCHMARKS.md "Static input scales"):
    # int8 without SmoothQuant, mse is far better; with SmoothQuant 0.8, max is a little better
    act_observer: str = "max"
    # GPTAQ (GPTQv2, solvers/gptq.py; method gptq): alpha > 0 also corrects each linear for the difference between
    # its inputs in the fp model and in the model being quantized (whose earlier layers are rounded already), at
    # the cost of one more pass per block, through its fp weights, and of its linears' fp inputs kept while it is
    # solved. None: plain GPTQ. GPTQModel's default alpha is 0.25
    gptaq: float | None = None
    # FP8 KV cache (llm-compressor's kv_cache_scheme; vLLM's --kv-cache-dtype fp8 reads the scales): "fp8" calibrates
    # one scale per attention layer for its keys and one for its values, max|k| / 448 and max|v| / 448 over the
    # calibration set as the quantized model writes them into its cache (keys after the rotary embedding), once its
    # weights are quantized (capture/kv_range.py). Exported with the compressed-tensors format; evaluation then casts
    # keys and values to E4M3 with them. None: the cache keeps the model's dtype
    kv_cache: str | None = None
    # rotated quantization (QuaRot; SpinQuant's R1 and R2 without training; smoothing/rotate.py): before anything is
    # measured or solved, the residual stream is rotated by an orthogonal matrix ("hadamard": a randomized Hadamard
    # matrix, solvers/hadamard.py; "orthogonal": a random one) and each attention head's values by another, folded
    # into the weights (norm weights into the linears that read them, a tied head untied), so the model computes
    # the same function while its weights and inputs lose their outlier channels. RMSNorm families only; the output
    # is a plain checkpoint (no online transform). `rotation_seed` draws the signs / matrices
    rotation: str | None = None
    rotation_seed: int = 0

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.sym is None:
            object.__setattr__(self, "sym", not self.uses_awq)
        _check(self.awq_grid >= 1, f"awq_grid must be positive, got {self.awq_grid!r}")
        _check(isinstance(self.bits, int) and 2 <= self.bits <= 8,
               f"bits must be an integer from 2 to 8, got {self.bits!r}")
        _check(isinstance(self.group_size, int) and (self.group_size == -1 or self.group_size >= 1),
               f"group_size must be -1 (per-channel) or a positive integer, got {self.group_size!r}")
        _check(self.compute_dtype in COMPUTE_DTYPES,
               f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        _check(self.hessian_dtype in HESSIAN_DTYPES,
               f"hessian_dtype must be one of {', '.join(HESSIAN_DTYPES)}, got {self.hessian_dtype!r}")
        _check(0.0 < self.damp < 1.0, f"damp must be in (0, 1), got {self.damp!r}")
        _check(self.block_size >= 1, f"block_size must be positive, got {self.block_size!r}")
        _check(not (self.static_groups and self.group_size == -1),
               "static_groups needs a group size (per-channel has a single group)")
        gptq_method = self.method in ("gptq", "awq+gptq")
        if self.act_group_aware is None:
            object.__setattr__(self, "act_group_aware", gptq_method and not self.act_order and self.group_size != -1)
        if self.scale_search is None:
            object.__setattr__(self, "scale_search", gptq_method)
        _check(gptq_method or not self.scale_search,
               f"scale_search is a GPTQ option; method {self.method!r} keeps the min-max range")
        if self.awq_clip is None:
            object.__setattr__(self, "awq_clip", self.uses_awq and not self.scale_search)
        if self.awq_gptq_aware is None:
            object.__setattr__(self, "awq_gptq_aware", self.method == "awq+gptq")
        _check(self.method == "awq+gptq" or not self.awq_gptq_aware,
               f"awq_gptq_aware judges AWQ scales by GPTQ; it needs method awq+gptq, not {self.method!r}")
        _check(not (self.act_group_aware and self.act_order),
               "act_group_aware and act_order are two column orders; pick one")
        _check(not (self.act_group_aware and self.group_size == -1),
               "act_group_aware needs a group size (per-channel: use act_order)")
        if self.bpw is not None:
            _check(self.method == "gptq", f"--bpw (mixed precision) needs method gptq, got {self.method!r}")
            _check(isinstance(self.bpw, (int, float)) and 2.0 <= self.bpw <= 8.0,
                   f"bpw must be a number from 2.0 to 8.0, got {self.bpw!r}")
            _check(self.bpw_format in ("gptq", "compressed-tensors"),
                   f"bpw_format must be gptq or compressed-tensors, got {self.bpw_format!r}")
        _check(self.bpw_units in BPW_UNITS, f"bpw_units must be one of {', '.join(BPW_UNITS)}, got {self.bpw_units!r}")
        object.__setattr__(self, "bpw_bits", tuple(self.bpw_bits))
        _check(all(type(b) is int and 2 <= b <= 8 for b in self.bpw_bits),
               f"bpw_bits must be bit widths from 2 to 8, got {self.bpw_bits!r}")
        for name in ("verify_samples", "search_generations"):      # a search can also continue an allocation
            v = getattr(self, name)
            _check(type(v) is int and v >= 0, f"{name} must be a whole number >= 0, got {v!r}")
        for name in ("search_samples", "search_offspring", "search_span"):
            v = getattr(self, name)
            _check(type(v) is int and v >= 1, f"{name} must be a whole number >= 1, got {v!r}")
        _check(not self.quantize_lm_head, "quantize_lm_head is not implemented: lm_head stays in full precision")
        _check(self.act_bits in (None, 8) or (self.mx or self.nvfp4) and self.act_bits == 4,
               f"act_bits must be 8 (W8A8; 4 with MXFP4 or NVFP4 weights) or None (weight-only), got "
               f"{self.act_bits!r}")
        _check(self.fp8 or not self.fp8_block, "fp8_block quantizes FP8 weights in blocks: it needs fp8")
        if self.nvfp4:
            _check(self.bits == 4 and self.group_size == 16 and self.sym and not self.fp8,
                   f"NVFP4 weights are 4-bit E2M1 in groups of 16, symmetric (bits 4, group_size 16, sym), got bits "
                   f"{self.bits}, group_size {self.group_size}, sym {self.sym}{', fp8' if self.fp8 else ''}")
            _check(self.method in ("rtn", "gptq"), f"NVFP4 takes method rtn or gptq, not {self.method!r}")
            _check(self.act_bits is None or self.act_bits == 4 and self.act_static and self.act_observer == "max",
                   f"NVFP4 inputs (W4A4, llm-compressor's NVFP4) are act_bits 4 with act_static (their global scale "
                   f"is calibrated; act_observer max), got act_bits {self.act_bits}, act_static {self.act_static}, "
                   f"act_observer {self.act_observer}")
            _check(self.bpw is None, "mixed precision (bpw) allocates integer schemes; it does not take nvfp4")
        if self.mx:
            _check((self.bits == 4 and not self.fp8 or self.bits == 8 and self.fp8) and self.group_size == 32
                   and self.sym and not (self.nvfp4 or self.fp8_block),
                   f"MX weights are MXFP4 (bits 4) or MXFP8 (bits 8 with fp8) in groups of 32, symmetric, got bits "
                   f"{self.bits}, group_size {self.group_size}, sym {self.sym}{', fp8' if self.fp8 else ''}"
                   f"{', nvfp4' if self.nvfp4 else ''}{', fp8_block' if self.fp8_block else ''}")
            _check(self.method in ("rtn", "gptq"), f"MX takes method rtn or gptq, not {self.method!r}")
            _check(self.act_bits in (None, self.bits) and not self.act_static,
                   f"MX inputs are MX of the weights' bits (act_bits {self.bits}), dynamic: got act_bits "
                   f"{self.act_bits}{', act_static' if self.act_static else ''}")
            _check(self.bpw is None, "mixed precision (bpw) allocates integer schemes; it does not take mx")
            _check(self.smoothquant is None, "smoothquant is offered for int8 inputs (W8A8); MX inputs take a scale "
                                             "per group of 32 channels")
        if self.fp8_block:
            _check(self.bits == 8 and self.group_size > 0 and self.sym,
                   f"FP8 blocks are 8-bit (E4M3) group_size x group_size tiles (bits 8, a group size, sym), got bits "
                   f"{self.bits}, group_size {self.group_size}, sym {self.sym}")
            _check(not self.act_static, "FP8 blocks take dynamic inputs (per token in groups); act_static quantizes "
                                        "per-channel FP8 weights' inputs")
            _check(not self.act_order or self.static_groups, "FP8 blocks are column ranges: act_order needs "
                                                             "static_groups")
        elif self.fp8 and not self.mx:
            _check(self.bits == 8 and self.group_size == -1 and self.sym,
                   f"FP8 weights are 8-bit (E4M3) with one scale per output channel (bits 8, group_size -1, sym; "
                   f"fp8_block for group_size x group_size blocks), got bits {self.bits}, group_size "
                   f"{self.group_size}, sym {self.sym}")
            _check(self.method in ("rtn", "gptq"), f"FP8 takes method rtn or gptq, not {self.method!r}")
            _check(self.bpw is None, "mixed precision (bpw) allocates integer schemes; it does not take fp8")
            _check(self.smoothquant is None, "smoothquant is offered for int8 activations (W8A8); FP8's per-token "
                                             "E4M3 inputs keep their outliers' precision without it")
        if self.act_bits is not None and not (self.mx or self.nvfp4):
            _check(self.bits == 8 and (self.group_size == -1 or self.fp8_block) and self.sym,
                   f"W8A8 needs 8-bit symmetric per-channel weights (bits 8, group_size -1, sym), as int8 GEMMs "
                   f"take them; got bits {self.bits}, group_size {self.group_size}, sym {self.sym}")
            _check(not self.uses_awq, "AWQ searches scales for weight-only quantization; for W8A8 use method rtn or "
                                      "gptq, with smoothquant to flatten the activations")
            _check(self.bpw is None, "mixed precision (bpw) allocates weight-only schemes; it does not take act_bits")
        _check(not self.act_static or self.act_bits is not None,
               "act_static fixes the scale of quantized inputs: it needs act_bits 8 (W8A8 or FP8 W8A8)")
        _check(self.act_observer in ACT_OBSERVERS,
               f"act_observer must be one of {', '.join(ACT_OBSERVERS)}, got {self.act_observer!r}")
        _check(self.act_static or self.act_observer == "max", "act_observer chooses static input scales: it needs "
                                                               "act_static")
        if self.smoothquant is not None:
            _check(self.act_bits is not None, "smoothquant flattens activations for their quantization: it needs "
                                              "act_bits 8 (weight-only quantization gains nothing from it)")
            _check(isinstance(self.smoothquant, (int, float)) and 0.0 <= self.smoothquant <= 1.0,
                   f"smoothquant (alpha) must be in [0, 1], got {self.smoothquant!r}")
        if self.gptaq is not None:
            _check(self.method == "gptq", f"gptaq (GPTQv2) is an option of method gptq, not {self.method!r}")
            _check(isinstance(self.gptaq, (int, float)) and 0.0 < self.gptaq <= 1.0,
                   f"gptaq (alpha) must be in (0, 1], got {self.gptaq!r}")
            _check(self.bpw is None, "mixed precision's measurement solves on plain Hessians: gptaq does not take "
                                     "bpw (quantize with a saved allocation instead)")
        _check(self.kv_cache in (None, *KV_CACHES),
               f"kv_cache must be one of {', '.join(KV_CACHES)} or None, got {self.kv_cache!r}")
        _check(self.rotation in (None, *ROTATIONS),
               f"rotation must be one of {', '.join(ROTATIONS)} or None, got {self.rotation!r}")
        _check(isinstance(self.rotation_seed, int) and self.rotation_seed >= 0,
               f"rotation_seed must be a non-negative integer, got {self.rotation_seed!r}")
        object.__setattr__(self, "skip", tuple(self.skip))

    @classmethod
    def from_scheme(cls, name: str, **fields) -> QuantizeConfig:
        """The config of llm-compressor's preset scheme `name` (SCHEMES: W4A16, W8A8, FP8_DYNAMIC, FP8_BLOCK, ...),
        `fields` added or overriding (method, calibration options, group_size...)."""
        _check(name in SCHEMES, f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}")
        return cls(**{**SCHEMES[name], **fields})

    def for_device(self, device) -> QuantizeConfig:
        """This config with compute_dtype "auto" resolved for `device` (utils/device.native_compute_dtype)."""
        if self.compute_dtype != "auto":
            return self
        from .utils.device import native_compute_dtype

        return dataclasses.replace(self, compute_dtype=native_compute_dtype(device))

    @property
    def needs_calibration(self) -> bool:
        return (NEEDS_CALIBRATION[self.method] and not (self.method == "awq" and self.awq_from)) or \
            self.smoothquant is not None or self.act_static or self.kv_cache is not None

    @property
    def rotation_key(self) -> list | None:
        """[rotation, seed]: what results made on the rotated model (AWQ scales, a measurement) were made under."""
        return [self.rotation, self.rotation_seed] if self.rotation else None

    @property
    def uses_awq(self) -> bool:
        return self.method.startswith("awq")

    @property
    def input_scheme(self):
        """The quantized linears' input scheme (solvers.InputScheme: act_bits, fp8, act_static, the FP8 blocks'
        input groups); None: weight-only."""
        from .solvers.grid import InputScheme

        return None if self.act_bits is None else InputScheme(
            self.act_bits, self.fp8, self.act_static,
            self.group_size if self.fp8_block or self.mx or self.nvfp4 else -1, self.mx, self.nvfp4)

    @property
    def grid(self):
        """The weights' grid (solvers.Grid) every quantized linear takes unless a mixed allocation gives it another."""
        from .solvers.grid import Grid

        return Grid(self.bits, self.group_size, self.sym, self.fp8, self.group_size if self.fp8_block else 0,
                    self.nvfp4 or self.mx and self.bits == 4, self.mx)


@dataclass(frozen=True)
class CalibrationConfig(_JsonMixin):
    """Which calibration samples to draw: `source` is a SPEC (builtin:NAME or a .txt/.jsonl/.parquet path).
    These defaults are also `QModel.quantize`'s and the CLI's. Windows of 512 tokens, not the GPTQ paper's 2048:
    at the same token count, windows of 2048 left GPTQ's ppl on SmolLM2 8-34% higher (each window's first
    token, the attention sink, is one token in 2048 instead of one in 512; BENCHMARKS.md "Calibration window
    length")."""

    source: str = "builtin:mix"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.source), "calibration source must not be empty")
        _check(self.nsamples >= 1, f"nsamples must be at least 1, got {self.nsamples}")
        _check(self.seqlen >= 2, f"seqlen must be at least 2, got {self.seqlen}")


@dataclass(frozen=True)
class SimulationConfig(_JsonMixin):
    """Simulated quantization applied at evaluation time (qforge.eval.simulate): RTN weights on an fp
    model, per-token activations, the KV cache, and SmoothQuant folded in first (its activation
    maxima come from `calib`); before all of it, the model rotated (`rotation`, as QuantizeConfig's)."""

    weight_bits: int | None = None       # RTN, symmetric, on an unquantized model
    weight_group_size: int = -1
    act_bits: int | None = None          # per-token dynamic symmetric input of every quantized linear
    kv_bits: int | None = None           # keys and values as they enter the cache, asymmetric
    kv_group_size: int = -1              # channels of head_dim per KV scale (-1: the whole head)
    smoothquant: float | None = None     # alpha
    calib: CalibrationConfig = CalibrationConfig(nsamples=32, seqlen=512)
    fp8: bool = False                    # weights (8 bits, per channel) and inputs on E4M3 grids instead of int8
    kv_fp8: bool = False                 # keys and values cast to E4M3 (per-tensor scale 1, as vLLM's fp8 cache)
    rotation: str | None = None          # QuaRot / SpinQuant R1 + R2 folded in first (smoothing/rotate.py), seed 0

    def __post_init__(self) -> None:
        if isinstance(self.calib, dict):
            object.__setattr__(self, "calib", CalibrationConfig(**self.calib))
        _check(self.weight_bits is None or self.weight_bits in range(2, 9),
               f"weight bits must be 2..8, got {self.weight_bits!r}")
        _check(self.weight_group_size == -1 or self.weight_group_size >= 1,
               f"weight group size must be -1 or positive, got {self.weight_group_size!r}")
        _check(self.act_bits in (None, 8, 4), f"act bits must be 8 or 4, got {self.act_bits!r}")
        _check(self.kv_bits in (None, 8, 4, 3, 2), f"KV bits must be 8, 4, 3 or 2, got {self.kv_bits!r}")
        _check(self.kv_group_size == -1 or self.kv_group_size >= 1,
               f"KV group size must be -1 or positive, got {self.kv_group_size!r}")
        _check(self.smoothquant is None or 0.0 <= self.smoothquant <= 1.0,
               f"SmoothQuant alpha must be in [0, 1], got {self.smoothquant!r}")
        _check(not self.kv_fp8 or self.kv_bits == 8, f"an FP8 KV cache is 8 bits, got kv bits {self.kv_bits}")
        _check(self.rotation in (None, *ROTATIONS),
               f"rotation must be one of {', '.join(ROTATIONS)} or None, got {self.rotation!r}")
        if self.fp8:
            _check(self.weight_bits in (None, 8) and self.weight_group_size == -1 and self.act_bits in (None, 8)
                   and (self.weight_bits or self.act_bits),
                   "simulated FP8 is E4M3 weights (8 bits, per channel) and/or inputs (8 bits): "
                   f"got weight bits {self.weight_bits}, group size {self.weight_group_size}, act bits {self.act_bits}")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.weight_bits, self.act_bits, self.kv_bits, self.smoothquant,
                                           self.rotation))

    @property
    def input_scheme(self):
        """The simulated inputs' scheme (per token, int or E4M3), None when inputs stay unquantized."""
        from .solvers.grid import InputScheme

        return InputScheme(self.act_bits, fp8=self.fp8) if self.act_bits else None

    @property
    def label(self) -> str:
        """W4A8, W16A16 KV4 ... in the paper's notation (W16/A16: not simulated here)."""
        s = ("FP8 " if self.fp8 else "") + f"W{self.weight_bits or 16}A{self.act_bits or 16}"
        if self.kv_bits:
            s += " KV FP8" if self.kv_fp8 else f" KV{self.kv_bits}"
        if self.smoothquant is not None:
            s += f" SmoothQuant({self.smoothquant:g})"
        if self.rotation is not None:
            s += f" rotated ({self.rotation})"
        return s
