import pytest
import torch

from qforge import QForgeError, QuantizeConfig
from qforge.capture import HessianAccumulator, capture_block_inputs, collect_group_inputs, run_block
from qforge.capture.blocks import make_batches
from qforge.models.arch import arch_spec, block_linears, get_blocks
from qforge.pipeline import quantize_model
from qforge.solvers import Grid, gptq, inverse_hessian_cholesky, rtn
from qforge.kernels import triton_matmul
from qforge.kernels.gptq_loop import column_loop_for, triton_column_loop
from qforge.solvers.gptq import column_loop, column_order
from tiny_models import CONFIGS, VOCAB, tiny_model


def correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.exp(torch.randn(d, generator=g))              # uneven channel magnitudes
    return (torch.randn(n, d, generator=g) @ mix) * scale


def hessian(X):
    acc = HessianAccumulator(X.shape[1])
    acc.add(X)
    return acc.H


def out_err(X, W, W_hat):
    return float(((X @ (W - W_hat).T) ** 2).sum())


@pytest.mark.parametrize("bits,group,act_order,static", [
    (4, 32, False, False), (3, 64, False, False), (2, -1, False, False), (4, 32, True, False),
    (3, 32, True, True), (3, 48, True, False), (4, -1, True, False), (4, 32, False, True),
])
def test_gptq_output_error_beats_rtn(bits, group, act_order, static):
    X = correlated_inputs()
    W = torch.randn(96, 128)
    grid = Grid(bits, group, sym=bits != 2)
    q = gptq(W, hessian(X), grid, act_order=act_order, static_groups=static)
    assert out_err(X, W, q.dequantize()) < 0.8 * out_err(X, W, rtn(W, grid).dequantize())
    assert q.codes.max() <= grid.maxq


@pytest.mark.parametrize("bits,group,act_order,static", [
    (3, 32, False, False), (2, -1, False, False), (4, 32, True, False), (3, 32, True, True), (2, 32, False, False),
])
def test_scale_search_lowers_gptq_output_error(bits, group, act_order, static):
    """Shrinking each group's range where that lowers the loss-weighted rounding error: lower layer output
    error than min-max ranges (summed over three draws; one draw could tie), codes still reproduce Ŵ."""
    searched, min_max = 0.0, 0.0
    for seed in range(3):
        X = correlated_inputs(seed=seed)
        W = torch.randn(96, 128, generator=torch.Generator().manual_seed(seed)) ** 3   # heavy-tailed weights
        grid = Grid(bits, group, sym=bits != 2)
        q = gptq(W, hessian(X), grid, act_order=act_order, static_groups=static, scale_search=True)
        assert torch.equal(q.dequantize(), q.w_hat) and q.codes.max() <= grid.maxq
        searched += out_err(X, W, q.dequantize())
        min_max += out_err(X, W, gptq(W, hessian(X), grid, act_order=act_order, static_groups=static).dequantize())
    assert searched < 0.95 * min_max


