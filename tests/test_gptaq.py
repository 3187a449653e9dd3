"""GPTAQ (GPTQv2): GPTQ that also corrects for the quantized model's inputs differing from the fp model's."""
from __future__ import annotations

import json

import pytest
import torch

import qforge
from qforge import QForgeError, QuantizeConfig
from qforge.capture.hessian import AsymmetricAccumulator, HessianAccumulator
from qforge.pipeline import quantize_model
from qforge.solvers import Grid, gptq, inverse_hessian_cholesky
from qforge.solvers.grid import fit_params
from tiny_models import VOCAB, tiny_model


def asymmetric_inputs(seed: int, n=2048, d=64):
    """X: a linear's inputs in the fp model; Xq: the same tokens' inputs in a model whose earlier layers are
    rounded (X plus a correlated error)."""
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5) * torch.exp(
        torch.randn(d, generator=g) / 2)
    Xq = X + 0.3 * torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    return X, Xq, torch.randn(48, d, generator=g)


def statistics(X, Xq):
    H = 2 / len(X) * Xq.t() @ Xq
    return H, 2 / len(X) * (X - Xq).t() @ Xq


def asymmetric_error(X, Xq, W, Q):
    return float(((X @ W.t() - Xq @ Q.t()) ** 2).sum())


def transcribed_gptaq(W, H, dXXT, bits, block, alpha, damp=0.01):
    """The paper's algorithm written out column by column: min-max per-channel grid fitted on the original W,
    in-block update err · U[i, i:] - w · P[i, i:], lazy update Err1 · U - W1 · P across blocks (W1 holds ŵ by then)."""
    W = W.clone()
    n = W.shape[1]
    U, _ = inverse_hessian_cholesky(H, damp)
    P = alpha * torch.triu(dXXT @ U.t(), diagonal=1) @ U
    grid = Grid(bits, -1, True)
    s, z = fit_params(W, grid)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        for i in range(i2 - i1):
            w = W1[:, i].clone()
            q = (torch.clamp(torch.round(w / s) + z, 0, grid.maxq) - z) * s
            err = (w - q) / U[i1 + i, i1 + i]
            W1[:, i:] -= torch.outer(err, U[i1 + i, i1:i2][i:]) - torch.outer(w, P[i1 + i, i1:i2][i:])
            Q[:, i1 + i], Err1[:, i] = q, err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:] - W1 @ P[i1:i2, i2:]
    return Q


def test_gptaq_follows_the_papers_algorithm():
    X, Xq, W = asymmetric_inputs(0)
    H, dXXT = statistics(X, Xq)
    got = gptq(W, H, Grid(3, -1, True), block_size=16, dXXT=dXXT, alpha=0.5).dequantize()
    want = transcribed_gptaq(W, H, dXXT, 3, 16, 0.5)
    assert (got != want).float().mean() < 0.01                 # a rounding tie may fall the other way
    assert torch.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("opts", [{}, dict(act_order=True), dict(group_aware=True, scale_search=True)])
def test_gptaq_on_identical_inputs_is_gptq(opts):
    X, _, W = asymmetric_inputs(1)
    H, dXXT = statistics(X, X)
    assert not dXXT.any()
    grid = Grid(4, 16, True)
    a, b = gptq(W, H, grid, **opts), gptq(W, H, grid, dXXT=dXXT, **opts)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.g_idx, b.g_idx)
    assert (a.info["method"], b.info["method"]) == ("gptq", "gptaq")


@pytest.mark.parametrize("grid,opts", [(Grid(3, -1, True), {}), (Grid(4, 16, False), dict(scale_search=True)),
                                       (Grid(4, 16, True), dict(act_order=True))])
def test_the_triton_column_loop_takes_gptaqs_term(grid, opts):
    """CUDA's one-kernel loop, in Triton's interpreter, with P1: the reference loop's GPTAQ result exactly."""
    from qforge.kernels import triton_matmul
    from qforge.kernels.gptq_loop import triton_column_loop

    if not triton_matmul.available():
        pytest.skip("triton is not installed")
    X, Xq, W = asymmetric_inputs(2)
    H, dXXT = statistics(X, Xq)
    want = gptq(W, H, grid, block_size=32, dXXT=dXXT, **opts)
    got = gptq(W, H, grid, block_size=32, dXXT=dXXT, loop=triton_column_loop, **opts)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert torch.equal(got.w_hat, want.w_hat)
    assert not torch.equal(want.codes, gptq(W, H, grid, block_size=32, **opts).codes)   # the term did something


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("bits,group", [(3, -1), (4, 16), (3, 16)])
def test_gptaq_lowers_the_error_against_the_fp_model(seed, bits, group):
    """At 3 and 4 bits; at 2 bits GPTAQ's correction (it drops the terms of columns already rounded) was as often
    worse as better on these layers."""
    X, Xq, W = asymmetric_inputs(seed)
    H, dXXT = statistics(X, Xq)
    grid = Grid(bits, group, True)
    plain = asymmetric_error(X, Xq, W, gptq(W, H, grid).dequantize())
    asym = asymmetric_error(X, Xq, W, gptq(W, H, grid, dXXT=dXXT).dequantize())
    assert asym < plain


