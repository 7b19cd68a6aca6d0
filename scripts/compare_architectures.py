"""Architecture experiment: at equal active parameters and equal training tokens, compare

  moe       a standard MoE: every MoE layer owns its routed experts, routers read their own layer
  megrez2   Megrez2: one expert pool per group of 3 MoE layers, pre-gated routers
  dense     a dense Llama model whose MLP width matches the MoE models' active width
  megrez2-wide (optional, --with-wide) Megrez2 with 3x the experts per pool: the stored size of `moe`

on the same data (the shipped model's corpus and tokenizer) with the same schedule, for several
seeds (the seed sets initialisation and data order). Reports validation loss (mean and spread over
seeds), stored and active parameters and CPU tokens/s as JSON and a plot.

    python -m scripts.compare_architectures --corpus runs-out/shipped/data --tokenizer runs-out/shipped/tokenizer \
        --out runs-out/compare --steps 300 --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HIDDEN, LAYERS, EXPERT_WIDTH, EXPERTS, TOP_K = 192, 7, 96, 16, 2
MOE = {
    "architectures": ["MegrezMoeForCausalLM"], "model_type": "megrez_moe", "hidden_size": HIDDEN,
    "intermediate_size": 6 * EXPERT_WIDTH, "moe_intermediate_size": EXPERT_WIDTH, "num_hidden_layers": LAYERS,
    "num_attention_heads": 3, "num_key_value_heads": 1, "n_routed_experts": EXPERTS, "num_experts_per_tok": TOP_K,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
    "max_position_embeddings": 1024, "rope_theta": 10000.0,
}


def dense_width() -> int:
    """The Llama MLP width whose parameters equal the MoE models' active MLP parameters
    (layer 0's dense MLP, then per MoE layer top-k + shared experts and the router)."""
    active = 3 * HIDDEN * MOE["intermediate_size"] + (LAYERS - 1) * (
        3 * HIDDEN * (TOP_K + 1) * EXPERT_WIDTH + HIDDEN * EXPERTS)
    return round(active / (3 * HIDDEN * LAYERS))


VARIANTS = {
    "moe": {"preset": "megrez2-tiny", "model_overrides": {**MOE, "experts_shared_frequency": 1, "pre_gate": False}},
    "megrez2": {"preset": "megrez2-tiny", "model_overrides": {**MOE, "experts_shared_frequency": 3, "pre_gate": True}},
    "dense": {"preset": "llama-test", "model_overrides": {
        "hidden_size": HIDDEN, "intermediate_size": dense_width(), "num_hidden_layers": LAYERS,
        "num_attention_heads": 3, "num_key_value_heads": 1, "max_position_embeddings": 1024, "rope_theta": 10000.0}},
    "megrez2-wide": {"preset": "megrez2-tiny", "model_overrides": {
        **MOE, "experts_shared_frequency": 3, "pre_gate": True, "n_routed_experts": 3 * EXPERTS,
        "num_experts_per_tok": TOP_K}},
}


def run_variant(name: str, seed: int, a) -> dict:
    from megrez.train import TrainConfig, Trainer

    d = Path(a.corpus)
    out = Path(a.out) / (name if seed == 0 else f"{name}-seed{seed}")
    cfg = TrainConfig(stage="pretrain", tokenizer=a.tokenizer, data=[str(d / "kjv.jsonl"), str(d / "zh_poetry.jsonl"),
                      str(d / "zh_classics.jsonl")], val_data=[str(d / "val.jsonl")], out=str(out),
                      seq_len=256, batch_size=8, steps=a.steps, lr=3e-3, warmup_steps=30, min_lr_ratio=0.1,
                      bias_update_rate=0.01, log_every=10, eval_every=a.eval_every, eval_batches=16,
                      save_every=a.eval_every, export_dtype="float32", seed=seed, progress=a.progress,
                      **VARIANTS[name])
    if not (out / "final" / "config.json").is_file():
        Trainer(cfg).run()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start = recs[0]
    val = [(r["tokens"], r["val_loss"]) for r in recs if "val_loss" in r]
    speed = [r["tok_per_s"] for r in recs if "tok_per_s" in r]
    imb = [r["imbalance"] for r in recs if "imbalance" in r]
    return {"name": name, "seed": seed, "stored_params": start["stored_params"], "active_params": start["active_params"],
            "train_tokens": val[-1][0], "val_loss": val[-1][1], "val_curve": val,
            "median_tok_per_s": sorted(speed)[len(speed) // 2],
            "final_max_imbalance": max(imb[-1]) if imb else None}


def summarise(results: list[dict]) -> list[dict]:
    """Per variant: mean final validation loss over seeds, and its spread (max - min)."""
    out = []
    for name in dict.fromkeys(r["name"] for r in results):
        rs = [r for r in results if r["name"] == name]
        losses = [r["val_loss"] for r in rs]
        out.append({"name": name, "seeds": [r["seed"] for r in rs], "stored_params": rs[0]["stored_params"],
                    "active_params": rs[0]["active_params"], "train_tokens": rs[0]["train_tokens"],
                    "val_loss_mean": sum(losses) / len(losses), "val_loss_spread": max(losses) - min(losses),
                    "val_losses": losses, "median_tok_per_s": sorted(r["median_tok_per_s"] for r in rs)[len(rs) // 2],
                    "final_max_imbalance": rs[0]["final_max_imbalance"]})
    return out


def plot(results: list[dict], summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, s in enumerate(summary):
        rs = [r for r in results if r["name"] == s["name"]]
        xs = [x / 1e6 for x, _ in rs[0]["val_curve"]]
        curves = [[y for _, y in r["val_curve"]] for r in rs]
        mean = [sum(c) / len(c) for c in zip(*curves)]
        color = f"C{n}"
        ax.plot(xs, mean, "o-", ms=3, color=color,
                label=f"{s['name']} ({s['stored_params'] / 1e6:.1f}M stored, {s['active_params'] / 1e6:.1f}M active)")
        if len(curves) > 1:
            ax.fill_between(xs, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)], color=color, alpha=0.2)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"equal active parameters, equal tokens (mean of {len(summary[0]['seeds'])} seeds, band = min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="runs-out/shipped/data")
    ap.add_argument("--tokenizer", default="runs-out/shipped/tokenizer")
    ap.add_argument("--out", default="runs-out/compare")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--variants", nargs="+", default=["moe", "megrez2", "dense", "megrez2-wide"],
                    choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--plot", default="docs/img/compare_val_loss.png")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    a = ap.parse_args()
    results = [run_variant(n, seed, a) for seed in a.seeds for n in a.variants]
    summary = summarise(results)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "results.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
    plot(results, summary, Path(a.plot))
    for s in summary:
        print(json.dumps(s))


if __name__ == "__main__":
    main()
