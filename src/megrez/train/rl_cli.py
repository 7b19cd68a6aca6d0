"""``megrez train rl``: options from a JSON config file (``--config``) and/or flags (flags win);
every option is a field of ``RLConfig``.

    megrez train rl --init src/megrez/assets/megrez2-tiny-chat --task arithmetic --out runs-out/rl --steps 200
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from .cli import _add_field

GROUPS = {
    "policy and task": ["init", "task", "task_options", "eval_task_options", "max_tokens"],
    "rollouts": ["steps", "prompts_per_step", "group_size", "temperature", "max_num_seqs", "filter_samples",
                 "zero_pass_fraction"],
    "objective": ["clip_eps", "kl_coef", "ppo_epochs", "minibatches", "micro_batch_size"],
    "optimisation": ["lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "grad_clip", "bias_update_rate"],
    "execution": ["device", "threads", "precision", "seed"],
    "output": ["out", "eval_every", "eval_samples", "eval_temperature", "save_every", "keep_checkpoints",
               "export_dtype", "resume", "stop_after", "time_limit_minutes", "progress", "plots"],
}
HELP = {
    "init": "checkpoint directory of the policy to train",
    "task": "a megrez eval task with a verifiable answer (see `megrez eval --list`)",
    "task_options": "JSON object: the training prompts (e.g. {\"split\": \"train\", \"n\": 1000})",
    "eval_task_options": "JSON object: the held-out prompts, evaluated every eval_every steps (null: none)",
    "group_size": "rollouts per prompt (advantages are normalised within the group)",
    "filter_samples": "attempts per prompt to estimate pass rates before training (0: no filtering)",
    "zero_pass_fraction": "share of never-solved prompts kept in the pool (the report keeps ~half; null: all)",
    "kl_coef": "weight of the KL penalty to the initial policy (0: none, as in the report)",
    "clip_eps": "PPO clipping range of the probability ratio",
    "bias_update_rate": "auxiliary-loss-free balancing: routing-bias change per update (0 disables)",
}


def add_rl_args(p: argparse.ArgumentParser) -> None:
    from .rl import RLConfig

    p.add_argument("--config", default=None, help="JSON file of RLConfig options (flags override it)")
    by_name = {f.name: f for f in fields(RLConfig)}
    for title, names in GROUPS.items():
        g = p.add_argument_group(title)
        for name in names:
            f = by_name[name]
            _add_field(g, f, HELP.get(name, ""))


def cmd_rl(a) -> int:
    from . import distributed
    from .rl import RLConfig, train_rl
    from .trainer import load_config_file

    cfg = load_config_file(a.config) if a.config else {}
    cfg.update({k: v for k, v in vars(a).items() if k not in ("config", "func", "command", "train_command")})
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    config = RLConfig.from_dict(cfg, source=a.config or "command line")
    try:
        summary = train_rl(config)
        rank, world = distributed.rank(), distributed.world_size()
    finally:
        distributed.cleanup()
    short = {k: v for k, v in summary.items() if k not in ("rewards", "losses")}
    if world > 1:
        short.update(rank=rank, world_size=world, rewards=summary["rewards"])
    sys.stdout.write(json.dumps(short) + "\n")
    sys.stdout.flush()
    return 0


def register(sub) -> None:
    sp = sub.add_parser("rl", help="reinforcement learning with verifiable rewards (GRPO advantages, PPO loss)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rl_args(sp)
    sp.set_defaults(func=cmd_rl)
