"""Real clients that qforge did not write (issues 5 and 6), each in its own process (tests/clients/worker.py):
GPTQModel loads qforge's gptq export of SmolLM2-135M, plain transformers loads its compressed-tensors
export (both mixed precision: 2/3/4/8 bits, several group sizes, per-layer overrides), and qforge loads
llm-compressor's and GPTQModel's own exports. Logits, greedy continuations and perplexity must match
what the other side computes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qforge
from qforge.models.arch import arch_spec, named_block_linears
from qforge.models.fused import fused_sets
from qforge.models.loading import resolve_model
from qforge.pipeline import quantize_model
from qforge.solvers import Grid, InputScheme

sys.path.insert(0, str(Path(__file__).parent / "clients"))
from worker import NEW_TOKENS, SEQLEN, WINDOWS, calibration, probe_ids  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLIENTS_PY = ROOT / ".venv-clients" / "bin" / "python"   # made by scripts/setup.sh (overlay on .venv)
WORKER = Path(__file__).parent / "clients" / "worker.py"
pytestmark = [pytest.mark.slow, pytest.mark.clients,
              pytest.mark.skipif(not CLIENTS_PY.exists(), reason="no .venv-clients: run scripts/setup.sh")]


# GPTQModel's CPU thread pool fails without a worker count; torch.compile of its kernels costs minutes on a CPU
WORKER_ENV = {"GPTQMODEL_CPU_WORKERS": "2", "TORCH_COMPILE_DISABLE": "1"}


def run_worker(task: str, model_dir: Path, out: Path) -> tuple[dict, torch.Tensor]:
    p = subprocess.run([str(CLIENTS_PY), str(WORKER), task, str(model_dir), str(out)], capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, **WORKER_ENV))
    assert p.returncode == 0, f"{task} failed:\n{p.stderr[-4000:]}"
    return worker_result(out)


def run_worker_batch(task: str, jobs: list[list[str]], jobs_file: Path) -> None:
    """One worker process runs `task` on each [model dir, out dir] of `jobs`; a job's failure is left in its out
    dir (error.txt) for worker_result to raise, a failure of the process itself in each."""
    jobs_file.write_text(json.dumps(jobs))
    p = subprocess.run([str(CLIENTS_PY), str(WORKER), task, "--batch", str(jobs_file)], capture_output=True,
                       text=True, timeout=1800, env=dict(os.environ, **WORKER_ENV))
    if p.returncode != 0:
        for _, out in jobs:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "error.txt").write_text(f"{task} worker failed:\n{p.stderr[-4000:]}")


def worker_result(out: Path) -> tuple[dict, torch.Tensor]:
    error = out / "error.txt"
    assert not error.exists(), error.read_text()
    return json.loads((out / "result.json").read_text()), torch.load(out / "logits.pt")


def qforge_side(path) -> tuple[dict, torch.Tensor]:
    from qforge.eval import load_eval_text, perplexity

    m = qforge.load(path)
    ids = probe_ids(m.tokenizer)
    make_cache = m.kv_cache_factory()                       # an FP8 KV cache: keys and values in E4M3, as served
    cache = (lambda: {"past_key_values": make_cache(), "use_cache": True}) if make_cache else dict
    with torch.no_grad(), m.quantized_inputs():             # W8A8: int8 inputs, as the checkpoint is served
        logits = m.model(ids, **cache()).logits.float()
        gen = m.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=m.tokenizer.eos_token_id, **cache())
        ppl = perplexity(m.model, m.tokenizer, load_eval_text("wiki"), SEQLEN, WINDOWS, show_progress=False,
                         make_cache=make_cache)["ppl"]
    return {"greedy": gen[0, ids.shape[1]:].tolist(), "ppl": ppl, "model": m}, logits


def assert_same_model(a: tuple[dict, torch.Tensor], b: tuple[dict, torch.Tensor]) -> None:
    (ra, la), (rb, lb) = a, b
    assert la.shape == lb.shape
    assert (la - lb).abs().max() < 1e-2 * la.abs().max()        # same weights, different kernels
    assert ra["greedy"] == rb["greedy"]
    assert rb["ppl"] == pytest.approx(ra["ppl"], rel=1e-3)      # within 0.1%


MIXED = [Grid(4, 64, True), Grid(8, -1, False), Grid(3, 64, True), Grid(2, 32, False), Grid(4, 32, False)]


def tiny_dir(model_type: str, tokenizer, where: Path, **overrides) -> Path:
    """A tiny random model of `model_type` (tests/tiny_models.py, seed 2) saved with the tiny tokenizer."""
    from tiny_models import tiny_model

    tiny_model(model_type, seed=2, **overrides).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def mixed_grids(model) -> dict:
    """Every third fused set (a block's q/k/v or gate/up, else one linear: models/fused.py) gets another scheme
    (2, 3, 4 and 8 bits; groups 32, 64 and per-channel), as a `--bpw` allocation ties them, so `dynamic` rules
    name vLLM's fused modules too; and one set split, as `--bpw-units linear` may leave it."""
    spec = arch_spec(model)
    sets = sorted(fused_sets(spec, named_block_linears(model, spec)).values())
    grids = {n: MIXED[k % len(MIXED)] for k, members in enumerate(sets) if k % 3 == 0 for n in members}
    split = next(members for k, members in enumerate(sets) if k % 3 and len(members) > 1)
    return {**grids, split[0]: Grid(4, 32, False)}


# session, not module: xdist runs other modules' tests between its two users, and a module fixture was rebuilt (2.5 min)
@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """SmolLM2 as qforge exports it: GPTQ with act-order (a permuted g_idx), base W4 g64 with per-layer
    overrides (GPTQModel's `dynamic`) as `gptq`; RTN asymmetric W4 g64 with the same kind of per-layer
    schemes (one config group each) as `compressed-tensors` (small calibration: formats, not quality)."""
    d = tmp_path_factory.mktemp("exports")
    m = qforge.load("smollm2-135m", qforge.QuantizeConfig(method="gptq", bits=4, group_size=64, act_order=True))
    m.result = quantize_model(m.model, m.config, calibration(m.tokenizer), grids=mixed_grids(m.model),
                              show_progress=False)
    assert any(not torch.equal(q.g_idx, q.g_idx.sort().values) for q in m.result.layers.values())
    assert {q.grid.bits for q in m.result.layers.values()} == {2, 3, 4, 8}
    m.export(d / "gptq", "gptq")
    r = qforge.load("smollm2-135m", qforge.QuantizeConfig(method="rtn", bits=4, group_size=64, sym=False))
    r.result = quantize_model(r.model, r.config, None, grids=mixed_grids(r.model), show_progress=False)
    r.export(d / "ct", "compressed-tensors")
    return d


@pytest.mark.xdist_group("smollm2-exports")   # one worker builds the module's exports
def test_gptqmodel_loads_qforge_gptq_export(exports, tmp_path):
    theirs = run_worker("gptqmodel-load", exports / "gptq", tmp_path)
    ours = qforge_side(exports / "gptq")
    assert theirs[0]["packed"] and theirs[0]["qlinear"] != "Linear"  # their packed module, not a dense copy
    assert_same_model(ours, theirs)


@pytest.mark.xdist_group("smollm2-exports")   # one worker builds the module's exports
def test_transformers_loads_qforge_compressed_tensors_export(exports, tmp_path):
    theirs = run_worker("transformers-ct", exports / "ct", tmp_path)
    assert theirs[0]["quant_method"] == "compressed-tensors"
    assert_same_model(qforge_side(exports / "ct"), theirs)


@pytest.mark.parametrize("act_bits", [8, None])
def test_transformers_loads_qforge_fp8_export(act_bits, tiny_tokenizer, tmp_path):
    """FP8 (float-quantized): transformers' compressed-tensors integration runs qforge's export as qforge does,
    the E4M3 inputs included (FP8_DYNAMIC) or not (weight-only)."""
    src = tiny_dir("llama", tiny_tokenizer, tmp_path / "src")
    m = qforge.load(src, qforge.QuantizeConfig(method="rtn", bits=8, group_size=-1, fp8=True, act_bits=act_bits))
    m.quantize(None)
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    theirs = run_worker("transformers-ct", tmp_path / "ct", tmp_path / "worker")
    assert theirs[0]["quant_method"] == "compressed-tensors"
    ours = qforge_side(tmp_path / "ct")
    assert_same_model(ours, theirs)
    if act_bits:                          # their model quantizes its inputs too: nearer ours than unquantized inputs
        m = ours[0]["model"]
        with torch.no_grad():
            plain = m.model(probe_ids(m.tokenizer)).logits.float()
        assert (theirs[1] - ours[1]).abs().max() < (theirs[1] - plain).abs().max() / 10


@pytest.mark.parametrize("fp8", [False, True])
def test_transformers_loads_qforge_static_input_exports(fp8, tiny_tokenizer, wiki_calibration, tmp_path):
    """W8A8 and FP8 W8A8 with static input scales: transformers' compressed-tensors integration reads each layer's
    input_scale and runs qforge's export as qforge does."""
    src = tiny_dir("llama", tiny_tokenizer, tmp_path / "src")
    m = qforge.load(src, qforge.QuantizeConfig(method="rtn", bits=8, group_size=-1, fp8=fp8, act_bits=8,
                                               act_static=True, compute_dtype="float32"))
    m.quantize(wiki_calibration)
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    theirs = run_worker("transformers-ct", tmp_path / "ct", tmp_path / "worker")
    ours = qforge_side(tmp_path / "ct")
    assert ours[0]["model"].input_scales is not None
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)
    assert_same_model(ours, theirs)


