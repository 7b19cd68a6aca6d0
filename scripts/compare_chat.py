"""The bundled model's sample prompts (``scripts/export_shipped.CHAT_PROMPTS``) answered greedily by
two models, side by side, to check that a fine-tuned model does not regress at chat.

    python -m scripts.compare_chat src/megrez/assets/megrez2-tiny-chat runs-out/rl-arith/rl/final
"""
from __future__ import annotations

import argparse
import json

from megrez.engine import SamplingParams
from megrez.llm import LLM
from scripts.export_shipped import CHAT_PROMPTS


def answers(model: str, prompts: list[str]) -> list[dict]:
    llm = LLM(model, device="cpu", max_num_seqs=len(prompts))
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    [SamplingParams(max_tokens=80, temperature=0.0)] * len(prompts))
    return [{"text": o.text, "finish": o.finish_reason} for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--prompt", action="append", default=None, help="extra prompt (repeatable)")
    a = ap.parse_args()
    prompts = CHAT_PROMPTS + (a.prompt or [])
    before, after = answers(a.before, prompts), answers(a.after, prompts)
    for p, b, c in zip(prompts, before, after):
        print(json.dumps({"prompt": p, "before": b, "after": c, "same": b == c}, ensure_ascii=False))


if __name__ == "__main__":
    main()
