"""``[citation:N]`` markers in an answer turned into links to the N-th source, while it streams:
a tail that may still grow into a marker is held back, so a marker is never split. Out-of-range
numbers link to the nearest source (first or last), as the model's web search does;
``[ citation:N]`` is accepted too."""
from __future__ import annotations

import re

from .backend import SearchResult

MARKER = re.compile(r"\[ ?citation:(\d+)\]")
_LONGEST = len("[ citation:99999]")


def link(n: int, sources: list[SearchResult], style: str) -> str:
    url = sources[min(max(n, 1), len(sources)) - 1].link
    if style == "html":
        return f' <a href="{url}" class="circle-link">{n}</a>'
    if style == "terminal":
        return f" \x1b]8;;{url}\x1b\\[{n}]\x1b]8;;\x1b\\"  # an OSC 8 hyperlink
    return f" [{n}]({url})"


def render(text: str, sources: list[SearchResult], style: str = "markdown") -> str:
    if not sources:
        return text
    return MARKER.sub(lambda m: link(int(m.group(1)), sources, style), text)


class CitationStream:
    """Feed answer deltas, get rendered deltas."""

    def __init__(self, sources: list[SearchResult], style: str = "markdown"):
        self.sources, self.style, self.held = sources, style, ""

    def feed(self, text: str) -> str:
        text = self.held + text
        cut = len(text)
        start = text.rfind("[")
        if start >= 0 and "]" not in text[start:] and len(text) - start < _LONGEST and \
                re.fullmatch(r"\[ ?(c(i(t(a(t(i(o(n(:\d*)?)?)?)?)?)?)?)?)?", text[start:]):
            cut = start
        self.held = text[cut:]
        return render(text[:cut], self.sources, self.style)

    def flush(self) -> str:
        out, self.held = render(self.held, self.sources, self.style), ""
        return out
