"""The generation engine: continuous batching over a slot-based KV cache.

Every :meth:`Engine.step` admits waiting requests into free cache slots and prefills them
(in chunks), runs one decode step for every running request, samples, applies stop
conditions and retires finished requests, freeing their slots at once. The Python
``LLM`` API and the HTTP server both drive this one engine.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..models.cache import KVCache
from ..tokenizer import Tokenizer
from .sampling import LogitsProcessor, SampleResult, SamplingParams, make_generator, sample_rows


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; try again later."""


@dataclass
class RequestOutput:
    """What one step produced for one request (deltas), plus running totals."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    new_logprobs: list[SampleResult] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    detokenizer: object
    output_ids: list[int] = field(default_factory=list)
    text: str = ""          # full output text, stop strings cut off
    sent: int = 0           # characters of ``text`` already returned
    slot: int | None = None
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    @property
    def history_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        """Tokens whose keys/values are in the cache (the last sampled token is not, yet)."""
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)


class Engine:
    def __init__(self, model, tokenizer: Tokenizer | None, max_num_seqs: int = 16, max_model_len: int | None = None,
                 kv_cache_memory: int | None = None, max_waiting: int = 1024, prefill_chunk: int = 1024):
        # Without a tokenizer the engine works on token ids only (benchmarks, tests): no text,
        # no eos, no generation_config defaults.
        self.model, self.tokenizer = model, tokenizer
        self.stop_token_ids = tokenizer.stop_token_ids if tokenizer else frozenset()
        self.generation_config = tokenizer.generation_config if tokenizer else {}
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        layers, n_kv, head_dim = model.kv_layout()
        per_token = KVCache.bytes_per_token(layers, n_kv, head_dim, self.dtype)
        context = model.args.max_position_embeddings
        if max_model_len and max_model_len > context:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's context "
                             f"(max_position_embeddings={context})")
        budget = kv_cache_memory if kv_cache_memory is not None else default_kv_budget(self.device)
        fit = budget // per_token
        # Unless asked for a length: the model's context, shortened (not below 8K) when the
        # budget cannot hold max_num_seqs sequences that long.
        self.max_model_len = max_model_len or min(context, fit, max(fit // max_num_seqs, 8192))
        slots = min(max_num_seqs, fit // max(self.max_model_len, 1))
        if slots < 1 or self.max_model_len < 2:
            raise ValueError(f"KV cache budget of {budget / 2**20:.0f} MiB holds {fit} tokens, less than one "
                             f"sequence of max_model_len={self.max_model_len}; lower max_model_len or raise "
                             f"the KV cache memory")
        self.cache = KVCache(layers, slots, self.max_model_len, n_kv, head_dim, self.dtype, self.device)
        self.max_num_seqs, self.max_waiting, self.prefill_chunk = slots, max_waiting, prefill_chunk
        self.free_slots = list(range(slots))[::-1]
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.offload = None  # an ExpertOffload when routed experts live in host memory
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "steps": 0}

    # ------------------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None,
                    logits_processors: list[LogitsProcessor] | None = None) -> Request:
        """Queue a prompt. ``logits_processors`` belong to this request alone (each call needs
        its own: they may keep state); the engine closes them when the request ends."""
        params = (params or SamplingParams()).with_defaults(self.generation_config)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens but the context holds {self.max_model_len} "
                             f"(max_model_len), leaving no room to generate: {n - self.max_model_len + 1} "
                             f"tokens too many")
        vocab = self.model.args.vocab_size
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[0]!r}")
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"waiting queue is full ({self.max_waiting} requests)")
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self.requests:
                raise ValueError(f"request id {rid!r} is already in use")
            detok = self.tokenizer.detokenizer(params.skip_special_tokens) if self.tokenizer else _NoText()
            req = Request(rid, list(prompt_ids), params, make_generator(params.seed, self.device), detok,
                          logits_processors=list(logits_processors or []))
            self.requests[rid] = req
            self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Cancel a request; its cache slot is freed at the start of the next step."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    @property
    def cache_usage(self) -> float:
        """Fraction of KV cache slots in use."""
        return len(self.running) / self.max_num_seqs

    # ------------------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs = self._apply_aborts()
        admitted = []
        with self._lock:
            while self.waiting and self.free_slots:
                req = self.waiting.popleft()
                req.slot = self.free_slots.pop()
                admitted.append(req)
        decoding = list(self.running)
        if admitted:
            # Running first: a request that finishes on its first token (max_tokens=1, a stop
            # token or string) retires from there and never joins the decode batch.
            self.running += admitted
            outputs += self._finish_step(admitted, self._prefill(admitted))
        if decoding:
            outputs += self._finish_step(decoding, self._decode(decoding))
        if self.offload is not None:
            self.offload.cache.collect_timings()  # the step's copies are done: sampling synchronised
        self.stats["steps"] += 1
        return outputs

    def _apply_aborts(self) -> list[RequestOutput]:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            outs = []
            for rid in aborted:
                req = self.requests.get(rid)
                if req is None or req.finish_reason is not None:
                    continue
                if req in self.waiting:
                    self.waiting.remove(req)
                req.finish_reason = "abort"
                outs.append(self._output(req, [], "", []))
                self._retire(req)
            return outs

    def _prefill(self, reqs: list[Request]) -> torch.Tensor:
        """Prompts right-padded into one batch and run in chunks; returns each row's logits at
        its last prompt token. Padding writes only cache positions past the row's prompt,
        which its own later tokens overwrite before anything attends to them."""
        lengths = [len(r.prompt_ids) for r in reqs]
        longest = max(lengths)
        tokens = torch.zeros(len(reqs), longest, dtype=torch.long)
        for b, r in enumerate(reqs):
            tokens[b, : lengths[b]] = torch.tensor(r.prompt_ids)
        tokens = tokens.to(self.device)
        slots = [r.slot for r in reqs]
        last = torch.tensor(lengths, device=self.device) - 1
        logits = torch.empty(len(reqs), self.model.args.vocab_size, device=self.device)
        for start in range(0, longest, self.prefill_chunk):
            chunk = tokens[:, start:start + self.prefill_chunk]
            view = self.cache.view([start] * len(reqs), chunk.shape[1], slots)
            at = (last - start).clamp(0, chunk.shape[1] - 1)
            chunk_logits = self.model(chunk, view, logits_at=at).float()
            ends_here = (last >= start) & (last < start + chunk.shape[1])
            logits[ends_here] = chunk_logits[ends_here]
        self.stats["prompt_tokens"] += sum(lengths)
        return logits

    def _decode(self, reqs: list[Request]) -> torch.Tensor:
        tokens = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)
        view = self.cache.view([r.length for r in reqs], 1, [r.slot for r in reqs])
        return self.model(tokens, view, logits_at=torch.zeros(len(reqs), dtype=torch.long,
                                                              device=self.device)).float()

    def _finish_step(self, reqs: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        samples = sample_rows(logits, reqs)
        outs = []
        now = time.monotonic()
        for req, s in zip(reqs, samples):
            if req.first_token_time is None:
                req.first_token_time = now
            req.output_ids.append(s.token)
            self.stats["generation_tokens"] += 1
            for processor in req.logits_processors:
                processor.accept(s.token)
            outs.append(self._append_token(req, s))
        return outs

    def _append_token(self, req: Request, sample: SampleResult) -> RequestOutput:
        p, token = req.params, sample.token
        is_stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.stop_token_ids)
        new_ids = [token]
        if is_stop_token:
            req.finish_reason = "stop"
            delta = req.detokenizer.flush()  # the stop token's own text is not part of the output
        else:
            delta = req.detokenizer.add(token)
        req.text += delta
        if req.finish_reason is None and p.stop:
            # Only the tail can contain a new match: search from where a stop string could start.
            window = max(len(s) for s in p.stop) + len(delta)
            from_ = max(0, len(req.text) - window)
            hits = [i for i in (req.text.find(s, from_) for s in p.stop) if i >= 0]
            if hits:
                req.text = req.text[: min(hits)]
                req.finish_reason = "stop"
        if req.finish_reason is None:
            if (p.max_tokens is not None and len(req.output_ids) >= p.max_tokens) \
                    or req.length + 1 >= self.max_model_len:
                req.finish_reason = "length"
                req.text += req.detokenizer.flush()
        # With stop strings, hold back a tail that could still grow into one.
        hold = 0
        if req.finish_reason is None and p.stop:
            hold = max(len(s) for s in p.stop) - 1
        upto = max(req.sent, len(req.text) - hold)
        text_delta = req.text[req.sent:upto]
        req.sent = upto
        out = self._output(req, new_ids, text_delta, [sample] if p.logprobs is not None else [])
        if req.finish_reason is not None:
            self._retire(req)
        return out

    def _output(self, req: Request, ids, text, logprobs) -> RequestOutput:
        return RequestOutput(req.request_id, ids, text, req.finish_reason is not None, req.finish_reason,
                             len(req.prompt_ids), len(req.output_ids), logprobs)

    def _retire(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None
        self.requests.pop(req.request_id, None)
        for processor in req.logits_processors:
            processor.close()
        self.stats["requests_finished"] += 1

    # ------------------------------------------------------------------------------ offline
    def run_to_completion(self, reqs: list[Request]) -> None:
        pending = {r.request_id for r in reqs}
        while pending:
            for out in self.step():
                if out.finished:
                    pending.discard(out.request_id)


class _NoText:
    def add(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 4 << 30
