"""Maths with verified answers: GSM8K-style (a number) and MATH-style (a LaTeX expression)
problems, answers checked by ``math-verify`` (symbolic equivalence, not string equality).

The prompt follows the model card's best practice: the problem, then "Please reason step by
step, and put your final answer within \\boxed{}." The answer is taken from the response's
last ``\\boxed{}`` (math-verify's extraction, which also reads plain final numbers and
``$...$`` expressions when there is no box).

Data: JSONL with ``question`` (or ``problem``) and ``answer`` (GSM8K: a solution ending in
``#### 72``; or just the final answer) or ``solution`` (MATH: the worked solution with a
``\\boxed{}`` answer). ``gsm8k-sample`` reads the eight GSM8K chain-of-thought exemplars that
lm-eval ships in its task files (the only GSM8K text available offline).
"""
from __future__ import annotations

import re
import threading

from .base import Example, Grade, Task, TaskError, field_of, read_jsonl
from .packaged import package_file

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise TaskError("maths grading needs math-verify (pip install 'math-verify>=0.9' or megrez[eval])") from None
    return math_verify


def gold_answer(obj: dict, where: str) -> str:
    if "solution" in obj:
        return field_of(obj, ("solution",), where)
    answer = obj.get("answer")
    if isinstance(answer, (int, float)):
        return str(answer)
    answer = field_of(obj, ("answer",), where)
    return answer.split("####")[-1].strip().replace(",", "") if "####" in answer else answer


class Math(Task):
    name = "math"
    max_tokens = 1024

    def __init__(self, data: str | None = None, instruction: str = INSTRUCTION):
        if not data:
            raise TaskError("math: give the problems as a JSONL file: --task-option data=FILE.jsonl")
        self.data, self.instruction = data, instruction

    def load(self) -> list[Example]:
        out = []
        for lineno, obj in read_jsonl(self.data):
            where = f"{self.data}:{lineno}"
            q = field_of(obj, ("question", "problem"), where)
            out.append(Example(str(obj.get("id", lineno)), q, gold_answer(obj, where)))
        return out

    def examples(self) -> list[Example]:
        return self.load()

    def messages(self, ex: Example) -> list[dict]:
        return [{"role": "user", "content": f"{ex.question}\n{self.instruction}"}]

    def raw_prompt(self, ex: Example) -> str:
        return f"Problem: {ex.question}\n{self.instruction}\nSolution:"

    def grade(self, ex: Example, response: str) -> Grade:
        mv = _math_verify()
        # math-verify times out with signal.alarm, which only works in the main thread.
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        gold_text = ex.target if "\\boxed" in ex.target or "$" in ex.target else f"${ex.target}$"
        gold = mv.parse(gold_text, parsing_timeout=timeout)
        pred = mv.parse(response, parsing_timeout=timeout)
        ok = bool(gold) and bool(pred) and mv.verify(gold, pred, timeout_seconds=timeout)
        return Grade(ok, extracted=str(pred[-1]) if pred else None, detail={"gold": str(gold[-1]) if gold else None})

    def describe(self) -> dict:
        return {"task": self.name, "data": str(self.data)}


class GSM8KSample(Math):
    name = "gsm8k-sample"
    max_tokens = 512

    def __init__(self, instruction: str = INSTRUCTION):
        self.data, self.instruction = None, instruction

    def examples(self) -> list[Example]:
        import yaml

        path = package_file("lm_eval", "tasks/gsm8k/gsm8k-cot.yaml")
        text = path.read_text(encoding="utf-8")
        # The file has custom !function tags further down; only the exemplars are needed.
        block = text[text.index("fewshot_config:"):text.index("filter_list:")]
        samples = yaml.safe_load(block)["fewshot_config"]["samples"]
        out = []
        for i, s in enumerate(samples):
            answer = re.findall(r"The answer is (-?[\d.,]+)", s["target"])
            if not answer:
                raise TaskError(f"{path}: exemplar {i} has no 'The answer is N'")
            out.append(Example(f"gsm8k-cot-{i}", s["question"], answer[-1].rstrip(".").replace(",", "")))
        return out

    def describe(self) -> dict:
        return {"task": self.name, "data": "lm_eval/tasks/gsm8k/gsm8k-cot.yaml (8 exemplars)"}
