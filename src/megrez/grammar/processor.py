"""Grammar masks in the engine: one llguidance matcher per request, as a logits processor
whose next mask is computed on a worker thread while the model runs its next forward pass.

The engine tells a processor the token it sampled (``accept``); the processor hands "consume
this token, compute the next mask" to a worker and returns at once. llguidance drops the GIL
while it works, so the mask is ready, or nearly, when the next step's logits arrive; sampling
then only waits for it and fills the disallowed logits with -inf.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance as llg
import torch

from ..engine.sampling import LogitsProcessor
from .compile import GrammarError

log = logging.getLogger("megrez.grammar")
_executor: ThreadPoolExecutor | None = None


def mask_executor() -> ThreadPoolExecutor:
    """Shared by every request: one worker per two cores (the rest run the model)."""
    global _executor
    if _executor is None:
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        _executor = ThreadPoolExecutor(workers, thread_name_prefix="megrez-grammar")
    return _executor


class GrammarCompiler:
    """Grammars for one tokenizer and logit width: llguidance's view of the vocabulary is
    built once; each request gets its own matcher."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_token_ids = sorted(tokenizer.stop_token_ids)
        if not self.stop_token_ids:
            raise GrammarError("constrained decoding needs an end-of-turn token, and this tokenizer has none")
        self.lltokenizer = llg.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size, eos_token=self.stop_token_ids)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def has_token(self, text: str) -> bool:
        """Whether ``text`` is one special token of the vocabulary (usable as ``<|name|>`` in Lark)."""
        tid = self.tokenizer.token_to_id(text)
        return tid is not None and self.lltokenizer.is_special_token(tid)

    def check(self, grammar: str, where: str) -> None:
        """Raises GrammarError (naming ``where``) for a grammar that is invalid or can match nothing."""
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if is_error:
            raise GrammarError(f"{where}: {messages[0]}")

    def processor(self, grammar: str, where: str = "grammar") -> "GrammarProcessor":
        matcher = llg.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{where}: {matcher.get_error()}")
        return GrammarProcessor(self, matcher)


class GrammarProcessor(LogitsProcessor):
    def __init__(self, compiler: GrammarCompiler, matcher):
        self.compiler, self.matcher = compiler, matcher
        self.bitmask = torch.zeros((compiler.vocab_size + 31) // 32, dtype=torch.int32)
        self.error: str | None = None
        self.mask_seconds = 0.0  # worker time spent on masks (for benchmarks)
        self.wait_seconds = 0.0  # time sampling waited for a mask: the part not hidden by the forward pass
        self._future: Future = mask_executor().submit(self._next_mask)  # overlaps the prefill

    def _next_mask(self, token: int | None = None) -> torch.Tensor:
        """Runs on the worker: the disallowed tokens after ``token`` (bool [vocab])."""
        start = time.perf_counter()
        m = self.matcher
        if token is not None:
            m.consume_token(token)
        if not m.is_error():
            m.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        allowed = ((self.bitmask.unsqueeze(1) >> self.compiler._shifts) & 1).view(-1)[: self.compiler.vocab_size]
        if m.is_error() or not bool(allowed.any()):
            # Cannot happen for tokens the mask allowed; if it does, end the answer cleanly
            # rather than sample from nothing.
            self.error = m.get_error() or "the grammar allows no further token"
            log.warning("grammar matcher stopped: %s", self.error)
            allowed = torch.zeros(self.compiler.vocab_size, dtype=torch.int32)
            allowed[self.compiler.stop_token_ids] = 1
        disallowed = allowed == 0
        self.mask_seconds += time.perf_counter() - start
        return disallowed

    def __call__(self, logits: torch.Tensor) -> None:
        start = time.perf_counter()
        disallowed = self._future.result()
        self.wait_seconds += time.perf_counter() - start
        logits.masked_fill_(disallowed.to(logits.device, non_blocking=True), float("-inf"))

    def accept(self, token: int) -> None:
        self._future = mask_executor().submit(self._next_mask, token)

    def close(self) -> None:
        self._future.cancel()
