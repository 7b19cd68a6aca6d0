"""Train a byte-level BPE tokenizer with the Megrez special tokens and chat template on text
(.txt / .jsonl with "text") and chat (.jsonl with "messages") files.

    python -m scripts.train_tokenizer --text a.jsonl b.jsonl --chat chat.jsonl --vocab 8192 --out DIR
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megrez.tiny import tokenizer_files, train_tokenizer
from megrez.train.data import read_conversations, read_documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", nargs="+", default=[], help="pre-training files")
    ap.add_argument("--chat", nargs="*", default=[], help="chat .jsonl files")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=1024, help="model_max_length written to tokenizer_config")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    texts = read_documents(a.text) if a.text else []
    if a.chat:
        texts += [m["content"] for _, conv in read_conversations(a.chat) for m in conv if isinstance(m.get("content"), str)]
    tok = train_tokenizer(texts, a.vocab)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in tokenizer_files(tok, a.max_length).items():
        (out / name).write_text(content, encoding="utf-8")
    print(f"wrote a {tok.get_vocab_size()}-token tokenizer to {out}")


if __name__ == "__main__":
    main()
