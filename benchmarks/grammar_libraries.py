"""Grammar engines for constrained decoding, compared on this project's tokenizers: xgrammar,
llguidance and outlines-core (whichever are installed).

    python benchmarks/grammar_libraries.py                         # bundled 8K tokenizer
    python benchmarks/grammar_libraries.py --vocab 32000           # a 32K byte-level BPE (the bench shape's vocab)

For each library and JSON schema it reports the time to prepare the tokenizer, the time to
compile the schema (caches off), and the time to compute the next-token mask at every token
of a valid document (walked token by token, each token checked against the mask), plus the
library's installed size and its runtime dependencies. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SCHEMAS = {
    "tool-arguments": (
        {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
         "required": ["city", "unit"], "additionalProperties": False},
        {"city": "Beijing 北京", "unit": "celsius", "days": 3}),
    "nested": (
        {"type": "object", "properties": {
            "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
            "customer": {"type": "object", "properties": {
                "name": {"type": "string"}, "email": {"type": "string"},
                "vip": {"type": "boolean"}}, "required": ["name", "vip"], "additionalProperties": False},
            "items": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
                "type": "object", "properties": {
                    "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["sku", "quantity", "price"], "additionalProperties": False}},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
         "required": ["order_id", "customer", "items", "note"], "additionalProperties": False},
        {"order_id": "ABC-123456", "customer": {"name": "张三 Zhang San", "vip": True},
         "items": [{"sku": "kbd-01", "quantity": 2, "price": 49.5, "tags": ["usb", "black"]},
                   {"sku": "mouse-7", "quantity": 1, "price": 19.99, "tags": []}],
         "note": "leave at the door, 谢谢"}),
}


def byte_vocab(tokenizer) -> tuple[list[str], dict[int, bytes], set[int]]:
    """Raw byte-level piece strings by id, their bytes, and the special token ids."""
    from megrez.server.protocol import _bytes_to_unicode

    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    hf = tokenizer.hf
    n = hf.get_vocab_size(with_added_tokens=True)
    special = set(hf.get_added_tokens_decoder())
    pieces, raw = [], {}
    for i in range(n):
        p = hf.id_to_token(i) or ""
        pieces.append(p)
        if i not in special:
            raw[i] = bytes(byte_of[c] for c in p)
    return pieces, raw, special


def walk(tokens, mask_fn, accept_fn) -> list[float]:
    times = []
    for t in tokens:
        start = time.perf_counter()
        allowed = mask_fn()
        times.append(time.perf_counter() - start)
        if not allowed(t):
            raise AssertionError(f"token {t} of a valid document was masked out")
        accept_fn(t)
    return times


def bit_allowed(mask_row):
    import torch

    def allowed(t):
        return bool((int(mask_row[t // 32]) >> (t % 32)) & 1) if mask_row.dtype == torch.int32 else bool(mask_row[t])
    return allowed


# ------------------------------------------------------------------------------ libraries
def run_llguidance(tokenizer, n_vocab, stop, docs):
    import llguidance as llg
    import torch

    t = time.perf_counter()
    lt = llg.LLTokenizer(tokenizer.hf.to_str(), n_vocab=n_vocab, eos_token=stop)
    prep = time.perf_counter() - t
    out = {}
    for name, (schema, instance, tokens) in docs.items():
        t = time.perf_counter()
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
        m = llg.LLMatcher(lt, grammar)
        compile_s = time.perf_counter() - t
        assert not m.is_error(), m.get_error()
        mask = torch.zeros((n_vocab + 31) // 32, dtype=torch.int32)

        def mask_fn():
            m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            return bit_allowed(mask)

        times = walk(tokens, mask_fn, lambda tok: m.consume_token(tok))
        assert m.is_accepting()
        out[name] = summary(compile_s, times)
    return prep, out


def run_xgrammar(tokenizer, n_vocab, stop, docs):
    import xgrammar as xgr

    pieces, _, _ = byte_vocab(tokenizer)
    pieces += [""] * (n_vocab - len(pieces))
    t = time.perf_counter()
    info = xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_LEVEL, vocab_size=n_vocab, stop_token_ids=stop)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    prep = time.perf_counter() - t
    out = {}
    for name, (schema, instance, tokens) in docs.items():
        t = time.perf_counter()
        cg = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        m = xgr.GrammarMatcher(cg)
        compile_s = time.perf_counter() - t
        mask = xgr.allocate_token_bitmask(1, n_vocab)

        def mask_fn():
            m.fill_next_token_bitmask(mask)
            return bit_allowed(mask[0])

        times = walk(tokens, mask_fn, lambda tok: m.accept_token(tok))
        out[name] = summary(compile_s, times)
    return prep, out


def run_outlines(tokenizer, n_vocab, stop, docs):
    import outlines_core as oc
    import torch

    _, raw, _ = byte_vocab(tokenizer)
    t = time.perf_counter()
    by_piece: dict[bytes, list[int]] = {}
    for i, b in raw.items():
        by_piece.setdefault(b, []).append(i)
    vocab = oc.Vocabulary(stop[0], by_piece)
    prep = time.perf_counter() - t
    out = {}
    for name, (schema, instance, tokens) in docs.items():
        t = time.perf_counter()
        regex = oc.json_schema.build_regex_from_schema(json.dumps(schema), "")
        index = oc.Index(regex, vocab)
        guide = oc.Guide(index)
        compile_s = time.perf_counter() - t
        mask = torch.zeros((n_vocab + 31) // 32, dtype=torch.int32)

        def mask_fn():
            guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
            return bit_allowed(mask)

        times = walk(tokens, mask_fn, lambda tok: guide.advance(tok))
        out[name] = summary(compile_s, times)
    return prep, out


def summary(compile_s, times) -> dict:
    times = sorted(times)
    return {"compile_ms": compile_s * 1e3, "tokens": len(times), "mask_us_mean": statistics.mean(times) * 1e6,
            "mask_us_p50": times[len(times) // 2] * 1e6, "mask_us_max": times[-1] * 1e6}


LIBRARIES = {"llguidance": ("llguidance", run_llguidance), "xgrammar": ("xgrammar", run_xgrammar),
             "outlines-core": ("outlines_core", run_outlines)}


def _requirements(d) -> list[str]:
    return [r.split(";")[0].strip() for r in d.requires or [] if "extra ==" not in r]


def _name(requirement: str) -> str:
    import re
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def installed(dist: str) -> dict:
    """Installed size of the distribution, and with the dependencies it pulls in beyond what
    megrez already needs (torch, numpy, tokenizers, ...)."""
    d = md.distribution(dist)
    size = sum(f.size or 0 for f in d.files or [])
    reqs = _requirements(d)
    ours = {"torch", "numpy", "tokenizers", "safetensors", "jinja2", "huggingface-hub", "tqdm"}
    seen, stack, extra = set(), [_name(r) for r in reqs], 0
    while stack:
        name = stack.pop()
        if name in seen or name in ours:
            continue
        seen.add(name)
        try:
            dep = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        extra += sum(f.size or 0 for f in dep.files or [])
        stack += [_name(r) for r in _requirements(dep)]
    return {"version": d.version, "installed_mb": size / 2 ** 20, "with_new_deps_mb": (size + extra) / 2 ** 20,
            "requires": reqs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(REPO / "src/megrez/assets/megrez2-tiny-chat"))
    ap.add_argument("--vocab", type=int, default=None,
                    help="train a byte-level BPE of this size on Python's own sources instead")
    ap.add_argument("--repeat", type=int, default=3, help="runs per library (the fastest is kept)")
    a = ap.parse_args()

    from megrez.tokenizer import Tokenizer

    if a.vocab:
        from tempfile import mkdtemp

        from megrez.tiny import tokenizer_files, train_tokenizer
        stdlib = Path(json.__file__).parents[1]
        texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))]
        out = Path(mkdtemp())
        for name, content in tokenizer_files(train_tokenizer(texts, a.vocab), 4096).items():
            (out / name).write_text(content, encoding="utf-8")
        a.tokenizer = str(out)
    tokenizer = Tokenizer(a.tokenizer)
    n_vocab = tokenizer.vocab_size
    stop = sorted(tokenizer.stop_token_ids)
    docs = {name: (schema, inst, tokenizer.encode(json.dumps(inst, ensure_ascii=False, separators=(",", ":")),
                                                  add_special_tokens=False))
            for name, (schema, inst) in SCHEMAS.items()}
    print(f"tokenizer: {n_vocab} tokens; documents: "
          + ", ".join(f"{k} {len(v[2])} tokens" for k, v in docs.items()))
    results = {}
    for lib, (module, fn) in LIBRARIES.items():
        try:
            __import__(module)
        except ImportError:
            print(f"{lib}: not installed")
            continue
        best = None
        for _ in range(a.repeat):
            try:
                prep, per = fn(tokenizer, n_vocab, stop, docs)
            except Exception as e:  # a library that cannot run a case is reported, not fatal
                best = {"error": f"{type(e).__name__}: {e}"}
                break
            if best is None or sum(r["mask_us_mean"] for r in per.values()) < \
                    sum(r["mask_us_mean"] for r in best["schemas"].values()):
                best = {"tokenizer_prep_ms": prep * 1e3, "schemas": per}
        results[lib] = {**installed(lib), **best}
    print(f"{'library':14s} {'version':9s} {'MB':>6s} {'+deps MB':>8s} {'prep ms':>8s} | "
          + " | ".join(f"{k}: compile ms, mask us mean/p50/max" for k in SCHEMAS))
    for lib, r in results.items():
        if "error" in r:
            print(f"{lib:14s} {r['version']:9s} {r['installed_mb']:6.1f} error: {r['error']}")
            continue
        cells = " | ".join(f"{s['compile_ms']:8.1f}, {s['mask_us_mean']:7.1f}/{s['mask_us_p50']:7.1f}/"
                           f"{s['mask_us_max']:8.1f}" for s in r["schemas"].values())
        print(f"{lib:14s} {r['version']:9s} {r['installed_mb']:6.1f} {r['with_new_deps_mb']:8.1f} "
              f"{r['tokenizer_prep_ms']:8.1f} | {cells}")
        print(f"{'':14s} requires: {', '.join(r['requires']) or 'nothing'}")
    print(json.dumps({"vocab": n_vocab, "date": time.strftime("%Y-%m-%d"), "results": results}))


if __name__ == "__main__":
    main()
