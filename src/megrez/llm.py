"""The Python API: ``LLM(model).generate(...)``, ``.chat(...)`` and their streaming variants.

    from megrez import LLM, SamplingParams
    llm = LLM("Infinigence/Megrez2-3x7B-A3B")            # or a local checkpoint directory
    print(llm.chat([{"role": "user", "content": "你好"}]).text)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .engine import Engine, RequestOutput, SamplingParams
from .engine.offload import ExpertOffload, format_bytes, parse_bytes
from .engine.sampling import SampleResult
from .loading import load_model, resolve_model_path
from .loading.gguf import tokenizer_path
from .tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[SampleResult] = field(default_factory=list)
    tool_calls: list = field(default_factory=list)  # megrez.tools.ToolCall: id, name, arguments (JSON)


def default_model() -> Path:
    """The model used when none is named: the small model shipped with the package if present,
    else a tiny random checkpoint generated once in the user's cache (no download)."""
    shipped = Path(__file__).parent / "assets" / "megrez2-tiny-chat"
    if (shipped / "config.json").is_file():
        return shipped
    cache = Path(os.environ.get("MEGREZ_CACHE", Path.home() / ".cache" / "megrez")) / "tiny-moe"
    if not (cache / "config.json").is_file():
        from .tiny import create_tiny

        print(f"megrez: no model given; creating a tiny random Megrez2 checkpoint at {cache} "
              f"(pass --model DIR or a hub id for a real one)", file=sys.stderr)
        create_tiny(cache, arch="moe")
    return cache


