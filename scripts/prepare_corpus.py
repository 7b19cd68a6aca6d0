"""Build the public-domain pre-training corpus of the shipped model from Debian packages.

    apt-get install -y bible-kjv fortunes-zh
    python -m scripts.prepare_corpus --out runs-out/shipped/data

Writes ``kjv.jsonl`` (the King James Bible, one chapter per document), ``zh_poetry.jsonl``
(唐诗三百首 and 宋词一百首, one poem per document) and ``zh_classics.jsonl`` (entries of the
fortunes-zh ``chinese`` file attributed to classical works and pre-modern poets only: 论语,
道德经, 菜根谭, 增广贤文, 荀子, proverbs, classical poems), ``val.jsonl`` (held-out documents of all three) and ``SOURCES.md``.

Sources and licences: the KJV text (Debian ``bible-kjv-text``) is public domain (translated
1611); the poems and classical texts are centuries old and public domain; the fortunes-zh
packaging is GPL-3.0+, and no modern text from it is used.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
BOOKS = dict(zip(
    "Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa Prv Eccl SSol Isa Jer Lam "
    "Eze Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal Mat Mark Luke John Acts Rom 1Cor 2Cor Gal Eph "
    "Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev".split(),
    ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
     "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
     "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
     "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
     "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
     "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
     "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
     "1 John", "2 John", "3 John", "Jude", "Revelation"]))
CLASSIC_WORKS = ("论语", "道德经", "菜根谭", "增广贤文", "谚语", "荀子", "孟子", "庄子", "诗经")
EXTRA_POETS = set("辛弃疾 苏轼 李清照 温庭筠 李煜 张若虚 卓文君 佚名 罗隐 白居易 柳永 晏殊 欧阳修 陆游 岳飞 秦观 范仲淹 "
                  "王安石 纳兰性德 曹操 陶渊明 屈原 杜牧 李商隐 李白 杜甫 王维 孟浩然 王昌龄 韦庄 冯延巳 晏几道 "
                  "周邦彦 姜夔 贺铸 黄庭坚 文天祥 杨万里 朱熹 曹植 王勃 骆宾王 刘禹锡 元稹 韩愈 柳宗元".split())


def kjv_verses() -> list[tuple[str, int, int, str]]:
    """(book, chapter, verse, text) for every verse, from ``bible -f``."""
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=True).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\w+?)(\d+):(\d+) (.*)$", line.strip())
        if m:
            out.append((BOOKS[m.group(1)], int(m.group(2)), int(m.group(3)), m.group(4).strip()))
    if len(out) < 31000:
        raise SystemExit(f"expected ~31,102 verses from `bible`, got {len(out)}; is bible-kjv installed?")
    return out


def kjv_chapters(verses) -> list[str]:
    docs, key, lines = [], None, []
    for book, ch, v, text in verses:
        if (book, ch) != key:
            if lines:
                docs.append("\n".join(lines))
            key, lines = (book, ch), [f"{book} {ch}"]
        lines.append(f"{v} {text}")
    docs.append("\n".join(lines))
    return docs


def fortune_entries(name: str) -> list[str]:
    text = ANSI.sub("", (FORTUNES / name).read_text(encoding="utf-8"))
    return [e.strip() for e in text.split("\n%\n") if e.strip() and e.strip() != "%"]


def normalise_poem(entry: str) -> tuple[str, str, str] | None:
    """(title, author, body) of a tang300/song100 entry."""
    lines = [ln.strip() for ln in entry.splitlines() if ln.strip()]
    if len(lines) < 3:
        return None
    title = re.sub(r"^题目[:：]", "", lines[0]).strip()
    author = re.sub(r"^作者[:：]", "", lines[1]).strip()
    author = re.sub(r"（.*?）|\(.*?\)", "", author).strip()
    if not title.startswith("《"):
        title = f"《{title}》"
    return title, author, "\n".join(lines[2:])


def poems() -> list[tuple[str, str, str]]:
    out = []
    for name in ("tang300", "song100"):
        out += [p for p in map(normalise_poem, fortune_entries(name)) if p]
    return out


def classics(known_poets: set[str]) -> list[str]:
    """Entries of ``chinese`` whose attribution is a classical work or a pre-modern poet."""
    poets = known_poets | EXTRA_POETS
    docs = []
    for entry in fortune_entries("chinese"):
        lines = entry.splitlines()
        m = re.match(r"^\s*--\s*(.+)$", lines[-1])
        if not m:
            continue
        who = m.group(1).strip()
        poet = re.match(r"^(\S{1,4}?)《", who)
        if any(w in who for w in CLASSIC_WORKS) or (poet and poet.group(1) in poets):
            body = "\n".join(ln.strip() for ln in lines[:-1] if ln.strip())
            if body:
                docs.append(f"{body}\n——{who}")
    return docs


def write_jsonl(path: Path, docs: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs-out/shipped/data")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    verses = kjv_verses()
    chapters = kjv_chapters(verses)
    ps = poems()
    poem_docs = [f"{t}\n作者：{a_}\n{b}" for t, a_, b in ps]
    cl = classics({a_ for _, a_, _ in ps})
    # Every 100th chapter / 50th poem / 100th entry is held out for validation, so training
    # files can be repeated (to up-weight the small Chinese part) without leaking into it.
    val = chapters[50::100] + poem_docs[25::50] + cl[50::100]
    write_jsonl(out / "kjv.jsonl", [d for i, d in enumerate(chapters) if i % 100 != 50])
    write_jsonl(out / "zh_poetry.jsonl", [d for i, d in enumerate(poem_docs) if i % 50 != 25])
    write_jsonl(out / "zh_classics.jsonl", [d for i, d in enumerate(cl) if i % 100 != 50])
    write_jsonl(out / "val.jsonl", val)
    with open(out / "verses.jsonl", "w", encoding="utf-8") as f:  # for the SFT set
        for book, ch, v, text in verses:
            f.write(json.dumps({"ref": f"{book} {ch}:{v}", "text": text}) + "\n")
    with open(out / "poems.jsonl", "w", encoding="utf-8") as f:
        for t, a_, b in ps:
            f.write(json.dumps({"title": t, "author": a_, "body": b}, ensure_ascii=False) + "\n")
    (out / "SOURCES.md").write_text(
        "# Corpus sources\n\n"
        f"- kjv.jsonl: {len(chapters)} chapters ({len(verses)} verses) of the King James Bible, Debian package "
        "bible-kjv-text via `bible -f Gen1:1-Rev22:21`. Public domain (translation of 1611).\n"
        f"- zh_poetry.jsonl: {len(ps)} poems from 唐诗三百首 and 宋词一百首, Debian package fortunes-zh "
        "(files tang300, song100). The poems are public domain; the packaging is GPL-3.0+.\n"
        f"- zh_classics.jsonl: {len(cl)} entries of fortunes-zh's `chinese` file attributed to classical works "
        "(论语, 道德经, 菜根谭, 增广贤文, 荀子, proverbs) or pre-modern poets. Public domain.\n",
        encoding="utf-8")
    print(f"wrote {len(chapters)} chapters, {len(ps)} poems, {len(cl)} classical entries to {out}")


if __name__ == "__main__":
    main()
