"""Packed layers on a CPU: PyTorch's weight-only int4 and int8 matmuls (kernels/cpu_matmul.py) against the dense
matmul and the reference (unpack and dequantize per call), per layer and for decoding a whole model.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_kernels.py [--quick] [--only layers|decode|peers]

1. Layers: SmolLM2-135M's shapes and Llama-3-8B's, batch 1-256, bf16 and fp32 activations, random codes
   (W4 g64 asym, 4096-wide ones g128; W8 per-channel asym, bf16 and up to 16 rows): median ms, the bytes each
   path holds per ms (GB/s), speed-up over the dense matmul in the same dtype.
2. Decoding: SmolLM2-135M quantized (RTN W4 g64 asym; the solver does not change the layout) and exported as
   gptq, loaded back (qforge.load): greedy decode tokens/s with a static KV cache, prefill time of a 512-token
   window, wiki ppl of the first windows of 512 (not the protocol's) and their KLD and top-1 agreement against
   the packed model run in fp32, and the bytes the linears hold.
3. Peers: GPTQModel's CPU backends (its int4 ones call the same PyTorch op) against qforge on one gptq export
   (W4 g64 sym), bf16: decode tokens/s, prefill time, wiki ppl. GPTQModel runs from .venv-clients.
4. Preparation (`--only prepare`): converting a 70B down-proj-shaped layer (8192 x 28672, W4 g128) to the int4
   layout, whole and in pieces of WEIGHTS_PER_CONVERSION weights, each in a fresh process: time and the peak
   resident memory it adds above the process holding the packed layer.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT = torch.randint(100, 20000, (1, 32), generator=torch.Generator().manual_seed(0))   # what decoding follows
LAYERS = [("SmolLM2 q/o", 576, 576, 64), ("SmolLM2 gate/up", 1536, 576, 64), ("SmolLM2 down", 576, 1536, 64),
          ("8B q/o", 4096, 4096, 128), ("8B gate/up", 14336, 4096, 128), ("8B down", 4096, 14336, 128)]


def median_ms(fn, budget_s: float = 0.4, min_reps: int = 3) -> float:
    fn()                                                                   # warm-up (and int4 preparation)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _random_layer(N: int, K: int, bits: int, group: int):
    from qforge.solvers import Grid, LayerQuant

    g = torch.Generator().manual_seed(N + K + bits)
    grid = Grid(bits, group, False)
    G, top = grid.n_groups(K), 1 << bits
    return LayerQuant(grid, torch.randint(0, top, (N, K), generator=g).to(torch.uint8),
                      torch.rand(N, G, generator=g) * 0.01 + 1e-3, torch.randint(0, top, (N, G), generator=g).float(),
                      torch.arange(K, dtype=torch.int32) // grid.group_len(K), info={})


def layer_table(batches, dtypes) -> None:
    from qforge.cli.table import format_table
    from qforge.kernels import QuantLinear, cpu_matmul, matmul_reference

    rows = []
    for name, N, K, group in LAYERS:
        for bits, grp in ((4, group), (8, -1)):                 # 8 bits: per-channel, what the int8 matmul takes
            q = _random_layer(N, K, bits, grp)
            W, lin = q.dequantize(), QuantLinear.from_quant(q)
            packed = (lin.qweight, lin.qzeros, lin.scales, lin.g_idx, bits)
            for dtype in dtypes if bits == 4 else [torch.bfloat16]:
                Wd, wq = W.to(dtype), cpu_matmul.prepare(*packed, dtype)
                held = sum(t.nbytes for t in vars(wq).values() if isinstance(t, torch.Tensor))  # codes, scales
                for M in batches if bits == 4 else [b for b in batches if b <= 16]:
                    x = torch.randn(M, K).to(dtype)
                    slow = M > 16 and N * K > 1e7                # the reference (and fp32 int4) take seconds a call
                    with torch.no_grad():
                        dense = median_ms(lambda: torch.nn.functional.linear(x, Wd))
                        tq = median_ms(lambda: cpu_matmul.matmul(x, wq)) \
                            if dtype == torch.bfloat16 or M == 1 else float("nan")
                        tref = median_ms(lambda: matmul_reference(x, *packed)) if not slow else float("nan")
                    rows.append([name, f"{N}x{K}", f"W{bits} g{grp}", str(dtype).split(".")[1], M, dense, tref, tq,
                                 Wd.numel() * Wd.element_size() / dense / 1e6, held / tq / 1e6, dense / tq])
                    print(rows[-1], flush=True)
    print(format_table(["layer", "out x in", "scheme", "dtype", "batch", "dense ms", "reference ms", "packed ms",
                        "dense GB/s", "packed GB/s", "packed speed-up"], rows,
                       title=f"CPU linear layers, asym, {torch.get_num_threads()} threads (packed: kernels/cpu_matmul; "
                             f"reference: unpack per call; nan: not timed, seconds per call)"))


def _linear_bytes(model) -> int:
    from qforge.kernels import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            held = [m.qweight, m.qzeros, m.scales, m.g_idx, m._w_cache]
            if m._cpu_weight:
                held += [t for t in vars(m._cpu_weight).values() if isinstance(t, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in held if t is not None)
        elif isinstance(m, torch.nn.Linear) and m.weight is not getattr(model.get_input_embeddings(), "weight", None):
            total += m.weight.numel() * m.weight.element_size()
    return total


# (label, QuantLinear.cache, QuantLinear.cpu_kernel, dtypes it applies to); qforge.load's default is cache and kernel
PACKED = [("packed, reference (unpack per call)", False, False, (torch.float32, torch.bfloat16)),
          ("packed, dense cache", True, False, (torch.float32, torch.bfloat16)),
          ("packed, int4 kernel", False, True, (torch.bfloat16,)),
          ("packed, int4 kernel + dense cache for prefill (default)", True, True, (torch.bfloat16,))]


def _windows(tok, n: int) -> torch.Tensor:
    """The first n windows of 512 tokens of the wiki evaluation set, cut as the perplexity protocol cuts them."""
    from qforge.eval import load_eval_text
    from qforge.eval.perplexity import token_windows

    return token_windows(tok, load_eval_text("wiki"), 512, n)


def _smollm2_export(d: str, sym: bool):
    """SmolLM2-135M quantized RTN W4 g64 (the solver does not change the layout), exported as gptq under d:
    (the quantized QModel, the export's path)."""
    import qforge

    m = qforge.load("smollm2-135m", qforge.QuantizeConfig(method="rtn", bits=4, group_size=64, sym=sym))
    m.quantize(None)
    m.export(Path(d) / "gptq", "gptq")
    return m, Path(d) / "gptq"


def _packed(path: Path, dtype: torch.dtype, **layer_attrs):
    """The packed checkpoint loaded by qforge.load, in `dtype`, its QuantLinear attributes set as given."""
    import qforge
    from qforge.kernels import QuantLinear

    model = qforge.load(path).model.to(dtype)
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            for k, v in layer_attrs.items():
                setattr(mod, k, v)
    return model


def _decode_prefill_logprobs(model, prompt, wiki, steps) -> tuple[float, float, torch.Tensor]:
    """(greedy decode tokens/s after `prompt`, median ms of a prefill of wiki's first window, log-probs on wiki)."""
    from qforge.eval.decode import greedy_decode

    with torch.no_grad():
        r = greedy_decode(model, prompt, steps)
        prefill = median_ms(lambda: model(input_ids=wiki[:1], use_cache=False), min_reps=2)
        lp = torch.log_softmax(model(input_ids=wiki).logits.float(), -1)
    return r.tokens_per_s, prefill, lp


def _ppl(lp: torch.Tensor, ids: torch.Tensor) -> float:
    return float((-lp[:, :-1].gather(-1, ids[:, 1:, None]).mean()).exp())


def decode_table(steps: int, dtypes, windows: int) -> None:
    from qforge.cli.table import format_table
    from qforge.eval.compare import kl_divergence

    rows = []
    with tempfile.TemporaryDirectory() as d:
        m, path = _smollm2_export(d, sym=False)
        wiki = _windows(m.tokenizer, windows)
        with torch.no_grad():                 # what every variant is compared with: the packed model in fp32
            truth = torch.log_softmax(_packed(path, torch.float32)(input_ids=wiki).logits.float(), -1)
        for dtype in dtypes:
            variants = [("dense (fake-quant weights)", m.model.to(dtype))]
            variants += [(label, _packed(path, dtype, cache=cache, cpu_kernel=kernel))
                         for label, cache, kernel, applies in PACKED if dtype in applies]
            for label, model in variants:
                tps, prefill, lp = _decode_prefill_logprobs(model, PROMPT, wiki, steps)
                kld = kl_divergence(truth, lp).mean()
                top1 = (truth.argmax(-1) == lp.argmax(-1)).float().mean()
                rows.append([str(dtype).split(".")[1], label, tps, prefill, _ppl(lp, wiki), f"{float(kld):.2e}",
                             float(top1), _linear_bytes(model) / 1e6])
                print(rows[-1], flush=True)
            variants.clear()
    print(format_table(["dtype", "model", "decode tokens/s", "prefill 512 ms", f"wiki ppl ({windows} x 512)",
                        "KLD vs fp32 packed", "top-1 agreement", "linears MB"], rows,
                       title=f"SmolLM2-135M W4 g64 asym (gptq export), greedy decode of {steps} tokens after 32, "
                             f"{torch.get_num_threads()} threads"))


# the peer's side, measured by this file's own helpers (imported from the benchmarks directory)
PEER = r"""
import json, sys, torch
torch.set_num_threads(2)
from gptqmodel import BACKEND, GPTQModel
sys.path.insert(0, sys.argv[5])
from cpu_kernels import PROMPT, _decode_prefill_logprobs, _ppl
path, backend, steps, windows = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = GPTQModel.load(path, device="cpu", dtype=torch.bfloat16, backend=BACKEND[backend]).model.eval()
kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__} - {"Linear"})
wiki = torch.load(windows)
tps, prefill, lp = _decode_prefill_logprobs(model, PROMPT, wiki, steps)
print("RESULT " + json.dumps({"layers": kinds, "tps": tps, "prefill_ms": prefill, "ppl": _ppl(lp, wiki)}))
"""
PEER_BACKENDS = ("GPTQ_TORCH_FUSED", "GPTQ_TORCH_ATEN", "GPTQ_TORCH")


def peer_table(steps: int, windows: int) -> None:
    """GPTQModel's CPU backends and qforge on one gptq export (W4 g64 sym: GPTQModel refuses an asymmetric gptq
    checkpoint it did not write), bf16, each GPTQModel backend in its own process."""
    import json
    import os
    import subprocess

    from qforge.cli.table import format_table

    root = Path(__file__).resolve().parent.parent
    client_py = str(root / ".venv-clients" / "bin" / "python")
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", TORCH_COMPILE_DISABLE="1", PYTHONPATH=str(root))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        m, path = _smollm2_export(d, sym=True)
        wiki = _windows(m.tokenizer, windows)
        torch.save(wiki, Path(d) / "wiki.pt")
        del m
        for label, cache in (("int4 matmul", False), ("int4 matmul + dense cache above 8 rows (default)", True)):
            tps, prefill, lp = _decode_prefill_logprobs(_packed(path, torch.bfloat16, cache=cache), PROMPT, wiki,
                                                        steps)
            rows.append(["qforge", label, tps, prefill, _ppl(lp, wiki)])
            print(rows[-1], flush=True)
        for backend in PEER_BACKENDS:
            p = subprocess.run([client_py, "-c", PEER, str(path), backend, str(steps),
                                str(Path(d) / "wiki.pt"), str(Path(__file__).parent)], capture_output=True, text=True,
                               env=env)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                why = p.stderr.strip().splitlines()[-1:]
                rows.append(["GPTQModel 7.6", f"{backend}: failed: {why}", *[float("nan")] * 3])
                continue
            r = json.loads(line[0][7:])
            rows.append(["GPTQModel 7.6", f"{backend} ({', '.join(r['layers'])})", r["tps"], r["prefill_ms"], r["ppl"]])
            print(rows[-1], flush=True)
    print(format_table(["tool", "path", "decode tokens/s", "prefill 512 ms", f"wiki ppl ({windows} x 512)"], rows,
                       title=f"SmolLM2-135M W4 g64 sym (one gptq export), bf16, greedy decode of {steps} tokens after "
                             f"32, {torch.get_num_threads()} threads"))


# Linux: writing 5 to /proc/self/clear_refs resets the peak resident size (VmHWM) to the current one (VmRSS)
_PREPARE_CHILD = """
import re, sys, time, torch
sys.path.insert(0, 'benchmarks')
from cpu_kernels import _random_layer
from qforge.kernels import QuantLinear, cpu_matmul
def kb(field):
    return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))
torch.set_num_threads(2)
m = QuantLinear.from_quant(_random_layer(8192, 28672, 4, 128), None)
cpu_matmul.WEIGHTS_PER_CONVERSION = int(sys.argv[1]) or m.out_features * m.in_features
open('/proc/self/clear_refs', 'w').write('5')
before = kb('VmRSS')
t = time.perf_counter()
w = cpu_matmul.prepare(m.qweight, m.qzeros, m.scales, m.g_idx, 4, torch.bfloat16)
print(time.perf_counter() - t, (kb('VmHWM') - before) / 1024, w.packed.numel() / 2**20)
"""


def prepare_table() -> None:
    import subprocess
    import sys

    from qforge.kernels import cpu_matmul

    print("\n## int4 preparation of an 8192 x 28672 layer (W4 g128), each in a fresh process")
    print("| weights converted at a time | seconds | peak memory added MB | int4 weight MB |\n|---|---|---|---|")
    for n in (0, cpu_matmul.WEIGHTS_PER_CONVERSION):
        out = subprocess.run([sys.executable, "-c", _PREPARE_CHILD, str(n)], capture_output=True, text=True,
                             check=True).stdout.split()
        sec, added, packed = map(float, out[-3:])
        print(f"| {f'{n:,} (WEIGHTS_PER_CONVERSION)' if n else 'all (one piece)'} | {sec:.2f} | {added:,.0f} | "
              f"{packed:,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="batches 1 and 16, bf16 only, 16 decode steps, 2 ppl windows")
    ap.add_argument("--only", choices=["layers", "decode", "peers", "prepare"], help="one of the tables")
    a = ap.parse_args()
    torch.set_num_threads(2)
    dtypes = [torch.bfloat16] if a.quick else [torch.bfloat16, torch.float32]
    if a.only in (None, "layers"):
        layer_table([1, 16] if a.quick else [1, 4, 8, 16, 64, 256], dtypes)
    if a.only in (None, "decode"):
        decode_table(16 if a.quick else 64, dtypes, 2 if a.quick else 8)
    if a.only in (None, "peers"):
        peer_table(16 if a.quick else 64, 2 if a.quick else 8)
    if a.only in (None, "prepare"):
        prepare_table()


if __name__ == "__main__":
    main()
