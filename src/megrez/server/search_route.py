"""Web search inside ``/v1/chat/completions``: a request whose ``tools`` holds
``{"type": "web_search"}`` runs Megrez's whole search loop on the server (the model decides,
the server's backend searches, the pages are summarised in one batch, the model answers) and
gets back the answer with its citations as Markdown links, plus ``message.search``: the query
and the numbered sources. Streams send the search as one ``delta.search`` chunk, then the answer.

The loop runs on a worker thread; its generations go through the same engine loop as every
other request (so they are batched with them), submitted on the event loop thread.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid

from ..engine import SamplingParams
from ..search import SearchConfig, SearchModel, WebSearchAgent
from ..search.agent import forced_search_call
from ..tools import FUNCTION_END
from . import protocol


class EngineSearchModel(SearchModel):
    """The loop's model over the server's engine loop, from a worker thread."""

    def __init__(self, server, loop: asyncio.AbstractEventLoop):
        self.server, self.loop, self.tokenizer = server, loop, server.tokenizer
        self.function_end = self.tokenizer.token_to_id(FUNCTION_END)
        self.prompt_tokens = self.completion_tokens = 0
        self.cancelled = threading.Event()
        self.rids: set[str] = set()

    def _submit(self, ids, params, processors, sink) -> str:
        async def add():
            rid = self.server.loop.add(ids, params, sink, None, logits_processors=processors)
            self.rids.add(rid)
            return rid
        return asyncio.run_coroutine_threadsafe(add(), self.loop).result()

    def _outputs(self, prompts, params, processors=None):
        """Yields (index, RequestOutput) for prompts submitted together."""
        sink: queue.Queue = queue.Queue()

        class Sink:  # the engine loop delivers with put_nowait on the event loop thread
            def __init__(self, i):
                self.i = i

            def put_nowait(self, item):
                sink.put((self.i, item[1]))

        limit = self.server.engine.max_model_len
        for i, ids in enumerate(prompts):
            if len(ids) >= limit:
                raise ValueError(f"the search conversation needs {len(ids)} tokens; the context holds {limit}")
            p = SamplingParams(**{**params.to_dict(), "max_tokens": min(params.max_tokens, limit - len(ids) - 1)})
            self._submit(ids, p, processors() if processors else None, Sink(i))
            self.prompt_tokens += len(ids)
        pending = set(range(len(prompts)))
        while pending:
            if self.cancelled.is_set():
                raise asyncio.CancelledError
            try:
                i, out = sink.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(out, Exception):
                raise out
            if out.finished:
                pending.discard(i)
                self.completion_tokens += out.completion_tokens
            yield i, out

    def stream(self, messages, max_tokens, temperature, forced_call=False):
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=0, skip_special_tokens=False,
                                stop_token_ids=[self.function_end] if self.function_end is not None else [])
        processors = None
        if forced_call:
            plan = self.server.structured.plan(forced_search_call())
            processors = plan.processors
        for _, out in self._outputs([self.tokenizer.encode_chat(messages)], params, processors):
            if out.new_text:
                yield out.new_text
            if out.finished and out.finish_reason == "stop" and out.new_token_ids[-1:] == [self.function_end]:
                yield FUNCTION_END

    def batch(self, conversations, max_tokens, temperature):
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=0)
        texts = [[] for _ in conversations]
        for i, out in self._outputs([self.tokenizer.encode_chat(c) for c in conversations], params):
            texts[i].append(out.new_text)
        return ["".join(t) for t in texts]

    def abort(self) -> None:
        self.cancelled.set()
        for rid in list(self.rids):
            self.loop.call_soon_threadsafe(self.server.loop.abort, rid)


def history_of(messages: list[dict]) -> tuple[list[dict], str]:
    """The client's conversation as the loop's history, and the question (the last user message)."""
    if messages[-1]["role"] != "user":
        raise protocol.invalid("messages", "with the web_search tool the last message must be the user's question")
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]
               if m["role"] in ("user", "assistant", "observation")]
    return history, messages[-1]["content"]


async def handle(server, req, model: str):
    """Answers a web_search request (whole, or as an event stream)."""
    if server.search_backend is None:
        raise protocol.invalid("tools", "web search is not enabled on this server (start it with --search-index "
                                        "or --search-backend)", code="unsupported_parameter")
    history, question = history_of(req.prompts[0])
    loop = asyncio.get_running_loop()
    search_model = EngineSearchModel(server, loop)
    options = req.web_search or {}
    config = SearchConfig(pages=options.get("max_results", server.search_pages)).fitted(server.engine.max_model_len)
    agent = WebSearchAgent(search_model, server.search_backend, config, clock=server.config.clock,
                           force_search=options.get("mode") == "always", history=history)
    events: asyncio.Queue = asyncio.Queue()

    def work():
        try:
            for event in agent.ask(question):
                loop.call_soon_threadsafe(events.put_nowait, event)
        except BaseException as e:  # reported to the client; the server goes on
            loop.call_soon_threadsafe(events.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(events.put_nowait, None)

    thread = threading.Thread(target=work, name="megrez-search", daemon=True)
    thread.start()
    rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    search_info = {"query": None, "sources": []}

    def note(event) -> bool:
        if event.kind == "call":
            search_info["query"] = event.value
        elif event.kind == "sources":
            search_info["sources"] = [{"index": i, **r.to_dict()} for i, r in enumerate(event.value, 1)]
            return True
        return False

    def failure(e) -> protocol.APIError:
        if isinstance(e, protocol.APIError):
            return e
        if isinstance(e, ValueError):
            return protocol.invalid("messages", str(e))
        return protocol.APIError(500, f"web search failed: {type(e).__name__}: {e}", type="internal_server_error")

    def usage():
        return protocol.usage(search_model.prompt_tokens, search_model.completion_tokens)

    if not req.stream:
        text = []
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, BaseException):
                    raise failure(event)
                note(event)
                if event.kind == "text":
                    text.append(event.value)
        finally:
            search_model.abort()
        message = {"role": "assistant", "content": "".join(text), "search": search_info}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage()}

    def chunk(delta, reason=None):
        return protocol.sse(protocol.envelope("chat", rid, created, model, [protocol.chat_delta(0, delta, reason)],
                                              chunk=True))

    async def stream():
        try:
            yield chunk({"role": "assistant", "content": ""})
            while (event := await events.get()) is not None:
                if isinstance(event, BaseException):
                    yield protocol.sse(failure(event).body())
                    break
                if note(event):
                    yield chunk({"search": json.loads(json.dumps(search_info))})
                elif event.kind == "text":
                    yield chunk({"content": event.value})
            else:
                yield chunk({}, "stop")
                if req.include_usage:
                    yield protocol.sse(protocol.envelope("chat", rid, created, model, [], chunk=True, usage=usage()))
            yield protocol.sse("[DONE]")
        finally:
            search_model.abort()

    return stream()