class LLM:
    """A model, its tokenizer and an engine.

    ``gpu_memory_budget`` (e.g. "6GiB"; Megrez2 only) keeps the routed experts in host memory
    and caches them on the device within the budget, prefetching each layer's experts as soon
    as the pre-gate names them (``offload_policy``: "group" or "lru"; ``prefetch=False`` to
    compare).

    ``memory_budget`` (e.g. "3GiB"; Megrez2 on a CPU) is a host-memory budget: everything but
    the routed experts is loaded, the experts stay in the checkpoint files and are read into a
    fixed-size RAM cache (direct I/O on ``io_threads`` threads), prefetched from the pre-gate
    in the same way (see :mod:`megrez.engine.storage`).
    ``quantization`` ("q8_0", "q4_0", "q4_k_m") quantizes the weights while they load, in
    llama.cpp's block formats (see :mod:`megrez.quant`)."""

    def __init__(self, model: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto",
                 router_bias: str | None = None, quantization: str | None = None, max_num_seqs: int = 16, max_model_len: int | None = None,
                 kv_cache_memory: int | None = None, gpu_memory_budget: str | int | None = None,
                 memory_budget: str | int | None = None, offload_policy: str = "group", prefetch: bool = True,
                 io_threads: int = 4, direct_io: bool = True, **engine_options):
        # Sizes and combinations are checked before anything loads.
        budget = parse_bytes(gpu_memory_budget) if gpu_memory_budget is not None else None
        ram_budget = parse_bytes(memory_budget) if memory_budget is not None else None
        if budget is not None and ram_budget is not None:
            raise ValueError("--memory-budget (experts read from storage into RAM) and --gpu-memory-budget (experts "
                             "copied from RAM to the GPU) cannot be combined yet; choose one")
        if ram_budget is not None:
            if device not in ("auto", "cpu") and torch.device(device).type != "cpu":
                raise ValueError("--memory-budget is a host-memory budget for running on the CPU (--device cpu); "
                                 "on a GPU use --gpu-memory-budget")
            device = "cpu"
        self.path = resolve_model_path(model) if model is not None else default_model()
        overrides = {"router_bias": router_bias} if router_bias else {}
        self.tokenizer = Tokenizer(tokenizer_path(self.path))
        self.offload = None
        if budget is None and ram_budget is None:
            self.model = load_model(self.path, device=device, dtype=dtype, quantization=quantization, **overrides)
        elif budget is not None:
            self.model = load_model(self.path, device=device, dtype=dtype, expert_device="cpu",
                                    quantization=quantization, **overrides)
            self.offload, kv_cache_memory = plan_offload(self.model, budget, kv_cache_memory, offload_policy,
                                                         prefetch)
        else:
            from .engine.storage import ExpertStore
            from .loading import checkpoint_shards
            from .loading.gguf import GGUFCheckpoint, is_gguf

            self.model = load_model(self.path, device="cpu", dtype=dtype, expert_device="meta",
                                    quantization=quantization, **overrides)
            if not hasattr(self.model.args, "owner"):
                raise ValueError("--memory-budget leaves routed experts in the checkpoint files: it needs a Megrez2 "
                                 "(MoE) model; this one is dense")
            files = [GGUFCheckpoint(self.path)] if is_gguf(self.path) else checkpoint_shards(self.path)
            store = ExpertStore(self.model, files, self.model.model.norm.weight.dtype, direct=direct_io)
            self.offload, kv_cache_memory = plan_offload(
                self.model, ram_budget, kv_cache_memory, offload_policy, prefetch, storage=store,
                io_threads=io_threads, prefill_chunk=engine_options.get("prefill_chunk", 1024),
                max_num_seqs=max_num_seqs)
        self.engine = Engine(self.model, self.tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                             kv_cache_memory=kv_cache_memory, **engine_options)
        self.engine.offload = self.offload
        self._structured = None

    @property
    def structured(self):
        """Tool calls and constrained output (megrez.structured), built on first use."""
        if self._structured is None:
            from .structured import Structured

            self._structured = Structured(self.tokenizer, self.model.args.vocab_size)
        return self._structured

    def _constraint(self, json_schema=None, grammar: str | None = None, tools=None, tool_choice=None,
                    parallel_tool_calls=None, response_format=None):
        """(tool spec, plan) from the keyword arguments of generate/chat."""
        from .grammar import json_schema_grammar, lark_grammar
        from .structured import parse_response_format
        from .tools import parse_tools

        spec = parse_tools(tools, tool_choice, parallel_tool_calls)
        if json_schema is not None and grammar is not None:
            raise ValueError("give json_schema or grammar, not both")
        text_grammar = None
        if json_schema is not None:
            text_grammar = json_schema_grammar(json_schema, "json_schema")
        elif grammar is not None:
            text_grammar = lark_grammar(grammar)
        return spec, self.structured.plan(spec, parse_response_format(response_format), text_grammar,
                                          "json_schema" if json_schema is not None else "grammar")

    # ------------------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TypeError("a prompt is a string or a list of token ids")

    def _batch(self, prompts, params):
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        plist = params if isinstance(params, list) else [params] * len(batch)
        if len(plist) != len(batch):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(batch)} prompts")
        return single, batch, plist

    # ------------------------------------------------------------------------------ generation
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 json_schema=None, grammar: str | None = None):
        """Complete raw prompts (text or token ids); a list in gives a list out. ``json_schema``
        (a dict) or ``grammar`` (Lark or GBNF text) constrains every answer."""
        single, batch, plist = self._batch(prompts, params)
        plan = None
        if json_schema is not None or grammar is not None:
            plan = self._constraint(json_schema, grammar)[1]
        return self._run([self.encode_prompt(p) for p in batch], plist, single, plan=plan)

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None, *, tools=None,
             tool_choice=None, parallel_tool_calls=None, response_format=None, json_schema=None,
             grammar: str | None = None, **template_kwargs):
        """Answer a conversation (a list of {"role", "content"}), or a list of conversations.

        ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format`` are OpenAI's:
        the answer's ``tool_calls`` hold the calls the model made (its ``text`` the rest), and
        ``role: "tool"`` messages carry results back. ``json_schema``/``grammar`` as for generate.

        With a Megrez-3B-Omni checkpoint, content may be a list of parts -- text, images and
        audio (``{"type": "image", "image": "cat.jpg"}``, ``{"type": "audio", "audio": "q.wav"}``,
        OpenAI ``image_url``/``input_audio`` parts) -- or the official ``{"text", "image",
        "audio"}`` dict (see ``megrez.multimodal.prompt``)."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else list(messages)
        plist = params if isinstance(params, list) else [params] * len(convs)
        plan = spec = None
        if any(x is not None for x in (tools, tool_choice, response_format, json_schema, grammar)):
            spec, plan = self._constraint(json_schema, grammar, tools, tool_choice, parallel_tool_calls,
                                          response_format)
        if spec is not None or any(m.get("role") == "tool" or m.get("tool_calls") for c in convs for m in c):
            encoded = [(self.structured.chat_prompt(c, spec), None) for c in convs]
        else:
            encoded = [self.encode_conversation(c, **template_kwargs) for c in convs]
        return self._run([ids for ids, _ in encoded], plist, single, [e for _, e in encoded], plan)

    def encode_conversation(self, messages, check_length: bool = True, **template_kwargs):
        """(token ids, placeholder embeddings or None) of a conversation; images and audio
        are encoded here (``check_length``: refuse media that leave no room in the context)."""
        from .multimodal.prompt import has_media, prepare_chat

        if not has_media(messages):
            return self.tokenizer.encode_chat(messages, **template_kwargs), None
        if getattr(self, "encoder_cache", None) is None:
            from .multimodal.prompt import EncoderCache

            self.encoder_cache = EncoderCache()
        ids, embeddings, _ = prepare_chat(self.model, self.tokenizer, messages,
                                          max_len=self.engine.max_model_len if check_length else None,
                                          cache=self.encoder_cache, **template_kwargs)
        return ids, embeddings

    def _run(self, prompt_ids: list[list[int]], plist, single: bool, embeddings=None, plan=None):
        embeddings = embeddings or [None] * len(prompt_ids)
        if plan is not None:
            plist = [plan.params((p or SamplingParams()).with_defaults(self.engine.generation_config))
                     for p in plist]
        reqs = [self.engine.add_request(ids, p, embeddings=e, logits_processors=plan.processors() if plan else None)
                for ids, p, e in zip(prompt_ids, plist, embeddings)]
        collected = {r.request_id: [] for r in reqs}
        pending = set(collected)
        while pending:
            for out in self.engine.step():
                if out.request_id in collected:
                    collected[out.request_id] += out.new_logprobs
                if out.finished:
                    pending.discard(out.request_id)
        results = [Completion(r.text, list(r.output_ids), r.finish_reason, len(r.prompt_ids),
                              collected[r.request_id]) for r in reqs]
        reader = plan.reader if plan is not None else None
        for res in results:
            calls = reader() if reader else None
            if calls is not None:
                msg, res.finish_reason = calls.message(res.text, res.finish_reason, (res.token_ids or [None])[-1])
                res.text, res.tool_calls = msg["content"] or "", calls.calls
        return results[0] if single else results

    def stream(self, prompt, params: SamplingParams | None = None, *, json_schema=None,
               grammar: str | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are generated (constrained as in generate)."""
        processors = None
        if json_schema is not None or grammar is not None:
            processors = self.constraint_processors(json_schema, grammar)
        return self._stream(self.encode_prompt(prompt), params, processors=processors)

    def constraint_processors(self, json_schema=None, grammar: str | None = None) -> list:
        """Logits processors for one request that keep it to a JSON schema or a grammar."""
        return self._constraint(json_schema, grammar)[1].processors()

    def chat_stream(self, messages, params: SamplingParams | None = None, **template_kwargs) -> Iterator[str]:
        ids, embeddings = self.encode_conversation(messages, **template_kwargs)
        return self._stream(ids, params, embeddings)

    def _stream(self, ids: list[int], params, embeddings=None, processors=None) -> Iterator[str]:
        for out in self.stream_outputs(ids, params, embeddings, processors=processors):
            if out.new_text:
                yield out.new_text

    def stream_outputs(self, ids: list[int], params: SamplingParams | None = None,
                       embeddings=None, processors=None) -> Iterator[RequestOutput]:
        """Every engine step's output for one request (token ids, text delta, finish reason),
        text or not, so a caller can stop between any two steps. Closing the iterator early
        cancels the request and frees its cache slot. ``processors``: its logits processors."""
        req = self.engine.add_request(ids, params, embeddings=embeddings, logits_processors=processors)
        self.last_request = req
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == req.request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            if req.finish_reason is None:  # the consumer stopped early: free the cache slot
                self.engine.abort(req.request_id)
                self.engine.step()