@pytest.mark.parametrize("static", [False, True])
def test_act_order_g_idx_reproduces_the_solver_weights(static):
    X = correlated_inputs(d=96)
    W = torch.randn(40, 96)
    q = gptq(W, hessian(X), Grid(4, 32, True), act_order=True, static_groups=static)
    assert torch.equal(q.dequantize(), q.w_hat)
    counts = torch.bincount(q.g_idx.long())
    assert counts.tolist() == [32, 32, 32]
    if static:
        assert torch.equal(q.g_idx, torch.arange(96, dtype=torch.int32) // 32)
    else:
        assert not torch.equal(q.g_idx, torch.arange(96, dtype=torch.int32) // 32)



@pytest.mark.parametrize("n,gs", [(96, 32), (100, 32)])
def test_group_aware_order_visits_whole_groups_most_sensitive_first(n, gs):
    diag = torch.rand(n, generator=torch.Generator().manual_seed(1))
    perm = column_order(diag, gs, act_order=False, group_aware=True)
    assert sorted(perm.tolist()) == list(range(n))
    full = n // gs
    runs = [perm[i * gs:(i + 1) * gs] for i in range(full)] + ([perm[full * gs:]] if n % gs else [])
    for run in runs:
        assert len(set((run // gs).tolist())) == 1                       # one group per run
        assert torch.all(diag[run][:-1] >= diag[run][1:])                 # sensitive columns first
    peaks = [float(diag[run].max()) for run in runs[:full]]
    assert peaks == sorted(peaks, reverse=True)                          # groups by their largest diag(H)
    assert n % gs == 0 or runs[-1].min() >= full * gs                    # a ragged group comes last


@pytest.mark.parametrize("static,d", [(False, 96), (True, 96), (False, 100)])
def test_group_aware_gptq_keeps_in_order_groups_and_beats_rtn(static, d):
    X = correlated_inputs(d=d)
    W = torch.randn(40, d)
    grid = Grid(3, 32, True)
    q = gptq(W, hessian(X), grid, group_aware=True, static_groups=static)
    assert torch.equal(q.g_idx, torch.arange(d, dtype=torch.int32) // 32)
    assert torch.equal(q.dequantize(), q.w_hat)
    assert out_err(X, W, q.dequantize()) < 0.8 * out_err(X, W, rtn(W, grid).dequantize())
    with pytest.raises(ValueError, match="pick one"):
        gptq(W, hessian(X), grid, group_aware=True, act_order=True)


def test_group_aware_per_channel_is_act_order():
    # a per-channel layer (mixed precision gives some layers one) is a single group: GAR visits its
    # columns in act-order and still records nothing in g_idx
    X = correlated_inputs(d=64)
    W = torch.randn(24, 64)
    grid = Grid(3, -1, False)
    gar = gptq(W, hessian(X), grid, group_aware=True)
    act = gptq(W, hessian(X), grid, act_order=True)
    plain = gptq(W, hessian(X), grid)
    assert torch.equal(gar.codes, act.codes) and torch.equal(gar.dequantize(), act.dequantize())
    assert torch.equal(gar.g_idx, torch.zeros(64, dtype=torch.int32))
    assert not torch.equal(gar.codes, plain.codes)


def test_group_aware_config_is_validated():
    assert QuantizeConfig(method="gptq").act_group_aware                       # GPTQModel's default
    assert not QuantizeConfig(method="gptq", act_order=True).act_group_aware
    assert not QuantizeConfig(method="gptq", group_size=-1).act_group_aware
    assert not QuantizeConfig(method="rtn").act_group_aware
    assert not QuantizeConfig.from_dict(QuantizeConfig(method="gptq", act_group_aware=False).to_dict()).act_group_aware
    with pytest.raises(Exception, match="pick one"):
        QuantizeConfig(method="gptq", act_order=True, act_group_aware=True)
    with pytest.raises(Exception, match="group size"):
        QuantizeConfig(method="gptq", group_size=-1, act_group_aware=True)


@pytest.mark.parametrize("d", [24, 500])     # one row panel; several, the last one short
def test_hessian_running_normalisation_matches_one_pass(d):
    X = torch.randn(1000, d, dtype=torch.float64)
    acc = HessianAccumulator(d)
    for chunk in X.split([1, 7, 300, 2, 690]):
        acc.add(chunk)
    torch.testing.assert_close(acc.H, (2 / 1000 * X.T @ X).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(acc.H, acc.H.T)      # only the upper triangle is accumulated, then mirrored
    assert acc.n == 1000


def test_bf16_hessian_products_stay_within_bf16_rounding_and_solve_alike():
    """bf16 panel products (compute_dtype bf16) differ from fp32 ones by at most the one bf16 rounding
    of each batch's panel, entrywise, and GPTQ solves on them as well as on the fp32 H."""
    X = correlated_inputs(n=4096, d=500).bfloat16()                  # activations as the bf16 passes make them
    fp, bf = HessianAccumulator(500), HessianAccumulator(500, product_dtype=torch.bfloat16)
    for chunk in X.split([2048, 1000, 1048]):
        fp.add(chunk)
        bf.add(chunk)
    bound = sum(2 * c.shape[0] / 4096 * (c.float().abs().T @ c.float().abs()) for c in X.split([2048, 1000, 1048]))
    assert ((bf.H - fp.H).abs() <= 2 ** -8 * bound + 1e-6).all()
    assert not torch.equal(bf.H, fp.H)                                # it is a different computation
    W = torch.randn(64, 500)
    Xf = X.float()
    errs = [out_err(Xf, W, gptq(W, acc.H, Grid(3, 64, True), scale_search=True).dequantize()) for acc in (fp, bf)]
    assert errs[1] < 1.02 * errs[0], errs


def test_rank_deficient_inputs_are_handled():
    X = correlated_inputs(n=16, d=64)                            # 16 tokens: H has rank 16 of 64
    W = torch.randn(32, 64)
    q = gptq(W, hessian(X), Grid(3, 32, True))
    assert torch.isfinite(q.dequantize()).all()
    assert out_err(X, W, q.dequantize()) < out_err(X, W, rtn(W, Grid(3, 32, True)).dequantize())


def test_dead_columns_are_zeroed_as_in_the_paper():
    X = correlated_inputs(d=64)
    X[:, [3, 40]] = 0
    W = torch.randn(16, 64)
    q = gptq(W, hessian(X), Grid(4, 32, True))
    assert q.info["dead_columns"] == 2
    assert torch.all(q.dequantize()[:, [3, 40]] == 0)


def test_all_zero_inputs_give_finite_weights():
    q = gptq(torch.randn(8, 32), torch.zeros(32, 32), Grid(4, 16, False))
    assert torch.isfinite(q.dequantize()).all()


def test_huge_magnitude_column():
    X = correlated_inputs(d=64)
    X[:, 5] *= 1e6
    W = torch.randn(16, 64)
    q = gptq(W, hessian(X), Grid(4, 32, True))
    assert torch.isfinite(q.dequantize()).all()
    # the huge column's own rounding dominates both errors (identical in both, ~5e14), so they agree to
    # float32 noise; GPTQ must not be worse beyond it
    assert out_err(X, W, q.dequantize()) <= out_err(X, W, rtn(W, Grid(4, 32, True)).dequantize()) * (1 + 1e-5)


def test_damping_escalates_when_cholesky_fails():
    A = torch.randn(32, 32)
    H = A @ A.T
    H -= 0.05 * torch.diag(H).mean() * torch.eye(32) + torch.linalg.eigvalsh(H)[0] * torch.eye(32)
    U, info = inverse_hessian_cholesky(H, damp=0.01)             # λ = 0.01 mean(diag) is too small
    assert info["retries"] >= 1 and info["damp"] > 0.01 and info["fallback"] is None
    damped = H + info["damp"] * torch.diag(H).mean() * torch.eye(32)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def test_eigen_fallback_when_every_damping_fails():
    H = torch.diag(torch.tensor([1.0, 1.0, -1e4]))              # indefinite beyond any damping tried
    U, info = inverse_hessian_cholesky(H, damp=0.01)
    assert info["fallback"] == "eigh" and torch.isfinite(U).all()
    q = gptq(torch.randn(4, 3), H, Grid(4, -1, True))
    assert torch.isfinite(q.dequantize()).all() and q.info["fallback"] == "eigh"


def test_nonfinite_inputs_are_refused():
    with pytest.raises(ValueError):
        gptq(torch.randn(4, 8), torch.full((8, 8), float("nan")), Grid(4, -1, True))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_each_table_group_shares_one_input(model_type):
    """The pipeline keeps one Hessian per group: every linear of a group must read the same tensor."""
    m = tiny_model(model_type)
    spec = arch_spec(m)
    block = get_blocks(m, spec)[0]
    seen = {}
    hooks = [ref.module.register_forward_pre_hook(lambda mod, a, n=ref.name: seen.setdefault(n, a[0]))
             for g in block_linears(block, spec) for ref in g if ref.expert is None]
    with torch.no_grad():
        m(input_ids=torch.randint(0, VOCAB, (2, 24)))
    for h in hooks:
        h.remove()
    for g in block_linears(block, spec):
        names = [r.name for r in g if r.expert is None]
        assert all(seen[n] is seen[names[0]] for n in names)


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "mixtral", "qwen3_moe", "gemma3_text"])
def test_stubbed_collection_equals_a_full_forward(model_type):
    """Swapping later linears for zeros does not change any group's inputs."""
    m = tiny_model(model_type)
    spec = arch_spec(m)
    ids = list(torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0)))
    inputs = capture_block_inputs(m, spec, make_batches(ids, 2))
    block = get_blocks(m, spec)[0]
    groups = block_linears(block, spec)
    for k, group in enumerate(groups):
        ref = group[0]
        fast, full = HessianAccumulator(ref.shape[1]), HessianAccumulator(ref.shape[1])
        with collect_group_inputs(block, [ref], {ref.name: fast.add}, [r for g in groups[k + 1:] for r in g]):
            run_block(block, inputs.hidden, inputs.for_block(0))
        with collect_group_inputs(block, [ref], {ref.name: full.add}, []):
            run_block(block, inputs.hidden, inputs.for_block(0))
        assert fast.n == full.n > 0
        torch.testing.assert_close(fast.H, full.H)
        if ref.expert is None:  # and against a plain hook on the real module
            real = HessianAccumulator(ref.shape[1])
            h = ref.module.register_forward_pre_hook(lambda mod, a: real.add(a[0].reshape(-1, a[0].shape[-1])))
            run_block(block, inputs.hidden, inputs.for_block(0))
            h.remove()
            torch.testing.assert_close(real.H, full.H)


def test_expert_token_counts_follow_the_router():
    m = tiny_model("mixtral")
    spec = arch_spec(m)
    ids = list(torch.randint(0, VOCAB, (2, 32)))
    inputs = capture_block_inputs(m, spec, make_batches(ids, 2))
    block = get_blocks(m, spec)[0]
    groups = block_linears(block, spec)
    experts = groups[2]
    accs = {r.name: HessianAccumulator(r.shape[1]) for r in experts}
    with collect_group_inputs(block, experts, {n: a.add for n, a in accs.items()}, []):
        run_block(block, inputs.hidden, inputs.for_block(0))
    assert sum(a.n for a in accs.values()) == 64 * m.config.num_experts_per_tok


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_gptq_pipeline_beats_rtn_on_every_architecture(model_type):
    ids = [torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(s)) for s in range(16)]
    x = torch.stack(ids[:4])
    ref = tiny_model(model_type)
    with torch.no_grad():
        want = ref(input_ids=x).logits
    errs = {}
    for method in ("rtn", "gptq"):
        m = tiny_model(model_type)
        res = quantize_model(m, QuantizeConfig(method=method, bits=3, group_size=32), ids, show_progress=False)
        assert all(torch.isfinite(q.dequantize()).all() for q in res.layers.values())
        with torch.no_grad():
            errs[method] = float((m(input_ids=x).logits - want).norm())
    assert errs["gptq"] < errs["rtn"]


def test_variable_length_samples_are_never_padded():
    """Batches hold equal-length samples only, so every Hessian row is a real token."""
    samples = [torch.arange(n) % VOCAB for n in (5, 9, 5, 7, 9, 9)]
    batches = make_batches(samples, batch_size=2)
    assert sorted(b.shape[1] for b in batches) == [5, 7, 9, 9]
    assert sum(b.numel() for b in batches) == sum(len(s) for s in samples)
    m = tiny_model("llama")
    spec = arch_spec(m)
    inputs = capture_block_inputs(m, spec, batches)
    block = get_blocks(m, spec)[0]
    ref = block_linears(block, spec)[0][0]
    acc = HessianAccumulator(ref.shape[1])
    with collect_group_inputs(block, [ref], {ref.name: acc.add}, []):
        run_block(block, inputs.hidden, inputs.for_block(0))
    assert acc.n == sum(len(s) for s in samples)


@pytest.mark.parametrize("model_type", ["llama", "opt", "mixtral"])
def test_one_pass_schedule_takes_statistics_from_the_unquantized_block(model_type):
    """true_sequential=False: every group of block 0 is solved on the fp block's inputs (tapped by hooks),
    while the default gives later groups the inputs of the already quantized earlier groups."""
    from qforge.capture.linear_inputs import tap_inputs

    ids = [torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    fp = tiny_model(model_type)
    spec = arch_spec(fp)
    inputs = capture_block_inputs(fp, spec, make_batches(ids, 2))
    block = get_blocks(fp, spec)[0]
    refs = [r for g in block_linears(block, spec) for r in g]
    accs = {r.name: HessianAccumulator(r.shape[1]) for r in refs}
    with tap_inputs(refs, {n: a.add for n, a in accs.items()}):
        run_block(block, inputs.hidden, inputs.for_block(0))
    grid = Grid(3, 32, True)
    results = {}
    for ts in (False, True):
        m = tiny_model(model_type)
        cfg = QuantizeConfig(method="gptq", bits=3, group_size=32, true_sequential=ts, compute_dtype="float32")
        results[ts] = quantize_model(m, cfg, ids, batch_size=2, show_progress=False).layers
    prefix = f"{spec.blocks}.0."
    last = refs[-1]
    want = gptq(last.weight.detach().float(), accs[last.name].H, grid, group_aware=cfg.act_group_aware,
                 scale_search=cfg.scale_search).codes
    assert torch.equal(results[False][prefix + last.name].codes, want)
    assert not torch.equal(results[True][prefix + last.name].codes, want)  # later groups see quantized inputs
    first = refs[0]
    want0 = gptq(first.weight.detach().float(), accs[first.name].H, grid, group_aware=cfg.act_group_aware,
                 scale_search=cfg.scale_search).codes
    assert torch.equal(results[False][prefix + first.name].codes, want0)
    assert torch.equal(results[True][prefix + first.name].codes, want0)   # the first group sees the same


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_early_exit_and_replayed_modules_change_nothing(model_type):
    """The fast true-sequential schedule (collection passes stop at the group's input, finished
    sub-modules are replayed) gives bit-identical codes and weights to running every pass in full."""
    from qforge.capture.replay import FrozenOutputs
    from qforge.pipeline import GPTQSolver, QuantizeResult, _quantize_calibrated

    ids = [torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(s)) for s in range(6)]
    cfg = QuantizeConfig(method="gptq", bits=3, group_size=32)
    runs = []
    for reuse in (True, False):
        m = tiny_model(model_type)
        spec = arch_spec(m)
        result = QuantizeResult()
        _quantize_calibrated(m, spec, get_blocks(m, spec), GPTQSolver(), Grid(3, 32, True), cfg, ids, "cpu", 4,
                             result, False, reuse_passes=reuse)
        runs.append((result, dict(m.named_parameters())))
    (fast, fast_params), (full, full_params) = runs
    assert fast.layers.keys() == full.layers.keys()
    for name, q in full.layers.items():
        assert torch.equal(fast.layers[name].codes, q.codes), name
    for name, p in full_params.items():
        assert torch.equal(fast_params[name], p), name
    m = tiny_model(model_type)
    spec = arch_spec(m)
    block = get_blocks(m, spec)[0]
    frozen = FrozenOutputs(block, block_linears(block, spec), 1, m.config.get_text_config().hidden_size, "cpu")
    done = len(spec.groups)
    assert frozen.finished(0) == []
    for k in range(1, done + 1):   # what is finished stays finished, possibly inside a larger finished module
        assert all(any(p == q or p.startswith(q + ".") for q in frozen.finished(k)) for p in frozen.finished(k - 1))


MIXERS = ("att", "conv", "mamba", "mixer")   # a block's token mixer: attention, a convolution (LFM2), Mamba-2, or
#                                              Nemotron-H's `mixer` (any of those)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_tail_sub_modules_run_once_per_block(model_type):
    """Attention (after o_proj) and the MLP (after down_proj) are not run again on every batch: their
    output is their last linear applied to the inputs that linear's collection pass kept. Each runs
    in full once per block (the check on the first batch), not once per batch."""
    from qforge.capture.replay import FrozenOutputs
    from qforge.pipeline import GPTQSolver, QuantizeResult, _quantize_calibrated

    ids = [torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(s)) for s in range(6)]
    m = tiny_model(model_type)
    spec = arch_spec(m)
    blocks = get_blocks(m, spec)
    width = m.config.get_text_config().hidden_size
    tails = [FrozenOutputs(b, block_linears(b, spec), 3, width, "cpu").tails for b in blocks]
    # the MLP is a tail when block 0 ends in a plain linear of an MLP module (not fused experts, not OPT's fc2)
    last = block_linears(blocks[0], spec)[-1][-1]
    if last.expert is None and "." in last.name:
        assert last.name.rpartition(".")[0] in tails[0]
    assert any(mixer in p for p in tails[0] for mixer in MIXERS)
    ran = {}
    for i, block in enumerate(blocks):
        for path in tails[i]:
            block.get_submodule(path).register_forward_hook(
                lambda *a, key=(i, path): ran.update({key: ran.get(key, 0) + 1}))
    _quantize_calibrated(m, spec, blocks, GPTQSolver(), Grid(3, 32, True), QuantizeConfig(method="gptq", bits=3,
                         group_size=32), ids, "cpu", 2, QuantizeResult(), False)
    # 3 batches, one full run each. Where a sub-module's output is not its last linear's (Bloom's attention and MLP
    # add the residual themselves, GPT-J's and GPT-OSS's eager attention return their weights too) the check on the
    # first batch sees it and the sub-module runs on every batch
    # (Falcon-H1's feed_forward scales down_proj's output by a multiplier; MiMo-V2's and the sliding-window Granites'
    # attention return their weights)
    differs = {"bloom": ("self_attention", "mlp"), "gptj": ("attn",), "gpt_oss": ("self_attn",),
               "falcon_h1": ("feed_forward",), "mimo_v2_flash": ("self_attn",), "granite_swa": ("self_attn",),
               "granitemoe_swa": ("self_attn",)}.get(model_type, ())
    assert ran == {(i, p): 3 if p in differs else 1 for i in range(len(blocks)) for p in tails[i]}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_finished_attention_is_recorded_once_then_replayed(model_type):
    from qforge.capture.replay import FrozenOutputs

    if model_type.startswith("nemotron_h"):
        pytest.skip("Nemotron-H's block 0 is its Mamba-2 mixer alone: nothing finishes before the block's last group")
    ids = [torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    m = tiny_model(model_type)
    spec = arch_spec(m)
    inputs = capture_block_inputs(m, spec, make_batches(ids, 2))
    block, calls = get_blocks(m, spec)[0], inputs.for_block(0)
    groups = block_linears(block, spec)
    frozen = FrozenOutputs(block, groups, len(calls), inputs.hidden[0].shape[-1], "cpu")
    def modules(k):
        return [p for p in frozen.finished(k) if p not in {r.name for g in groups for r in g}]
    done = next(k for k in range(1, len(groups)) if modules(k))     # the first sub-module finished
    attn = modules(done)
    assert len(attn) == 1 and any(m in attn[0] for m in MIXERS)    # its linears solved: the token mixer module
    ran = []
    block.get_submodule(attn[0]).register_forward_hook(lambda *a: ran.append(1))
    with frozen.pass_after(done):
        want = run_block(block, inputs.hidden, calls)
    assert len(ran) == len(calls) and attn[0] in frozen.recorded
    with frozen.pass_after(len(groups), record=False):
        got = run_block(block, inputs.hidden, calls)
    assert len(ran) == len(calls)                      # replayed, not run again
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert not any(p.endswith(("gate_proj", "up_proj", "fc1", "c_fc", "dense_h_to_4h")) for p in frozen.recorded)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_bfloat16_passes_keep_fp32_weights_and_quantize_as_well(model_type):
    """compute_dtype="bfloat16" runs the calibration passes through a bf16 copy of each block: the model
    stays fp32, unquantized parameters are untouched, every solved weight is its codes' exact fp32
    dequantization (not rounded to bf16), and the quantized model is about as close to the fp model as
    the fp32 run's (the Hessians differ only by the bf16 rounding of the activations)."""
    ids = [torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(s)) for s in range(6)]
    batch = torch.stack(ids)
    fp = tiny_model(model_type)
    with torch.no_grad():
        ref = fp(batch).logits
    err = {}
    for dtype in ("float32", "bfloat16"):
        m = tiny_model(model_type)
        cfg = QuantizeConfig(method="gptq", bits=4, group_size=32, compute_dtype=dtype)
        res = quantize_model(m, cfg, ids, batch_size=3, show_progress=False)
        spec, solved = arch_spec(m), set()
        for b, block in enumerate(get_blocks(m, spec)):
            for r in (r for g in block_linears(block, spec) for r in g):
                assert torch.equal(r.weight, res.layers[f"{spec.blocks}.{b}.{r.name}"].dequantize()), r.name
                solved.add(id(getattr(r.module, r.param)))
        fp_params = dict(fp.named_parameters())
        for n, p in m.named_parameters():
            assert p.dtype == torch.float32, n
            assert id(p) in solved or torch.equal(p, fp_params[n]), n   # norms, embeddings: not round-tripped
        with torch.no_grad():
            err[dtype] = float((m(batch).logits - ref).pow(2).mean())
    assert err["bfloat16"] < 1.25 * err["float32"], err


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_a_half_precision_model_quantizes_with_passes_in_another_dtype(compute_dtype):
    """A model held in fp16 (quantize_model takes any model) runs its passes through a copy of each block in the
    compute dtype, float32 too (the block itself serves only when it is in that dtype already); each solved
    weight is written back in fp16 and the model stays fp16."""
    ids = [torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    m = tiny_model("llama").half()
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=32, compute_dtype=compute_dtype)
    res = quantize_model(m, cfg, ids, batch_size=2, show_progress=False)
    spec = arch_spec(m)
    assert all(p.dtype == torch.float16 for p in m.parameters())
    for b, block in enumerate(get_blocks(m, spec)):
        for r in (r for g in block_linears(block, spec) for r in g):
            assert torch.equal(r.weight, res.layers[f"{spec.blocks}.{b}.{r.name}"].dequantize().half()), r.name


@pytest.mark.parametrize("act_order,scale_search", [(False, False), (True, True)])
def test_stacked_rows_solve_as_each_matrix_alone(act_order, scale_search):
    """GPTQ's rows are independent given H: linears sharing an input, solved as one stacked matrix and split
    with LayerQuant.rows, give each matrix's own solve (what the pipeline does for q/k/v and gate/up)."""
    X = correlated_inputs()
    H = hessian(X)
    g = torch.Generator().manual_seed(3)
    Ws = [torch.randn(r, 128, generator=g) for r in (48, 16, 16)]
    grid = Grid(3, 32, False)
    opts = dict(act_order=act_order, scale_search=scale_search)
    stacked = gptq(torch.cat(Ws), H, grid, **opts)
    r0 = 0
    for W in Ws:
        part, alone = stacked.rows(r0, r0 + W.shape[0]), gptq(W, H, grid, **opts)
        r0 += W.shape[0]
        assert torch.equal(part.g_idx, alone.g_idx) and torch.equal(part.dequantize(), part.w_hat)
        assert (part.codes == alone.codes).float().mean() > 0.995     # BLAS blocking may flip a rare tie
        assert torch.allclose(part.dequantize(), alone.dequantize(), atol=1e-5, rtol=0) or \
            out_err(X, W, part.dequantize()) == pytest.approx(out_err(X, W, alone.dequantize()), rel=1e-2)
        assert part.info["loss"] == pytest.approx(alone.info["loss"], rel=1e-3)
        assert part.codes.untyped_storage().data_ptr() != stacked.codes.untyped_storage().data_ptr()
    assert sum(stacked.rows(a, b).info["loss"] for a, b in ((0, 48), (48, 64), (64, 80))) == \
        pytest.approx(stacked.info["loss"], rel=1e-6)


def test_pipeline_solves_shared_input_linears_stacked():
    model = tiny_model("llama")
    samples = [torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    result = quantize_model(model, QuantizeConfig(method="gptq", bits=4, group_size=32), samples, show_progress=False)
    q = result.layers["model.layers.0.self_attn.q_proj"]
    assert sorted(q.info["stacked_with"]) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert result.layers["model.layers.0.mlp.up_proj"].info["stacked_with"] == ["model.layers.0.mlp.gate_proj"]
    assert "stacked_with" not in result.layers["model.layers.0.mlp.down_proj"].info
    assert "stacked_with" not in result.layers["model.layers.0.self_attn.o_proj"].info
    assert q.shape == tuple(model.model.layers[0].self_attn.q_proj.weight.shape) and q.w_hat is None


def test_linears_on_different_grids_are_solved_apart():
    model = tiny_model("llama")
    samples = [torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    q_name = "model.layers.0.self_attn.q_proj"
    result = quantize_model(model, QuantizeConfig(method="gptq", bits=4, group_size=32), samples, show_progress=False,
                            grids={q_name: Grid(8, 32, True)})
    assert "stacked_with" not in result.layers[q_name].info and result.layers[q_name].grid.bits == 8
    assert result.layers["model.layers.0.self_attn.k_proj"].info["stacked_with"] == ["model.layers.0.self_attn.v_proj"]


def test_one_statistic_on_several_grids_is_factored_once(monkeypatch):
    """q on its own grid and k/v stacked read one Hessian: one factorization serves both solves, as in a uniform
    run (test_factors_kept_across_grids_give_the_same_result: the same codes as separate factorizations)."""
    import importlib

    gptq_module = importlib.import_module("qforge.solvers.gptq")

    calls = []
    real = gptq_module.inverse_hessian_cholesky
    monkeypatch.setattr(gptq_module, "inverse_hessian_cholesky", lambda H, *a: calls.append(H.shape) or real(H, *a))
    samples = [torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    q_name = "model.layers.0.self_attn.q_proj"
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=32, act_order=True)
    mixed = quantize_model(tiny_model("llama"), cfg, samples, show_progress=False, grids={q_name: Grid(3, 32, True)})
    n_mixed, calls[:] = len(calls), []
    quantize_model(tiny_model("llama"), cfg, samples, show_progress=False)
    assert n_mixed == len(calls) == 4 * tiny_model("llama").config.num_hidden_layers   # qkv, o, gate/up, down
    assert mixed.layers[q_name].grid.bits == 3 and "stacked_with" not in mixed.layers[q_name].info


@pytest.mark.skipif(not triton_matmul.available(), reason="triton is not installed")
@pytest.mark.parametrize("grid,block_size,opts", [
    (Grid(4, 32, False), 128, {}), (Grid(3, 64, True), 64, {"act_order": True}),
    (Grid(4, 48, False), 96, {"scale_search": True}), (Grid(2, -1, True), 128, {"scale_search": True}),
    (Grid(3, 16, True), 256, {"act_order": True, "static_groups": True}),
    (Grid(8, 32, False), 128, {"group_aware": True, "scale_search": True}),
])
def test_triton_column_loop_matches_the_reference(grid, block_size, opts):
    """The one-kernel-per-block column loop (CUDA's) in Triton's interpreter: the reference's codes, grids and
    weights (ragged rows, ragged last group and block, fitted and given grids, the range search)."""
    X = correlated_inputs()
    W = torch.randn(37, 128, generator=torch.Generator().manual_seed(2))
    want = gptq(W, hessian(X), grid, block_size=block_size, **opts)
    got = gptq(W, hessian(X), grid, block_size=block_size, loop=triton_column_loop, **opts)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert torch.equal(got.zeros, want.zeros) and torch.equal(got.w_hat, want.w_hat)


def test_column_loop_choice_follows_the_device():
    assert column_loop_for("cpu") is column_loop
    assert column_loop_for("cuda") is (triton_column_loop if triton_matmul.available() else column_loop)
    with pytest.raises(ValueError, match="256 columns"):
        triton_column_loop(torch.zeros(4, 512), torch.eye(512), Grid(4, 32), 32)
    with pytest.raises(ValueError, match="FP8 grids"):
        triton_column_loop(torch.zeros(4, 64), torch.eye(64), Grid(8, -1, True, fp8=True), 64)
    from qforge.pipeline import gptq_options

    fp8 = QuantizeConfig(method="gptq", bits=8, group_size=-1, fp8=True)
    assert gptq_options(fp8, "cuda")["loop"] is column_loop                     # the pipeline never hands it FP8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("opts", [{}, {"scale_search": True}, {"act_order": True, "static_groups": True},
                                  {"scale_search": True, "gptaq": True}])
def test_compiled_column_loop_on_cuda_matches_the_reference(opts):
    """The compiled kernel (enable_fp_fusion off, IEEE divisions) against the CPU reference: only the blocks'
    lazy updates (cuBLAS vs the CPU's BLAS) differ, so nearly every code agrees."""
    X = correlated_inputs(d=512)
    W = torch.randn(300, 512, generator=torch.Generator().manual_seed(4))
    grid = Grid(4, 128, False)
    opts = dict(opts)
    if opts.pop("gptaq", False):                  # GPTAQ's P1 term in the kernel: an asymmetric dXXT
        Xq = X + 0.1 * torch.randn(X.shape, generator=torch.Generator().manual_seed(5))
        opts["dXXT"] = 2 / len(X) * (X - Xq).t() @ Xq
    want = gptq(W, hessian(X), grid, **opts)
    if "dXXT" in opts:
        opts["dXXT"] = opts["dXXT"].cuda()
    got = gptq(W.cuda(), hessian(X).cuda(), grid, loop=column_loop_for("cuda"), **opts)
    assert column_loop_for("cuda") is triton_column_loop
    assert float((got.codes.cpu() == want.codes).float().mean()) > 0.995
    assert got.info["loss"] == pytest.approx(want.info["loss"], rel=2e-2)


def test_activations_stay_on_a_cuda_device_only_when_four_copies_fit():
    from qforge.capture.blocks import fits_on_device

    assert not fits_on_device(1, "cpu")
    assert fits_on_device(2 << 30, "cuda", free_bytes=8 << 30) and not fits_on_device(2 << 30, "cuda", free_bytes=7 << 30)


def test_replay_recordings_stay_on_the_device_only_when_they_fit_beside_the_activations():
    from qforge.capture.replay import TAIL_RATIO, recordings_fit

    need = int(2 * (2 + TAIL_RATIO)) * (2 << 30)                         # 2 GB of activations: 24 GB free
    assert recordings_fit(2 << 30, "cuda", free_bytes=need) and not recordings_fit(2 << 30, "cuda", free_bytes=need - 1)
    assert not recordings_fit(1, "cpu")


def test_fp32_sums_of_bf16_products_keep_the_hessian_positive_semidefinite():
    """Nearly dependent bf16 inputs (as o_proj's behind grouped-query attention): rounding each batch's panel
    of products to bf16 leaves H indefinite by more than the default damping, so GPTQ raises it;
    hessian_dtype float32 sums the same exact products in fp32, a Gram matrix: no damping raised."""
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(4096, 4, generator=g) @ torch.randn(4, 256, generator=g)
         + 1e-3 * torch.randn(4096, 256, generator=g)).bfloat16()
    W = torch.randn(32, 256, generator=g)
    retries = {}
    for dtype in (torch.float32, torch.bfloat16):
        acc = HessianAccumulator(256, product_dtype=dtype)
        for chunk in X.split(512):
            acc.add(chunk)
        retries[dtype] = gptq(W, acc.H, Grid(4, 64, True), damp=0.01).info["retries"]
        if dtype == torch.float32:
            assert float(torch.linalg.eigvalsh(acc.H.double()).min()) > -1e-6 * float(torch.diag(acc.H).mean())
    assert retries == {torch.float32: 0, torch.bfloat16: 1}
    with pytest.raises(QForgeError, match="hessian_dtype"):
        QuantizeConfig(hessian_dtype="float16")


