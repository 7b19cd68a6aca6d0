"""Reinforcement learning with verifiable rewards (the Megrez2 report's RLVR recipe).

    megrez train rl --init CHECKPOINT --task arithmetic --out runs-out/rl --steps 200
    torchrun --nproc-per-node 8 -m megrez.cli train rl --config rl.json          (FSDP2)

One step: take ``prompts_per_step`` prompts from the (filtered) pool; the project's engine
samples ``group_size`` answers to each at temperature 1.0 with the current weights, keeping
each sampled token's log-probability; the task grades them (binary verified reward); rewards
are normalised within each prompt's group (GRPO) and every response token gets its rollout's
advantage (GAE with lambda = gamma = 1 for a terminal reward, see ``rl_loss``); the PPO clipped
objective (old log-probabilities = the engine's) is minimised for ``ppo_epochs`` passes over
``minibatches`` minibatches, one AdamW update each, followed by the auxiliary-loss-free
routing-bias update. No KL term unless ``kl_coef > 0``. Groups whose answers all got the same
reward carry no signal and are left out of the update.

Before training, each pool prompt is tried ``filter_samples`` times: prompts solved every time
are dropped, and prompts never solved are kept to make ``zero_pass_fraction`` of the pool (the
report keeps about half). Checkpoints (HF weights + optimizer, prompt position, RNG) resume
bit-identically; every rollout's seed is a function of (seed, step, prompt, sample).
``RUN/metrics.jsonl`` and ``RUN/rl.png`` / ``RUN/expert_load.png`` hold the curves: reward,
accuracy, response length, held-out accuracy, expert load.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..engine import Engine, SamplingParams
from ..eval.backends import EngineBackend, GenRequest
from ..eval.harness import EvalConfig, evaluate, sample_seed
from ..eval.tasks import get_task
from ..loading import load_model
from ..tokenizer import Tokenizer
from . import checkpoint as ckpt
from . import distributed
from .balance import ExpertLoad, imbalance
from .data import shuffled
from .optim import build_optimizer, lr_at, set_lr
from .rl_loss import (
    gae_advantages,
    group_advantages,
    kl_penalty_sum,
    ppo_clip_loss_sum,
    terminal_rewards,
    token_logprobs,
)
from .rl_sync import RolloutWeights
from .trainer import Options, _jsonable, _truncate_metrics, autocast_for


@dataclass
class RLConfig(Options):
    init: str = ""                           # the policy to start from (any checkpoint the engine loads)
    task: str = "arithmetic"
    task_options: dict = field(default_factory=lambda: {"split": "train", "n": 1000})
    eval_task_options: dict = field(default_factory=lambda: {"split": "test", "n": 300})
    out: str = "runs-out/rl"
    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    max_tokens: int | None = None            # None: the task's budget
    ppo_epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int = 64               # rows per forward pass (gradient accumulation inside a minibatch)
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    lr: float = 1e-5
    min_lr_ratio: float = 1.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bias_update_rate: float = 1e-3
    filter_samples: int = 8                  # 0: no pass-rate filtering
    zero_pass_fraction: float | None = 0.5   # share of never-solved prompts kept (None: keep all)
    eval_every: int = 20
    eval_samples: int = 1                    # held-out answers per prompt (1: greedy)
    eval_temperature: float = 0.0
    save_every: int = 20
    keep_checkpoints: int = 2
    export_dtype: str = "float32"
    max_num_seqs: int = 64                   # the rollout engine's batch
    device: str = "auto"
    threads: int | None = None               # CPU threads (on a busy machine: the free cores)
    precision: str = "fp32"
    seed: int = 0
    resume: bool = True
    stop_after: int | None = None
    time_limit_minutes: float | None = None  # finish (save, export) after the step that passes it
    progress: bool = True
    plots: bool = True

    kind = "RL"

    def validate(self, source: str = "config") -> None:
        need = self.requirement(source)
        need(bool(self.init), "init", "give the checkpoint to train (--init DIR)")
        for key in ("steps", "prompts_per_step", "ppo_epochs", "minibatches", "micro_batch_size", "eval_every",
                    "save_every", "max_num_seqs", "eval_samples"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) > 0, key, "must be a positive integer")
        need(isinstance(self.group_size, int) and self.group_size >= 2, "group_size",
             "must be at least 2 (advantages are relative to the group)")
        need(self.temperature > 0, "temperature", "rollouts must sample (the recipe uses 1.0)")
        need(self.clip_eps > 0, "clip_eps", "must be positive")
        need(self.kl_coef >= 0, "kl_coef", "must be non-negative")
        need(self.filter_samples >= 0, "filter_samples", "must be non-negative")
        need(self.zero_pass_fraction is None or 0 <= self.zero_pass_fraction < 1, "zero_pass_fraction",
             "must be in [0, 1) or null")
        need(self.export_dtype in ("float32", "bfloat16"), "export_dtype", "must be float32 or bfloat16")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", "must be auto, fp32 or bf16")


@dataclass
class Rollout:
    example: int             # index into the pool
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]    # the engine's, one per output token
    reward: float
    text: str


class PromptSampler:
    """Prompts in a per-epoch shuffled order; (epoch, position) is all it needs to resume."""

    def __init__(self, pool: list[int], seed: int):
        self.pool, self.seed, self.epoch, self.pos = pool, seed, 0, 0
        self._order: list[int] | None = None

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self._order is None:
                self._order = shuffled(self.pool, self.seed, self.epoch)
            if self.pos >= len(self._order):
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
                continue
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos, self._order = int(s["epoch"]), int(s["pos"]), None


class RLTrainer:
    """``task`` / ``eval_task``: Task objects to use instead of building them from the config."""

    def __init__(self, cfg: RLConfig, task=None, eval_task=None):
        cfg.validate()
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world, self.device = distributed.init(cfg.device)
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        self.tok = Tokenizer(cfg.init)
        self.tok_dir = Path(cfg.init)
        self.task = task or get_task(cfg.task, **cfg.task_options)
        self.examples = self.task.examples()
        self.eval_task = eval_task or (get_task(cfg.task, **cfg.eval_task_options)
                                       if cfg.eval_task_options is not None else None)
        self.max_tokens = cfg.max_tokens or self.task.max_tokens

        resume_from = ckpt.latest_checkpoint(self.out) if cfg.resume else None
        self.model = load_model(resume_from or cfg.init, device=self.device, dtype=torch.float32)
        self.state = ckpt.load_trainer_state(resume_from) if resume_from is not None else None
        self.model.train().requires_grad_(True)
        self.balance = ExpertLoad(self.model)
        self.reference = None
        if cfg.kl_coef > 0:
            self.reference = load_model(cfg.init, device=self.device, dtype=torch.float32)
        if self.world > 1:
            distributed.shard_model(self.model, torch.bfloat16 if self.device.type == "cuda" else None)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas)
        self.autocast = autocast_for(cfg.precision, self.device)
        self.rollout = RolloutWeights(self.model, self.device)
        context = self.model.args.max_position_embeddings if hasattr(self.model, "args") else None
        lengths = [len(self.prompt_ids(i)) for i in range(len(self.examples))]
        if self.eval_task is not None:
            lengths += [len(self.tok.encode_chat(self.eval_task.messages(ex))) for ex in self.eval_task.examples()]
        longest = max(lengths) + self.max_tokens + 1
        self.engine = Engine(self.rollout.model, self.tok, max_num_seqs=cfg.max_num_seqs,
                             max_model_len=min(context, longest) if context else longest)
        self.backend = EngineBackend(self.engine, self.tok)

        self.step = 0
        self.pool: list[int] | None = None
        if self.state is not None:
            ckpt.restore_optimizer(self.model, self.optimizer, self.state)
            ckpt.set_rng_state(self.state["rng"])
            self.step = self.state["step"]
            self.pool = self.state["pool"]
        self.metrics_path = self.out / "metrics.jsonl"
        self.history: list[dict] = []

    # ---------------------------------------------------------------------------- helpers
    _prompt_cache: dict

    def prompt_ids(self, i: int) -> list[int]:
        cache = self.__dict__.setdefault("_prompt_cache", {})
        if i not in cache:
            cache[i] = self.tok.encode_chat(self.task.messages(self.examples[i]))
        return cache[i]

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def sampling(self, tag: str, k: int) -> SamplingParams:
        # Plain temperature sampling: the engine's log-probabilities are then exactly the
        # sampling distribution's, which PPO's ratio needs.
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.cfg.temperature, top_p=1.0, top_k=0,
                              repetition_penalty=1.0, seed=sample_seed(self.cfg.seed, tag, k), logprobs=0)

    def generate(self, indices: list[int], n: int, tag: str, desc: str) -> list[Rollout]:
        reqs = [GenRequest(params=self.sampling(f"{tag}/{self.examples[i].id}", k)) for i in indices for k in range(n)]
        ids = [self.prompt_ids(i) for i in indices for _ in range(n)]
        gens = self.backend.generate(reqs, progress=False, desc=desc, prompt_ids=ids)
        out = []
        for j, g in enumerate(gens):
            i = indices[j // n]
            out.append(Rollout(i, g.prompt_ids, g.token_ids, g.logprobs or [], self.task.reward(self.examples[i], g.text),
                               g.text))
        return out

    # ---------------------------------------------------------------------------- filtering
    def build_pool(self) -> list[int]:
        cfg = self.cfg
        everything = list(range(len(self.examples)))
        if cfg.filter_samples == 0:
            return everything
        mine = everything[self.rank::self.world]
        rolls = self.generate(mine, cfg.filter_samples, "filter", "filtering prompts")
        wins = torch.zeros(len(self.examples), dtype=torch.float64, device=self.device)
        for r in rolls:
            wins[r.example] += r.reward > 0
        distributed.all_reduce_sum(wins)
        wins = [int(w) for w in wins.tolist()]  # whole counts: compared exactly, unlike summed fractions
        n = cfg.filter_samples
        solved = [i for i in everything if wins[i] == n]
        never = [i for i in everything if wins[i] == 0]
        partial = [i for i in everything if 0 < wins[i] < n]
        keep_never = never
        if cfg.zero_pass_fraction is not None:
            f = cfg.zero_pass_fraction
            want = round(f / (1 - f) * len(partial)) if partial else len(never)
            keep_never = shuffled(never, cfg.seed, -2)[:want]
        pool = sorted(partial + keep_never)
        self.log({"event": "filter", "prompts": len(everything), "always_solved": len(solved),
                  "never_solved": len(never), "partly_solved": len(partial), "kept": len(pool),
                  "kept_never_solved": len(keep_never), "mean_pass_rate": sum(wins) / (n * len(wins))})
        if not pool:
            raise ValueError(f"prompt filtering left no prompts: all {len(everything)} were solved in every one of "
                             f"{cfg.filter_samples} attempts; use harder prompts or filter_samples=0")
        return pool

    # ---------------------------------------------------------------------------- update
    def batch_tensors(self, rolls: list[Rollout], advantages: list[float]):
        """Padded [B, T] inputs/targets with a mask on response targets, old log-probs and advantages."""
        seqs = [r.prompt_ids + r.output_ids for r in rolls]
        t = max(map(len, seqs)) - 1
        b = len(rolls)
        inputs = torch.zeros(b, t, dtype=torch.long)
        targets = torch.zeros(b, t, dtype=torch.long)
        mask = torch.zeros(b, t, dtype=torch.bool)
        old = torch.zeros(b, t)
        valid = torch.zeros(b, t, dtype=torch.bool)
        for row, (r, s) in enumerate(zip(rolls, seqs)):
            n = len(s) - 1
            inputs[row, :n] = torch.tensor(s[:-1])
            targets[row, :n] = torch.tensor(s[1:])
            valid[row, :n] = True
            p, o = len(r.prompt_ids), len(r.output_ids)
            mask[row, p - 1:p - 1 + o] = True      # the targets that are response tokens
            old[row, p - 1:p - 1 + o] = torch.tensor(r.logprobs)
        adv_terminal = terminal_rewards(torch.tensor(advantages), mask)
        adv = gae_advantages(adv_terminal, torch.zeros(b, t), mask, gamma=1.0, lam=1.0)
        dev = self.device
        return inputs.to(dev), targets.to(dev), mask.to(dev), old.to(dev), adv.to(dev), valid.to(dev)

    def policy_logprobs(self, model, inputs, targets):
        with self.autocast():
            logits = model(inputs)
        return token_logprobs(logits, targets)

    def update(self, rolls: list[Rollout], advantages: list[float], stats: dict) -> None:
        cfg = self.cfg
        order = list(range(len(rolls)))
        # Every rank runs the same number of minibatches (FSDP collectives must line up).
        for epoch in range(cfg.ppo_epochs):
            if epoch > 0:
                order = shuffled(order, cfg.seed * 7919 + self.step, epoch)
            for mb in range(cfg.minibatches):
                part = order[mb::cfg.minibatches]
                n_tokens = sum(len(rolls[i].output_ids) for i in part)
                denom = distributed.all_reduce_sum(torch.tensor(float(n_tokens), device=self.device)).clamp_min(1.0)
                self.optimizer.zero_grad(set_to_none=True)
                micro = [part[i:i + cfg.micro_batch_size] for i in range(0, max(len(part), 1), cfg.micro_batch_size)]
                for rows in micro:
                    sub = [rolls[i] for i in rows]
                    if sub:
                        inputs, targets, mask, old, adv, valid = self.batch_tensors(sub, [advantages[i] for i in rows])
                    else:  # this rank has nothing this time, but must join the collectives
                        inputs, targets, mask, old, adv, valid = self.empty_batch()
                    self.balance.token_mask = valid.reshape(-1)
                    self.balance.active = True
                    logp = self.policy_logprobs(self.model, inputs, targets)
                    self.balance.active = False
                    loss_sum, s = ppo_clip_loss_sum(logp, old, adv, mask, cfg.clip_eps)
                    if epoch == 0 and mb == 0:
                        # Before any update in this step the trainer's log-probabilities must be
                        # the engine's (the PPO ratio starts at 1); a gap means a mismatch.
                        gap = (logp.detach() - old).abs()[mask]
                        stats["logprob_gap_max"] = max(stats.get("logprob_gap_max", 0.0),
                                                       float(gap.max()) if gap.numel() else 0.0)
                    if self.reference is not None:
                        with torch.no_grad():
                            ref = self.policy_logprobs(self.reference, inputs, targets)
                        kl = kl_penalty_sum(logp, ref, mask)
                        loss_sum = loss_sum + cfg.kl_coef * kl
                        stats["kl_sum"] = stats.get("kl_sum", 0.0) + float(kl.detach())
                    (loss_sum / denom * self.world).backward()
                    stats["loss_sum"] = stats.get("loss_sum", 0.0) + float(loss_sum.detach())
                    stats["clipped"] = stats.get("clipped", 0.0) + s["clipped_tokens"]
                    stats["approx_kl_sum"] = stats.get("approx_kl_sum", 0.0) + s["approx_kl_sum"]
                    stats["update_tokens"] = stats.get("update_tokens", 0.0) + float(mask.sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                stats["grad_norm"] = float(grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.balance.reduce()
                self.balance.update_biases(self.model, cfg.bias_update_rate)
                self.rollout.sync()

    def empty_batch(self):
        z = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        f = torch.zeros(1, 1, dtype=torch.bool, device=self.device)
        return z, z, f, torch.zeros(1, 1, device=self.device), torch.zeros(1, 1, device=self.device), f

    # ---------------------------------------------------------------------------- steps
    def train_step(self) -> dict:
        cfg = self.cfg
        set_lr(self.optimizer, lr := lr_at(self.step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
        prompts = self.sampler.take(cfg.prompts_per_step)
        mine = prompts[self.rank::self.world]
        t0 = time.perf_counter()
        rolls = self.generate(mine, cfg.group_size, f"step{self.step}", "rollouts")
        t_roll = time.perf_counter() - t0
        rewards = torch.tensor([r.reward for r in rolls]).view(-1, cfg.group_size)
        adv = group_advantages(rewards)
        keep_groups = [g for g in range(rewards.shape[0]) if rewards[g].std() > 0] if rewards.numel() else []
        kept = [g * cfg.group_size + k for g in keep_groups for k in range(cfg.group_size)]
        stats: dict = {}
        t0 = time.perf_counter()
        self.update([rolls[i] for i in kept], [float(adv.view(-1)[i]) for i in kept], stats)
        t_train = time.perf_counter() - t0
        sums = torch.tensor([sum(r.reward for r in rolls), len(rolls), sum(len(r.output_ids) for r in rolls),
                             len(keep_groups), rewards.shape[0], stats.get("loss_sum", 0.0),
                             stats.get("update_tokens", 0.0), stats.get("clipped", 0.0),
                             stats.get("approx_kl_sum", 0.0), stats.get("kl_sum", 0.0)],
                            dtype=torch.float64, device=self.device)
        distributed.all_reduce_sum(sums)
        s = sums.tolist()
        gap = torch.tensor(stats.get("logprob_gap_max", 0.0), device=self.device)
        if distributed.is_distributed():
            torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
        self.step += 1
        tokens = max(s[6], 1.0)
        rec = {"step": self.step, "reward": s[0] / s[1], "accuracy": s[0] / s[1], "response_length": s[2] / s[1],
               "groups_with_signal": s[3] / s[4], "loss": s[5] / tokens, "clip_fraction": s[7] / tokens,
               "approx_kl": s[8] / tokens, "logprob_gap_max": float(gap), "lr": lr,
               "grad_norm": stats.get("grad_norm", 0.0), "rollout_seconds": round(t_roll, 3),
               "train_seconds": round(t_train, 3)}
        if cfg.kl_coef > 0:
            rec["kl"] = s[9] / tokens
        loads = self.balance.take_window()
        if loads.numel() and loads.sum() > 0:
            frac = loads / loads.sum(-1, keepdim=True).clamp_min(1)
            rec["expert_load"] = [[round(x, 5) for x in row] for row in frac.tolist()]
            rec["imbalance"] = [round(x, 4) for x in imbalance(loads).tolist()]
        return rec

    @torch.no_grad()
    def held_out(self) -> dict:
        if self.eval_task is None:
            return {}
        res = {}
        if self.rank == 0:
            self.model.eval()
            ecfg = EvalConfig(task=self.eval_task.name, samples=self.cfg.eval_samples, temperature=self.cfg.eval_temperature,
                              max_tokens=self.max_tokens, seed=self.cfg.seed, progress=False)
            s = evaluate(self.backend, ecfg, self.eval_task)
            self.model.train()
            res = {"eval_accuracy": s["accuracy"], "eval_ci": [s["ci_low"], s["ci_high"]], "eval_items": s["items"]}
        distributed.barrier()
        return res

    def save(self) -> None:
        state = {"sampler": self.sampler.state_dict(), "pool": self.pool, "config": _jsonable(asdict(self.cfg))}
        ckpt.save_checkpoint(self.out, self.step, self.model, self.optimizer, state, self.tok_dir,
                             self.cfg.keep_checkpoints)

    def export(self) -> Path:
        """RUN/final: the trained model alone, in ``export_dtype``, for inference."""
        return ckpt.export_final(self.model, self.optimizer, self.out / "final", self.cfg.export_dtype, self.tok_dir)

    def run(self) -> dict:
        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "rl_config.json").write_text(json.dumps(_jsonable(asdict(cfg)), indent=2) + "\n")
            _truncate_metrics(self.metrics_path, self.step)
        if self.pool is None:
            if self.rank == 0 and self.step == 0:
                self.log({"event": "start", "world_size": self.world, "task": self.task.describe(),
                          "eval_task": self.eval_task.describe() if self.eval_task else None})
            self.pool = self.build_pool()
        self.sampler = PromptSampler(self.pool, cfg.seed)
        if self.state is not None:
            self.sampler.load_state_dict(self.state["sampler"])
        if self.step == 0:
            ev = self.held_out()
            if ev:
                self.log({"step": 0, **ev})
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=not (cfg.progress and self.rank == 0), desc="rl")
        start, stopped, last_eval = self.step, False, {}
        t_start = time.monotonic()
        while self.step < cfg.steps:
            if cfg.stop_after is not None and self.step - start >= cfg.stop_after:
                stopped = True
                break
            rec = self.train_step()
            self.history.append(rec)
            out_of_time = cfg.time_limit_minutes is not None and time.monotonic() - t_start > 60 * cfg.time_limit_minutes
            if distributed.is_distributed():  # every rank must agree to stop
                flag = torch.tensor(float(out_of_time), device=self.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                out_of_time = bool(flag)
            last = self.step == cfg.steps or out_of_time
            if self.step % cfg.eval_every == 0 or last:
                last_eval = self.held_out()
                rec.update(last_eval)
            self.log(rec)
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward']:.3f}", len=f"{rec['response_length']:.1f}",
                            **({"held_out": f"{last_eval['eval_accuracy']:.3f}"} if last_eval else {}))
            if self.step % cfg.save_every == 0 or last:
                self.save()
                if cfg.plots and self.rank == 0:
                    from .rl_plots import plot_rl

                    plot_rl(self.out)
            if out_of_time:
                bar.write(f"time limit of {cfg.time_limit_minutes:g} minutes reached after step {self.step}")
                break
        bar.close()
        summary = {"step": self.step, "stopped": stopped, "rewards": [h["reward"] for h in self.history],
                   "losses": [h["loss"] for h in self.history], **last_eval}
        if not stopped:
            summary["final"] = str(self.export())
        return summary


def train_rl(cfg: RLConfig | dict) -> dict:
    if isinstance(cfg, dict):
        cfg = RLConfig.from_dict(cfg)
    return RLTrainer(cfg).run()
