"""The task protocol: a task owns its data, how a prompt is written, how an answer is graded,
and the reward RL trains on (the grade, so evaluation and training can never disagree).

    task = get_task("arithmetic", split="test")
    for ex in task.examples():
        messages = task.messages(ex)               # chat rendering (the default)
        grade = task.grade(ex, response_text)      # Grade(correct, score, extracted, ...)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TaskError(ValueError):
    """Task data or options cannot be used; the message names the file, line or option."""


@dataclass
class Example:
    id: str
    question: str            # the user-facing text the prompt is built from
    target: Any              # what grading compares against
    meta: dict = field(default_factory=dict)


@dataclass
class Grade:
    correct: bool
    score: float | None = None       # defaults to 1.0 / 0.0 from ``correct``
    extracted: Any = None            # the answer found in the response, None if none
    detail: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.score is None:
            self.score = 1.0 if self.correct else 0.0


class Task:
    name = "task"
    max_tokens = 256                 # generation budget per answer
    stop: tuple[str, ...] = ()       # extra stop strings (raw prompts); chat turns end at <|turn_end|>
    temperature = 0.0                # default decoding for evaluation
    metric_keys: tuple[str, ...] = ()  # extra per-item scores (from Grade.detail) to aggregate

    def examples(self) -> list[Example]:
        raise NotImplementedError

    def messages(self, ex: Example) -> list[dict]:
        """The conversation sent to a chat model."""
        return [{"role": "user", "content": ex.question}]

    def raw_prompt(self, ex: Example) -> str:
        """The prompt for plain completion (no chat template)."""
        return ex.question

    def grade(self, ex: Example, response: str) -> Grade:
        raise NotImplementedError

    def reward(self, ex: Example, response: str) -> float:
        """Binary verified reward: 1 for a verified-correct answer, 0 otherwise."""
        return 1.0 if self.grade(ex, response).correct else 0.0

    def describe(self) -> dict:
        return {"task": self.name}


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    rows = []
    opener = __import__("gzip").open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise TaskError(f"{path}: no examples")
    return rows


def field_of(obj: dict, names: tuple[str, ...], where: str, kind=str):
    for name in names:
        if name in obj:
            value = obj[name]
            if not isinstance(value, kind):
                raise TaskError(f"{where}: field {name!r} must be {getattr(kind, '__name__', kind)}, "
                                f"got {type(value).__name__}")
            return value
    raise TaskError(f"{where}: missing field {' or '.join(map(repr, names))}")
