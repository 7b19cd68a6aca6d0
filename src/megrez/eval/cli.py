"""``megrez eval``: score a model on tasks with verifiable answers.

    megrez eval --task arithmetic --task-option ops=* --model DIR --out results/
    megrez eval --task humaneval --samples 10 --temperature 0.8 --pass-k 1 10 --model DIR
    megrez eval --task mmlu-dev --url http://127.0.0.1:8000 --api-key sk-local     (any OpenAI-compatible server)
    megrez eval --list

Several ``--task`` flags run one after another on the same loaded model. Prints one JSON line
per task (accuracy with its confidence interval, pass@k, timings); ``--out DIR`` also writes
``DIR/<task>.jsonl`` (one line per answer) and ``DIR/<task>.summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--task-option {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a plain string (a path, "+-*")
    return out


def cmd_eval(a) -> int:
    from .harness import EvalConfig, evaluate
    from .tasks import TASKS

    if a.list:
        for name, (_, _, text) in TASKS.items():
            print(f"{name:16s} {text}")
        return 0
    if not a.task:
        raise ValueError("give at least one --task (see megrez eval --list)")
    options = parse_options(a.task_option)
    if a.url:
        from .backends import OpenAIBackend

        backend = OpenAIBackend(a.url, a.served_model, a.api_key, concurrency=a.concurrency)
    else:
        from ..cli import make_llm
        from .backends import EngineBackend

        backend = EngineBackend.from_llm(make_llm(a, max_num_seqs=a.max_num_seqs))
    for task in a.task:
        cfg = EvalConfig(task=task, task_options=options, samples=a.samples, temperature=a.temperature,
                         top_p=a.top_p, max_tokens=a.max_tokens, template=a.template, system=a.system, limit=a.limit,
                         seed=a.seed, pass_k=tuple(a.pass_k), out=a.out, progress=not a.no_progress,
                         workers=a.workers)
        summary = evaluate(backend, cfg)
        summary["model"] = a.url or a.model or "bundled"
        sys.stdout.write(json.dumps(summary, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return 0


def register(subparsers) -> None:
    from ..cli import add_model_args

    p = subparsers.add_parser("eval", help="evaluate a model on tasks with verifiable answers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("tasks")
    g.add_argument("--task", action="append", default=[], help="task name (repeatable; see --list)")
    g.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. data=FILE.jsonl, n=500, ops=*, split=test (repeatable)")
    g.add_argument("--list", action="store_true", help="list the tasks and exit")
    g.add_argument("--limit", type=int, default=None, help="only the first N examples")
    g.add_argument("--samples", type=int, default=1, help="answers per example (for pass@k)")
    g.add_argument("--pass-k", type=int, nargs="+", default=[1], help="k values of pass@k (<= samples)")
    g.add_argument("--template", default="chat", choices=["chat", "raw"],
                   help="chat: the checkpoint's chat template (default); raw: plain completion of the prompt")
    g.add_argument("--system", default=None, help="system message (chat template)")
    g.add_argument("--temperature", type=float, default=None, help="default: the task's (0 = greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0, off)")
    g.add_argument("--max-tokens", type=int, default=None, help="default: the task's budget")
    g.add_argument("--seed", type=int, default=0, help="seeds every answer (reproducible, batch-independent)")
    g.add_argument("--out", default=None, help="directory for per-answer JSONL and the summary")
    g.add_argument("--workers", type=int, default=4, help="parallel sandboxed graders (code tasks)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("server (instead of --model)")
    s.add_argument("--url", default=None, help="base URL of an OpenAI-compatible server")
    s.add_argument("--served-model", default=None, help="model name on the server (default: its first)")
    s.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    s.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    add_model_args(p)
    p.add_argument("--max-num-seqs", type=int, default=32, help="engine batch (continuous batching)")
    p.set_defaults(func=cmd_eval)
