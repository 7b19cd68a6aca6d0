"""Multiple choice with the model card's convention: the model answers with a JSON object whose
``"answer"`` field holds the letter only, e.g. ``{"answer": "B"}``.

Grading reads the last JSON object with an ``answer`` key in the response (a fenced
```json block or inline); anything else counts as no answer (``answered`` in the summary
says how often that happened). ``lenient=true`` also accepts a bare final "The answer is (B)"
or a lone letter, for models that were not trained on the convention.

Data: JSONL with ``question``, ``choices`` (a list) and ``answer`` (a letter or a 0-based
index). ``mmlu-dev`` reads the MMLU dev questions (5 per subject, 57 subjects) from lm-eval's
flan chain-of-thought prompt file.
"""
from __future__ import annotations

import json
import re

from .base import Example, Grade, Task, TaskError, field_of, read_jsonl
from .packaged import package_file

LETTERS = "ABCDEFGHIJ"
INSTRUCTION = ('Answer with a JSON object whose "answer" field is the letter of the correct choice only, '
               'for example {"answer": "A"}.')
JSON_ANSWER = re.compile(r"\{[^{}]*\"answer\"[^{}]*\}", re.S)


def format_question(question: str, choices: list[str]) -> str:
    return question.strip() + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def extract_letter(response: str, n_choices: int, lenient: bool = False) -> str | None:
    valid = LETTERS[:n_choices]
    for m in reversed(JSON_ANSWER.findall(response)):
        try:
            value = json.loads(m).get("answer")
        except json.JSONDecodeError:
            value = re.search(r"\"answer\"\s*:\s*\"?([A-J])", m)
            value = value.group(1) if value else None
        if isinstance(value, str) and value.strip().strip("()").upper() in valid and value.strip():
            return value.strip().strip("()").upper()
    if lenient:
        m = re.findall(rf"answer is \(?([{valid}])\)?", response) or re.findall(rf"^\s*\(?([{valid}])\)?\s*$",
                                                                                response, re.M)
        if m:
            return m[-1]
    return None


class MultipleChoice(Task):
    name = "multiple-choice"
    max_tokens = 512

    def __init__(self, data: str | None = None, lenient: bool = False, instruction: str = INSTRUCTION):
        if not data and type(self) is MultipleChoice:
            raise TaskError("multiple-choice: give the questions as JSONL: --task-option data=FILE.jsonl")
        self.data, self.lenient, self.instruction = data, _bool(lenient), instruction

    def examples(self) -> list[Example]:
        out = []
        for lineno, obj in read_jsonl(self.data):
            where = f"{self.data}:{lineno}"
            q = field_of(obj, ("question",), where)
            choices = field_of(obj, ("choices", "options"), where, list)
            if not 2 <= len(choices) <= len(LETTERS):
                raise TaskError(f"{where}: 'choices' must hold 2 to {len(LETTERS)} options, got {len(choices)}")
            ans = obj.get("answer")
            if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(choices):
                ans = LETTERS[ans]
            if not (isinstance(ans, str) and ans in LETTERS[:len(choices)]):
                raise TaskError(f"{where}: 'answer' must be a letter A-{LETTERS[len(choices) - 1]} or an index, "
                                f"got {ans!r}")
            out.append(Example(str(obj.get("id", lineno)), q, ans, {"choices": [str(c) for c in choices],
                                                                   "subject": obj.get("subject")}))
        return out

    def messages(self, ex: Example) -> list[dict]:
        return [{"role": "user", "content": f"{format_question(ex.question, ex.meta['choices'])}\n{self.instruction}"}]

    def raw_prompt(self, ex: Example) -> str:
        return f"{format_question(ex.question, ex.meta['choices'])}\n{self.instruction}\nAnswer:"

    def grade(self, ex: Example, response: str) -> Grade:
        letter = extract_letter(response, len(ex.meta["choices"]), self.lenient)
        return Grade(letter == ex.target, extracted=letter)

    def describe(self) -> dict:
        return {"task": self.name, "data": str(self.data), "lenient": self.lenient}


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def parse_flan_cot(text: str, subject: str, where: str) -> list[dict]:
    """The "Q: ... (A) .. (B) .. A: ... The answer is (X)." blocks of lm-eval's flan CoT prompts."""
    out = []
    for n, block in enumerate(text.split("\n\nQ: ")[1:]):
        if "\nA: " not in block:
            raise TaskError(f"{where}: {subject} question {n} has no answer part")
        q, a = block.split("\nA: ", 1)
        lines = q.split("\n")
        opts = [i for i, line in enumerate(lines) if line.startswith("(A) ")]
        if not opts:
            raise TaskError(f"{where}: {subject} question {n} has no '(A) ...' choices line")
        choice_text = "\n".join(lines[opts[-1]:])
        parts = re.split(r"\s*\(([A-J])\)\s", " " + choice_text)
        choices = [parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)]
        answer = re.findall(r"The answer is \(([A-J])\)", a)
        if len(choices) < 2 or not answer:
            raise TaskError(f"{where}: cannot parse {subject} question {n}")
        out.append({"question": "\n".join(lines[:opts[-1]]).strip(), "choices": choices, "answer": answer[-1],
                    "subject": subject, "id": f"{subject}-{n}"})
    return out


class MMLUDev(MultipleChoice):
    name = "mmlu-dev"

    def examples(self) -> list[Example]:
        path = package_file("lm_eval", "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json")
        prompts = json.loads(path.read_text(encoding="utf-8"))
        out = []
        for subject in sorted(prompts):
            for q in parse_flan_cot(prompts[subject], subject, str(path)):
                out.append(Example(q["id"], q["question"], q["answer"], {"choices": q["choices"], "subject": subject}))
        return out

    def describe(self) -> dict:
        return {"task": self.name, "data": "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json",
                "lenient": self.lenient}
