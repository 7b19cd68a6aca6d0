"""The generation engine: continuous batching over a paged KV cache with prefix caching.

Every :meth:`Engine.step` first makes room for the running requests' next tokens (taking a
block from the pool, or preempting the newest request when none is left), then admits
waiting requests whose prompts fit: a prompt's leading full blocks already in the cache
(an earlier turn of the conversation, a shared system prompt, another choice of the same
request) are reused and only the rest is prefilled, in chunks. Then one decode step runs for
every running request, each samples, stop conditions apply and finished requests retire,
their blocks returned at once. The Python ``LLM`` API and the HTTP server both drive this
one engine.

A failure in one request's sampling, stop handling or detokenisation ends that request
alone (``finish_reason="error"``); the rest of the batch goes on.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..models.cache import KVCache
from ..tokenizer import Tokenizer
from .blocks import BlockPool
from .sampling import LogitsProcessor, SampleResult, SamplingParams, make_generator, sample_row, token_logprobs

log = logging.getLogger("megrez.engine")

DEFAULT_BLOCK_SIZE = 16
WEIGHT_SCAN_STEPS = 64  # how often the weights' tensor list is collected again (see _weights_fingerprint)
# Prompt logprobs need the logits of every prompt position: bound those of one forward pass.
PROMPT_LOGITS_BYTES = 256 << 20


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
    # With params.prompt_logprobs, in the request's first output: one entry per prompt token
    # (None for the first, which nothing predicts).
    prompt_logprobs: list[SampleResult | None] | None = None
    cached_tokens: int = 0          # prompt tokens whose keys/values came from the prefix cache
    error: str | None = None        # why, when finish_reason == "error"


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
    finish_reason: str | None = None
    error: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    cache_salt: object = None  # set when keys/values depend on more than the token ids
    # KV cache state: the sequence's blocks, how many of its tokens have keys/values there,
    # how many leading blocks are published to the prefix cache and the key to chain on.
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_registered: int = 0
    parent: object = None
    cached_tokens: int = 0
    prompt_logprobs: list | None = None
    _prompt_logprobs_sent: bool = False
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # (position, [n, hidden] vectors): rows of the prompt's token embeddings to overwrite
    # (image and audio features of multimodal prompts); shared, never modified.
    embeddings: list | None = None

    @property
    def history_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def length(self) -> int:
        """Tokens whose keys/values are in the cache once the last sampled token is fed."""
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self._prompt_logprobs_sent


class Engine:
    def __init__(self, model, tokenizer: Tokenizer | None, max_num_seqs: int = 16, max_model_len: int | None = None,
                 kv_cache_memory: int | None = None, max_waiting: int = 1024, prefill_chunk: int = 1024,
                 block_size: int = DEFAULT_BLOCK_SIZE, enable_prefix_caching: bool = True):
        # Without a tokenizer the engine works on token ids only (benchmarks, tests): no text,
        # no eos, no generation_config defaults.
        self.model, self.tokenizer = model, tokenizer
        self.stop_token_ids = tokenizer.stop_token_ids if tokenizer else frozenset()
        self.generation_config = tokenizer.generation_config if tokenizer else {}
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        for name, v in (("max_num_seqs", max_num_seqs), ("block_size", block_size), ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer (got {v!r})")
        layers, n_kv, head_dim = model.kv_layout()
        per_block = KVCache.bytes_per_token(layers, n_kv, head_dim, self.dtype) * block_size
        context = model.args.max_position_embeddings
        if max_model_len and max_model_len > context:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's context "
                             f"(max_position_embeddings={context})")
        budget = kv_cache_memory if kv_cache_memory is not None else default_kv_budget(self.device)
        fit = budget // per_block - 1  # blocks the budget holds, less the null block
        self.max_model_len = max_model_len or min(context, fit * block_size)
        per_seq = -(-self.max_model_len // block_size)
        if self.max_model_len < 2 or fit < per_seq:
            raise ValueError(f"KV cache budget of {budget / 2**20:.0f} MiB holds {max(fit, 0) * block_size} tokens, "
                             f"less than one sequence of max_model_len={self.max_model_len}; lower max_model_len "
                             f"or raise the KV cache memory")
        # No more blocks than max_num_seqs full-length sequences can use.
        num_blocks = min(fit, max_num_seqs * per_seq) + 1
        self.cache = KVCache(layers, num_blocks, block_size, n_kv, head_dim, self.dtype, self.device)
        self.blocks = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.max_num_seqs, self.max_waiting, self.prefill_chunk = max_num_seqs, max_waiting, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._aborted: set[str] = set()
        self._preempted_now: set[Request] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.offload = None  # an ExpertOffload when routed experts live in host memory
        self.stats = {"prompt_tokens": 0, "prefill_tokens": 0, "cached_prompt_tokens": 0, "generation_tokens": 0,
                      "requests_finished": 0, "requests_failed": 0, "preemptions": 0, "steps": 0}
        self._weights_seen = self._weights_fingerprint()

    # ------------------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt=None, embeddings: list | None = None,
                    logits_processors: list[LogitsProcessor] | None = None) -> Request:
        """Queue a generation. ``cache_salt`` (hashable) keeps the prompt's cached blocks apart
        from those of equal token ids computed from other inputs. ``embeddings`` is a list of
        ``(position, vectors [n, hidden])``: prefill uses those vectors in place of the token
        embeddings of prompt positions ``position .. position + n - 1`` (image and audio
        features); unless a salt is given, their digest salts the prompt's cache blocks.
        ``logits_processors`` belong to this request alone (each call needs its own: they may
        keep state); the engine closes them when the request ends."""
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
        if params.logit_bias and any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias: token ids must be in [0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > vocab:
                raise ValueError(f"{name}: at most the vocabulary size ({vocab})")
        for pos, vec in embeddings or []:
            if not (vec.dim() == 2 and vec.shape[1] == self.model.args.hidden_size and 0 <= pos
                    and pos + vec.shape[0] <= n):
                raise ValueError(f"embeddings at position {pos} with shape {list(vec.shape)} do not fit a prompt "
                                 f"of {n} tokens and hidden size {self.model.args.hidden_size}")
        if embeddings and cache_salt is None:
            cache_salt = embeddings_digest(embeddings)
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"waiting queue is full ({self.max_waiting} requests)")
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self.requests:
                raise ValueError(f"request id {rid!r} is already in use")
            detok = self.tokenizer.detokenizer(params.skip_special_tokens) if self.tokenizer else _NoText()
            req = Request(rid, list(prompt_ids), params, make_generator(params.seed, self.device), detok,
                          cache_salt=cache_salt, embeddings=list(embeddings) if embeddings else None,
                          logits_processors=list(logits_processors or []))
            self.requests[rid] = req
            self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at the start of the next step."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    @property
    def cache_usage(self) -> float:
        """Fraction of KV cache blocks held by requests."""
        return self.blocks.num_used / self.blocks.usable

    # ------------------------------------------------------------------------------ stepping
    def _weights_fingerprint(self) -> tuple:
        """Changes whenever a weight is modified in place (an optimizer step, a copy_ from a
        trainer) or replaced: tensors count their in-place writes. Walking the modules costs
        more than a decode step of a small model, so the tensor list is collected again only
        every WEIGHT_SCAN_STEPS steps (replacing a tensor is rare; writing one is not)."""
        if self.stats["steps"] % WEIGHT_SCAN_STEPS == 0 or not hasattr(self, "_weight_tensors"):
            self._weight_tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors = self._weight_tensors
        versions = 0
        for t in tensors:
            try:
                versions += t._version
            except RuntimeError:  # an inference tensor: it cannot be written outside inference mode
                pass
        return len(tensors), sum(map(id, tensors)), versions

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; returns how many blocks were forgotten."""
        return self.blocks.reset_prefix_cache()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        if self.blocks.enable_prefix_caching:
            seen = self._weights_fingerprint()
            if seen != self._weights_seen:  # cached keys/values came from other weights
                self._weights_seen = seen
                n = self.reset_prefix_cache()
                log.info("the model's weights changed: %d cached prefix blocks forgotten", n)
        outputs = self._apply_aborts()
        self._preempted_now: set[Request] = set()
        decoding = self._make_room(list(self.running))
        admitted = self._admit()
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

    # ------------------------------------------------------------------------------ scheduling
    def _make_room(self, decoding: list[Request]) -> list[Request]:
        """A block for every running request's next token; when the pool is empty the newest
        request is preempted (its blocks freed, kept in the prefix cache where full) and goes
        back to the head of the queue, to be recomputed, mostly from cache, when room returns."""
        ready = []
        while decoding:
            req = decoding.pop(0)
            while req.num_computed // self.block_size >= len(req.block_table):
                if self.blocks.num_free:
                    req.block_table.append(self.blocks.allocate())
                    continue
                victim = decoding.pop() if decoding else req
                self._preempt(victim)
                if victim is req:
                    break
            else:
                ready.append(req)
        return ready

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.release(req.block_table)
        req.block_table, req.num_computed, req.num_registered, req.parent = [], 0, 0, None
        self._preempted_now.add(req)  # not readmitted in the step that preempted it
        with self._lock:
            self.waiting.appendleft(req)
        self.stats["preemptions"] += 1
        log.info("preempted request %s (KV cache full); it resumes when blocks free up", req.request_id)

    def _admit(self) -> list[Request]:
        """Waiting requests, in order, while sequences and blocks allow. A request whose next
        prompt block is being computed in this step by one admitted before it waits one step
        and then finds it in the cache (``n`` choices of one prompt are prefilled once)."""
        admitted: list[Request] = []
        with self._lock:
            queue = list(self.waiting)
        room = self.max_num_seqs - len(self.running)
        for req in queue:
            if len(admitted) >= room:
                break
            if req in self._preempted_now:
                continue
            tokens = req.history_ids
            if req.wants_prompt_logprobs:  # every prompt position's logits are needed: no hits
                hits, parent = [], self.blocks.root(req.cache_salt)
            else:
                hits, parent = self.blocks.longest_prefix(tokens, req.cache_salt)
                if self.blocks.enable_prefix_caching and any(
                        _computes_next_block(a, tokens, len(hits), req.cache_salt, self.block_size) for a in admitted):
                    continue
            need = self.blocks.blocks_for(len(tokens)) - len(hits)
            if need > self.blocks.available_with(hits):
                break  # first come, first served: nobody overtakes a request that does not fit
            self.blocks.take(hits)
            req.block_table = hits + [self.blocks.allocate() for _ in range(need)]
            req.num_computed = req.num_registered = len(hits)
            req.num_computed *= self.block_size
            req.parent = parent
            if not req.output_ids:  # a first admission, not a resumption after preemption
                req.cached_tokens = req.num_computed
                self.blocks.record_query(len(tokens), req.num_computed)
                self.stats["prompt_tokens"] += len(tokens)
                self.stats["cached_prompt_tokens"] += req.num_computed
            admitted.append(req)
        if admitted:
            with self._lock:
                for req in admitted:
                    self.waiting.remove(req)
        return admitted

    # ------------------------------------------------------------------------------ forward passes
    def _prefill(self, reqs: list[Request]) -> torch.Tensor:
        """Each request's uncached tokens, in chunks; returns each row's logits at its last
        token. Requests that want prompt logprobs are run one at a time with logits at every
        position (bounded per pass), the others together, right-padded."""
        logits = torch.empty(len(reqs), self.model.args.vocab_size, device=self.device)
        rows = {r: b for b, r in enumerate(reqs)}
        plain = [r for r in reqs if not r.wants_prompt_logprobs]
        if plain:
            self._prefill_rows(plain, self.prefill_chunk, logits, rows)
        per_pass = max(1, PROMPT_LOGITS_BYTES // (4 * self.model.args.vocab_size))
        for r in reqs:
            if r.wants_prompt_logprobs:
                r.prompt_logprobs = [None]
                self._prefill_rows([r], min(self.prefill_chunk, per_pass), logits, rows, every_position=True)
        return logits

    def _prefill_rows(self, reqs, chunk: int, logits, rows, every_position: bool = False) -> None:
        while True:
            active = [r for r in reqs if r.num_computed < r.num_tokens]
            if not active:
                return
            starts = [r.num_computed for r in active]
            counts = [min(chunk, r.num_tokens - r.num_computed) for r in active]
            width = max(counts)
            tokens = torch.zeros(len(active), width, dtype=torch.long)
            for b, r in enumerate(active):
                tokens[b, :counts[b]] = torch.tensor(r.tokens(starts[b], starts[b] + counts[b]))
            tokens = tokens.to(self.device)
            view = self.cache.view(starts, width, [r.block_table for r in active], counts)
            last = torch.tensor(counts, device=self.device) - 1
            embeds = self._row_embeddings(active, tokens, starts)
            if embeds is not None:
                tokens = None  # the model reads the embeddings instead
            if every_position:
                out = self.model(tokens, view, input_embeddings=embeds).float()  # [B, T, V]
                last_logits = out[torch.arange(len(active), device=self.device), last]
                self._record_prompt_logprobs(active[0], out[0, :counts[0]], starts[0])
            else:
                last_logits = self.model(tokens, view, input_embeddings=embeds, logits_at=last).float()
            for b, r in enumerate(active):
                r.num_computed += counts[b]
                self.stats["prefill_tokens"] += counts[b]
                self._register_full_blocks(r)
                if r.num_computed == r.num_tokens:
                    logits[rows[r]] = last_logits[b]

    def _record_prompt_logprobs(self, req: Request, logits: torch.Tensor, start: int) -> None:
        """Logits at positions start.. predict the prompt tokens after them."""
        n = len(req.prompt_ids)
        upto = min(start + logits.shape[0], n - 1)  # the last prompt position predicts the output
        if upto <= start:
            return
        lp = logits[: upto - start].log_softmax(-1)
        req.prompt_logprobs += token_logprobs(lp, req.prompt_ids[start + 1:upto + 1], req.params.prompt_logprobs)

    def _row_embeddings(self, reqs, tokens: torch.Tensor, starts: list[int]) -> torch.Tensor | None:
        """Token embeddings of a prefill pass with the requests' own vectors written over
        their positions (row b covers positions starts[b]..); None when no row brings any."""
        if not any(r.embeddings for r in reqs):
            return None
        h = self.model.embed(tokens)
        for b, r in enumerate(reqs):
            start, end = starts[b], starts[b] + tokens.shape[1]
            for pos, vec in r.embeddings or []:
                lo, hi = max(pos, start), min(pos + vec.shape[0], end)
                if lo < hi:
                    h[b, lo - start:hi - start] = vec[lo - pos:hi - pos].to(h.device, h.dtype)
        return h

    def _decode(self, reqs: list[Request]) -> torch.Tensor:
        tokens = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)
        view = self.cache.view([r.num_computed for r in reqs], 1, [r.block_table for r in reqs])
        logits = self.model(tokens, view, logits_at=torch.zeros(len(reqs), dtype=torch.long,
                                                                device=self.device)).float()
        for r in reqs:
            r.num_computed += 1
            self._register_full_blocks(r)
        return logits

    def _register_full_blocks(self, req: Request) -> None:
        bs = self.block_size
        while (req.num_registered + 1) * bs <= req.num_computed:
            i = req.num_registered
            req.parent = self.blocks.register(req.block_table[i], req.parent, req.tokens(i * bs, (i + 1) * bs))
            req.num_registered += 1

    # ------------------------------------------------------------------------------ sampling, stops
    def _finish_step(self, reqs: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        raw = logits.log_softmax(-1) if any(r.params.logprobs is not None for r in reqs) else None
        outs = []
        now = time.monotonic()
        for b, req in enumerate(reqs):
            try:
                if req.params.max_tokens == 0:  # prompt logprobs only: nothing to sample
                    req.finish_reason = "length"
                    outs.append(self._output(req, [], "", []))
                    self._retire(req)
                    continue
                sample = sample_row(logits[b], req, None if raw is None else raw[b])
                if req.first_token_time is None:
                    req.first_token_time = now
                req.output_ids.append(sample.token)
                self.stats["generation_tokens"] += 1
                for processor in req.logits_processors:
                    processor.accept(sample.token)
                outs.append(self._append_token(req, sample))
            except Exception as e:  # this request alone: the others in the batch go on
                outs.append(self._fail(req, e))
        return outs

    def _fail(self, req: Request, e: Exception) -> RequestOutput:
        log.exception("request %s failed; the others go on", req.request_id)
        req.finish_reason, req.error = "error", f"{type(e).__name__}: {e}"
        self.stats["requests_failed"] += 1
        out = self._output(req, [], "", [])
        self._retire(req)
        return out

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
        prompt_lp = None
        if req.prompt_logprobs is not None and not req._prompt_logprobs_sent and req.finish_reason != "error":
            prompt_lp, req._prompt_logprobs_sent = req.prompt_logprobs, True
        return RequestOutput(req.request_id, ids, text, req.finish_reason is not None, req.finish_reason,
                             len(req.prompt_ids), len(req.output_ids), logprobs, prompt_lp, req.cached_tokens,
                             req.error)

    def _retire(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.block_table:
            self.blocks.release(req.block_table)
            req.block_table = []
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


def _computes_next_block(other: Request, tokens: list[int], hit_blocks: int, salt, block_size: int) -> bool:
    """Whether ``other``'s prefill in this step fills (and publishes) block ``hit_blocks`` of
    ``tokens``, which a request with these tokens could then reuse."""
    end = (hit_blocks + 1) * block_size
    if other.cache_salt != salt or end > len(tokens) - 1 or end > other.num_tokens:
        return False
    return other.num_computed < end and other.tokens(0, end) == tokens[:end]


def embeddings_digest(embeddings: list) -> tuple:
    """A cache salt naming the vectors of a multimodal prompt by content, so equal images
    share cached blocks and different ones never do."""
    import hashlib

    h = hashlib.sha256()
    for pos, vec in embeddings:
        v = vec.detach().to("cpu").contiguous()
        h.update(f"{pos}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.dtype == torch.bfloat16 else v.numpy().tobytes())
    return ("embeddings", h.hexdigest())


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
