"""A search backend with no network: a folder of documents indexed into SQLite FTS5 with the
trigram tokenizer, which matches any substring of three characters or more, so Chinese text
needs no word segmenter. Queries are split into words (Latin) and overlapping character
trigrams (CJK runs); terms shorter than three characters are matched as substrings. Results
are ranked by BM25, ties broken by path, so the order (and the citation numbers) is stable.

    megrez index add docs/           # .txt / .md / .markdown / .html files, recursively
    megrez index search "北京 天气"
"""
from __future__ import annotations

import html
import os
import re
import sqlite3
from pathlib import Path

from .backend import SearchBackend, SearchResult

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm")
SNIPPET_CHARS = 200
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")
_WORD = re.compile(r"\w+", re.UNICODE)


def default_index_path() -> Path:
    cache = Path(os.environ.get("MEGREZ_CACHE", Path.home() / ".cache" / "megrez"))
    return cache / "search" / "index.sqlite"


def query_terms(query: str) -> tuple[list[str], list[str]]:
    """(terms of 3+ characters for the trigram index, shorter terms for substring matching)."""
    long_terms, short_terms = [], []
    for word in _WORD.findall(query.lower()):
        for part in re.split(f"({_CJK.pattern})", word):
            if not part:
                continue
            if _CJK.fullmatch(part) and len(part) > 3:
                long_terms += [part[i:i + 3] for i in range(len(part) - 2)]
            elif len(part) >= 3:
                long_terms.append(part)
            else:
                short_terms.append(part)
    dedup = lambda xs: list(dict.fromkeys(xs))  # noqa: E731
    return dedup(long_terms), dedup(short_terms)


def html_to_text(source: str) -> tuple[str | None, str]:
    """(title, visible text) of an HTML page, without scripts and styles."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.parts, self.title, self._skip, self._in_title = [], None, 0, False

        def handle_starttag(self, tag, attrs):
            if tag in ("script", "style", "noscript"):
                self._skip += 1
            elif tag == "title":
                self._in_title = True
            elif tag in ("p", "br", "div", "li", "h1", "h2", "h3", "h4", "tr", "section", "article"):
                self.parts.append("\n")

        def handle_endtag(self, tag):
            if tag in ("script", "style", "noscript"):
                self._skip = max(0, self._skip - 1)
            elif tag == "title":
                self._in_title = False

        def handle_data(self, data):
            if self._in_title:
                self.title = (self.title or "") + data
            elif not self._skip:
                self.parts.append(data)

    p = Text()
    p.feed(source)
    text = re.sub(r"[ \t]+", " ", html.unescape("".join(p.parts)))
    text = re.sub(r"\n\s*\n+", "\n\n", text).strip()
    return (p.title.strip() if p.title else None), text


def read_document(path: Path) -> tuple[str, str]:
    """(title, text): the first heading (or first line) of a text file, the HTML title, else the file name."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() in (".html", ".htm"):
        title, text = html_to_text(raw)
        return title or path.stem, text
    title = None
    for line in raw.splitlines():
        if line.strip():
            title = line.strip().lstrip("#").strip() if line.lstrip().startswith("#") else None
            break
    return title or path.stem, raw.strip()


class LocalIndex(SearchBackend):
    name = "local"

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ValueError(f"{self.path}: no search index here; build one with `megrez index add DIR`")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.db.execute("CREATE TABLE IF NOT EXISTS docs(id INTEGER PRIMARY KEY, path TEXT UNIQUE, title TEXT, "
                            "mtime REAL, body TEXT)")
            self.db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS docs_fts USING fts5(title, body, tokenize='trigram')")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a megrez search index ({e})") from None

    # ------------------------------------------------------------------------------ building
    def add(self, folder: str | os.PathLike, progress: bool = False) -> dict:
        """Index (or re-index, when changed) every document under ``folder``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a directory")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        counts = {"added": 0, "updated": 0, "unchanged": 0}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(files, desc="indexing", unit="file")
        with self.db:
            for f in bar if bar is not None else files:
                key, mtime = str(f.resolve()), f.stat().st_mtime
                row = self.db.execute("SELECT id, mtime FROM docs WHERE path = ?", (key,)).fetchone()
                if row is not None and row[1] == mtime:
                    counts["unchanged"] += 1
                    continue
                title, body = read_document(f)
                if row is not None:
                    self.db.execute("UPDATE docs SET title = ?, mtime = ?, body = ? WHERE id = ?",
                                    (title, mtime, body, row[0]))
                    self.db.execute("DELETE FROM docs_fts WHERE rowid = ?", (row[0],))
                    doc_id = row[0]
                    counts["updated"] += 1
                else:
                    doc_id = self.db.execute("INSERT INTO docs(path, title, mtime, body) VALUES (?, ?, ?, ?)",
                                             (key, title, mtime, body)).lastrowid
                    counts["added"] += 1
                self.db.execute("INSERT INTO docs_fts(rowid, title, body) VALUES (?, ?, ?)", (doc_id, title, body))
        counts["documents"] = self.db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
        return counts

    # ------------------------------------------------------------------------------ searching
    def search(self, query: str, k: int) -> list[SearchResult]:
        long_terms, short_terms = query_terms(query)
        scores: dict[int, float] = {}
        if long_terms:
            match = " OR ".join('"' + t.replace('"', '""') + '"' for t in long_terms)
            for doc_id, rank in self.db.execute("SELECT rowid, bm25(docs_fts) FROM docs_fts WHERE docs_fts MATCH ?",
                                                (match,)):
                scores[doc_id] = rank  # bm25(): lower is better
        for term in short_terms:  # under three characters: substring match, a fixed weight each
            like = "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            for (doc_id,) in self.db.execute("SELECT id FROM docs WHERE title LIKE ? ESCAPE '\\' OR body LIKE ? "
                                             "ESCAPE '\\'", (like, like)):
                scores[doc_id] = scores.get(doc_id, 0.0) - 1.0
        if not scores:
            return []
        rows = {r[0]: r[1:] for r in self.db.execute(
            f"SELECT id, path, title, body FROM docs WHERE id IN ({','.join('?' * len(scores))})", list(scores))}
        ranked = sorted(scores, key=lambda i: (scores[i], rows[i][0]))[:k]
        return [SearchResult(rows[i][1], Path(rows[i][0]).as_uri(), _snippet(rows[i][2])) for i in ranked]

    def fetch(self, result: SearchResult) -> str:
        """The indexed text of the document (what the search matched)."""
        path = result.link.removeprefix("file://")
        from urllib.parse import unquote

        row = self.db.execute("SELECT body FROM docs WHERE path = ?", (unquote(path),)).fetchone()
        return row[0] if row else ""

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]


def _snippet(body: str) -> str:
    text = " ".join(body.split())
    return text[:SNIPPET_CHARS]