def test_the_asymmetric_statistics_match_one_pass_and_refuse_unmatched_batches():
    X, Xq, _ = asymmetric_inputs(3, n=300)
    cuts = [0, 17, 150, 300]
    acc = AsymmetricAccumulator(X.shape[1], [X[a:b] for a, b in zip(cuts, cuts[1:])])
    for a, b in zip(cuts, cuts[1:]):
        acc.add(Xq[a:b])
    H, dXXT = statistics(X, Xq)
    assert torch.allclose(acc.take_dXXT(), dXXT, atol=1e-5, rtol=1e-4)
    assert torch.allclose(acc.take(), H, atol=1e-5, rtol=1e-4)
    plain = HessianAccumulator(X.shape[1])
    plain.add(Xq)
    short = AsymmetricAccumulator(X.shape[1], [X[:10]])
    with pytest.raises(QForgeError, match="not the same tokens"):
        short.add(Xq[:11])
    with pytest.raises(QForgeError, match="more batches"):
        AsymmetricAccumulator(X.shape[1], []).add(Xq[:5])
    unmatched = AsymmetricAccumulator(X.shape[1], [X[:5], X[5:9]])
    unmatched.add(Xq[:5])
    with pytest.raises(QForgeError, match="never matched"):
        unmatched.take_dXXT()


@pytest.mark.parametrize("bad,msg", [(dict(method="awq+gptq"), "option of method gptq"),
                                     (dict(method="rtn"), "option of method gptq"),
                                     (dict(gptaq=0.0), r"\(0, 1\]"), (dict(gptaq=1.5), r"\(0, 1\]"),
                                     (dict(bpw=3.0), "plain Hessians")])
def test_gptaq_settings_are_validated(bad, msg):
    with pytest.raises(QForgeError, match=msg):
        QuantizeConfig(**{"method": "gptq", "gptaq": 0.25, **bad})


def _samples(n=4, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(n)]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptaq_in_the_pipeline_starts_as_gptq_and_then_differs(true_sequential):
    """Block 0's first linears (one pass over the unrounded block: all of block 0's) see the same inputs in both
    models: GPTQ's codes. Every later linear is solved against the fp model's inputs: other codes."""
    cfg = dict(method="gptq", bits=3, group_size=16, true_sequential=true_sequential, compute_dtype="float32")
    plain, asym = tiny_model("llama"), tiny_model("llama")
    rp = quantize_model(plain, QuantizeConfig(**cfg), _samples(), show_progress=False)
    ra = quantize_model(asym, QuantizeConfig(**cfg, gptaq=0.25), _samples(), show_progress=False)
    assert rp.layers.keys() == ra.layers.keys()
    first = [n for n in ra.layers if n.startswith("model.layers.0.") and (
        not true_sequential or n.split(".")[-1] in ("q_proj", "k_proj", "v_proj"))]
    assert first and all(torch.equal(ra.layers[n].codes, rp.layers[n].codes) for n in first)
    later = [n for n in ra.layers if n not in first]
    assert all(ra.layers[n].info["method"] == "gptaq" for n in ra.layers)
    assert sum(not torch.equal(ra.layers[n].codes, rp.layers[n].codes) for n in later) >= len(later) // 2


def test_gptaq_leaves_fused_experts_to_gptq():
    m = tiny_model("mixtral")
    r = quantize_model(m, QuantizeConfig(method="gptq", bits=4, group_size=16, gptaq=0.25), _samples(),
                       show_progress=False)
    methods = {n: q.info["method"] for n, q in r.layers.items()}
    assert {v for n, v in methods.items() if ".experts." in n} == {"gptq"}
    assert {v for n, v in methods.items() if ".experts." not in n} == {"gptaq"}


