"""Sampling parameters and the batched sampler.

Every request carries its own ``torch.Generator``: the random numbers a request consumes
depend only on its seed and its own step count, never on what else is in the batch.

Rows are sampled one by one in float64, so that any value the parameters allow gives a
well-defined distribution: temperature divides logits after their maximum is subtracted (a
temperature of 1e-40 is the exact greedy limit, not an overflow), top-p always keeps the most
likely token, and a repetition penalty so small that penalised logits overflow resolves to
its limit (the largest of the overflowing logits wins).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace

import torch

MAX_LOGPROBS = 20       # the server's default bound on logprobs / top_logprobs
MAX_LOGIT_BIAS = 100.0  # |bias| bound, as in the OpenAI API


@dataclass
class SamplingParams:
    """How to generate. ``None`` means "the checkpoint's generation_config.json, else the
    built-in default"; ``temperature=0`` means greedy; without ``max_tokens`` (here or in
    generation_config.json) generation runs until a stop token or string, or a full context."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the top-k
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob and the top-k
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    skip_special_tokens: bool = True  # False: special tokens (e.g. <|function_start|>) stay in the text

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    def validate(self) -> "SamplingParams":
        def bad(name, value, want):
            raise ValueError(f"{name}: {want} (got {value!r})")

        def number(name, v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if self.max_tokens is not None and not count(self.max_tokens):
            bad("max_tokens", self.max_tokens, "must be a non-negative integer (0: prompt logprobs only)")
        if self.temperature is not None and (not number("temperature", self.temperature) or not 0 <= self.temperature <= 100):
            bad("temperature", self.temperature, "must be a number in [0, 100]")
        if self.top_p is not None and (not number("top_p", self.top_p) or not 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "must be a number in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1):
            bad("top_k", self.top_k, "must be an integer >= -1 (0 or -1 disable it)")
        if self.repetition_penalty is not None and (not number("repetition_penalty", self.repetition_penalty)
                                                    or not 0 < self.repetition_penalty <= 10):
            bad("repetition_penalty", self.repetition_penalty, "must be a number in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not number(name, v) or not -2 <= v <= 2:
                bad(name, v, "must be a number in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2 ** 63) <= self.seed < 2 ** 64):
            bad("seed", self.seed, "must be an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "must be a non-empty string or a list of non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "must be a list of non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not count(v):
                bad(name, v, "must be a non-negative integer")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", self.logit_bias, "must be a dict of token id -> bias")
            for t, b in self.logit_bias.items():
                if not count(t):
                    bad("logit_bias", t, "keys must be non-negative token ids")
                if not number("logit_bias", b) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
                    bad("logit_bias", b, f"values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        return self

    def with_defaults(self, generation_config: dict | None) -> "SamplingParams":
        """Fill unset fields from generation_config.json (as vLLM does), then built-in defaults."""
        g = generation_config or {}
        greedy_default = g.get("do_sample") is False
        filled = replace(self)
        if filled.temperature is None:
            filled.temperature = 0.0 if greedy_default else float(g.get("temperature", 1.0))
        if filled.top_p is None:
            filled.top_p = float(g.get("top_p", 1.0))
        if filled.top_k is None:
            filled.top_k = int(g.get("top_k", 0) or 0)
        if filled.repetition_penalty is None:
            filled.repetition_penalty = float(g.get("repetition_penalty", 1.0))
        if filled.max_tokens is None and g.get("max_new_tokens"):
            filled.max_tokens = int(g["max_new_tokens"])  # else: until a stop or the context is full
        if filled.seed is None:
            filled.seed = int.from_bytes(os.urandom(8), "little") >> 1
        return filled.validate()

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class LogitsProcessor:
    """A per-request hook on the logits each step samples from: a logit bias, a grammar's
    token mask. ``__call__`` edits the request's row of logits in place (float64, after any
    ``logit_bias``), before penalties
    and temperature (logprobs stay those of the model); ``accept`` is told each token the
    request sampled, so a stateful processor can advance and start preparing its next mask
    while the next forward pass runs; ``close`` is called once when the request ends."""

    def __call__(self, logits: torch.Tensor) -> None:
        raise NotImplementedError

    def accept(self, token: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed % (2 ** 64))
    return g


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, output: torch.Tensor,
                    repetition: float, presence: float, frequency: float) -> torch.Tensor:
    """One row. ``history``: prompt + output ids (repetition penalty, as in transformers);
    ``output``: generated ids only (OpenAI presence/frequency penalties)."""
    if repetition != 1.0 and history.numel():
        seen = history.unique()
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / repetition, picked * repetition)
    if (presence or frequency) and output.numel():
        counts = torch.bincount(output, minlength=logits.shape[0])[: logits.shape[0]].to(logits.dtype)
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits


def resolve_overflow(row: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Logits pushed to +inf (a repetition penalty near 0 divides positive logits) stand for
    values so far above the rest that only the largest of them keeps any probability: the
    limit puts all mass on the overflowing tokens with the largest logit ``before`` the push."""
    up = row == float("inf")
    if not up.any():
        return row
    best = before[up].max()
    keep = up & (before == best)
    return torch.where(keep, torch.zeros_like(row), torch.full_like(row, float("-inf")))


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row of temperature-scaled logits -> the same with excluded tokens at -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p, and always the most likely token
        # (a top_p that rounds to 0 would otherwise drop every token).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass
class SampleResult:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def sample_row(logits: torch.Tensor, r, logprobs: torch.Tensor | None = None) -> SampleResult:
    """One request's next token. ``logits`` [V] (the model's, any float dtype); ``r`` has
    ``params`` (filled), ``generator``, ``history_ids``, ``output_ids`` and (optionally)
    ``logits_processors``; ``logprobs`` [V] is the row's log-softmax when the request asked for
    logprobs."""
    p = r.params
    processors = getattr(r, "logits_processors", ())
    if (p.temperature == 0 and not p.logit_bias and not processors and p.repetition_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty and p.logprobs is None):
        # Plain greedy: the argmax of the logits as they are (the float64 copy below would pick
        # the same, first, maximum; it costs more than the choice in a small model's step).
        return SampleResult(int(logits.argmax()))
    row = logits.double()  # a copy: the batch's logits stay untouched
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
        row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
    for processor in processors:
        processor(row)
    if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        before = row.clone()
        device = row.device
        history = torch.tensor(r.history_ids, dtype=torch.long, device=device)
        output = torch.tensor(r.output_ids, dtype=torch.long, device=device)
        row = apply_penalties(row, history, output, p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        row = resolve_overflow(row, before)
    if p.temperature == 0:
        token = int(row.argmax())
    else:
        row = filter_top_k_top_p(row, p.top_k, 1.0)
        # Subtract the maximum first: (l - max) / t is at most 0 for any t > 0, never inf - inf.
        row = (row - row.max()) / p.temperature
        row = filter_top_k_top_p(row, 0, p.top_p)
        token = int(torch.multinomial(row.softmax(-1), 1, generator=r.generator))
    result = SampleResult(token)
    if p.logprobs is not None:
        result.logprob = float(logprobs[token])
        if p.logprobs > 0:
            vals, ids = logprobs.topk(min(p.logprobs, logprobs.shape[-1]))
            result.top_logprobs = list(zip(ids.tolist(), vals.tolist()))
    return result


def sample_rows(logits: torch.Tensor, rows: list) -> list[SampleResult]:
    """logits [B, V], one row per request (see :func:`sample_row`)."""
    logits = logits.float()
    raw = logits.log_softmax(-1) if any(r.params.logprobs is not None for r in rows) else None
    return [sample_row(logits[b], r, None if raw is None else raw[b]) for b, r in enumerate(rows)]


def token_logprobs(logprobs: torch.Tensor, targets: list[int], k: int) -> list[SampleResult]:
    """Log-probabilities of given tokens: ``logprobs`` [N, V] (log-softmax rows), ``targets[i]``
    the token that followed row i; with the top k of each row when k > 0."""
    target = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, target[:, None])[:, 0].tolist()
    tops = None
    if k > 0:
        vals, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return [SampleResult(t, lp, tops[i] if tops else None) for i, (t, lp) in enumerate(zip(targets, chosen))]