@pytest.mark.parametrize("act_bits", [8, None])
def test_transformers_loads_qforge_fp8_block_export(act_bits, tiny_tokenizer, tmp_path):
    """FP8 in 32 x 32 blocks (FP8_BLOCK's layout): transformers' compressed-tensors integration runs qforge's export
    (GPTQ-solved) as qforge does, with the E4M3 inputs per token in groups of 32 channels or without."""
    src = tiny_dir("llama", tiny_tokenizer, tmp_path / "src")
    m = qforge.load(src, qforge.QuantizeConfig(method="gptq", bits=8, group_size=32, fp8=True, fp8_block=True,
                                               act_bits=act_bits, compute_dtype="float32"))
    m.quantize("builtin:wiki", nsamples=4, seqlen=64)
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    theirs = run_worker("transformers-ct", tmp_path / "ct", tmp_path / "worker")
    ours = qforge_side(tmp_path / "ct")
    assert ours[0]["model"].result.layers["model.layers.0.mlp.down_proj"].grid.block_rows == 32
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)
    assert_same_model(ours, theirs)
    if act_bits:                          # per-token inputs (one scale a row) would give other logits
        from qforge.eval.simulate import quantized_activations

        q = ours[0]["model"]
        with torch.no_grad(), quantized_activations(q.model, InputScheme(8, fp8=True), set(q.result.layers)):
            per_token = q.model(probe_ids(q.tokenizer)).logits.float()
        assert (per_token - theirs[1]).abs().max() > 1e-4


