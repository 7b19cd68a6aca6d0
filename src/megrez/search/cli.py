"""``megrez index add|search|info`` (the local search index) and the ``--search`` options of
``megrez chat``, whose turns go through :func:`run_turn`."""
from __future__ import annotations

import sys


def add_search_args(p) -> None:
    g = p.add_argument_group("web search (Megrez's search-and-cite loop)")
    g.add_argument("--search", nargs="?", const="auto", default=None, choices=["auto", "always"],
                   help="let the model search (auto: it decides; always: every turn starts with a search "
                        "whose query the model writes)")
    g.add_argument("--search-backend", default="local", choices=["local", "serper"],
                   help="local: the index of `megrez index add` (no network); serper: Google via serper.dev "
                        "(needs SERPER_API_KEY)")
    g.add_argument("--search-index", default=None, metavar="PATH",
                   help="the local index (default: $MEGREZ_CACHE/search/index.sqlite)")
    g.add_argument("--search-pages", type=int, default=5, help="pages read and summarised per search (default 5)")


def make_agent(llm, a):
    """The loop for ``megrez chat --search``, its budgets fitted to the model's context."""
    from .agent import LLMSearchModel, SearchConfig, WebSearchAgent
    from .backend import open_backend

    if a.search_pages < 1:
        raise ValueError("--search-pages must be at least 1")
    config = SearchConfig(pages=a.search_pages).fitted(llm.engine.max_model_len)
    style = "terminal" if sys.stdout.isatty() else "markdown"
    return WebSearchAgent(LLMSearchModel(llm), open_backend(a.search_backend, a.search_index), config,
                          citation_style=style, force_search=a.search == "always")


def search_session(llm, a, params, **kw):
    """A ``megrez chat`` session whose turns go through the search loop (``/reset``, ``/save``
    and the rest of the REPL work as usual; the conversation holds the raw turns)."""
    from ..chat import ChatSession

    agent = make_agent(llm, a)

    class SearchSession(ChatSession):
        def ask(self, text: str) -> str | None:
            import time

            t0 = time.perf_counter()
            answer = run_turn(agent, text, self.out, self.err)
            self.messages = list(agent.history)
            if self.after_answer is not None:
                self.after_answer(time.perf_counter() - t0)
            return answer

        def reset(self) -> None:
            super().reset()
            agent.reset()

    return SearchSession(llm, params, **kw)


def run_turn(agent, question: str, out=sys.stdout, err=sys.stderr) -> str:
    """One user turn: progress on ``err``, the answer (citations as links) on ``out``."""
    answer = ""
    for event in agent.ask(question):
        if event.kind == "call":
            print(f"[searching: {event.value}]", file=err, flush=True)
        elif event.kind == "sources":
            for i, r in enumerate(event.value, 1):
                print(f"[{i}] {r.title} <{r.link}>", file=err)
            if not event.value:
                print("[no results]", file=err)
            err.flush()
        elif event.kind == "error":
            print(f"[search failed: {event.value}]", file=err, flush=True)
        elif event.kind == "text":
            out.write(event.value)
            out.flush()
        elif event.kind == "done":
            answer = event.value
    out.write("\n")
    out.flush()
    return answer


def register(sub) -> None:
    p = sub.add_parser("index", help="the local search index for web search without a network")
    isub = p.add_subparsers(dest="index_command", required=True)
    for name, help_ in (("add", "index the .txt/.md/.html files under DIR (re-indexes changed ones)"),
                        ("search", "run a query against the index"), ("info", "what the index holds")):
        q = isub.add_parser(name, help=help_)
        if name == "add":
            q.add_argument("dir", help="folder of documents (searched recursively)")
        elif name == "search":
            q.add_argument("query", help="words or Chinese text to look for")
            q.add_argument("-k", type=int, default=5, help="results to show (default 5)")
        q.add_argument("--index", default=None, help="index file (default: $MEGREZ_CACHE/search/index.sqlite)")
        q.set_defaults(func=cmd_index)


def cmd_index(a) -> int:
    from .local import LocalIndex, default_index_path

    path = a.index or default_index_path()
    if a.index_command == "add":
        index = LocalIndex(path)
        c = index.add(a.dir, progress=sys.stderr.isatty())
        print(f"{path}: {c['added']} added, {c['updated']} updated, {c['unchanged']} unchanged; "
              f"{c['documents']} documents")
        return 0
    index = LocalIndex(path, create=False)
    if a.index_command == "info":
        print(f"{path}: {len(index)} documents")
        return 0
    for i, r in enumerate(index.search(a.query, a.k), 1):
        print(f"[{i}] {r.title} <{r.link}>\n    {r.snippet[:120]}")
    return 0
