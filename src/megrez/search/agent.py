"""The web-search loop Megrez-3B-Instruct was trained for, over any model and search backend.

One user turn: the model, shown the search function in its system prompt, either answers or
writes a call. For a call, the backend runs the query, every page is summarised for the query
in one batched generation, and the observation (instructions, question, keywords, numbered
summaries) goes back in an ``observation`` turn; the model then streams the answer, whose
``[citation:N]`` markers become links to the pages. The history keeps the raw turns (calls and
observations included) and is cut to the last turns that fit before every generation.

    agent = WebSearchAgent(LLMSearchModel(llm), LocalIndex(path))
    for event in agent.ask("北京今天天气怎么样"):
        ...   # Event("call" | "sources" | "text" | "done", ...)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Iterator

from ..tools import FUNCTION_END, ToolCallParser
from ..tools import megrez_format as mf
from . import prompts
from .backend import SearchBackend, SearchResult
from .citations import CitationStream

MAX_QUERY_CHARS = 64


@dataclass
class SearchConfig:
    """InfiniWebSearch's settings; :meth:`fitted` shrinks the budgets for a short context."""
    pages: int = 5                       # pages searched and summarised
    summary_input_tokens: int = 2048     # each page is cut to this many tokens
    summary_output_tokens: int = 512
    session_window: int = 2              # user turns kept in the history
    session_max_input_tokens: int = 3072
    temperature: float = 0.01            # the call, the summaries and the answer
    call_max_tokens: int = 512
    answer_max_tokens: int = 2048        # larger than the call's (the source demo caps both at 512)
    max_action_turns: int = 1            # searches per user turn

    def fitted(self, context: int) -> "SearchConfig":
        """Budgets that fit a context of ``context`` tokens: the summary prompt and its answer,
        and the answer prompt (history + observation of ``pages`` summaries) and its answer."""
        if context >= 8192:
            return self
        answer = min(self.answer_max_tokens, context // 4)
        summary_out = min(self.summary_output_tokens, max(32, context // (4 * self.pages)))
        summary_in = min(self.summary_input_tokens, context - summary_out - 256)
        session = min(self.session_max_input_tokens, context - answer - self.pages * summary_out - 512)
        return replace(self, answer_max_tokens=answer, call_max_tokens=min(self.call_max_tokens, answer),
                       summary_output_tokens=summary_out, summary_input_tokens=max(64, summary_in),
                       session_max_input_tokens=max(128, session))


@dataclass
class Event:
    kind: str                 # "call" (query), "sources" (results), "text" (answer delta), "done" (raw answer)
    value: object = None


class SearchModel:
    """What the loop needs from a model: streamed chat text with the special tokens kept, one
    batched chat generation, and its tokenizer (for the prompts, budgets and page cuts)."""
    tokenizer = None

    def stream(self, messages: list[dict], max_tokens: int, temperature: float,
               forced_call: bool = False) -> Iterator[str]:
        """``forced_call``: the answer must be a call of the search function (its query is
        still the model's)."""
        raise NotImplementedError

    def batch(self, conversations: list[list[dict]], max_tokens: int, temperature: float) -> list[str]:
        raise NotImplementedError


def truncate_messages(messages: list[dict], count, system: str, window: int, max_tokens: int) -> list[dict]:
    """The last ``window`` turns (a turn starts at a user message), then from the newest back
    only while system + kept turns stay under ``max_tokens``; the newest turn is always kept."""
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"][-window:]
    parts = [messages[s:e] for s, e in zip(starts, starts[1:] + [len(messages)])]
    kept: list[dict] = []
    for i, part in enumerate(reversed(parts)):
        if i == 0 or count([{"role": "system", "content": system}] + kept + part) < max_tokens:
            kept = part + kept
        else:
            break
    return kept


@dataclass
class WebSearchAgent:
    model: SearchModel
    backend: SearchBackend
    config: SearchConfig = field(default_factory=SearchConfig)
    clock: object = datetime.now
    citation_style: str = "markdown"
    force_search: bool = False           # the first generation of a turn must be a search call
    history: list[dict] = field(default_factory=list)
    sources: list[SearchResult] = field(default_factory=list)   # of the latest search

    def reset(self) -> None:
        self.history, self.sources = [], []

    def system_prompt(self) -> str:
        return mf.system_prompt([prompts.SEARCH_FUNCTION], self.clock())

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.model.tokenizer.encode_chat(messages, add_generation_prompt=False))

    def prompt(self) -> list[dict]:
        system = self.system_prompt()  # re-stamped every generation
        c = self.config
        kept = truncate_messages(self.history, self.count_tokens, system, c.session_window,
                                 c.session_max_input_tokens)
        return [{"role": "system", "content": system}] + kept

    # ------------------------------------------------------------------------------ one turn
    def ask(self, question: str) -> Iterator[Event]:
        self.history.append({"role": "user", "content": question})
        c = self.config
        for turn in range(c.max_action_turns + 1):
            may_call = turn < c.max_action_turns
            raw, call = yield from self._generate(may_call, forced=self.force_search and turn == 0)
            self.history.append({"role": "assistant", "content": raw})
            if call is None:
                yield Event("done", raw)
                return
            observation = yield from self._run_call(question, call)
            self.history.append({"role": mf.OBSERVATION_ROLE, "content": observation})

    def _generate(self, may_call: bool, forced: bool):
        """Streams one generation; returns (raw text, the call or None)."""
        c = self.config
        parser = ToolCallParser(None, 1) if may_call else None
        cites = CitationStream(self.sources, self.citation_style)
        raw = []
        stream = self.model.stream(self.prompt(), c.call_max_tokens if may_call else c.answer_max_tokens,
                                   c.temperature, forced_call=forced)
        for delta in stream:
            raw.append(delta)
            if parser is None:
                text = cites.feed(delta)
            else:
                events = parser.feed(delta)
                text = cites.feed("".join(v for k, v in events if k == "content"))
                if parser.calls:  # the call is complete: stop reading, as the source demo does
                    getattr(stream, "close", lambda: None)()
                    break
            if text:
                yield Event("text", text)
        if parser is not None and not parser.calls:
            tail = "".join(v for k, v in parser.finish() if k == "content")
            if tail:
                yield Event("text", cites.feed(tail))
        rest = cites.flush()
        if rest:
            yield Event("text", rest)
        raw_text = "".join(raw)
        if parser is not None and parser.calls and not raw_text.endswith(FUNCTION_END):
            raw_text += FUNCTION_END
        return raw_text, (parser.calls[0] if parser is not None and parser.calls else None)

    def _run_call(self, question: str, call):
        import json

        if call.name != prompts.SEARCH_FUNCTION["name"]:
            return prompts.UNKNOWN_TOOL.format(name=call.name)
        query = json.loads(call.arguments).get("query")
        if not isinstance(query, str) or not query.strip():
            return prompts.MISSING_QUERY
        yield Event("call", query)
        c = self.config
        try:
            results = self.backend.search(query, c.pages)
            fetch_all = getattr(self.backend, "fetch_all", None)
            pages = fetch_all(results) if fetch_all else [self.backend.fetch(r) for r in results]
        except Exception as e:  # a backend failure is the model's to report, not a crash
            yield Event("error", f"{type(e).__name__}: {e}")
            return prompts.SEARCH_FAILED
        self.sources = results
        yield Event("sources", results)
        if not results or all(p == prompts.PAGES_TIMED_OUT for p in pages):
            return prompts.PAGES_TIMED_OUT
        tok = self.model.tokenizer
        convs = []
        for text in pages:
            if text:
                text = tok.decode(tok.encode(text, add_special_tokens=False)[: c.summary_input_tokens])
            convs.append([{"role": "system", "content": prompts.SUMMARY_SYSTEM},
                          {"role": "user", "content": prompts.SUMMARY_PROMPT.format(question=query, context=text)}])
        summaries = self.model.batch(convs, c.summary_output_tokens, c.temperature)
        yield Event("summaries", summaries)
        return prompts.observation(question, query, summaries)


def forced_search_call():
    """A tool spec that makes the answer one search call; the grammar (not the prompt) also
    bounds the query's length, so a weak model cannot ramble through its whole budget."""
    from ..tools import parse_tools

    fn = prompts.SEARCH_FUNCTION
    query = {**fn["parameters"]["properties"]["query"], "minLength": 1, "maxLength": MAX_QUERY_CHARS}
    bounded = {**fn, "parameters": {**fn["parameters"], "properties": {"query": query}, "additionalProperties": False}}
    return parse_tools([{"type": "function", "function": bounded}],
                       {"type": "function", "function": {"name": fn["name"]}}, False)


class LLMSearchModel(SearchModel):
    """The loop's model over the Python API (``megrez chat --search``)."""

    def __init__(self, llm):
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.function_end = llm.tokenizer.token_to_id(FUNCTION_END)

    def _params(self, max_tokens, temperature, **kw):
        from ..engine import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=0, **kw)

    def stream(self, messages, max_tokens, temperature, forced_call: bool = False):
        stop = [self.function_end] if self.function_end is not None else []
        params = self._params(max_tokens, temperature, skip_special_tokens=False, stop_token_ids=stop)
        processors = None
        if forced_call:
            processors = self.llm.structured.plan(forced_search_call()).processors()
        ids = self.tokenizer.encode_chat(messages)
        room = self.llm.engine.max_model_len - len(ids) - 1
        if room < 1:
            raise ValueError(f"the conversation needs {len(ids)} tokens; the context holds "
                             f"{self.llm.engine.max_model_len}")
        params.max_tokens = min(max_tokens, room)
        yield from self.llm._stream(ids, params, processors=processors)
        req = self.llm.last_request
        if req.output_ids and req.output_ids[-1] == self.function_end:
            yield FUNCTION_END  # the stop token's text is not part of the output

    def batch(self, conversations, max_tokens, temperature):
        return [r.text for r in self.llm.chat(conversations, self._params(max_tokens, temperature))]