ACTIVATION_MARGIN = 256 << 20  # room for activations and logits on the device


def activation_bytes(args, prefill_chunk: int, max_num_seqs: int) -> int:
    """Host memory a forward pass allocates beyond the weights and the KV cache, at most: a
    prefill chunk's hidden states and MLP intermediates in float32, and the logits rows."""
    widest = max(args.intermediate_size, (getattr(args, "n_shared_experts", 0) or 0) * args.moe_intermediate_size,
                 args.moe_intermediate_size * args.num_experts_per_tok)
    per_token = 4 * (8 * args.hidden_size + 3 * widest)
    return prefill_chunk * per_token + 3 * max_num_seqs * args.vocab_size * 4


def plan_offload(model, budget: int, kv_cache_memory: int | None, policy: str, prefetch: bool, storage=None,
                 io_threads: int = 4, prefill_chunk: int = 1024, max_num_seqs: int = 16):
    """Split a memory budget (the device's, or with ``storage`` the host's): non-expert weights
    (already there), the KV cache, a margin for activations, and an expert cache for the rest.
    Returns (offload, KV cache bytes); ``offload.budget`` records the split."""
    args = model.args
    flag = "--memory-budget" if storage is not None else "--gpu-memory-budget"
    if not hasattr(args, "owner"):
        raise ValueError(f"{flag} offloads routed experts: it needs a Megrez2 (MoE) model")
    from .quant.modules import quant_tensors

    device = model.model.norm.weight.device
    resident = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    # Quantized weights (a GGUF file's) are not parameters; a tied table counts once.
    resident += sum({qt.data.data_ptr(): qt.nbytes for n, qt in quant_tensors(model).items()
                     if ".mlp.experts." not in n}.values())
    if storage is not None:
        from .engine.storage import StorageTransfer

        margin = activation_bytes(args, prefill_chunk, max_num_seqs)
        expert = StorageTransfer.slot_bytes(storage)
        staging = 0 if storage.views else io_threads * storage.span
    else:
        margin = ACTIVATION_MARGIN if device.type == "cuda" else 0
        expert = 3 * args.hidden_size * args.moe_intermediate_size * next(model.parameters()).element_size()
        staging = 0
    left = budget - resident - margin
    kv = kv_cache_memory if kv_cache_memory is not None else max(min(1 << 30, left // 4), 0)
    need = args.num_experts_per_tok * expert + staging
    cache = left - kv
    if cache < need:
        raise ValueError(f"a memory budget of {format_bytes(budget)} is too small: the non-expert weights take "
                         f"{format_bytes(resident)}, the KV cache {format_bytes(kv)} and activations "
                         f"{format_bytes(margin)}, leaving {format_bytes(max(cache, 0))} for experts; one layer "
                         f"needs {format_bytes(need)} (raise the budget to at least "
                         f"{format_bytes(budget - cache + need)})")
    offload = ExpertOffload(model, device, cache, policy=policy, prefetch=prefetch, storage=storage,
                            io_threads=io_threads)
    offload.budget = {"budget": budget, "resident": resident, "kv_cache": kv, "activations": margin,
                      "experts": offload.cache.nbytes}
    return offload, kv
