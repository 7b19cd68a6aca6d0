"""Run a task against a backend and score it.

    megrez eval --task arithmetic --model DIR --samples 1 --out results/
    megrez eval --task humaneval --url http://127.0.0.1:8000 --samples 10 --temperature 0.8 --pass-k 1 10

Every example gets ``samples`` answers (each with its own seed derived from ``seed``, the
example and the sample number, so a run is reproducible and independent of batching). The
summary has accuracy with a confidence interval (Wilson for one sample per example, a normal
interval over examples otherwise), the standard error, pass@k for k <= samples, the task's own
extra metrics, token counts and timings; ``OUT/<task>.jsonl`` has one line per answer.
"""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..engine import SamplingParams
from .backends import Generation, GenRequest
from .metrics import mean_interval, summarize
from .tasks import Task, TaskError, get_task


@dataclass
class EvalConfig:
    task: str = "arithmetic"
    task_options: dict = field(default_factory=dict)
    samples: int = 1
    temperature: float | None = None      # None: the task's default (greedy for most)
    top_p: float = 1.0
    max_tokens: int | None = None          # None: the task's default
    template: str = "chat"                 # chat | raw
    system: str | None = None
    limit: int | None = None
    seed: int = 0
    pass_k: tuple[int, ...] = (1,)
    confidence: float = 0.95
    out: str | None = None
    progress: bool = True
    workers: int = 4                        # parallel graders for tasks that run code


def sample_seed(seed: int, example_id: str, k: int) -> int:
    h = hashlib.sha256(f"{seed}/{example_id}/{k}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def build_requests(task: Task, examples, cfg: EvalConfig) -> list[GenRequest]:
    if cfg.template not in ("chat", "raw"):
        raise TaskError(f"template={cfg.template!r}: must be chat or raw")
    temperature = task.temperature if cfg.temperature is None else cfg.temperature
    max_tokens = cfg.max_tokens or task.max_tokens
    reqs = []
    for ex in examples:
        for k in range(cfg.samples):
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=cfg.top_p, top_k=0,
                                    repetition_penalty=1.0, seed=sample_seed(cfg.seed, ex.id, k))
            if cfg.template == "chat":
                msgs = task.messages(ex)
                if cfg.system:
                    msgs = [{"role": "system", "content": cfg.system}] + msgs
                reqs.append(GenRequest(messages=msgs, params=params))
            else:
                params.stop = list(task.stop)
                reqs.append(GenRequest(text=task.raw_prompt(ex), params=params))
    return reqs


def grade_all(task: Task, examples, gens: list[Generation], cfg: EvalConfig):
    pairs = [(ex, gens[i * cfg.samples + k]) for i, ex in enumerate(examples) for k in range(cfg.samples)]
    if getattr(task, "parallel_grading", False):
        # Code runs in sandbox subprocesses: grade several at once.
        with ThreadPoolExecutor(cfg.workers) as pool:
            return list(pool.map(lambda p: task.grade(p[0], p[1].text), pairs))
    return [task.grade(ex, g.text) for ex, g in pairs]  # math-verify's timeouts need the main thread


def evaluate(backend, cfg: EvalConfig, task: Task | None = None) -> dict:
    task = task or get_task(cfg.task, **cfg.task_options)
    examples = task.examples()
    if cfg.limit:
        examples = examples[: cfg.limit]
    if cfg.samples < 1:
        raise TaskError("samples must be at least 1")
    reqs = build_requests(task, examples, cfg)
    t0 = time.perf_counter()
    gens = backend.generate(reqs, progress=cfg.progress, desc=task.name)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    grades = grade_all(task, examples, gens, cfg)
    t_grade = time.perf_counter() - t0

    per_item = [[grades[i * cfg.samples + k].score for k in range(cfg.samples)] for i in range(len(examples))]
    correct = [[float(grades[i * cfg.samples + k].correct) for k in range(cfg.samples)] for i in range(len(examples))]
    summary = {**task.describe(), "backend": backend.name, "template": cfg.template, "samples_per_item": cfg.samples,
               "temperature": reqs[0].params.temperature if reqs else None, "seed": cfg.seed}
    summary.update(summarize(correct, tuple(cfg.pass_k), cfg.confidence))
    if any(g.score != float(g.correct) for g in grades):
        m, lo, hi = mean_interval([sum(s) / len(s) for s in per_item], cfg.confidence)
        summary.update(score=m, score_ci=[lo, hi])
    for key in task.metric_keys:
        vals = [g.detail[key] for g in grades if key in g.detail]
        if vals:
            flat = [float(x) for v in vals for x in (v if isinstance(v, list) else [v])]
            m, lo, hi = mean_interval(flat, cfg.confidence)
            summary[key] = m
            summary[f"{key}_ci"] = [lo, hi]
    n_tokens = sum(g.completion_tokens for g in gens)
    summary.update(answered=sum(1 for g in grades if g.extracted is not None) / max(len(grades), 1),
                   completion_tokens=n_tokens, generation_seconds=round(t_gen, 3),
                   grading_seconds=round(t_grade, 3), tokens_per_second=round(n_tokens / max(t_gen, 1e-9), 1),
                   finish_reasons=_count(g.finish_reason for g in gens))
    if cfg.out:
        write_results(Path(cfg.out), task, examples, reqs, gens, grades, summary, cfg)
    return summary


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def write_results(out: Path, task, examples, reqs, gens, grades, summary, cfg: EvalConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task.name}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            for k in range(cfg.samples):
                j = i * cfg.samples + k
                g, r = grades[j], reqs[j]
                f.write(json.dumps({"id": ex.id, "sample": k, "prompt": r.messages if r.messages is not None else r.text,
                                    "response": gens[j].text, "target": _jsonable(ex.target),
                                    "extracted": _jsonable(g.extracted), "correct": g.correct, "score": g.score,
                                    "finish_reason": gens[j].finish_reason, "tokens": gens[j].completion_tokens,
                                    "seed": r.params.seed, **({"detail": g.detail} if g.detail else {})},
                                   ensure_ascii=False) + "\n")
    tmp.replace(path)
    (out / f"{task.name}.summary.json").write_text(json.dumps({**summary, "config": _jsonable(asdict(cfg))},
                                                              indent=2, ensure_ascii=False) + "\n")


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return str(x)
