"""Megrez's web search: the model decides to search, a backend (a local SQLite index, or the
web) finds pages, each is summarised for the query, and the model answers with citations
turned into links. See docs/web-search.md."""
from .agent import LLMSearchModel, SearchConfig, SearchModel, WebSearchAgent, truncate_messages
from .backend import SearchBackend, SearchResult, open_backend
from .local import LocalIndex

__all__ = ["LLMSearchModel", "LocalIndex", "SearchBackend", "SearchConfig", "SearchModel", "SearchResult",
           "WebSearchAgent", "open_backend", "truncate_messages"]
