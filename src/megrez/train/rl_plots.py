"""Plots of an RL run's ``metrics.jsonl``: ``rl.png`` (rollout reward = accuracy, held-out
accuracy with its confidence interval, response length, share of groups with a learning
signal, clip fraction) and ``expert_load.png``.

    python -m megrez.train.rl_plots RUN_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

from .plots import open_run, plot_expert_load


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_rl(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    plt, recs = open_run(run_dir)
    if plt is None:
        return []
    steps = [r for r in recs if "reward" in r]
    evals = [r for r in recs if "eval_accuracy" in r]
    if not steps and not evals:
        return []
    window = max(1, len(steps) // 20)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    a = axes[0]
    if steps:
        x = [r["step"] for r in steps]
        a.plot(x, [r["reward"] for r in steps], lw=0.5, alpha=0.4, color="C0")
        a.plot(x, _smooth([r["reward"] for r in steps], window), lw=1.5, color="C0",
               label=f"rollout accuracy (T=1, mean of {window})")
    if evals:
        x = [r["step"] for r in evals]
        y = [r["eval_accuracy"] for r in evals]
        lo = [r["eval_accuracy"] - r["eval_ci"][0] for r in evals]
        hi = [r["eval_ci"][1] - r["eval_accuracy"] for r in evals]
        a.errorbar(x, y, yerr=[lo, hi], fmt="o-", ms=3, color="C3", capsize=2, label="held-out accuracy (95% CI)")
    a.set_xlabel("step")
    a.set_ylabel("accuracy = mean reward")
    a.set_title(f"{run_dir.name}: reward and accuracy")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    if steps:
        x = [r["step"] for r in steps]
        axes[1].plot(x, [r["response_length"] for r in steps], lw=0.8)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("tokens")
        axes[1].set_title("response length (mean over rollouts)")
        axes[1].grid(alpha=0.3)
        axes[2].plot(x, _smooth([r["groups_with_signal"] for r in steps], window), label="groups with signal")
        axes[2].plot(x, _smooth([r["clip_fraction"] for r in steps], window), label="clipped tokens")
        axes[2].set_xlabel("step")
        axes[2].set_title("share of groups with unequal rewards; clipped tokens")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "rl.png", dpi=110)
    plt.close(fig)
    written = [run_dir / "rl.png"]
    loads = [r for r in steps if "expert_load" in r]
    if loads:
        written.append(plot_expert_load(plt, loads, run_dir / "expert_load.png"))
    return written


if __name__ == "__main__":
    for p in plot_rl(sys.argv[1]):
        print(p)