@pytest.mark.parametrize("scheme", ["NVFP4A16", "MXFP4A16", "MXFP8A16"])
def test_transformers_loads_qforge_fp4_and_mx_exports(scheme, tiny_tokenizer, tmp_path):
    """NVFP4A16 (nvfp4-pack-quantized), MXFP4A16 / MXFP8A16 (mxfp4-pack-quantized / mxfp8-quantized), GPTQ-solved:
    transformers' compressed-tensors integration runs qforge's export as qforge does. It decompresses them into bf16
    weights: exact for MX's power-of-two scales (logits to 1e-5), rounded for NVFP4's."""
    src = tiny_dir("llama", tiny_tokenizer, tmp_path / "src")
    m = qforge.load(src, qforge.QuantizeConfig.from_scheme(scheme, method="gptq", compute_dtype="float32"))
    m.quantize("builtin:wiki", nsamples=4, seqlen=64)
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    theirs = run_worker("transformers-ct", tmp_path / "ct", tmp_path / "worker")
    ours = qforge_side(tmp_path / "ct")
    if scheme.startswith("MX"):
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)
    assert_same_model(ours, theirs)


def assert_nvfp4_w4a4_logits(m, theirs: torch.Tensor) -> None:
    """qforge's logits of an NVFP4 W4A4 model are `theirs` (transformers' or llm-compressor's, which run the weights
    decompressed into bf16) to 1e-5 once qforge's weights are rounded to bf16 too, and not without its inputs'
    quantization."""
    from qforge.kernels import Fp8Linear

    for mod in m.model.modules():
        if isinstance(mod, Fp8Linear):
            mod._w_cache = mod.dequantized(torch.float32).to(torch.bfloat16).float()
    ids = probe_ids(m.tokenizer)
    with torch.no_grad(), m.quantized_inputs():
        torch.testing.assert_close(m.model(ids).logits.float(), theirs, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (m.model(ids).logits.float() - theirs).abs().max() > 1e-3


def test_transformers_runs_qforge_nvfp4_w4a4_export(tiny_tokenizer, wiki_calibration, tmp_path):
    """NVFP4 (W4A4): transformers' compressed-tensors integration reads qforge's input_global_scale of every layer and
    quantizes the inputs as qforge does."""
    src = tiny_dir("llama", tiny_tokenizer, tmp_path / "src")
    m = qforge.load(src, qforge.QuantizeConfig.from_scheme("NVFP4", method="gptq", compute_dtype="float32"))
    m.quantize(wiki_calibration)
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    theirs = run_worker("transformers-ct", tmp_path / "ct", tmp_path / "worker")
    assert_nvfp4_w4a4_logits(qforge.load(tmp_path / "ct"), theirs[1])


def test_transformers_loads_qforge_fp8_kv_cache_export(tiny_tokenizer, wiki_calibration, tmp_path):
    """An FP8 KV cache: transformers' compressed-tensors integration reads every attention layer's k_scale / v_scale
    and casts keys and values as qforge does (their logits are qforge's with its FP8 cache, not with a plain one)."""
    src = tiny_dir("llama", tiny_tokenizer, tmp_path / "src")
    m = qforge.load(src, qforge.QuantizeConfig(method="rtn", bits=4, group_size=16, kv_cache="fp8",
                                               compute_dtype="float32"))
    m.quantize(wiki_calibration)
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    theirs = run_worker("transformers-ct", tmp_path / "ct", tmp_path / "worker")
    ours = qforge_side(tmp_path / "ct")
    assert len(ours[0]["model"].kv_scales) == 2 * 2
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)
    assert_same_model(ours, theirs)
    with torch.no_grad():
        plain = ours[0]["model"].model(probe_ids(m.tokenizer)).logits.float()
    assert (plain - theirs[1]).abs().max() > 1e-4