def test_gptaq_streams_and_is_saved_from_the_command_line(tiny_llama_dir, wiki_excerpt, tmp_path, capsys):
    from qforge.cli.main import main

    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bits", "3", "--group-size", "16",
                 "--gptaq", "0.25", "--calib", wiki_excerpt, "--nsamples", "4", "--calib-seqlen", "32",
                 "--compute-dtype", "float32", "--out", str(out)]) == 0
    assert "gptq (GPTAQ 0.25) W3 g16" in capsys.readouterr().out
    assert json.loads((out / "qforge_config.json").read_text())["gptaq"] == 0.25
    streamed = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bits=3, group_size=16, gptaq=0.25,
                                                          compute_dtype="float32"), stream=True)
    streamed.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "rs")
    streamed.save(tmp_path / "s")
    a, b = qforge.load(out), qforge.load(tmp_path / "s")
    assert a.result.layers.keys() == b.result.layers.keys()
    assert all(torch.equal(q.codes, b.result.layers[n].codes) for n, q in a.result.layers.items())


@pytest.mark.parametrize("model_type", ["llama", "gemma4_text"])
@pytest.mark.parametrize("true_sequential", [True, False])
@pytest.mark.parametrize("held", [True, False])
def test_gptaqs_fp_inputs_are_the_fp_models(model_type, true_sequential, held, monkeypatch):
    """The inputs GPTAQ solves against are the unquantized model's, block after block (Gemma 4: its later blocks
    read the keys and values an earlier block left, which must be the fp model's too, not the quantized one's),
    whether a block's are held from one run (they fit the memory) or made batch by batch as they are taken."""
    import copy

    from qforge import pipeline
    from qforge.models.arch import arch_spec, block_linears, get_blocks

    model = tiny_model(model_type)
    fp_model = copy.deepcopy(model)
    fp_group_inputs, seen = pipeline.fp_group_inputs, []

    def spy(block, groups, hidden, calls, device):
        inputs, fp_block, out = fp_group_inputs(block, groups, hidden, calls, device)
        assert (fp_block is None) == held
        seen.append({})
        for k, batches in inputs.items():
            name = groups[k][0].name
            if held:
                seen[-1][name] = list(batches)
            else:                                            # made as taken: recorded as they are
                def pop(index=0, take=batches.pop, got=seen[-1].setdefault(name, [])):
                    got.append(take(index))
                    return got[-1]
                batches.pop = pop
        return inputs, fp_block, out

    monkeypatch.setattr(pipeline, "fp_group_inputs", spy)
    monkeypatch.setattr(pipeline, "HOLD_FP_INPUTS", 1.0 if held else 0.0)
    samples = _samples()
    quantize_model(model, QuantizeConfig(method="gptq", bits=2, group_size=16, gptaq=0.5, compute_dtype="float32",
                                         true_sequential=true_sequential), samples, show_progress=False, batch_size=2)
    spec = arch_spec(fp_model)
    blocks = get_blocks(fp_model, spec)
    want = [{} for _ in blocks]
    hooks = [g[0].module.register_forward_pre_hook(
        lambda mod, args, w=want[i], name=g[0].name: w.setdefault(name, []).append(args[0].flatten(0, -2)))
        for i, block in enumerate(blocks) for g in block_linears(block, spec)]
    with torch.no_grad():
        fp_model(torch.stack(samples))
    for h in hooks:
        h.remove()
    assert len(seen) == len(blocks)
    for i, inputs in enumerate(seen):
        assert inputs.keys() == want[i].keys() and all(len(x) == 2 for x in inputs.values())   # 2 batches of 2
        for name, x in inputs.items():
            torch.testing.assert_close(torch.cat(x), torch.cat(want[i][name]), rtol=1e-4, atol=1e-5,
                                       msg=f"block {i} {name}")


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptaq_per_batch_fp_inputs_give_the_held_ones_codes(true_sequential, monkeypatch):
    from qforge import pipeline

    codes = []
    for hold in (1.0, 0.0):
        monkeypatch.setattr(pipeline, "HOLD_FP_INPUTS", hold)
        r = quantize_model(tiny_model("qwen3"), QuantizeConfig(method="gptq", bits=3, group_size=16, gptaq=0.25,
                                                               true_sequential=true_sequential), _samples(),
                           show_progress=False, batch_size=2)
        codes.append(r.layers)
    assert codes[0].keys() == codes[1].keys()
    assert all(torch.equal(q.codes, codes[1][n].codes) for n, q in codes[0].items())
