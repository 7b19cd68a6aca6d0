"""IFEval's verifiable instructions, checked here (no NLTK, no language-detection model).

Instruction ids and keyword arguments are IFEval's (``google/IFEval``'s JSONL rows run as
they are), and each check follows the rule of the reference checkers (lm-eval's
``tasks/ifeval/instructions.py``). Where this implementation differs: sentences are split by
a regular expression instead of NLTK's punkt model; ``language:response_language`` and the
English-only case checks judge the script of the letters (Latin, Han, Cyrillic, ...) instead of
running ``langdetect``, so they cannot tell English from French; instruction ids not listed in
``CHECKS`` are refused by name rather than guessed.
"""
from __future__ import annotations

import json
import re
import unicodedata

RELATIONS = ("less than", "at least")


def _compare(count: int, relation: str, n: int) -> bool:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    return count < n if relation == "less than" else count >= n


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


_SENTENCE_END = re.compile(r"[.!?。！？]+[\"')\]”’]*(?=\s|$)|[。！？]+")
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "vs", "jr", "sr", "etc", "e.g", "i.e", "no", "prof"}


def split_sentences(text: str) -> list[str]:
    """Sentences end at . ! ? (or 。！？) followed by a space or the end, except after a common
    abbreviation or a single capital letter (an initial)."""
    parts, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        word = re.findall(r"([\w.]+)$", text[start:m.start()])
        if m.group().startswith(".") and word and (word[-1].lower() in ABBREVIATIONS
                                                   or (len(word[-1]) == 1 and word[-1].isupper())):
            continue
        piece = text[start:m.end()].strip()
        if piece:
            parts.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        parts.append(tail)
    return parts


SCRIPTS = {"zh": "CJK", "ja": ("CJK", "HIRAGANA", "KATAKANA"), "ko": "HANGUL", "ru": "CYRILLIC", "uk": "CYRILLIC",
           "bg": "CYRILLIC", "ar": "ARABIC", "fa": "ARABIC", "ur": "ARABIC", "hi": "DEVANAGARI", "mr": "DEVANAGARI",
           "ne": "DEVANAGARI", "th": "THAI", "he": "HEBREW", "el": "GREEK", "bn": "BENGALI", "ta": "TAMIL",
           "te": "TELUGU", "gu": "GUJARATI", "kn": "KANNADA", "pa": "GURMUKHI", "en": "LATIN"}


def script_share(text: str, language: str) -> float:
    want = SCRIPTS[language]
    want = (want,) if isinstance(want, str) else want
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    hits = sum(1 for c in letters if unicodedata.name(c, "").startswith(want))
    return hits / len(letters)


def _response_language(r, language):
    if language not in SCRIPTS:
        raise ValueError(f"language:response_language: cannot judge {language!r} without a language model "
                         f"(supported: {', '.join(sorted(SCRIPTS))})")
    return script_share(r, language) > 0.5


def _latin(r):
    return script_share(r, "en") > 0.5


def _paragraphs_divider(r, num_paragraphs):
    paragraphs = re.split(r"\s?\*\*\*\s?", r)
    n = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if i in (0, len(paragraphs) - 1):
                n -= 1
            else:
                return False
    return n == num_paragraphs


def _nth_paragraph_first_word(r, num_paragraphs, nth_paragraph, first_word):
    paragraphs = [p for p in re.split(r"\n\n", r)]
    n = sum(1 for p in paragraphs if p.strip())
    real = [p for p in paragraphs if p.strip()]
    if n != num_paragraphs or nth_paragraph > len(real):
        return False
    words = real[nth_paragraph - 1].strip().split()
    if not words:
        return False
    word = re.sub(r"^[\"'“‘(\[]+|[^\w]+$", "", words[0]).lower()
    return word == first_word.lower()


def _bullets(r, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.M)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.M)
    return len(stars) + len(dashes) == num_bullets


def _json(r):
    v = r.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON").removeprefix("```")
    v = v.removesuffix("```").strip()
    try:
        json.loads(v)
    except ValueError:
        return False
    return True


def _highlights(r, num_highlights):
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h.removeprefix("**").removesuffix("**").strip())
    return n >= num_highlights


def _sections(r, section_spliter, num_sections):
    parts = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", r)
    return len(parts) - 1 >= num_sections


def _postscript(r, postscript_marker):
    marker = postscript_marker.strip().lower()
    if marker == "p.p.s":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "p.s.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker) + r".*$"
    return bool(re.findall(pattern, r.lower(), flags=re.M))


def _two_responses(r):
    parts = r.split("******")
    valid = [p for i, p in enumerate(parts) if p.strip() or i in (0, len(parts) - 1)]
    real = [p.strip() for p in valid if p.strip()]
    return len(valid) == len(parts) and len(real) == 2 and real[0] != real[1]


CHECKS = {
    "punctuation:no_comma": lambda r: "," not in r,
    "change_case:english_lowercase": lambda r: r == r.lower() and _latin(r),
    "change_case:english_capital": lambda r: r == r.upper() and _latin(r),
    "change_case:capital_word_frequency": lambda r, capital_frequency, capital_relation: _compare(
        sum(1 for w in re.findall(r"\w+", r) if w.isupper()), capital_relation, capital_frequency),
    "length_constraints:number_words": lambda r, num_words, relation: _compare(count_words(r), relation, num_words),
    "length_constraints:number_sentences": lambda r, num_sentences, relation: _compare(
        len(split_sentences(r)), relation, num_sentences),
    "length_constraints:number_paragraphs": _paragraphs_divider,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:json_format": _json,
    "detectable_format:title": lambda r: any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r)),
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:constrained_response": lambda r: any(
        o in r for o in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_content:number_placeholders": lambda r, num_placeholders: len(re.findall(r"\[.*?\]", r))
    >= num_placeholders,
    "detectable_content:postscript": _postscript,
    "keywords:existence": lambda r, keywords: all(re.search(re.escape(k), r, flags=re.I) for k in keywords),
    "keywords:frequency": lambda r, keyword, frequency, relation: _compare(
        len(re.findall(re.escape(keyword), r, flags=re.I)), relation, frequency),
    "keywords:forbidden_words": lambda r, forbidden_words: not any(
        re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.I) for w in forbidden_words),
    "keywords:letter_frequency": lambda r, letter, let_frequency, let_relation: _compare(
        r.lower().count(letter.lower()), let_relation, let_frequency),
    "language:response_language": _response_language,
    "startend:end_checker": lambda r, end_phrase: r.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "combination:repeat_prompt": lambda r, prompt_to_repeat: r.strip().lower().startswith(
        prompt_to_repeat.strip().lower()),
    "combination:two_responses": _two_responses,
}


def check(instruction_id: str, response: str, kwargs: dict) -> bool:
    if instruction_id not in CHECKS:
        raise ValueError(f"unsupported instruction {instruction_id!r} (supported: {', '.join(sorted(CHECKS))})")
    args = {k: v for k, v in (kwargs or {}).items() if v is not None}
    if not response.strip():
        return False
    return bool(CHECKS[instruction_id](response, **args))


def loose_variants(response: str) -> list[str]:
    """IFEval's loose setting: also accept the response without its first and/or last line and
    without markdown asterisks."""
    lines = response.split("\n")
    first, last, both = "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()
    variants = [response, first, last, both]
    return variants + [v.replace("*", "") for v in variants]