@pytest.mark.parametrize("task,fmt", [("llmc-quantize", "compressed-tensors"), ("gptqmodel-quantize-tiny", "gptq"),
                                      ("llmc-w8a8-tiny", "compressed-tensors"),
                                      ("llmc-fp8-tiny", "compressed-tensors"),
                                      ("llmc-w8a8-static-tiny", "compressed-tensors"),
                                      ("llmc-fp8-static-tiny", "compressed-tensors"),
                                      ("llmc-kv-fp8-tiny", "compressed-tensors"),
                                      ("llmc-fp8-block-tiny", "compressed-tensors"),
                                      ("llmc-nvfp4-tiny", "compressed-tensors"),
                                      ("llmc-mxfp4-tiny", "compressed-tensors"),
                                      ("llmc-mxfp8-tiny", "compressed-tensors"),
                                      ("llmc-mxfp4-a4-tiny", "compressed-tensors"),
                                      ("llmc-mxfp8-a8-tiny", "compressed-tensors"),
                                      ("llmc-nvfp4-a4-tiny", "compressed-tensors")])
def test_qforge_loads_peer_exports(task, fmt, tiny_tokenizer, tmp_path):
    """llm-compressor's export of SmolLM2, GPTQModel's of a tiny Llama (its CPU quantization of SmolLM2 took 2.5 of
    CI's 20 minutes; GPTQModel reading qforge's SmolLM2 export is tested above), llm-compressor's W8A8 of a tiny
    Llama (int-quantized; its model object quantizes the inputs as it runs, and so must qforge's), its FP8_DYNAMIC
    (float-quantized, E4M3 inputs per token), and both with static input scales (its FP8 scheme: per-tensor E4M3
    weights and inputs; int8 per-channel weights with per-tensor static int8 inputs), and an FP8 KV cache (its model
    object casts keys and values with their calibrated scales: so must qforge's)."""
    src, n_linears = resolve_model("smollm2-135m"), 30 * 7
    if task.endswith("-tiny"):
        src, n_linears = tiny_dir("llama", tiny_tokenizer, tmp_path / "src"), 2 * 7
    theirs = run_worker(task, src, tmp_path / "worker")
    ours = qforge_side(tmp_path / "worker" / "ckpt")
    m = ours[0]["model"]
    assert m.packed_format == fmt and len(m.result.layers) == n_linears
    if "kv-fp8" in task:                 # their calibrated k/v scales, stored: both sides cast k / k_scale alike
        assert m.kv_scales is not None and len(m.kv_scales) == 2 * 2
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)
        assert_same_model(theirs, ours)
        return
    if "static" in task:                 # their calibrated scales, stored: both sides round x / input_scale alike
        assert m.act_bits == 8 and m.act_fp8 == ("fp8" in task)
        assert m.input_scales.keys() == m.result.layers.keys()
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)
        assert_same_model(theirs, ours)
        return
    if "nvfp4" in task:                  # their global scales (not powers of two), their E4M3 group scales
        assert all(q.grid.fp4 and q.global_scale is not None for q in m.result.layers.values())
        if "-a4" in task:                # W4A4: their calibrated input global scales, their inputs' rounding
            assert m.input_scheme == qforge.QuantizeConfig.from_scheme("NVFP4").input_scheme
            assert m.input_scales.keys() == m.result.layers.keys()
            assert_nvfp4_w4a4_logits(m, theirs[1])
            return                      # (in fp32 the weights' bf16 rounding moves 4-bit inputs: not "the same model")
        else:
            assert m.input_scheme is None
        assert_same_model(theirs, ours)
        return
    if "mxfp" in task:                   # powers of two: their logits exactly, and qforge's RTN is their checkpoint
        scheme = task.split("-")[1].upper() + ("" if "-a" in task else "A16")       # MXFP4 (W4A4) or MXFP4A16
        assert all(q.grid.mx and q.grid.fp4 == ("mxfp4" in task) for q in m.result.layers.values())
        assert m.input_scheme == qforge.QuantizeConfig.from_scheme(scheme).input_scheme
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)
        assert_same_model(theirs, ours)
        if "-a" in task:                 # their model object quantizes the inputs: qforge's logits without differ
            with torch.no_grad():
                plain = m.model(probe_ids(m.tokenizer)).logits.float()
            assert (plain - theirs[1]).abs().max() > 1e-3
        mine = qforge.load(src, qforge.QuantizeConfig.from_scheme(scheme))
        mine.quantize()
        for name, q in mine.result.layers.items():
            assert torch.equal(q.scales, m.result.layers[name].scales)
            assert torch.equal(q.codes.float(), m.result.layers[name].codes.float())   # (their packing keeps -0)
        return
    if "block" in task:                  # E4M3 in 32 x 32 tiles, inputs per token in groups of 32: exactly theirs
        assert m.input_scheme.fp8 and m.input_scheme.group_size == 32
        assert all(q.grid.block_rows == 32 and q.grid.group_size == 32 for q in m.result.layers.values())
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)
        assert_same_model(theirs, ours)
        return
    if "fp8" in task:                    # E4M3 inputs, max|x| / 448 per token: the same rule on both sides
        assert m.act_bits == 8 and m.act_fp8
        assert all(q.grid.fp8 for q in m.result.layers.values())
        assert_same_model(theirs, ours)
        return
    if "w8a8" not in task:
        assert_same_model(theirs, ours)
        return
    # W8A8: their model object scales each token by max|x| / 127.5 (compressed-tensors' fake quantization), vLLM's
    # kernels and qforge by max|x| / 127. With their divisor, qforge's logits are theirs exactly: the same int8
    # weights and the same inputs quantized at the same places
    from qforge.eval.simulate import quantized_activations

    assert m.act_bits == 8
    with torch.no_grad(), quantized_activations(m.model, InputScheme(8), set(m.result.layers), divisor=127.5):
        same = m.model(probe_ids(m.tokenizer)).logits.float()
    torch.testing.assert_close(same, theirs[1], rtol=0, atol=1e-5)
    assert not torch.allclose(ours[1], theirs[1], rtol=0, atol=1e-5)        # qforge's own run is vLLM's rule