def test_gptq_leaves_its_inputs_untouched():
    """H is permuted into one copy (no clone of the caller's [in, in] matrix): the caller's W and H stay as given,
    dead columns included."""
    X = torch.randn(256, 64)
    X[:, 5] = 0
    H = 2 / 256 * X.T @ X
    W = torch.randn(16, 64)
    H0, W0 = H.clone(), W.clone()
    q = gptq(W, H, Grid(4, 16, True), act_order=True)
    assert torch.equal(H, H0) and torch.equal(W, W0)
    assert q.info["dead_columns"] == 1 and torch.all(q.dequantize()[:, 5] == 0)


def test_the_hessian_is_mirrored_in_place_and_then_closed():
    """H is built from the accumulated upper triangle in its own storage (no second [in, in] matrix), equal to
    the sum of the two triangles bit for bit (signs of zeros too); adding inputs after reading it is refused."""
    for n in (5, 191, 193, 500):                      # around and across the panel size
        acc = HessianAccumulator(n)
        for m in (7, 64):
            x = torch.randn(m, n)
            x[:, 0] = 0
            acc.add(x)
        U = acc._upper.clone()
        H = acc.H
        want = torch.triu(U) + torch.triu(U, diagonal=1).t()
        assert H.data_ptr() == acc._upper.data_ptr()
        assert torch.equal(H, want) and torch.equal(torch.signbit(H), torch.signbit(want))
        with pytest.raises(RuntimeError, match="H was read"):
            acc.add(torch.randn(2, n))


