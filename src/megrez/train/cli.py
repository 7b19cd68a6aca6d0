"""``megrez train pretrain|sft|presets``: options come from a JSON config file (``--config``)
and/or flags (flags win). Every option is a field of ``TrainConfig``.

    megrez train pretrain --preset megrez2-tiny --data kjv.txt --out runs-out/pt --steps 3000
    megrez train sft --init runs-out/pt/final --data chat.jsonl --out runs-out/sft --epochs 2
    torchrun --nproc-per-node 2 -m megrez.cli train pretrain --config pt.json     (FSDP2)
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

GROUPS = {
    "data": ["data", "val_data", "val_fraction", "text_field", "seq_len"],
    "model": ["init", "preset", "model_overrides", "init_std", "tokenizer", "tokenizer_vocab"],
    "optimisation": ["batch_size", "grad_accum", "steps", "epochs", "lr", "min_lr_ratio", "warmup_steps",
                     "weight_decay", "betas", "grad_clip", "loss"],
    "MoE balancing": ["bias_update_rate", "aux_loss_weight"],
    "execution": ["device", "precision", "attention", "activation_checkpointing", "seed"],
    "output": ["out", "log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints",
               "export_dtype", "resume", "stop_after", "progress", "plots"],
}
HELP = {
    "data": "training files (.txt / .jsonl; SFT: .jsonl with 'messages')",
    "val_data": "validation files (default: hold out val_fraction of the data)",
    "init": "checkpoint directory to start from (any model the engine loads)",
    "preset": "train from scratch with this size (see `megrez train presets`)",
    "model_overrides": "JSON object of config.json keys set on top of the preset",
    "loss": "per_token, or turn (each assistant turn averaged, then turns averaged; the default of sft)",
    "bias_update_rate": "auxiliary-loss-free balancing: routing-bias change per step (0 disables; DeepSeek-V3 "
                        "uses 1e-3 over very long runs)",
    "warmup_steps": "linear learning-rate warm-up (default: a tenth of the run, at most 100 steps)",
    "aux_loss_weight": "weight of the sequence-wise balance loss (0 disables)",
    "precision": "auto = bf16 autocast on CUDA, fp32 on CPU",
    "attention": "packed attention: auto = FlexAttention on CUDA, dense mask on CPU",
    "steps": "optimizer steps (or give epochs)",
    "stop_after": "stop this invocation after N steps without saving (to test resuming)",
    "resume": "resume from the newest checkpoint in OUT if there is one",
}


def _add_field(group, f, help_text: str | None = None) -> None:
    flag = "--" + f.name.replace("_", "-")
    kind = str(f.type)  # field types are strings (postponed annotations)
    value = f.default_factory() if f.default is MISSING else f.default
    text = HELP.get(f.name, "") if help_text is None else help_text
    if "default" not in text:
        text = f"{text} (default: {value})".strip()
    text = text.replace("%", "%%")
    default = argparse.SUPPRESS  # unset flags do not override the config file
    if kind == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
    elif kind.startswith("list"):
        group.add_argument(flag, nargs="+", default=default, help=text)
    elif kind.startswith("dict"):
        group.add_argument(flag, type=json.loads, default=default, help=text)
    elif kind.startswith("tuple"):
        group.add_argument(flag, nargs=2, type=float, default=default, help=text)
    else:
        conv = int if kind.startswith("int") else float if kind.startswith("float") else str
        group.add_argument(flag, type=conv, default=default, help=text)


def add_train_args(p: argparse.ArgumentParser) -> None:
    from .trainer import TrainConfig

    p.add_argument("--config", default=None, help="JSON file of TrainConfig options (flags override it)")
    by_name = {f.name: f for f in fields(TrainConfig)}
    for title, names in GROUPS.items():
        g = p.add_argument_group(title)
        for name in names:
            _add_field(g, by_name[name])


def config_from_args(a, stage: str):
    from .trainer import TrainConfig, load_config_file

    cfg = load_config_file(a.config) if a.config else {}
    given = {k: v for k, v in vars(a).items() if k not in ("config", "func", "command", "train_command")}
    cfg.update(given)
    cfg["stage"] = stage
    if stage == "sft":
        cfg.setdefault("loss", "turn")
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return TrainConfig.from_dict(cfg, source=a.config or "command line")


def cmd_train(a) -> int:
    from . import distributed
    from .trainer import train

    cfg = config_from_args(a, a.train_command)
    try:
        summary = train(cfg)
        rank, world = distributed.rank(), distributed.world_size()
    finally:
        distributed.cleanup()
    if summary.get("interrupted"):
        return 130
    # One summary line per process: under torchrun every rank reports the (all-reduced) losses.
    short = {k: v for k, v in summary.items() if k != "losses"}
    if world > 1:
        short.update(rank=rank, world_size=world, losses=summary["losses"])
    # One write per report: ranks share stdout, and a separate newline write could interleave.
    sys.stdout.write(json.dumps(short) + "\n")
    sys.stdout.flush()
    return 0


def cmd_presets(a) -> int:
    import torch

    from ..models import build_model
    from ..presets import PRESETS

    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            model = build_model({**cfg, "vocab_size": a.vocab_size})
        c = model.parameter_counts()
        print(f"{name:14s} {cfg['architectures'][0]:22s} hidden {cfg['hidden_size']:5d} layers "
              f"{cfg['num_hidden_layers']:3d}  stored {c['stored'] / 1e6:9.1f}M  active {c['active'] / 1e6:8.1f}M "
              f"(vocab {a.vocab_size})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pre-train or fine-tune (SFT) a model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="train_command", required=True)
    for stage, text in (("pretrain", "pre-train on packed text documents"),
                        ("sft", "supervised fine-tuning on chat conversations (turn-level loss by default)")):
        sp = sub.add_parser(stage, help=text)
        add_train_args(sp)
        sp.set_defaults(func=cmd_train)
    from .rl_cli import register as register_rl

    register_rl(sub)
    from .image_adapter import register as register_image_adapter

    register_image_adapter(sub)
    sp = sub.add_parser("presets", help="list the named model sizes")
    sp.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size to count parameters with")
    sp.set_defaults(func=cmd_presets)