PEER_CASES = [
    ("qwen3_moe", "gptqmodel-load", "gptq"),
    ("phi3", "transformers-ct", "compressed-tensors"),            # fused q|k|v and gate|up linears
    ("deepseek_v3", "transformers-ct", "compressed-tensors"),     # MLA, a dense and a MoE block, shared experts
    ("qwen2_moe", "transformers-ct", "compressed-tensors"),       # shared expert, its gate left unquantized
    ("falcon_parallel", "gptqmodel-load", "gptq"),                # fused multi-query q|k|v, one norm for both
    ("llama4_text", "gptqmodel-load", "gptq"),                    # experts stored [experts, in, out], written apart
    ("lfm2", "transformers-ct", "compressed-tensors"),            # a hybrid: convolution and attention blocks
    ("lfm2", "gptqmodel-load", "gptq"),
    ("lfm2_moe", "transformers-ct", "compressed-tensors"),
    ("qwen3_next", "transformers-ct", "compressed-tensors"),
    ("granitemoehybrid_dense", "transformers-ct", "compressed-tensors"),   # Mamba-2 and attention blocks
    ("nemotron_h", "transformers-ct", "compressed-tensors"),      # one mixer a block: Mamba-2, attention or MLP
    ("nemotron_h_moe", "transformers-ct", "compressed-tensors"),  # Nemotron 3: experts without a gate
    ("nemotron_h_latent", "transformers-ct", "compressed-tensors"),   # and between latent projections
    ("falcon_h1", "transformers-ct", "compressed-tensors"),       # Mamba-2 beside attention, µP multipliers
    ("qwen3_5_text", "transformers-ct", "compressed-tensors"),    # Gated DeltaNet and gated attention, dense MLPs
    ("qwen3_5_moe_text", "transformers-ct", "compressed-tensors"),
    ("hunyuan_v1_moe", "transformers-ct", "compressed-tensors"),  # shared MLP first, an fp32 nn.Linear router
    ("minimax_m2", "transformers-ct", "compressed-tensors"),      # routed experts, a score-correction bias
    ("jamba", "transformers-ct", "compressed-tensors"),           # Mamba-1 (dt_proj unquantized) and attention
    ("gemma3", "transformers-ct", "compressed-tensors"),          # vision-language: the text decoder quantized
    ("gemma4", "transformers-ct", "compressed-tensors"),          # and per-layer inputs, keys and values reused
    ("cohere2_moe", "transformers-ct", "compressed-tensors"),     # attention beside dense or routed + shared MLPs
    ("afmoe", "transformers-ct", "compressed-tensors"),           # gated attention, an nn.Linear router kept
    ("llama", "gptqmodel-load", "gptq"),                          # a linear kept dense (skip): a "-:" rule
    ("llama", "transformers-ct", "compressed-tensors"),           # and in the ignore list
]
PEER_SKIP = {"llama": ("*.1.mlp.down_proj", "*.0.self_attn.o_proj")}
# Gemma 4 without its routed experts: a packed export writes them one module per expert, and transformers reads
# Gemma 4's experts 3-D only
PEER_OVERRIDES = {"llama4_text": {"interleave_moe_layer_step": 1}, "gemma4": {"enable_moe_block": False}}


