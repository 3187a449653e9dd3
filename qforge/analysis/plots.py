"""Plots of the tensor statistics across depth: one PNG per statistic, a panel per kind of tensor
(weights, linear inputs, keys and values), a line per role (q_proj, down_proj, ...)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .stats import layer_of

PANELS = (("weights", ("weights",)), ("linear inputs", ("activations",)), ("KV cache", ("keys", "values")))


def plot_stats(stats: dict, blocks: str, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    for stat, log_y in (("absmax", True), ("std", True), ("kurtosis", True)):
        fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4), sharex=True)
        for ax, (title, kinds) in zip(axes, PANELS):
            lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for kind in kinds:
                for name, st in stats["tensors"][kind].items():
                    role = name[len(blocks) + 1:].split(".", 1)[1]
                    lines[role].append((layer_of(name, blocks), st[stat]))
            for role, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1, label=role)
            if stat == "kurtosis":
                ax.axhline(3.0, color="k", lw=0.8, ls="--", label="normal (3)")
            if log_y:
                ax.set_yscale("log")
            ax.set_title(f"{title}: {stat}")
            ax.set_xlabel("decoder layer")
            if lines:
                ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = out_dir / f"stats_{stat}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
