"""`qforge report DIR`: one Markdown page (with PNG plots beside it) about a qforge output directory:
settings, calibration, sizes and bits per weight, perplexity per domain against fp32, per-layer
quantization error, the mixed-precision allocation and tensor statistics when present.

Everything comes from the files the run wrote (qforge_config.json, run_record.json, allocation.json);
`evaluate` (perplexity now, when the run recorded none) and `stats` (statistics of the source model)
are optional extra work.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..checkpoint import is_qforge_output
from ..errors import QForgeError

log = logging.getLogger(__name__)


def _table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def build_report(run_dir: str | Path, out: str | Path, evaluate: bool = False, stats: bool = False,
                 datasets=("wiki", "brown", "news", "code"), max_windows: int | None = 2, seqlen: int = 2048) -> Path:
    """Write `out`/report.md and its plots (into `out`, which must exist); returns the page's path."""
    run_dir, out = Path(run_dir), Path(out)
    if not is_qforge_output(run_dir):
        raise QForgeError(f"{run_dir} is not a qforge output directory (no qforge_config.json / run_record.json)")
    cfg = json.loads((run_dir / "qforge_config.json").read_text())
    record = json.loads((run_dir / "run_record.json").read_text())
    calib_file = run_dir / "qforge_calibration.json"
    calib = json.loads(calib_file.read_text()) if calib_file.is_file() else None
    md = [f"# qforge report: {run_dir.name}", "",
          f"Source model `{record.get('source')}`, written {record.get('created')}."]
    if record.get("source_types"):
        md += ["", "Its GGUF file stored the tensors as " +
               ", ".join(f"{t} x {n}" for t, n in record["source_types"].items()) + "."]
        md += [f"- warning: {w}" for w in record.get("source_warnings", [])]
    md += ["", "## Settings", "",
          _table(["setting", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in cfg.items()])]
    if calib:
        md += ["", "## Calibration", "", _table(["setting", "value"], [[k, v] for k, v in calib.items()])]
        md += [f"- warning: {w}" for w in record.get("calibration_warnings", [])]
    st = record.get("storage", {})
    md += ["", "## Size", "", _table(["quantity", "value"], [[k, v] for k, v in st.items()]), "",
           f"Quantization took {record.get('quantize_seconds')} s; peak RSS {record.get('peak_rss_mb')} MB."]
    md += ["", "## Perplexity", ""] + _perplexity_section(run_dir, record, evaluate, datasets, max_windows, seqlen)
    md += ["", "## Per-layer quantization error", ""] + _layer_section(record, out)
    if (run_dir / "allocation.png").is_file():
        shutil.copy(run_dir / "allocation.png", out / "allocation.png")
        alloc = json.loads((run_dir / "allocation.json").read_text())
        md += ["", "## Mixed-precision allocation", "",
               f"Target {alloc['target_bpw']} bpw, stored {alloc['bpw']:.4f} bpw ({alloc['format']}).", "",
               "![allocation](allocation.png)"]
    if stats:
        md += ["", "## Tensor statistics of the source model", ""] + _stats_section(record["source"], out)
    page = out / "report.md"
    page.write_text("\n".join(md) + "\n")
    return page


def _perplexity_section(run_dir: Path, record: dict, evaluate: bool, datasets, max_windows, seqlen) -> list[str]:
    fp, q = record.get("eval_fp32"), record.get("eval_quantized")
    if (fp is None or q is None) and evaluate:
        from ..api import evaluate as run_eval

        kw = dict(datasets=list(datasets), max_windows=max_windows, seqlen=seqlen)
        fp, q = run_eval(record["source"], **kw), run_eval(str(run_dir), **kw)
    if fp is None or q is None:
        return ["The run recorded no perplexity; `qforge report DIR --eval` measures it."]
    fpd = {r["dataset"]: r for r in fp}
    rows = [[r["dataset"], fpd[r["dataset"]]["ppl"], r["ppl"], f"{r['ppl'] / fpd[r['dataset']]['ppl'] - 1:+.2%}",
             f"{r['windows']} x {r['seqlen']}"] for r in q if r["dataset"] in fpd]
    return [_table(["domain", "fp32 ppl", "quantized ppl", "change", "windows"], rows)]


def _layer_section(record: dict, out: Path) -> list[str]:
    layers = record.get("layers", [])
    if not layers:
        return ["No per-layer records."]
    from .plots import plot_by_role

    plot_by_role({r["name"]: r["rel_weight_err"] for r in layers}, out / "layer_error.png", "‖W − Ŵ‖ / ‖W‖")
    worst = sorted(layers, key=lambda r: -r["rel_weight_err"])[:10]
    return ["![per-layer relative weight error](layer_error.png)", "", "The ten layers with the largest relative weight error:", "",
            _table(["layer", "shape", "method", "‖W − Ŵ‖ / ‖W‖"],
                   [[r["name"], "x".join(map(str, r["shape"])), r.get("method"), r["rel_weight_err"]] for r in worst])]


def _stats_section(source: str, out: Path, nsamples: int = 8, seqlen: int = 512) -> list[str]:
    from .. import api
    from ..calibration import build_calibration
    from ..models.arch import arch_spec
    from .plots import plot_stats
    from .stats import collect_stats

    m = api.load(source)
    st = collect_stats(m.model, build_calibration("builtin:mix", m.tokenizer, nsamples, seqlen).samples)
    (out / "stats.json").write_text(json.dumps(st, indent=1) + "\n")
    plot_stats(st, arch_spec(m.model).blocks, out)
    rows = [[r["kind"], r["tensor"], r["kurtosis"], r["absmax"]] for r in st["heaviest_tails"]]
    return [f"On {nsamples} x {seqlen} tokens of the built-in mix. Kurtosis is E[(x−μ)⁴]/σ⁴: a normal distribution "
            "gives 3.", "", "![AbsMax](stats_absmax.png)", "", "![kurtosis](stats_kurtosis.png)", "",
            "Heaviest tails:", "", _table(["kind", "tensor", "kurtosis", "AbsMax"], rows)]
