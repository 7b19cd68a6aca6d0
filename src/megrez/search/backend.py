"""Search backends behind one interface: ``search(query, k)`` returns results in a fixed order
(the citation numbers follow it), ``fetch(result)`` the page text (or an error marker)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SearchResult:
    title: str
    link: str
    snippet: str = ""
    date: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class SearchBackend:
    name = "backend"

    def search(self, query: str, k: int) -> list[SearchResult]:
        raise NotImplementedError

    def fetch(self, result: SearchResult) -> str:
        raise NotImplementedError


def open_backend(kind: str, index: str | None = None) -> SearchBackend:
    """``local`` (a SQLite index made by ``megrez index add``) or ``serper`` (the web; needs
    SERPER_API_KEY)."""
    if kind == "local":
        from .local import LocalIndex, default_index_path

        return LocalIndex(index or default_index_path(), create=False)
    if kind == "serper":
        from .web import SerperBackend

        return SerperBackend.from_env()
    raise ValueError(f"unknown search backend {kind!r} (expected 'local' or 'serper')")
