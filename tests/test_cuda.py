"""GPU runs of the pipeline; skipped where no CUDA device is present (CI never has one)."""
import pytest
import torch

from qforge import QuantizeConfig
from qforge.pipeline import quantize_model
from tiny_models import VOCAB, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "gpt2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_cuda_matches_cpu(model_type, act_order):
    ids = [torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(s)) for s in range(8)]
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=32, act_order=act_order)
    ref, cpu, gpu = tiny_model(model_type), tiny_model(model_type), tiny_model(model_type)
    r_cpu = quantize_model(cpu, cfg, ids, device="cpu", show_progress=False)
    r_gpu = quantize_model(gpu, cfg, ids, device="cuda", show_progress=False)
    assert next(gpu.parameters()).device.type == "cpu"        # blocks go back after their turn
    # GPTQ's error feedback turns a last-bit float difference into different codes downstream, and
    # later blocks see inputs shaped by those codes: the first layer agrees almost bit for bit, the
    # model reaches the same quality
    first = next(iter(r_cpu.layers))
    assert float((r_cpu.layers[first].codes == r_gpu.layers[first].codes).float().mean()) > 0.98
    x = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        want = ref(input_ids=x).logits
        err_cpu = float((cpu(input_ids=x).logits - want).norm())
        err_gpu = float((gpu(input_ids=x).logits - want).norm())
    assert err_gpu < 1.15 * err_cpu
