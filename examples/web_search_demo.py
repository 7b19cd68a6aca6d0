"""The web-search loop end to end, offline: the bundled model, the local index over the demo
documents that ship with megrez, and the whole model-side transcript printed turn by turn.

    python examples/web_search_demo.py "北京今天天气怎么样？"
    python examples/web_search_demo.py --model DIR --mode auto "..."     # a real Megrez-3B-Instruct decides itself

``--mode always`` (the default here) makes the first generation a search call whose query the
model writes; the bundled 9.9M-parameter model was never trained to search on its own.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question", nargs="+")
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--docs", default=str(REPO / "src/megrez/assets/search-demo"))
    ap.add_argument("--mode", default="always", choices=["auto", "always"])
    ap.add_argument("--pages", type=int, default=3)
    ap.add_argument("--now", default="2025-01-06 09:30:05", help="the clock of the system prompt")
    a = ap.parse_args()

    from megrez.llm import LLM
    from megrez.search import LLMSearchModel, LocalIndex, SearchConfig, WebSearchAgent

    index = LocalIndex(Path(tempfile.mkdtemp()) / "demo.sqlite")
    print(f"# index: {index.add(a.docs)}")
    llm = LLM(a.model)
    now = datetime.strptime(a.now, "%Y-%m-%d %H:%M:%S")
    config = SearchConfig(pages=a.pages).fitted(llm.engine.max_model_len)
    agent = WebSearchAgent(LLMSearchModel(llm), index, config, clock=lambda: now, force_search=a.mode == "always")
    print(f"# model: {llm.path}; budgets for a {llm.engine.max_model_len}-token context: {config}")
    for question in a.question:
        start = len(agent.history)
        print(f"\n## user: {question}\n")
        answer = []
        for event in agent.ask(question):
            if event.kind == "call":
                print(f"[search call] query = {event.value!r}")
            elif event.kind == "sources":
                for i, r in enumerate(event.value, 1):
                    print(f"[source {i}] {r.title} <{r.link}>")
            elif event.kind == "summaries":
                for i, s in enumerate(event.value, 1):
                    print(f"[summary {i}] {s!r}")
            elif event.kind == "text":
                answer.append(event.value)
        print(f"\n[answer, citations as links]\n{''.join(answer)}")
        print("\n[model-side turns of this question, raw]")
        for m in agent.history[start:]:
            print(f"<|role_start|>{m['role']}<|role_end|>{m['content']}<|turn_end|>")


if __name__ == "__main__":
    main()
