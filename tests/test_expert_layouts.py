"""Fused experts in every stored layout (ExpertLayout): [experts, out, in] (Mixtral, Qwen3-MoE), [experts, in, out]
with router-scaled inputs (Llama 4), with interleaved gate/up and biases (GPT-OSS), and without a gate (Nemotron-H's
up_proj / down_proj). The inputs qforge rebuilds for each expert are checked against the operands the experts module
itself multiplies with each expert's weight."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from qforge.capture.linear_inputs import tap_inputs
from qforge.models.arch import arch_spec, block_linears, get_blocks
from tiny_models import VOCAB, tiny_model

MOE = ["mixtral", "qwen3_moe", "llama4_text", "gpt_oss", "lfm2_moe", "granitemoehybrid", "qwen3_next", "nemotron_h_moe",
       "nemotron_h_latent"]
_PRODUCTS = (torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm)


class _WeightOperands(TorchFunctionMode):
    """Records X^T X of the activation each expert's weight is multiplied with, by (parameter name, expert),
    whatever the call (F.linear on W[e], x @ W[e], or one bmm over every expert)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.params, self.xtx = params, {}

    def _which(self, w):
        """(parameter name, expert) of weight operand `w` (a view or a copy of one expert), or (name, None) for
        the whole parameter, or None."""
        if not isinstance(w, torch.Tensor):
            return None
        for name, p in self.params.items():
            if w.shape == p.shape and torch.equal(w, p):
                return name, None
            if w.shape == p.shape[1:]:
                for e in range(p.shape[0]):
                    if torch.equal(w, p[e]):
                        return name, e
        return None

    def _add(self, key, x):
        x = x.reshape(-1, x.shape[-1]).double()
        self.xtx[key] = self.xtx.get(key, 0) + x.T @ x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS and len(args) >= 2:
            x, w = args[0], args[1]
            hit = self._which(w)
            if hit is not None:
                name, e = hit
                if e is None:                                      # bmm over every expert: x [experts, tokens, in]
                    for e in range(w.shape[0]):
                        self._add((name, e), x[e])
                else:
                    self._add((name, e), x)
        return func(*args, **kwargs)


@pytest.mark.parametrize("model_type", MOE)
def test_rebuilt_expert_inputs_are_what_each_expert_multiplies(model_type):
    m = tiny_model(model_type, experts_implementation="eager")    # per-expert products the mode below can see
    spec = arch_spec(m)
    block = get_blocks(m, spec)[-1]                                # the last block is a MoE block in every config
    refs = [r for g in block_linears(block, spec) for r in g if r.expert is not None]
    assert refs
    params = {r.name.rpartition(".")[0]: getattr(r.module, r.param) for r in refs}
    got: dict = {}

    def sink(name):
        def add(x):
            x = x.double()
            got[name] = got.get(name, 0) + x.T @ x
        return add

    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    hidden = {}
    h = block.register_forward_pre_hook(lambda mod, a, k: hidden.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    h.remove()
    mode = _WeightOperands(params)
    with torch.no_grad(), mode:                                    # apart: the taps multiply weights themselves
        block(*hidden["args"], **hidden["kwargs"])
    with torch.no_grad(), tap_inputs(refs, {r.name: sink(r.name) for r in refs}):
        block(*hidden["args"], **hidden["kwargs"])
    routed = [r for r in refs if mode.xtx.get((r.name.rpartition(".")[0], r.expert), torch.zeros(1)).any()]
    assert len(routed) >= 2 * 2                                    # at least two experts saw tokens, gate/up and down
    for r in refs:
        want = mode.xtx.get((r.name.rpartition(".")[0], r.expert))
        if want is None or not want.any():                         # an expert no token was routed to
            assert r.name not in got or not got[r.name].any()
            continue
        torch.testing.assert_close(got[r.name], want, rtol=1e-5, atol=1e-6)
        assert want.abs().sum() > 0


@pytest.mark.parametrize("model_type", ["llama4_text", "gpt_oss"])
def test_an_expert_weight_is_its_in_out_parameter_transposed(model_type):
    m = tiny_model(model_type)
    spec = arch_spec(m)
    assert spec.experts.stored == "in_out"
    block = get_blocks(m, spec)[-1]
    ref = next(r for g in block_linears(block, spec) for r in g if r.expert == 2 and r.param == "gate_up_proj")
    p = getattr(ref.module, ref.param)
    assert ref.shape == (p.shape[2], p.shape[1])                   # [out = 2·I, in]
    W = torch.randn(ref.shape)
    ref.set_weight(W)
    torch.testing.assert_close(p[2], W.T)
    bias = getattr(ref.module, "gate_up_proj_bias", None)
    assert (ref.bias is None) == (bias is None)
    if bias is not None:
        assert ref.bias.data_ptr() == bias[2].data_ptr()


@pytest.mark.parametrize("model_type", MOE)
def test_the_table_layout_agrees_with_what_transformers_declares(model_type):
    """transformers 5 marks decorated experts modules is_transposed / is_concatenated / has_bias / has_gate (its own
    grouped kernels read them); the table's ExpertLayout must say the same."""
    m = tiny_model(model_type)
    spec = arch_spec(m)
    block = get_blocks(m, spec)[-1]
    module = next(r.module for g in block_linears(block, spec) for r in g if r.expert is not None)
    if not hasattr(module, "is_transposed"):
        pytest.skip(f"{type(module).__name__} declares no layout")
    assert module.is_transposed == (spec.experts.stored == "in_out")
    assert getattr(module, "has_gate", True) == (spec.experts.gate_up != "none")
    if spec.experts.gate_up != "none":
        assert module.is_concatenated == (spec.experts.gate_up == "halves")
    ref = next(r for g in block_linears(block, spec) for r in g if r.expert is not None)
    assert module.has_bias == (ref.bias is not None)
