"""The `qforge` command: quantize, export, eval, generate, demo."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path

from ..config import BPW_UNITS, COMPUTE_DTYPES, HESSIAN_DTYPES, METHODS, SCHEMES, CalibrationConfig
from ..errors import QForgeError
from ..utils.device import check_device
from .table import format_table, human_bytes

log = logging.getLogger("qforge")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")   # the --dtype choices


def _at_least(low: int):
    """An argparse type: an integer >= low (a count, a length), refused by argparse with a message otherwise."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


COUNT, WHOLE = _at_least(1), _at_least(0)


def _widths(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated bit widths from 2 to 8 (4,8), as a tuple; empty: none given."""
    try:
        bits = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit widths such as 4,8, got {text!r}") from None
    if any(not 2 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths go from 2 to 8, got {text!r}")
    return bits


_widths.__name__ = "bit widths"


def _size(text: str) -> int:
    """An argparse type: a byte size, 4GB or 500MB or 2GiB (utils.shards.parse_size)."""
    from ..utils.shards import parse_size

    try:
        return parse_size(text)
    except QForgeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_size.__name__ = "size"


def _add_quant_args(p: argparse.ArgumentParser, default_group: int = 128) -> argparse.ArgumentParser:
    q = p.add_argument_group("quantization")
    q.add_argument("--scheme", choices=SCHEMES,
                   help="llm-compressor's preset: the grid and input quantization of "
                        + ", ".join(f"{k} ({_scheme_words(v)})" for k, v in SCHEMES.items())
                        + "; any option given beside it wins")
    q.add_argument("--method", default="rtn", choices=METHODS,
                   help="rtn (data-free), gptq, awq (scales + clipping, then RTN), awq+gptq (then the GPTQ solve)")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=default_group, help="-1 for per-channel")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric grid (default, except asymmetric for AWQ methods as in AutoAWQ)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero point")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening as a fraction of mean diag(H)")
    q.add_argument("--block-size", type=int, default=128, help="GPTQ: lazy-update block width")
    q.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    q.add_argument("--static-groups", action="store_true", help="GPTQ: group parameters fixed before reordering")
    q.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: groups in column order, visited most sensitive first (GAR; in-order g_idx); "
                        "default: on with groups and without --act-order")
    q.add_argument("--scale-search", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: each group's range shrunk to minimise its loss-weighted rounding error "
                        "(default: on for gptq and awq+gptq); --no-scale-search: min-max ranges")
    q.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="GPTQ: take every linear's statistics from the unquantized block in one pass")
    w = p.add_argument_group("AWQ (methods awq, awq+gptq)")
    w.add_argument("--awq-grid", type=int, default=20, help="points of the scale exponent grid in [0, 1)")
    w.add_argument("--no-awq-duo-scaling", dest="awq_duo_scaling", action="store_false",
                   help="s = mean|x|^a alone instead of mean|x|^a / mean|w|^(1-a)")
    w.add_argument("--awq-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clipping search after the scales (default: on for awq; for awq+gptq only with "
                        "--no-scale-search, as GPTQ's range search does the clipping)")
    w.add_argument("--awq-gptq-aware", action=argparse.BooleanOptionalAction, default=None,
                   help="awq+gptq: judge each scale candidate by the GPTQ-solved weights (and try no scaling) "
                        "instead of rounded ones (default: on for awq+gptq)")
    w.add_argument("--awq-from", default="", help="apply the scales/clips saved by an earlier run (its output "
                                                  "directory or awq_results.safetensors) instead of searching")
    x = p.add_argument_group("mixed precision (method gptq)")
    x.add_argument("--bpw", type=float, help="target average stored bits per weight of the quantized linears "
                                             "(2.0-8.0), counted as --format stores them (gptq by default)")
    x.add_argument("--bpw-units", choices=BPW_UNITS, default="linear",
                   help="linear (default): each linear its own scheme; fused: the linears vLLM fuses into one module "
                        "(a block's q/k/v, gate/up, a MoE block's experts) take one, so the export loads in vLLM")
    x.add_argument("--candidate-bits", type=_widths, default=(),
                   help="comma-separated bit widths the allocation may use, e.g. 4,8 for vLLM (default: every "
                        "width --format stores); a new measurement measures only these")
    x.add_argument("--measurement", default="", help="measurement file from `qforge measure` to reuse (or to "
                                                     "write and resume; default OUT.measurement.json)")
    x.add_argument("--verify-samples", type=int, default=0,
                   help="after planning, quantize each block alone at its schemes and run this many calibration "
                        "sequences through the model; a block costing more than the whole allocation's predicted "
                        "KL on one of them gets its lowest width raised (default 0: no check)")
    x.add_argument("--search-generations", type=int, default=0,
                   help="after planning, improve the allocation by this many generations of evolutionary search "
                        "judged by the whole model's KL on calibration sequences (default 0: no search)")
    x.add_argument("--search-samples", type=int, default=16, help="calibration sequences the search is judged on")
    x.add_argument("--search-offspring", type=int, default=8, help="mutants scored per search generation")
    x.add_argument("--search-span", type=int, default=2,
                   help="levels (measured options no cheaper one beats) a linear may move either side of the "
                        "plan's pick")
    c = p.add_argument_group("calibration (ignored by rtn without --smoothquant)")
    c.add_argument("--calib", default=CalibrationConfig.source,
                   help="builtin:mix|builtin:DOMAIN or a .txt/.jsonl/.parquet file")
    c.add_argument("--nsamples", type=COUNT, default=CalibrationConfig.nsamples)
    c.add_argument("--calib-seqlen", dest="calib_seqlen", type=int, default=CalibrationConfig.seqlen,
                   help="tokens per calibration sample (each starts a sequence: windows of 2048 gave SmolLM2 8-34%% "
                        "higher GPTQ ppl than the same tokens in windows of 512, and 128 lower still)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--compute-dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="dtype of quantize's calibration passes and Hessian products (summed in fp32; `measure` "
                        "runs fp32 and refuses another). auto: bfloat16 where the device multiplies it natively "
                        "(CUDA, CPUs with AVX512-BF16 or AMX: 1.7x faster than float32 there), float32 elsewhere "
                        "(emulated bf16 is several times slower); float32 is exact")
    c.add_argument("--hessian-dtype", default="bfloat16", choices=HESSIAN_DTYPES,
                   help="with bf16 passes: round each batch's Hessian products to bf16 (fast) or sum them in "
                        "fp32 (a positive semi-definite H: no damping raised for rounding)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=COUNT, default=8, help="calibration samples per forward")
    return p


def _add_eval_args(p: argparse.ArgumentParser, default_windows: int | None = None) -> None:
    p.add_argument("--dataset", default="wiki,brown,news,code", help="comma-separated built-in sets or files")
    p.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, default=2048, help="evaluation window length")
    p.add_argument("--max-windows", type=WHOLE, default=default_windows,
                   help="evaluate the first K windows of each set (0: all)")


def _add_export_args(p: argparse.ArgumentParser, help_text: str, default: str | None = None) -> None:
    from ..formats import FORMATS

    p.add_argument("--format", choices=list(FORMATS), default=default, help=help_text)
    p.add_argument("--dtype", default="float16", choices=FLOAT_DTYPES,
                   help="dtype of the non-quantized tensors in the packed checkpoint")
    p.add_argument("--max-shard-size", type=_size, default="4GB",
                   help="largest safetensors shard: 4GB (10^9 bytes), 500MB, 2GiB (2^30); a streamed export holds "
                        "one shard in memory")


def _export(m, out, a) -> None:
    import torch

    sizes = m.export(out, a.format, getattr(torch, a.dtype), overwrite=a.overwrite, max_shard_size=a.max_shard_size)
    print(f"packed {a.format} checkpoint -> {out}: {human_bytes(sizes['safetensors_bytes'])} of safetensors, "
          f"quantized linears {human_bytes(sizes['quantized_layer_bytes'])} = "
          f"{sizes['bits_per_weight']:.3f} bits/weight (measured on the files)")


MIXED_FORMATS = ("gptq", "compressed-tensors")


def _add_rotation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rotate", choices=("hadamard", "orthogonal"),
                   help="rotate the model first (QuaRot; SpinQuant's R1/R2 untrained): a randomized Hadamard (or "
                        "random orthogonal) matrix on the residual stream and one per attention head's values, "
                        "folded into the weights (the model's function is unchanged, checked on a probe); outliers "
                        "spread out, so low-bit weights and W4A4 inputs lose less. RMSNorm families; a tied head "
                        "is untied; the output is a plain checkpoint")
    p.add_argument("--rotation-seed", type=int, default=0, help="seed of --rotate's signs / matrices")


def _add_quantize_only_args(p: argparse.ArgumentParser) -> None:
    """Options of the commands that quantize (quantize, study, demo), not of `measure`, which measures every linear
    weight-only."""
    p.add_argument("--skip", nargs="+", default=(), metavar="PATTERN",
                   help="modules kept in full precision: glob patterns on full module names, e.g. "
                        "'*.mlp.down_proj' or 'model.layers.0.*' (lm_head and embeddings always are)")
    p.add_argument("--gptaq", type=float, metavar="ALPHA",
                   help="method gptq: GPTAQ (GPTQv2) also corrects each linear for how its inputs in the model being "
                        "quantized differ from the fp model's (one more pass per block; GPTQModel's default alpha "
                        "is 0.25)")
    g = p.add_argument_group("weight-activation quantization (W8A8) and FP8")
    g.add_argument("--act-bits", type=int, choices=(8, 4),
                   help="8: the quantized linears' inputs are int8 (E4M3 with --fp8) too, per token and dynamic "
                        "(W8A8, with --bits 8 --group-size -1 --sym; exported as compressed-tensors int-quantized, "
                        "which vLLM runs on int8 GEMMs); evaluation and generate quantize them as the model runs. "
                        "With --mx: MX inputs of the weights' bits (4: MXFP4, 8: MXFP8) per token in groups of 32; "
                        "4 with --nvfp4 --act-static: NVFP4 inputs under a calibrated global scale (W4A4)")
    g.add_argument("--smoothquant", type=float, metavar="ALPHA",
                   help="W8A8: fold SmoothQuant scales (alpha in [0, 1], e.g. 0.8 as llm-compressor's W8A8 "
                        "examples) into each block, from its calibration inputs, before its weights are quantized")
    g.add_argument("--fp8", action="store_true",
                   help="FP8 (E4M3) weights with one scale per output channel (with --bits 8 --group-size -1; "
                        "method rtn or gptq); with --act-bits 8 the inputs are FP8 too, per token and dynamic "
                        "(llm-compressor's FP8_DYNAMIC). Exported as compressed-tensors float-quantized, which vLLM "
                        "runs on FP8 GEMMs")
    g.add_argument("--nvfp4", action="store_true",
                   help="NVFP4 weights (with --bits 4 --group-size 16; llm-compressor's NVFP4A16): E2M1 codes, E4M3 "
                        "group scales over one global scale per tensor, shared by the linears engines fuse; "
                        "exported as compressed-tensors nvfp4-pack-quantized")
    g.add_argument("--mx", action="store_true",
                   help="MX weights, the OCP microscaling formats (with --group-size 32: --bits 4 is MXFP4, --bits 8 "
                        "--fp8 MXFP8; llm-compressor's MXFP4A16 / MXFP8A16): E2M1 or E4M3 codes, one power-of-two "
                        "scale per group; exported as compressed-tensors mxfp4-pack-quantized / mxfp8-quantized")
    g.add_argument("--fp8-block", action="store_true",
                   help="with --fp8: one weight scale per group-size x group-size block (--group-size 128: "
                        "llm-compressor's FP8_BLOCK, DeepSeek-V3's layout) instead of per channel; with --act-bits 8 "
                        "the inputs are FP8 per token in groups of group-size channels")
    g.add_argument("--act-static", action="store_true",
                   help="with --act-bits 8: one fixed scale per linear for its inputs (the largest |x| it reads in "
                        "calibration / 127, or / 448 with --fp8), saved as its input_scale, instead of one per token "
                        "computed as the model runs (llm-compressor's static activations, its FP8 scheme's)")
    g.add_argument("--act-observer", choices=("max", "mse"), default="max",
                   help="with --act-static: the scale is the largest |x| (max: nothing clipped), or that times the "
                        "clip ratio (1.0 .. 0.1) with the least squared error over the calibration inputs (mse: one "
                        "more pass per block; far better for int8 without --smoothquant)")
    p.add_argument("--kv-cache", choices=("fp8",),
                   help="fp8: calibrate an FP8 scale for every attention layer's keys and one for its values "
                        "(max / 448 over the calibration set, on the quantized model), exported as compressed-tensors "
                        "kv_cache_scheme (vLLM: --kv-cache-dtype fp8); evaluation and generate then cache keys and "
                        "values in E4M3 with them")
    _add_rotation_args(p)


def _quant_config(a):
    from ..config import QuantizeConfig

    return QuantizeConfig(method=a.method, bits=a.bits, group_size=a.group_size, sym=a.sym, damp=a.damp,
                          block_size=a.block_size, act_order=a.act_order, static_groups=a.static_groups,
                          act_group_aware=a.act_group_aware, true_sequential=a.true_sequential,
                          scale_search=a.scale_search, awq_grid=a.awq_grid, awq_duo_scaling=a.awq_duo_scaling,
                          awq_clip=a.awq_clip, awq_gptq_aware=a.awq_gptq_aware, awq_from=a.awq_from,
                          compute_dtype=a.compute_dtype, hessian_dtype=a.hessian_dtype, bpw=a.bpw, measurement=a.measurement,
                          verify_samples=a.verify_samples, search_generations=a.search_generations,
                          search_samples=a.search_samples, search_offspring=a.search_offspring,
                          search_span=a.search_span, bpw_units=a.bpw_units, bpw_bits=a.candidate_bits,
                          bpw_format=getattr(a, "format", None) if getattr(a, "format", None) in MIXED_FORMATS
                          else "gptq", act_bits=getattr(a, "act_bits", None),
                          smoothquant=getattr(a, "smoothquant", None), skip=tuple(getattr(a, "skip", ())),
                          gptaq=getattr(a, "gptaq", None), fp8=getattr(a, "fp8", False),
                          fp8_block=getattr(a, "fp8_block", False), nvfp4=getattr(a, "nvfp4", False),
                          mx=getattr(a, "mx", False),
                          act_static=getattr(a, "act_static", False), act_observer=getattr(a, "act_observer", "max"),
                          kv_cache=getattr(a, "kv_cache", None), rotation=getattr(a, "rotate", None),
                          rotation_seed=getattr(a, "rotation_seed", 0))


def _scheme_words(fields: dict) -> str:
    from ..config import QuantizeConfig

    cfg = QuantizeConfig(**fields)
    return (f"{_fp8(cfg)}W{cfg.bits} {_groups(cfg, 'per channel')}{'' if cfg.sym else ' asym'}"
            f"{f' A{cfg.act_bits} ' + ('static' if cfg.act_static else 'dynamic') if cfg.act_bits else ''}")


def build_parser(scheme: dict | None = None) -> argparse.ArgumentParser:
    """The command line; `scheme` (a SCHEMES entry): the defaults `--scheme` gives the quantization options."""
    quantizing = []                             # the parsers with quantization options
    # no abbreviated options: `--export gptq` must not pass as `--export-out gptq`
    ap = argparse.ArgumentParser(prog="qforge", description="Post-training quantization of causal LMs.",
                                 allow_abbrev=False)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = ap.add_subparsers(dest="cmd", required=True,
                            parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))

    p = sub.add_parser("quantize", help="quantize a model and write an output directory")
    p.add_argument("model", help="built-in alias (smollm2-135m), HF directory, .gguf file or hub id")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    quantizing.append(_add_quant_args(p))
    _add_quantize_only_args(p)
    p.add_argument("--seqlen", dest="calib_seqlen", type=int, help="alias of --calib-seqlen")
    p.add_argument("--allocation", default="", help="mixed precision: reuse the allocation.json of an earlier run "
                                                    "(one scheme per linear) instead of --bpw")
    _add_export_args(p, "also write a packed checkpoint in this format to --export-out")
    p.add_argument("--export-out", help="where the packed checkpoint goes (default: OUT-FORMAT)")
    p.add_argument("--packed-only", action="store_true",
                   help="write only the --format checkpoint, to --out: no dense qforge output beside it (a 4-bit "
                        "model takes ~0.5 bytes per weight on disk instead of ~5.5 more; it can then not be "
                        "re-exported or reported on)")
    p.add_argument("--stream", action="store_true",
                   help="models larger than RAM: read one decoder block at a time from the safetensors files, and "
                        "write the output (and --format's checkpoint) block by block (--bpw measures and "
                        "--verify-samples checks streamed too; --search-generations needs the model in memory)")
    _add_probe_memory(p)

    p = sub.add_parser("measure", help="mixed precision: every layer's error at every candidate scheme")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="measurement JSON (resumed when it exists)")
    p.add_argument("--format", choices=MIXED_FORMATS, default="gptq", help="whose storage the costs count")
    p.add_argument("--probe-samples", type=COUNT, default=4, help="calibration samples the end-to-end KL probes run on")
    p.add_argument("--stream", action="store_true",
                   help="models larger than RAM: one decoder block in memory at a time, the same numbers (the "
                        "probes of a span of blocks share sweeps over the model: see qforge.mixed.streamed)")
    _add_probe_memory(p)
    quantizing.append(_add_quant_args(p))
    _add_rotation_args(p)
    p.set_defaults(compute_dtype="float32")           # the measurement runs fp32; another dtype is refused
    p.add_argument("--seqlen", dest="calib_seqlen", type=int, help="alias of --calib-seqlen")

    p = sub.add_parser("stats", help="AbsMax, Std and kurtosis of weights, linear inputs, keys and values")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="directory for stats.json and the plots (written atomically)")
    p.add_argument("--calib", default="builtin:mix", help="calibration data for the activations")
    p.add_argument("--nsamples", type=COUNT, default=16)
    p.add_argument("--calib-seqlen", type=_at_least(2), default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=COUNT, default=10, help="how many heaviest-tailed tensors to name")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("study", help="studies that quantize several times (calibration: one run per domain)")
    studies = p.add_subparsers(dest="study", required=True)
    p = studies.add_parser("calibration", help="quantize once per calibration domain, evaluate on every domain")
    p.add_argument("model")
    p.add_argument("--domains", default="wiki,brown,news,code", help="built-in domains (the mix is always added)")
    p.add_argument("--out", help="directory for study.json and study.png (written atomically)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--overfit-factor", type=float, default=3.0,
                   help="warn when a domain's off-domain degradation exceeds this multiple of the mix's")
    quantizing.append(_add_quant_args(p, default_group=64))
    _add_quantize_only_args(p)
    _add_eval_args(p, default_windows=2)

    p = sub.add_parser("report", help="a Markdown report (with plots) of a qforge output directory")
    p.add_argument("result", help="a qforge output directory")
    p.add_argument("--out", help="report directory (default: RESULT/report; written atomically)")
    p.add_argument("--eval", action="store_true", help="measure fp32 and quantized perplexity if the run recorded none")
    p.add_argument("--stats", action="store_true", help="add tensor statistics of the source model")
    _add_eval_args(p, default_windows=2)

    p = sub.add_parser("export", help="write a finished qforge run as a packed checkpoint engines load")
    p.add_argument("result", help="a qforge output directory (from `qforge quantize`)")
    p.add_argument("--out", required=True, help="the packed checkpoint directory (written atomically)")
    p.add_argument("--overwrite", action="store_true")
    _add_export_args(p, "packed format", default="gptq")
    p.add_argument("--stream", action="store_true", help="pack one decoder block at a time (models larger than RAM)")

    p = sub.add_parser("convert", help="dequantize a GGUF file into a Hugging Face directory (fp32 safetensors)")
    p.add_argument("gguf", help="a .gguf file")
    p.add_argument("--out", required=True, help="the model directory (written atomically)")
    p.add_argument("--max-shard-size", default="500MB", help="largest shard (memory holds about two)")
    p.add_argument("--dtype", default="float32", choices=FLOAT_DTYPES,
                   help="of the weights: float32 holds the dequantized values exactly, the others round them")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("generate", help="greedy continuation of a prompt, for a quick look at a model")
    p.add_argument("model", help="any model spec, a qforge output or a packed checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=COUNT, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=FLOAT_DTYPES,
                   help="the model's dtype; in bfloat16 on a CPU, packed 4-bit and per-channel 8-bit layers decode "
                        "through PyTorch's weight-only matmuls")
    p.add_argument("--no-dense-cache", action="store_true",
                   help="packed checkpoints: keep no dequantized copy of the weights (the dense model's memory); "
                        "prompts are slower, in bfloat16 on a CPU every step takes the weight-only matmuls")
    p.add_argument("--tune-kernels", action="store_true",
                   help="packed checkpoints on CUDA: time the Triton kernel's schedules per layer shape first")
    p.add_argument("--kernel-picks", metavar="FILE", help="with --tune-kernels: earlier picks to reuse, saved back")

    p = sub.add_parser("eval", help="perplexity of a model or a quantized output directory")
    p.add_argument("model")
    _add_eval_args(p)
    p.add_argument("--stream", action="store_true",
                   help="models larger than RAM: run every window through one decoder block at a time, each read "
                        "once from the safetensors files (dense, qforge output or packed; perplexity only)")
    p.add_argument("--seqlen", dest="eval_seqlen", type=int, help="alias of --eval-seqlen")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tune-kernels", action="store_true",
                   help="packed checkpoints on CUDA: time the Triton kernel's schedules per layer shape first")
    p.add_argument("--kernel-picks", metavar="FILE", help="with --tune-kernels: earlier picks to reuse, saved back")
    sim = p.add_argument_group("simulated quantization (fake quant: values rounded to the grid, math in float)")
    sim.add_argument("--w-bits", type=int, help="RTN symmetric weights on an unquantized model (W8, W4 ...)")
    sim.add_argument("--w-group-size", type=int, default=-1, help="weight group size (-1: per channel)")
    sim.add_argument("--act-bits", type=int, choices=[8, 4], help="per-token dynamic inputs of every quantized linear")
    sim.add_argument("--kv-bits", type=int, choices=[8, 4, 3, 2], help="keys and values entering the KV cache")
    sim.add_argument("--kv-fp8", action="store_true",
                     help="the KV cache in E4M3 (per-tensor scale 1, as vLLM's --kv-cache-dtype fp8 without "
                          "calibrated scales); implies --kv-bits 8")
    sim.add_argument("--kv-group-size", type=int, default=-1, help="head_dim channels per KV scale (-1: whole head)")
    sim.add_argument("--smoothquant", type=float, metavar="ALPHA", help="fold SmoothQuant scales in first")
    sim.add_argument("--rotate", choices=("hadamard", "orthogonal"),
                     help="rotate the model before everything else (as quantize --rotate): outliers spread out")
    sim.add_argument("--fp8", action="store_true",
                     help="E4M3 instead of int: --w-bits 8 weights per channel, --act-bits 8 inputs per token")
    sim.add_argument("--calib", default="builtin:mix", help="SmoothQuant's calibration data")
    sim.add_argument("--nsamples", type=COUNT, default=32)
    sim.add_argument("--calib-seqlen", type=_at_least(2), default=512)
    p.add_argument("--reference", help="a model to compare distributions with: mean KLD, top-1 agreement, delta p")

    p = sub.add_parser("demo", help="quantize the built-in model and compare perplexity with fp32")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/demo")
    quantizing.append(_add_quant_args(p))
    _add_quantize_only_args(p)
    _add_eval_args(p, default_windows=4)
    for p in quantizing if scheme else ():      # after every argument: set_defaults then replaces their defaults
        p.set_defaults(**scheme)
    return ap


def _add_probe_memory(p) -> None:
    p.add_argument("--probe-memory", type=_size, default="4GiB",         # mixed.measure.PROBE_MEMORY
                   help="mixed precision with --stream: memory for the end-to-end probes' activations; more holds "
                        "a longer span of blocks per sweep over the model, so fewer reads of it (default 4GiB)")


def cmd_measure(a) -> int:
    import qforge
    from ..calibration import build_calibration
    from ..config import QuantizeConfig
    from ..mixed import measure_model
    from ..mixed.measure import grid_key
    from ..solvers import Grid

    if a.compute_dtype != "float32":
        raise QForgeError(f"qforge measure runs in float32 (--compute-dtype {a.compute_dtype} applies to quantize's "
                          f"passes, not to the measurement)")
    cfg = QuantizeConfig(method="gptq", damp=a.damp, block_size=a.block_size, act_order=a.act_order,
                         static_groups=a.static_groups, act_group_aware=a.act_group_aware,
                         scale_search=a.scale_search, rotation=a.rotate, rotation_seed=a.rotation_seed)
    bits = a.candidate_bits or None
    m = qforge.load(a.model, cfg, stream=a.stream)
    m.rotate()                                        # --rotate: measured as quantize --rotate will solve it
    calib = build_calibration(a.calib, m.tokenizer, a.nsamples, a.calib_seqlen, a.seed)
    identity = {"model": a.model, "calibration": CalibrationConfig(a.calib, a.nsamples, a.calib_seqlen, a.seed).to_dict()}
    try:
        data = measure_model(m.model, calib.samples, a.out, cfg, a.format, bits, identity, a.device, a.batch_size,
                             show_progress=not a.quiet, probe_samples=a.probe_samples, weights=m.blocks,
                             probe_memory=a.probe_memory)
    except KeyboardInterrupt:
        return _interrupted(a.out)
    by_scheme: dict[str, list] = {}
    for d in data["layers"].values():
        for o in d["options"]:
            k = grid_key(Grid(o["bits"], o["group_size"], o["sym"]))
            by_scheme.setdefault(k, []).append((o["err"], o["rel_err"], o["stored_bits"], d["shape"][0] * d["shape"][1]))
    rows = [[k, len(v), sum(r[2] for r in v) / sum(r[3] for r in v), sum(r[0] for r in v), sum(r[1] for r in v) / len(v)]
            for k, v in by_scheme.items()]
    print(format_table(["scheme", "layers", "bpw", "summed KL, nats/token", "mean rel. output error"],
                       sorted(rows, key=lambda r: r[2]),
                       title=f"measurement of {len(data['layers'])} linears -> {a.out} (error: KL of the model's next-token "
                             f"distribution with one linear quantized, summed over linears; see qforge.mixed.measure)"))
    return 0


def cmd_stats(a) -> int:
    import qforge
    from ..analysis import collect_stats, plot_stats
    from ..analysis.stats import heaviest_tails
    from ..calibration import build_calibration
    from ..models.arch import arch_spec
    from ..utils.atomic import atomic_dir, check_new_output

    check_new_output(a.out, a.overwrite)
    m = qforge.load(a.model)
    calib = build_calibration(a.calib, m.tokenizer, a.nsamples, a.calib_seqlen, a.seed)
    stats = collect_stats(m.model, calib.samples)
    with atomic_dir(a.out, overwrite=a.overwrite) as tmp:
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        plot_stats(stats, arch_spec(m.model).blocks, tmp)
    for kind, rows in stats["layers"].items():
        if rows:
            print(format_table(["layer", "AbsMax", "Std", "kurtosis (max)", "its tensor"],
                               [[r["layer"], r["absmax"], r["std"], r["kurtosis"], r["kurtosis_tensor"]] for r in rows],
                               title=f"{kind} per decoder layer"))
    print(format_table(["kind", "tensor", "kurtosis", "AbsMax", "Std"],
                       [[r["kind"], r["tensor"], r["kurtosis"], r["absmax"], r["std"]]
                        for r in heaviest_tails(stats["tensors"], a.top)],
                       title=f"the {a.top} heaviest-tailed tensors"))
    print(f"kurtosis is E[(x-mu)^4]/sigma^4: a normal distribution gives 3. Statistics and plots -> {a.out}")
    return 0


def cmd_study(a) -> int:
    from ..eval.study import calibration_study, plot_study
    from ..utils.atomic import atomic_dir, check_new_output

    if a.calib != "builtin:mix":
        raise QForgeError("the calibration study draws its data from the built-in domains; drop --calib")
    if a.out:
        check_new_output(a.out, a.overwrite)                 # before the study's hours, not after
    study = calibration_study(a.model, _quant_config(a), a.domains.split(","), a.nsamples, a.calib_seqlen,
                              a.eval_seqlen, a.max_windows or None, a.seed, a.device, a.overfit_factor,
                              on_row=None if a.quiet else lambda c, r: print(f"calibrated on {c}: " + ", ".join(
                                  f"{d} {v:.3f}" for d, v in r.items()), flush=True))
    cols = list(study["fp"])
    rows = [["fp (unquantized)", *[study["fp"][c] for c in cols], None, None]]
    for calib, r in study["ppl"].items():
        d = study["degradation"][calib]
        rows.append([f"calib {calib}", *[r[c] for c in cols],
                     None if d["in_domain"] is None else f"{d['in_domain']:+.1%}", f"{d['off_domain']:+.1%}"])
    print(format_table(["", *[f"ppl {c}" for c in cols], "in-domain", "off-domain"], rows,
                       title=f"{a.model}: {a.method} W{a.bits} g{a.group_size}, calibrated on each domain "
                             f"({a.nsamples} x {a.calib_seqlen} tokens), ppl on {a.max_windows} x {a.eval_seqlen}"))
    for w in study["warnings"]:
        print(f"warning: {w}")
    if a.out:
        with atomic_dir(a.out, overwrite=a.overwrite) as tmp:
            (tmp / "study.json").write_text(json.dumps(study, indent=1) + "\n")
            plot_study(study, tmp / "study.png")
        print(f"study -> {a.out}")
    return 0


def cmd_report(a) -> int:
    from ..analysis.report import build_report
    from ..utils.atomic import atomic_dir

    out = Path(a.out) if a.out else Path(a.result) / "report"
    with atomic_dir(out, overwrite=True) as tmp:
        build_report(a.result, tmp, evaluate=a.eval, stats=a.stats, datasets=a.dataset.split(","),
                     max_windows=a.max_windows or None, seqlen=a.eval_seqlen)
    print(f"report -> {out / 'report.md'}")
    return 0


def _print_allocation(alloc) -> None:
    from ..mixed.plan import allocation_rows

    print(format_table(["layer", "scheme", "bpw", "error (proxy)", "rel. output error"], allocation_rows(alloc),
                       title=f"mixed precision: {alloc.bpw:.4f} bpw as {alloc.format} stores it "
                             f"(target {alloc.target_bpw}), summed error {alloc.total_err:.4g}"))
    v = alloc.verification
    if v:
        worst = max(v["blocks"].items(), key=lambda kv: kv[1]["worst_kl"], default=None)
        print(f"checked {len(v['blocks'])} blocks alone on {v['sequences']} calibration sequences: "
              + (f"worst block {worst[0]} at {worst[1]['worst_kl']:.3g} nats/token (limit {v['limit']:.3g}); "
                 if worst else "")
              + (f"raised {len(v['raised'])} layer(s) above their block's lowest width" if v["raised"]
                 else "no layer raised"))


def _export_dir(a, out) -> str:
    return a.export_out or f"{str(out).rstrip('/')}-{a.format}"


def _interrupted(*saved) -> int:
    """Ctrl-C: say which of the stages' saved results (a block directory, a measurement) the same command resumes."""
    kept = [str(p) for p in saved if p and Path(p).exists()]
    if kept:
        print(f"\ninterrupted: finished work is saved in {' and '.join(kept)}; the same command resumes from it",
              file=sys.stderr)
    return 130


def cmd_quantize(a) -> int:
    import qforge
    from ..utils.atomic import check_new_output

    check_new_output(a.out, a.overwrite)                     # before quantizing, so no run is lost at save
    if a.packed_only and not a.format:
        raise QForgeError("--packed-only writes the --format checkpoint: name one (gptq, compressed-tensors, awq)")
    if a.packed_only and a.export_out:
        raise QForgeError("--packed-only writes the packed checkpoint to --out; drop --export-out")
    if a.export_out and not a.format:
        raise QForgeError("--export-out says where the packed checkpoint goes: name its --format "
                          "(gptq, compressed-tensors, awq)")

    allocation = None
    if a.allocation:
        from ..mixed import Allocation

        if a.bpw is not None:
            raise QForgeError("--allocation already fixes every layer's scheme: give it or --bpw, not both")
        if a.search_generations and not a.measurement:
            raise QForgeError("continuing the search of --allocation needs the measurement it was planned from "
                              "(--measurement FILE)")
        allocation = Allocation.load(a.allocation)
        a.bpw = allocation.target_bpw                          # recorded in the run's config
    elif a.bpw is not None and not a.measurement:
        a.measurement = f"{str(a.out).rstrip('/')}.measurement.json"   # kept beside the output: resumable
    cfg = _quant_config(a)
    m = qforge.load(a.model, cfg, stream=a.stream)
    if a.format:                                             # also before quantizing: an impossible export
        if not a.packed_only:
            check_new_output(_export_dir(a, a.out), a.overwrite)
        m.check_export(a.format, allocation)
    state = f"{str(a.out).rstrip('/')}.partial"               # finished blocks, kept until the output is saved
    try:
        m.quantize(a.calib, nsamples=a.nsamples, seqlen=a.calib_seqlen, seed=a.seed, device=a.device,
                   batch_size=a.batch_size, show_progress=not a.quiet, allocation=allocation, resume=state,
                   probe_memory=a.probe_memory)
    except KeyboardInterrupt:
        return _interrupted(state, a.measurement)
    out = Path(a.out) if a.packed_only else m.save(a.out, overwrite=a.overwrite)
    if m.result.allocation is not None:
        _print_allocation(m.result.allocation)
    _print_quant_summary(m, out)
    if a.packed_only:                                        # packed from memory or, streamed, from the run state
        _export(m, out, a)
        m.drop_run_state()
    elif a.format:
        _export(m, _export_dir(a, out), a)
    return 0


def cmd_export(a) -> int:
    import qforge

    from ..checkpoint import is_qforge_output

    if not is_qforge_output(a.result):
        raise QForgeError(f"{a.result} is not a qforge output directory (no qforge_config.json); "
                          f"quantize first with `qforge quantize ... --out DIR`")
    _export(qforge.load(a.result, stream=a.stream), a.out, a)
    return 0


def cmd_convert(a) -> int:
    import torch

    from ..models.gguf import write_dense
    from ..models.loading import gguf_file
    from ..utils.atomic import atomic_dir
    from ..utils.shards import parse_size

    gguf = gguf_file(a.gguf)
    if gguf is None:
        raise QForgeError(f"{a.gguf} is not a .gguf file")
    size = parse_size(a.max_shard_size)
    with atomic_dir(Path(a.out), overwrite=a.overwrite) as tmp:
        write_dense(gguf, tmp, size, show_progress=not a.quiet, dtype=getattr(torch, a.dtype))
    files = sorted(Path(a.out).glob("*.safetensors"))
    print(f"wrote {a.out}: {len(files)} safetensors file(s), {sum(f.stat().st_size for f in files) / 1e9:.2f} GB")
    return 0


def cmd_generate(a) -> int:
    import qforge
    import torch

    m = qforge.load(a.model, dense_cache=not a.no_dense_cache)
    tuner = qforge.tune_kernels(m.model, a.device, a.kernel_picks) if a.tune_kernels else None
    m.model.to(a.device, getattr(torch, a.dtype))
    tok = m.tokenizer
    if a.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(a.prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(a.device)
    make_cache = m.kv_cache_factory()                   # an FP8 KV cache with the model's scales, if it has them
    with torch.no_grad(), m.quantized_inputs():
        out = m.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                               past_key_values=make_cache() if make_cache else None)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    if tuner is not None and a.kernel_picks:
        tuner.save(a.kernel_picks)
    return 0


def _print_quant_summary(m, out: Path) -> None:
    s = m.storage()
    acts = f"A{m.config.act_bits}" + (" (static input scales)" if m.config.act_static else "") \
        if m.config.act_bits else ""
    method = m.config.method + (f" (GPTAQ {m.config.gptaq:g})" if m.config.gptaq is not None else "")
    fp8 = _fp8(m.config)
    acts += " KV FP8" if m.config.kv_cache == "fp8" else ""
    rotated = f", rotated ({m.config.rotation})" if m.config.rotation else ""
    print(f"quantized {m.source} with {method} {fp8}W{m.config.bits}{acts} "
          f"{_groups(m.config, 'per-channel')} "
          f"{'sym' if m.config.sym else 'asym'}{rotated} in {m.result.seconds:.1f} s -> {out}")
    print(f"  {len(m.result.layers)} linears, {s['bits_per_weight']:.3f} bits/weight; model "
          f"{human_bytes(s['fp16_bytes'])} (fp16) -> {human_bytes(s['quantized_bytes'])} (packed)")
    if m.result.ragged_layers:
        print(f"  note: {len(m.result.ragged_layers)} linears have a ragged last group (group size "
              f"{m.config.group_size} does not divide their input width)")


def _fp8(cfg) -> str:
    """The label's prefix for FP8 weights (MXFP8 names itself in _groups)."""
    return "FP8 " if cfg.fp8 and not cfg.mx else ""


def _groups(cfg, per_channel: str) -> str:
    """How a config's weight scales are laid out, for a label."""
    if cfg.fp8_block:
        return f"{cfg.group_size}x{cfg.group_size} blocks"
    if cfg.nvfp4 or cfg.mx:
        return f"{'NVFP4' if cfg.nvfp4 else 'MXFP4' if cfg.bits == 4 else 'MXFP8'} g{cfg.group_size}"
    return per_channel if cfg.group_size == -1 else f"g{cfg.group_size}"


def cmd_eval(a) -> int:
    import qforge
    from ..config import SimulationConfig

    kv_bits = 8 if a.kv_fp8 and a.kv_bits is None else a.kv_bits
    sim = SimulationConfig(a.w_bits, a.w_group_size, a.act_bits, kv_bits, a.kv_group_size, a.smoothquant,
                           CalibrationConfig(a.calib, a.nsamples, a.calib_seqlen), fp8=a.fp8, kv_fp8=a.kv_fp8,
                           rotation=a.rotate)
    rows = qforge.evaluate(a.model, datasets=a.dataset.split(","), seqlen=a.eval_seqlen, max_windows=a.max_windows or None,
                           device=a.device, show_progress=not a.quiet, simulate=sim, reference=a.reference,
                           tune=a.tune_kernels, kernel_picks=a.kernel_picks, stream=a.stream)
    title = f"perplexity of {a.model}" + (f", simulated {sim.label}" if sim.active else "")
    if rows and rows[0].get("act_bits"):
        kind = f"{rows[0]['act_format']} fp" if rows[0].get("act_format") else "fp" if rows[0].get("act_fp8") \
            else "int"
        how = "per token" + (f" in groups of {rows[0]['act_group_size']}" if rows[0].get("act_group_size") else "")
        if rows[0].get("act_static"):
            how = f"{how} under calibrated global scales" if rows[0].get("act_format") == "NVFP4" else \
                "with static scales"
        title += f", inputs of its quantized linears quantized to {kind}{rows[0]['act_bits']} {how}"
    if rows and rows[0].get("kv_cache"):
        title += f", its KV cache in {rows[0]['kv_cache'].upper()} with calibrated scales"
    print(format_table(["dataset", "ppl", "seqlen", "windows", "tokens", "seconds"],
                       [[r["dataset"], r["ppl"], r["seqlen"], r["windows"], r["tokens"], r["seconds"]] for r in rows],
                       title=title))
    buckets = rows[0]["by_position"]
    print(format_table(["dataset", *[f"ppl @ {b['positions'][0]}-{b['positions'][1] - 1}" for b in buckets]],
                       [[r["dataset"], *[b["ppl"] for b in r["by_position"]]] for r in rows],
                       title="perplexity by position of the predicted token in its window"))
    if a.reference:
        print(format_table(["dataset", "mean KLD", "KLD p99", "top-1 agreement", "mean delta p"],
                           [[r["dataset"], r["reference"]["kld_mean"], r["reference"]["kld_p99"],
                             r["reference"]["top1_agreement"], r["reference"]["delta_p_mean"]] for r in rows],
                           title=f"next-token distributions against {a.reference}"))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_demo(a) -> int:
    import qforge

    cfg = _quant_config(a)
    datasets = a.dataset.split(",")
    t0 = time.perf_counter()
    m = qforge.load(a.model, cfg)
    kw = dict(datasets=datasets, seqlen=a.eval_seqlen, max_windows=a.max_windows or None, show_progress=not a.quiet)
    base = qforge.evaluate(m, **kw)
    fp16 = m.storage()["fp16_bytes"]
    m.quantize(a.calib, nsamples=a.nsamples, seqlen=a.calib_seqlen, seed=a.seed, device=a.device,
               batch_size=a.batch_size, show_progress=not a.quiet)
    quant = qforge.evaluate(m, **kw)
    out = m.save(a.out, overwrite=True, eval_fp32=base, eval_quantized=quant)
    s = m.storage()
    acts = f"A{cfg.act_bits}" + (" static" if cfg.act_static else "") + \
        (f" SmoothQuant {cfg.smoothquant:g}" if cfg.smoothquant is not None else "") if cfg.act_bits else ""
    fp8 = _fp8(cfg)
    label = (f"{cfg.method} {fp8}W{cfg.bits}{acts} {_groups(cfg, 'pc')} "
             f"{'sym' if cfg.sym else 'asym'}" + (" KV FP8" if cfg.kv_cache == "fp8" else "")
             + (f" rotated ({cfg.rotation})" if cfg.rotation else ""))
    rows = [[b["dataset"], b["ppl"], q["ppl"], f"{q['ppl'] - b['ppl']:+.3f}", f"{b['windows']}x{b['seqlen']}"]
            for b, q in zip(base, quant)]
    print()
    print(format_table(["domain", "fp32 ppl", f"{label} ppl", "delta", "windows"], rows,
                       title=f"{a.model}: fp32 vs {label}"))
    print(f"\nmodel size: {human_bytes(fp16)} (fp16) -> {human_bytes(s['quantized_bytes'])} "
          f"({s['bits_per_weight']:.3f} bits/weight in the quantized linears)")
    print(f"time: quantize {m.result.seconds:.1f} s, total {time.perf_counter() - t0:.1f} s; output in {out}")
    if m.result.ragged_layers:
        print(f"note: {len(m.result.ragged_layers)} linears have a ragged last group (group size {cfg.group_size} "
              f"does not divide their input width)")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if getattr(a, "scheme", None):              # its fields are the quantization options' defaults
        a = build_parser(SCHEMES[a.scheme]).parse_args(argv)
    level = logging.DEBUG if a.verbose else logging.WARNING if a.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if getattr(a, "device", None) is not None:
            check_device(a.device)                              # before any model is loaded
        return {"quantize": cmd_quantize, "measure": cmd_measure, "stats": cmd_stats, "study": cmd_study, "report": cmd_report, "export": cmd_export, "convert": cmd_convert, "eval": cmd_eval, "generate": cmd_generate,
                "demo": cmd_demo}[a.cmd](a)
    except QForgeError as e:
        print(f"qforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
