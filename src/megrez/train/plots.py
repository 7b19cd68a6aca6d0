"""PNG plots of a run's ``metrics.jsonl``: ``loss.png`` (training and validation loss against
tokens) and ``expert_load.png`` (per-expert share of routed tokens in each MoE layer over the
last logging window, and max/mean load over training).

    python -m megrez.train.plots RUN_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("megrez: matplotlib is not installed; skipping plots (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def open_run(run_dir: Path):
    """(pyplot, the run's metrics records), or (None, None) without matplotlib or metrics."""
    path = Path(run_dir) / "metrics.jsonl"
    plt = _pyplot()
    if plt is None or not path.is_file():
        return None, None
    return plt, read_metrics(path)


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    plt, recs = open_run(run_dir)
    if plt is None:
        return []
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], label="train", lw=1)
        if val:
            ax.plot([r["tokens"] / 1e6 for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
        ax.set_xlabel("tokens (millions)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(f"{run_dir.name}: loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "loss.png", dpi=110)
        plt.close(fig)
        written.append(run_dir / "loss.png")
    loads = [r for r in train if "expert_load" in r]
    if loads:
        written.append(plot_expert_load(plt, loads, run_dir / "expert_load.png"))
    return written


def plot_expert_load(plt, loads: list[dict], path: Path) -> Path:
    """Records with ``step``, ``expert_load`` [layers][experts] and ``imbalance`` [layers]: a heat
    map of the last window's share of routed tokens per expert, and max/mean load over steps."""
    last = loads[-1]["expert_load"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    im = a1.imshow(last, aspect="auto", cmap="viridis")
    a1.set_xlabel("expert")
    a1.set_yticks(range(len(last)))
    a1.set_ylabel("MoE layer (counted from the first)")
    a1.set_title(f"share of routed tokens per expert, step {loads[-1]['step']}")
    fig.colorbar(im, ax=a1)
    steps = [r["step"] for r in loads]
    for layer in range(len(last)):
        a2.plot(steps, [r["imbalance"][layer] for r in loads], lw=1, label=f"MoE layer {layer}")
    a2.set_xlabel("step")
    a2.set_ylabel("max load / mean load")
    a2.set_title("load imbalance")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for p in plot_run(sys.argv[1]):
        print(p)
