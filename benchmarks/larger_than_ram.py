"""A model larger than this machine's memory, quantized end to end: `qforge quantize --stream --packed-only`.

A random Llama with Llama-3-70B's block shape (hidden 8192, intermediate 28672, 64 query / 8 KV heads) and
vocabulary size (128256; SmolLM2's tokenizer, whose ids are all below it) is written as bf16 safetensors, one
shard per block, without ever holding the model in memory; `--layers` sets its depth (default: enough blocks
for the checkpoint to exceed the machine's RAM). The CLI then quantizes it in a child process while this
script samples the disk the run uses beside the source (run state, temporary and final output); the child's
peak resident memory is its ru_maxrss. The packed layers of the first and the last block are then checked
against RTN of the source weights computed here (codes equal, scales equal after the format's fp16 rounding).
Last, `qforge eval --stream` measures the perplexity of the source and of the packed output on one window,
one block at a time.

    .venv/bin/python benchmarks/larger_than_ram.py [--layers N] [--method rtn] [--work DIR] [--steps quantize,check,eval]
        [--rotate hadamard]

`--rotate KIND` quantizes the rotated model (`quantize --stream --rotate KIND`: each block rotated as it is read);
the check then rotates the source's blocks with qforge's own streamed rotation (its probe check run again) before
the RTN it compares with.

RTN by default: GPTQ on this shape costs minutes of CPU per block (the 28672-wide Hessian alone), which the
script runs too (`--method gptq --nsamples 4 --seqlen 128`) if you have the hours.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 8192, 28672, 64, 8, 128256


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def block_params() -> int:
    head = HIDDEN // HEADS
    return 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head + 3 * HIDDEN * INTER + 2 * HIDDEN


def make_model(d: Path, layers: int) -> Path:
    """The checkpoint, written block by block (bf16, std 0.02 linears, unit norms) with an index."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qforge.models.loading import resolve_model

    if (d / "config.json").is_file():
        return d
    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m")))
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(cfg)
    names = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tmp = d.with_name(d.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards = [[k for k in names if not k.startswith("model.layers.")]]
    shards += [[k for k in names if k.startswith(f"model.layers.{i}.")] for i in range(layers)]
    weight_map, total = {}, 0
    for s, keys in enumerate(shards):
        t = {k: (torch.ones(names[k]) if len(names[k]) == 1 else torch.randn(names[k], generator=gen) * 0.02)
             .to(torch.bfloat16) for k in keys}
        f = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(t, str(tmp / f), metadata={"format": "pt"})
        weight_map.update({k: f for k in keys})
        total += sum(v.numel() * 2 for v in t.values())
        print(f"  wrote {f} ({sum(v.numel() for v in t.values()) / 1e9:.2f} B params)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(d)
    return d


def du(paths) -> int:
    n = 0
    for p in paths:
        for root, _, files in os.walk(p):
            for f in files:
                try:
                    n += os.lstat(os.path.join(root, f)).st_size
                except FileNotFoundError:
                    pass
    return n


def check_blocks(src: Path, out: Path, blocks: list[int], group: int, rotate: str | None = None) -> list[str]:
    """The packed gptq layers of `blocks` against RTN of the source weights (rotated first with `rotate`)."""
    import torch

    from qforge.formats import FORMATS
    from qforge.models.arch import arch_spec, get_blocks, submodule_or_none
    from qforge.models.streaming import CheckpointFiles, load_streamed
    from qforge.smoothing.rotate import rotate_streamed
    from qforge.solvers import Grid
    from qforge.solvers.rtn import rtn

    grid, fmt = Grid(4, group, True), FORMATS["gptq"]
    packed = CheckpointFiles(out)
    lm, loader = load_streamed(str(src))
    if rotate:
        record = rotate_streamed(lm.model, loader, rotate)
        print(f"rotation re-checked: outputs moved {record['max_logit_change']:.2g} of their range")
    skeleton = get_blocks(lm.model, arch_spec(lm.model))
    lines = []
    for i in blocks:
        names = sorted({k.rsplit(".", 1)[0] for k in packed.where if k.startswith(f"model.layers.{i}.")
                        and k.endswith(".qweight")})
        ok = 0
        loader.load(i, skeleton[i])
        for n in names:
            ref = rtn(submodule_or_none(skeleton[i], n.split(f"model.layers.{i}.", 1)[1]).weight.detach(), grid)
            t = packed.read([f"{n}.{k}" for k in fmt.KEYS])
            got = fmt.unpack({k: t[f"{n}.{k}"] for k in fmt.KEYS}, grid)
            ok += torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales.half().float())
        loader.release(skeleton[i])
        lines.append(f"block {i}: {ok} of {len(names)} packed layers equal to RTN of the source weights"
                     + (f" rotated ({rotate})" if rotate else ""))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, help="decoder blocks (default: enough to exceed this machine's RAM)")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--work", default="/tmp/qforge-larger-than-ram")
    ap.add_argument("--steps", default="quantize,check,eval",
                    help="quantize (--packed-only), check (RTN: packed layers vs the source), eval (--stream)")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--rotate", choices=("hadamard", "orthogonal"), help="quantize the rotated model")
    a = ap.parse_args()
    emb = 2 * VOCAB * HIDDEN + HIDDEN
    layers = a.layers or int((1.2 * ram_bytes() / 2 - emb) // block_params()) + 1
    params = emb + layers * block_params()
    src = Path(a.work) / f"llama70b-shape-{layers}-layers"
    print(f"machine: {os.cpu_count()} cores, {ram_bytes() / 2**30:.1f} GiB RAM; model: {layers} blocks of "
          f"{block_params() / 1e6:.0f} M params, {params / 1e9:.2f} B params, {params * 2 / 2**30:.1f} GiB in bf16 "
          f"({params * 4 / 2**30:.1f} GiB in fp32, as an in-memory run would hold it)", flush=True)
    t0 = time.perf_counter()
    make_model(src, layers)
    print(f"source checkpoint ready in {time.perf_counter() - t0:.0f} s: {du([src]) / 2**30:.1f} GiB on disk",
          flush=True)
    if "quantize" in a.steps:
        quantize(a, src, layers, params)
    if "check" in a.steps and a.method == "rtn":
        for line in check_blocks(src, output_dir(a), [0, layers - 1], a.group_size, a.rotate):
            print(line)
    if "eval" in a.steps:
        evaluate(a, src)


def child(cmd: list[str], work: Path, src: Path) -> tuple[float, int, int]:
    """Run `cmd`; its wall time, peak RSS (bytes) and the peak disk used under `work` beside `src`."""
    print("$ " + " ".join(cmd), flush=True)
    peak_disk, running = [0], [True]

    def sample():
        while running[0]:
            peak_disk[0] = max(peak_disk[0], du([p for p in work.iterdir() if p != src]))
            time.sleep(2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)                       # this child's own rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    running[0] = False
    sampler.join()
    if proc.returncode:
        sys.exit(f"qforge exited with {proc.returncode}")
    return wall, usage.ru_maxrss * 1024, peak_disk[0]


def evaluate(a, src: Path) -> None:
    """`qforge eval --stream` of the source and of the packed output: one window through every block."""
    qforge = str(Path(sys.executable).with_name("qforge"))
    rows = []
    for model in (src, output_dir(a)):
        if not model.is_dir():
            continue
        res = Path(a.work) / "eval.json"
        wall, rss, _ = child([qforge, "eval", str(model), "--stream", "--dataset", "wiki", "--seqlen",
                              str(a.eval_seqlen), "--max-windows", "1", "--json", str(res)], Path(a.work), src)
        r = json.loads(res.read_text())[0]
        rows.append(f"| {model.name} | {r['windows']} x {r['seqlen']} tokens of wiki | {wall / 60:.1f} min | "
                    f"{rss / 2**30:.2f} GiB | {r['ppl']:.1f} |")
    print("\n| model (eval --stream) | windows | wall | peak RSS | ppl (random weights) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def output_dir(a) -> Path:
    return Path(a.work) / (f"out-{a.method}" + (f"-{a.rotate}" if a.rotate else ""))


def quantize(a, src: Path, layers: int, params: int) -> None:
    out = output_dir(a)
    for p in (out, out.with_name(out.name + ".partial")):    # an earlier run's: not counted in this one's disk
        shutil.rmtree(p, ignore_errors=True)
    cmd = [str(Path(sys.executable).with_name("qforge")), "quantize", str(src), "--stream", "--method", a.method,
           "--bits", "4", "--group-size", str(a.group_size), "--format", "gptq", "--packed-only", "--out", str(out),
           "--nsamples", str(a.nsamples), "--calib-seqlen", str(a.seqlen)] + (["--rotate", a.rotate] if a.rotate else [])
    wall, rss, peak_disk = child(cmd, Path(a.work), src)
    print("\n| model | params | bf16 on disk | fp32 | method | wall | peak RSS | peak extra disk | packed output |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| random Llama, 70B block shape, {layers} blocks | {params / 1e9:.2f} B | {du([src]) / 2**30:.1f} GiB | "
          f"{params * 4 / 2**30:.1f} GiB | {a.method} W4 g{a.group_size}{f' rotated ({a.rotate})' if a.rotate else ''} | "
          f"{wall / 60:.1f} min | "
          f"{rss / 2**30:.2f} GiB | {peak_disk / 2**30:.1f} GiB | {du([out]) / 2**30:.1f} GiB |")


if __name__ == "__main__":
    main()