@pytest.fixture(scope="session")
def peer_runs(tmp_path_factory, tiny_tokenizer):
    """Every PEER_CASES model quantized and exported by qforge, then each peer task run once over all its exports
    (one worker process per task: a client's imports cost ~9 s a process, more than a tiny model's checks).
    {(model_type, task): (case directory, packed linears)}, or the error its export raised."""
    root = tmp_path_factory.mktemp("peers")
    runs = {}
    calib = calibration(tiny_tokenizer, n=8, seqlen=64)   # every case's tokenizer is this one: drawn once (~4 s)
    for model_type, task, fmt in PEER_CASES:
        d = root / f"{model_type}-{task}"
        try:
            src = tiny_dir(model_type, tiny_tokenizer, d / "src", **PEER_OVERRIDES.get(model_type, {}))
            m = qforge.load(str(src), qforge.QuantizeConfig(method="gptq", bits=4, group_size=32,
                                                            act_order=fmt == "gptq",
                                                            skip=PEER_SKIP.get(model_type, ())))
            m.quantize(calib)
            m.export(d / "packed", fmt)
            runs[(model_type, task)] = (d, len(m.result.layers))
        except Exception as e:          # reported by its own test, not by every case's
            runs[(model_type, task)] = e
    for task in dict.fromkeys(t for _, t, _ in PEER_CASES):
        jobs = [[str(r[0] / "packed"), str(r[0] / "worker")] for (_, t), r in runs.items()
                if t == task and not isinstance(r, Exception)]
        run_worker_batch(task, jobs, root / f"{task}.json")
    return runs


