"""A web search backend: Serper's Google search API (key from ``SERPER_API_KEY``), pages
fetched over plain HTTP and reduced to their visible text. Off unless asked for
(``--search-backend serper``); standard library only."""
from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from .backend import SearchBackend, SearchResult
from .local import html_to_text

KEY_ENV = "SERPER_API_KEY"
SERPER_URL = "https://google.serper.dev/search"
TIMEOUT = 10.0


class SerperBackend(SearchBackend):
    name = "serper"

    def __init__(self, api_key: str, url: str = SERPER_URL, timeout: float = TIMEOUT, gl: str = "cn",
                 hl: str = "zh-CN"):
        self.api_key, self.url, self.timeout, self.gl, self.hl = api_key, url, timeout, gl, hl

    @classmethod
    def from_env(cls) -> "SerperBackend":
        key = os.environ.get(KEY_ENV)
        if not key:
            raise ValueError(f"the serper search backend needs an API key in ${KEY_ENV}")
        return cls(key, url=os.environ.get("MEGREZ_SERPER_URL", SERPER_URL))

    def search(self, query: str, k: int) -> list[SearchResult]:
        params = urllib.parse.urlencode({"q": query, "gl": self.gl, "hl": self.hl, "sort": "date"})
        req = urllib.request.Request(f"{self.url}?{params}", data=b"{}", method="POST",
                                     headers={"X-API-KEY": self.api_key, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            data = json.loads(r.read().decode("utf-8"))
        return [SearchResult(item.get("title", ""), item["link"], item.get("snippet", ""), item.get("date"))
                for item in (data.get("organic") or [])[:k] if item.get("link")]

    def fetch(self, result: SearchResult) -> str:
        try:
            req = urllib.request.Request(result.link, headers={"User-Agent": "megrez-websearch/1"})
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read(4 << 20)
                charset = r.headers.get_content_charset() or "utf-8"
                kind = r.headers.get_content_type()
            text = raw.decode(charset, errors="replace")
            return html_to_text(text)[1] if "html" in kind else text
        except TimeoutError:
            from .prompts import PAGES_TIMED_OUT

            return PAGES_TIMED_OUT
        except (OSError, ValueError):
            return ""

    def fetch_all(self, results: list[SearchResult]) -> list[str]:
        """Pages in parallel, returned in the results' order (the citation order)."""
        if not results:
            return []
        with ThreadPoolExecutor(len(results)) as pool:
            return list(pool.map(self.fetch, results))
