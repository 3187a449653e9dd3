"""Plots of the tensor statistics across depth: one PNG per statistic, a panel per kind of tensor
(weights, linear inputs, keys and values), a line per role (q_proj, down_proj, ...); and one value per
linear in model order, coloured by role (per-layer errors, mixed-precision allocations)."""
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


def plot_by_role(values: dict[str, float], path: str | Path, ylabel: str, title: str | None = None,
                 average: float | None = None) -> None:
    """One point per linear (full names, model order), coloured by its role (the name's last part)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    roles: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(names):
        parts = n.split(".")
        roles[parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]].append(i)   # experts: their param
    fig, ax = plt.subplots(figsize=(max(9, len(names) * 0.05), 3.5))
    for role, xs in sorted(roles.items()):
        ax.scatter(xs, [values[names[i]] for i in xs], s=8, label=role)
    if average is not None:
        ax.axhline(average, color="k", lw=0.8, ls="--", label=f"average {average:.3f}")
    ax.set_xlabel("linear (model order)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
