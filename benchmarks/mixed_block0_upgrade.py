"""The 3.0 bpw allocation with block 0's attention projections raised from 2 to 3 bits per channel (asym): does
the held-out failure traced by mixed_heldout_diag.py go away, and what does it cost in bpw and ppl?

    PYTHONPATH=. .venv/bin/python benchmarks/mixed_block0_upgrade.py
"""
import torch, qforge
from qforge.calibration import load_samples_jsonl
from qforge.eval import load_eval_text, perplexity
from qforge.eval.compare import kl_divergence
from qforge.mixed import load_measurement, plan, Allocation
from qforge.mixed.plan import restate_costs
from benchmarks.mixed_heldout_diag import MEAS, logp       # the same measurement and held-out log-probabilities
torch.set_num_threads(2)
every = load_samples_jsonl("benchmarks/results/brown_128x512.jsonl")
samples, held = every[:32], every[32:40]
fp = qforge.load("smollm2-135m").model
ref = [logp(fp, s) for s in held]
meas = restate_costs(load_measurement(MEAS), "compressed-tensors")
a = plan(meas, 3.0, pc_min_bits=0)      # the session-18 allocation: every option allowed
layers = dict(a.layers)
for n in list(layers):
    if n.startswith("model.layers.0.self_attn."):
        o = next(o for o in meas["layers"][n]["options"]
                 if (o["bits"], o["group_size"], o["sym"]) == (3, -1, False))
        layers[n] = {**layers[n], "bits": 3, "group_size": -1, "sym": False, "stored_bits": o["stored_bits"],
                     "err": o["err"]}
b = Allocation(3.0, "compressed-tensors", layers)
print("bpw", a.bpw, "->", b.bpw)
m = qforge.load("smollm2-135m", qforge.QuantizeConfig(method="gptq", bpw=3.0))
m.quantize(samples, allocation=b)
kl = [float(kl_divergence(r, logp(m.model, s)).mean()) for r, s in zip(ref, held)]
print("per-sample KL", [round(k, 2) for k in kl], "mean", sum(kl) / 8)
print({d: perplexity(m.model, m.tokenizer, load_eval_text(d), 2048, 2, show_progress=False)["ppl"]
       for d in ("wiki", "news", "code")})