def test_inverse_hessian_cholesky_factors_the_permuted_hessian_without_touching_it():
    """One work matrix, filled with H[perm][:, perm] panel by panel and factored in place: the factor of the
    permuted matrix (dead inputs' H_jj = 1), and the caller's H unchanged."""
    X = correlated_inputs(d=96)
    X[:, 7] = 0.0                                                # a dead input: zero row and column of H
    H = hessian(X)
    before = H.clone()
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    U, info = inverse_hessian_cholesky(H, damp=0.01, perm=perm)
    assert torch.equal(H, before) and info["retries"] == 0
    Hp = H[perm][:, perm]
    Hp.diagonal()[Hp.diagonal() == 0] = 1.0
    Hp.diagonal().add_(0.01 * Hp.diagonal().mean())
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
    torch.testing.assert_close(U, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(U, U.triu())


@pytest.mark.parametrize("n,nb", [(1, 4), (13, 5), (64, 64), (70, 16)])
def test_the_in_place_triangular_inverse_and_reversal(n, nb):
    """inverse_hessian's two steps after the Cholesky, at block and chunk sizes that leave ragged ends."""
    from qforge.solvers.inverse_hessian import _invert_lower_, _reverse_

    g = torch.Generator().manual_seed(n)
    L = torch.randn(n, n, generator=g, dtype=torch.float64).tril_() * 0.1
    L.diagonal().copy_(torch.rand(n, generator=g, dtype=torch.float64) + 1.0)
    want = torch.linalg.inv(L)
    got = L.clone().mT.contiguous().mT                          # column-major, as the factor is held
    _invert_lower_(got, nb=nb)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    flat = torch.arange(n * n + (n % 2), dtype=torch.float32)
    rev = flat.clone()
    _reverse_(rev, chunk=nb)
    assert torch.equal(rev, flat.flip(0))


def test_factors_kept_across_grids_give_the_same_result():
    """gptq(factors=...): one factorization serves every grid of one H (a measurement's candidates); the codes
    equal those of independent calls, and a dict of another H is refused."""
    X = correlated_inputs(d=96)
    H, W = hessian(X), torch.randn(24, 96, generator=torch.Generator().manual_seed(3))
    for opts in [{}, {"act_order": True}, {"group_aware": True}]:
        factors = {}
        for grid in [Grid(4, 32, False), Grid(3, 32, True), Grid(2, -1, False), Grid(4, 16, False)]:
            got, want = gptq(W, H, grid, factors=factors, **opts), gptq(W, H, grid, **opts)
            assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
            assert got.info == want.info
        assert len(factors) == 2                                  # H and one factor
        with pytest.raises(ValueError, match="another H"):
            gptq(W, H.clone(), Grid(4, 32, False), factors=factors, **opts)


def test_a_handed_over_hessian_is_freed_before_the_column_loop(monkeypatch):
    """GPTQSolver.solve hands a once-used H over (HessianAccumulator.take): the 3.3 GB of a 28672-wide H are gone
    before the column loop's W-sized work is made. A shared H (several grids) stays with its accumulator."""
    import weakref

    from qforge.pipeline import GPTQSolver
    from qforge.solvers.gptq import column_loop

    torch.manual_seed(0)
    W = torch.randn(16, 64)
    acc = HessianAccumulator(64)
    acc.add(torch.randn(256, 64))
    ref = weakref.ref(acc.H)
    alive = []

    def loop(*args):
        alive.append(ref() is not None)
        return column_loop(*args)

    want = gptq(W, acc.H.clone(), Grid(4, 32, False))
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=32, sym=False)
    solver = GPTQSolver()
    got = gptq(W, [acc.take()], Grid(4, 32, False), **{"loop": loop})   # a ** call keeps its args in a tuple
    assert alive and not any(alive) and ref() is None and torch.equal(got.codes, want.codes)
    for use in (lambda: acc.add(torch.randn(4, 64)), acc.take):    # an emptied accumulator is refused
        with pytest.raises(RuntimeError, match="handed over"):
            use()

    torch.manual_seed(1)
    acc = HessianAccumulator(64)
    acc.add(torch.randn(256, 64))
    ref = weakref.ref(acc.H)
    alive.clear()
    monkeypatch.setattr("qforge.pipeline.column_loop_for", lambda device, fp8=False: loop)
    q = solver.solve(W, acc, Grid(4, 32, False), cfg)                   # solved once: handed over, freed
    assert alive and not any(alive) and q.codes.shape == W.shape
    torch.manual_seed(1)
    acc = HessianAccumulator(64)
    acc.add(torch.randn(256, 64))
    H = acc.H
    shared = {}
    again = solver.solve(W, acc, Grid(4, 32, False), cfg, shared=shared)
    assert acc.H is H and shared["H"] is H and torch.equal(again.codes, q.codes)   # kept for the next grid