@pytest.mark.xdist_group("peer-families")   # one worker builds the exports and runs each peer once
@pytest.mark.parametrize("model_type,task,fmt", PEER_CASES)
def test_peers_load_qforge_exports_of_other_families(model_type, task, fmt, peer_runs):
    """Families beyond SmolLM2's, exported by qforge, loaded by a peer that builds its own model from the files:
    the same logits, greedy tokens and perplexity. MoE experts, fused into 3-D parameters in transformers, are
    exported one module per expert as the models' checkpoints store them. (Mixtral is left out of the GPTQModel
    cases: qforge writes its original names, block_sparse_moe.experts.{e}.w1/w2/w3, as save_pretrained and vLLM's
    Mixtral loader name them, while GPTQModel 7.6 requires its runtime names, mlp.experts.{e}.gate_proj/up_proj/
    down_proj, and refuses them. Phi-3 likewise: GPTQModel 7.6 splits its fused gate_up_proj into gate_proj and
    up_proj and wants those in the checkpoint; qforge writes the fused module as Phi-3's own checkpoints and
    vLLM's Phi-3 loader have it, which transformers with compressed-tensors loads. Llama 4 with MoE blocks only, as
    Scout: GPTQModel 7.6's Llama 4 tree has no dense MLP, so it drops Maverick-style interleaved dense blocks. Granite
    4.0-H through transformers only: GPTQModel 7.6 patches GraniteMoeHybridMambaLayer.torch_forward, which
    transformers 5.17 no longer has. LFM2-MoE too: GPTQModel 7.6's tree names its attention output o_proj (LFM2's
    is out_proj), so that packed module is never built and the model it loads computes NaN. Qwen3-Next too:
    GPTQModel 7.6's tree has neither linear_attn.in_proj_ba nor dense MLP blocks, and leaves them unloaded.)"""
    run = peer_runs[(model_type, task)]
    if isinstance(run, Exception):
        raise run
    d, n_packed = run
    theirs = worker_result(d / "worker")
    ours = qforge_side(d / "packed")
    if task == "gptqmodel-load":
        assert theirs[0]["packed"] >= n_packed                   # GPTQModel's own packed linears, every one
        if model_type in PEER_SKIP:                              # and the skipped ones stay dense there
            assert theirs[0]["packed"] == n_packed
    else:
        assert theirs[0]["quant_method"] == "compressed-tensors"
    assert_same_model(ours, theirs)


@pytest.mark.parametrize("model_type,task,fmt", [
    ("mixtral", "gptqmodel-quantize-tiny", "gptq"),
    ("gpt_oss", "gptqmodel-quantize-tiny", "gptq"),
    ("gpt_oss", "llmc-quantize-tiny", "compressed-tensors"),   # its Llama 4 path needs the multimodal config
])
def test_qforge_loads_peers_moe_exports(model_type, task, fmt, tiny_tokenizer, tmp_path):
    """Peers write fused experts one module per expert, `mlp.experts.{e}.gate_proj/up_proj/down_proj`: GPTQModel 7.6
    for Mixtral too (its runtime names, not the model's own block_sparse_moe.experts.{e}.w1/w3/w2); for GPT-OSS
    (experts stored [experts, in, out], gate/up interleaved, biases) llm-compressor 0.14 puts the gate rows under
    gate_proj and the up rows under up_proj, as qforge's export does, while GPTQModel (its Defuser splits the fused
    rows in two) puts the first and second half of the interleaved rows there. qforge reads each into the fused
    expert parameters (the writer named in the quantization_config says which split) and computes what the peer
    computes, in memory and block by block."""
    from safetensors import safe_open

    from qforge.formats import FORMATS

    theirs = run_worker(task, tiny_dir(model_type, tiny_tokenizer, tmp_path / "src"), tmp_path / "worker")
    ckpt = tmp_path / "worker" / "ckpt"
    with safe_open(str(next(ckpt.glob("*.safetensors"))), "pt") as f:
        assert any(f".mlp.experts.0.gate_proj.{FORMATS[fmt].KEYS[0]}" in k for k in f.keys())
    ours = qforge_side(ckpt)
    assert ours[0]["model"].packed_format == fmt
    assert_same_model(theirs, ours)
    ppl = [qforge.evaluate(m, ["wiki"], seqlen=64, max_windows=2)[0]["ppl"]
           for m in (ours[0]["model"], qforge.load(ckpt, stream=True))]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-3)
