"""The training loop shared by pre-training and SFT.

    megrez train pretrain --preset megrez2-tiny --data corpus.txt --out runs-out/pt --steps 2000
    megrez train sft --init runs-out/pt/final --data chat.jsonl --out runs-out/sft --epochs 2

One step: ``grad_accum`` micro-batches (the loss is normalised by the learned tokens, or turns,
of the whole global batch, so accumulation and data parallelism change nothing but speed),
gradient clipping, AdamW with warm-up + cosine, then the auxiliary-loss-free routing-bias
update from the step's expert load. Checkpoints (HF weights + trainer state) are written
atomically every ``save_every`` steps; rerunning the same command resumes from the newest one
and continues bit-identically. ``RUN/metrics.jsonl`` logs loss, learning rate, gradient norm,
tokens/s and per-expert load; ``RUN/loss.png`` and ``RUN/expert_load.png`` plot them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..loading import load_model, read_json
from ..models import build_model
from ..presets import preset_config
from ..tokenizer import Tokenizer
from . import checkpoint as ckpt
from . import distributed
from .attention import packed_context
from .balance import ExpertLoad, imbalance
from .data import (
    PAD_DOC,
    Batch,
    DataError,
    Loader,
    PretrainSource,
    SFTSource,
    read_conversations,
    read_documents,
    render_conversation,
    split_validation,
    tokenize_documents,
)
from .loss import LOSS_MODES, loss_count, loss_sum, per_token_sum, token_losses, turn_sum
from .optim import build_optimizer, lr_at, set_lr


class Options:
    """A dataclass of options built from a dict that must name only its fields, then validated."""
    kind = "training"

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown {cls.kind} option(s) {', '.join(map(repr, unknown))}")
        cfg = cls(**d)
        cfg.validate(source)
        return cfg

    def requirement(self, source: str):
        """need(cond, key, what): raise naming the option and its value unless ``cond``."""
        def need(cond, key, what):
            if not cond:
                raise ValueError(f"{source}: {key}={getattr(self, key)!r}: {what}")
        return need

    def validate(self, source: str = "config") -> None:
        pass


@dataclass
class TrainConfig(Options):
    stage: str = "pretrain"                  # pretrain | sft
    data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = 0.01               # held out of ``data`` when ``val_data`` is empty
    out: str = "runs-out/train"
    # model: start from a checkpoint, or from scratch with a preset
    init: str | None = None
    preset: str | None = None
    model_overrides: dict = field(default_factory=dict)
    init_std: float = 0.02
    tokenizer: str | None = None             # directory with tokenizer.json (default: init's)
    tokenizer_vocab: int = 8192              # from scratch without a tokenizer: train one on the data
    text_field: str = "text"
    # batch and schedule
    seq_len: int = 512
    batch_size: int = 8                      # rows per micro-batch per process
    grad_accum: int = 1
    steps: int | None = None
    epochs: float | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None          # None: a tenth of the run, at most 100 steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    loss: str = "per_token"                  # per_token | turn
    # MoE
    bias_update_rate: float = 1e-2
    aux_loss_weight: float = 0.0
    # execution
    device: str = "auto"
    precision: str = "auto"                  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    attention: str = "auto"                  # auto (flex on CUDA, dense mask on CPU) | dense | flex
    activation_checkpointing: bool = False
    seed: int = 0
    # bookkeeping
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    keep_checkpoints: int = 2
    export_dtype: str = "bfloat16"           # dtype of RUN/final
    resume: bool = True
    stop_after: int | None = None            # leave after this many steps of this invocation, unsaved
    progress: bool = True
    plots: bool = True

    def validate(self, source: str = "config") -> None:
        need = self.requirement(source)
        need(self.stage in ("pretrain", "sft"), "stage", "must be 'pretrain' or 'sft'")
        need(bool(self.data), "data", "give at least one data file")
        need(bool(self.init) != bool(self.preset), "init", "give exactly one of init (a checkpoint) or preset")
        need(self.loss in LOSS_MODES, "loss", f"must be one of {', '.join(LOSS_MODES)}")
        need(self.loss == "per_token" or self.stage == "sft", "loss", "turn-level loss needs SFT data")
        need((self.steps is None) != (self.epochs is None), "steps", "give exactly one of steps or epochs")
        for key in ("seq_len", "batch_size", "grad_accum", "log_every", "eval_every", "save_every"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) > 0, key, "must be a positive integer")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", "must be auto, fp32 or bf16")
        need(self.export_dtype in ("float32", "bfloat16"), "export_dtype", "must be float32 or bfloat16")


# ----------------------------------------------------------------------------------- setup

def prepare_tokenizer(cfg: TrainConfig, out: Path, rank: int) -> tuple[Tokenizer, Path]:
    if cfg.tokenizer or cfg.init:
        path = Path(cfg.tokenizer or cfg.init)
        return Tokenizer(path), path
    path = out / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        if rank == 0:
            from ..tiny import tokenizer_files, train_tokenizer

            texts = read_documents(cfg.data, cfg.text_field) if cfg.stage == "pretrain" else \
                [m.get("content", "") for _, conv in read_conversations(cfg.data) for m in conv]
            tok = train_tokenizer(texts, cfg.tokenizer_vocab)
            path.mkdir(parents=True, exist_ok=True)
            for name, content in tokenizer_files(tok, cfg.seq_len).items():
                (path / name).write_text(content, encoding="utf-8")
        distributed.barrier()
    return Tokenizer(path), path


def build_sources(cfg: TrainConfig, tok: Tokenizer, pad_id: int):
    if cfg.stage == "pretrain":
        docs = read_documents(cfg.data, cfg.text_field)
        val = read_documents(cfg.val_data, cfg.text_field) if cfg.val_data else None
        if val is None:
            docs, val = split_validation(docs, cfg.val_fraction, cfg.seed)
        train_src = PretrainSource(tokenize_documents(tok, docs), cfg.seq_len, cfg.seed)
        val_tokens = tokenize_documents(tok, val) if val else None
        if val_tokens is not None and sum(map(len, val_tokens)) < cfg.seq_len + 1:
            # Found now, not after the training steps when the first evaluation packs it.
            what = (f"--val-data {' '.join(cfg.val_data)}" if cfg.val_data else
                    f"the validation split (--val-fraction {cfg.val_fraction} of the documents)")
            raise DataError(f"{what} has only {sum(map(len, val_tokens))} tokens, fewer than one row of "
                            f"--seq-len {cfg.seq_len} + 1: give more validation data, a larger --val-fraction or "
                            f"a smaller --seq-len")
        val_src = PretrainSource(val_tokens, cfg.seq_len, cfg.seed, shuffle=False) if val else None
        return train_src, val_src

    def examples(paths):
        return [render_conversation(tok, msgs, where) for where, msgs in read_conversations(paths)]

    ex = examples(cfg.data)
    val = examples(cfg.val_data) if cfg.val_data else None
    if val is None:
        ex, val = split_validation(ex, cfg.val_fraction, cfg.seed)
    train_src = SFTSource(ex, cfg.seq_len, pad_id, cfg.seed)
    val_src = SFTSource(val, cfg.seq_len, pad_id, cfg.seed, shuffle=False) if val else None
    return train_src, val_src


def new_model(cfg: TrainConfig, tok: Tokenizer, device: torch.device):
    turn_end, eos = tok.token_to_id("<|turn_end|>"), tok.token_to_id("<|eos|>")
    config = preset_config(cfg.preset, tok.vocab_size, cfg.model_overrides,
                           eos_token_id=turn_end if turn_end is not None else eos, pad_token_id=eos)
    model = build_model(config, source=f"preset {cfg.preset!r}")
    model.init_weights(std=cfg.init_std, generator=torch.Generator().manual_seed(cfg.seed))
    model.hf_config = config
    return model.to(device)


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's attention block and MLP in the backward pass instead of keeping
    their activations. Routing stays outside the recomputed regions, so hooks fire once."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        layer.attention_block = functools.partial(checkpoint, layer.attention_block, use_reentrant=False)
        layer.mlp.forward = functools.partial(checkpoint, layer.mlp.forward, use_reentrant=False)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast (auto: on CUDA only; CPU bf16 matmuls are slow), or nothing."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


# ------------------------------------------------------------------------------------ loop

class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.rank, self.world, self.device = distributed.init(cfg.device)
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        self.tok, self.tok_dir = prepare_tokenizer(cfg, self.out, self.rank)
        pad_id = self.tok.token_to_id("<|eos|>")
        if pad_id is None:
            pad_id = 0
        self.train_src, self.val_src = build_sources(cfg, self.tok, pad_id)
        self.loader = Loader(self.train_src, cfg.batch_size, self.rank, self.world)

        resume_from = ckpt.latest_checkpoint(self.out) if cfg.resume else None
        if resume_from is not None:
            self.model = load_model(resume_from, device=self.device, dtype=torch.float32)
            self.state = ckpt.load_trainer_state(resume_from)
        elif cfg.init:
            self.model = load_model(cfg.init, device=self.device, dtype=torch.float32)
            self.state = None
        else:
            self.model = new_model(cfg, self.tok, self.device)
            self.state = None
        if self.tok.vocab_size > self.model.args.vocab_size:
            raise DataError(f"tokenizer has {self.tok.vocab_size} tokens but the model's vocab_size is "
                            f"{self.model.args.vocab_size}")
        self.model.train().requires_grad_(True)
        self.balance = ExpertLoad(self.model, cfg.aux_loss_weight)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        if self.world > 1:
            distributed.shard_model(self.model, torch.bfloat16 if self.device.type == "cuda" else None)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas)
        self.autocast = autocast_for(cfg.precision, self.device)

        self.step, self.tokens_seen = 0, 0
        if self.state is not None:
            ckpt.restore_optimizer(self.model, self.optimizer, self.state)
            self.loader.load_state_dict(self.state["loader"])
            ckpt.set_rng_state(self.state["rng"])
            self.step, self.tokens_seen = self.state["step"], self.state["tokens_seen"]
            saved_threads = self.state.get("threads")
            if saved_threads is not None and saved_threads != torch.get_num_threads() and self.device.type == "cpu":
                # CPU matrix products split their sums by thread: another count rounds differently.
                self.say(f"warning: {resume_from} was written with {saved_threads} CPU threads, this run has "
                         f"{torch.get_num_threads()}: training continues, but not bit-identically "
                         f"(run with OMP_NUM_THREADS={saved_threads} for that)")
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world
        if cfg.steps is not None:
            self.total_steps = cfg.steps
        else:
            self.total_steps = max(1, math.floor(cfg.epochs * self.loader.steps_per_epoch / cfg.grad_accum))
        self.warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(self.total_steps)
        self.metrics_path = self.out / "metrics.jsonl"
        self.losses: list[float] = []
        self.last_eval: dict = {}

    # ------------------------------------------------------------------------------ helpers
    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def forward_loss(self, batch, mode: str):
        with self.autocast():
            logits = self.model(batch.inputs, cache=packed_context(batch.doc_ids, self.cfg.attention))
        return loss_sum(logits, batch, mode)

    def train_step(self) -> dict:
        cfg = self.cfg
        set_lr(self.optimizer, lr := lr_at(self.step, cfg.lr, self.total_steps, self.warmup_steps, cfg.min_lr_ratio))
        micro = [self.loader.next_batch() for _ in range(cfg.grad_accum)]
        count = distributed.all_reduce_sum(torch.tensor(float(sum(loss_count(b, cfg.loss) for b in micro)),
                                                        device=self.device))
        denom = count.clamp_min(1.0)
        total = torch.zeros((), device=self.device)
        for batch in micro:
            batch = batch.to(self.device)
            self.balance.token_mask = (batch.doc_ids != PAD_DOC).reshape(-1)
            self.balance.batch_shape = tuple(batch.inputs.shape)
            self.balance.active = True
            s, _ = self.forward_loss(batch, cfg.loss)
            self.balance.active = False
            # FSDP averages gradients over ranks: scale by the world size to get global sum / count.
            loss = s / denom * self.world
            aux = self.balance.take_aux_loss()
            if aux is not None:
                loss = loss + aux / cfg.grad_accum
            loss.backward()
            total += s.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.balance.reduce()
        self.balance.update_biases(self.model, cfg.bias_update_rate)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        loss_value = float(distributed.all_reduce_sum(total) / denom)
        return {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean per-token loss (and turn-level loss for SFT) over the first ``eval_batches``
        global batches of the held-out rows."""
        if self.val_src is None:
            return {}
        self.model.eval()
        rows = self.val_src.epoch_rows(0)
        g = self.cfg.batch_size * self.world
        n_rows = min(len(rows), self.cfg.eval_batches * g)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # token sum, tokens, turn sum, turns
        for start in range(0, n_rows, g):
            lo = start + self.rank * self.cfg.batch_size
            hi = min(lo + self.cfg.batch_size, n_rows)
            if lo >= hi:
                continue
            batch = Batch.from_rows(rows, slice(lo, hi)).to(self.device)
            with self.autocast():
                logits = self.model(batch.inputs, cache=packed_context(batch.doc_ids, self.cfg.attention))
            losses = token_losses(logits, batch.targets)
            for k, (s, c) in enumerate((per_token_sum(losses, batch.loss_mask), turn_sum(losses, batch.turn_ids))):
                sums[2 * k] += s.double()
                sums[2 * k + 1] += c
        distributed.all_reduce_sum(sums)
        self.model.train()
        out = {"val_loss": float(sums[0] / sums[1].clamp_min(1))}
        if self.cfg.stage == "sft":
            out["val_turn_loss"] = float(sums[2] / sums[3].clamp_min(1))
        return out

    def save(self) -> Path:
        state = {"loader": self.loader.state_dict(), "tokens_seen": self.tokens_seen,
                 "config": _jsonable(asdict(self.cfg)), "threads": torch.get_num_threads()}
        return ckpt.save_checkpoint(self.out, self.step, self.model, self.optimizer, state, self.tok_dir,
                             self.cfg.keep_checkpoints)

    def export(self) -> Path:
        """RUN/final: the trained model alone, in ``export_dtype``, for inference."""
        return ckpt.export_final(self.model, self.optimizer, self.out / "final", self.cfg.export_dtype, self.tok_dir)

    # ------------------------------------------------------------------------------ run
    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"megrez train: {text}", file=sys.stderr, flush=True)

    def run(self) -> dict:
        if self.state is not None and self.step >= self.total_steps:
            final = self.out / "final"
            self.say(f"{self.out} is already trained: {self.step}/{self.total_steps} steps done"
                     f"{'' if (final / 'config.json').is_file() else '; writing ' + str(final)}. Nothing to do: "
                     f"give more --steps (or --epochs) to train further, or a new --out to start over")
            if not (final / "config.json").is_file():
                self.export()
            return {"step": self.step, "losses": [], "stopped": False, "already_done": True, "final": str(final)}
        with self.interruptible() as interrupted:
            return self._run(interrupted)

    @contextlib.contextmanager
    def interruptible(self):
        """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and save; a
        second Ctrl-C stops at once (checkpoints are written atomically, so none is left half-done)."""
        flag = threading.Event()
        if threading.current_thread() is not threading.main_thread():
            yield flag
            return

        def on_signal(signum, frame):
            if flag.is_set():
                raise KeyboardInterrupt
            flag.set()
            self.say("stopping after this step to save a checkpoint (Ctrl-C again to quit without saving)")

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield flag
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _interrupted(self, flag: threading.Event) -> bool:
        if self.world == 1:
            return flag.is_set()
        # Every rank must take the same decision, or the others would wait on a collective forever.
        return bool(distributed.all_reduce_sum(torch.tensor(float(flag.is_set()), device=self.device)) > 0)

    def _run(self, interrupted: threading.Event) -> dict:
        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(_jsonable(asdict(cfg)), indent=2) + "\n")
            _truncate_metrics(self.metrics_path, self.step)
            if self.step == 0:
                counts = self.model.parameter_counts()
                self.log({"event": "start", "stored_params": counts["stored"], "active_params": counts["active"],
                          "train_tokens": self.train_src.num_tokens, "tokens_per_step": self.tokens_per_step,
                          "total_steps": self.total_steps, "world_size": self.world})
            truncated = getattr(self.train_src, "truncated", 0)
            if truncated:
                print(f"warning: {truncated} SFT example(s) longer than seq_len+1={cfg.seq_len + 1} were truncated")
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=not (cfg.progress and self.rank == 0), desc=cfg.stage)
        start_step, window, t_window = self.step, [], 0.0
        stopped = False
        while self.step < self.total_steps:
            if self._interrupted(interrupted):
                bar.close()
                where = self.save()
                self.say(f"interrupted at step {self.step}/{self.total_steps}: saved {where}; "
                         f"run the same command again to resume from it")
                return {"step": self.step, "losses": self.losses, "stopped": True, "interrupted": True,
                        **self.last_eval}
            if cfg.stop_after is not None and self.step - start_step >= cfg.stop_after:
                stopped = True  # as if the process had been killed here
                break
            t0 = time.perf_counter()
            rec = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            t_window += dt
            window.append(rec["loss"])
            self.losses.append(rec["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{self.tokens_per_step / dt:,.0f}", lr=f"{rec['lr']:.2e}")
            last = self.step == self.total_steps
            if self.step % cfg.log_every == 0 or last:
                loads = self.balance.take_window()
                entry = {"step": self.step, "loss": sum(window) / len(window), "lr": rec["lr"],
                         "grad_norm": rec["grad_norm"], "tokens": self.tokens_seen,
                         "tok_per_s": len(window) * self.tokens_per_step / max(t_window, 1e-9)}
                if loads.numel():
                    frac = loads / loads.sum(-1, keepdim=True).clamp_min(1)
                    entry["expert_load"] = [[round(x, 5) for x in row] for row in frac.tolist()]
                    entry["imbalance"] = [round(x, 4) for x in imbalance(loads).tolist()]
                self.log(entry)
                window, t_window = [], 0.0
            if self.step % cfg.eval_every == 0 or last:
                ev = self.last_eval = self.evaluate()
                if ev:
                    self.log({"step": self.step, "tokens": self.tokens_seen, **ev})
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            if self.step % cfg.save_every == 0 or last:
                self.save()
                if cfg.plots and self.rank == 0:
                    from .plots import plot_run

                    plot_run(self.out)
        bar.close()
        summary = {"step": self.step, "losses": self.losses, "stopped": stopped, **self.last_eval}
        if not stopped:
            summary["final"] = str(self.export())
        return summary


def default_warmup(total_steps: int) -> int:
    """Warm-up when none is given: a tenth of the run, at least 1 and at most 100 steps, so a
    short run reaches its learning rate and a long one warms up as usual."""
    return max(1, min(100, round(total_steps / 10)))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records of steps after the checkpoint: they will be done again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


def train(cfg: TrainConfig | dict) -> dict:
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    return Trainer(cfg).run()


def load_config_file(path: str) -> dict:
    return read_json(Path(path))
