"""Arithmetic in the bundled model's chat format: "What is 7 × 5?" -> "7 × 5 = 35."

Questions are generated deterministically from a seed, with the phrasings of the shipped
model's SFT set (``scripts/make_chat_data.py``). ``split`` picks the seed stream: ``train``
and ``test`` never share a question string within one ``(ops, max_operand)`` setting when the
space is large enough; with small operands the space is small (10 x 10 facts per operation)
and fresh draws repeat facts, which the RL experiment in docs/training.md takes into account.
The answer is the last integer of the response; the reward is whether it equals the result.
"""
from __future__ import annotations

import random
import re

from .base import Example, Grade, Task, TaskError

SYMBOL = {"+": "+", "-": "-", "*": "×"}
WORD = {"+": "plus", "-": "minus", "*": "times"}
ZH = {"+": "加", "-": "减", "*": "乘以"}
SPLIT_SEEDS = {"train": 0, "test": 1}
INTEGER = re.compile(r"-?\d+")


def phrase(rng: random.Random, a: int, b: int, op: str, languages: str) -> str:
    sym = SYMBOL[op]
    if languages == "zh" or (languages == "en+zh" and rng.random() < 0.5):
        return rng.choice([f"{a}{ZH[op]}{b}等于多少？", f"{a}{ZH[op]}{b}等于几？", f"请计算{a}{sym}{b}。"])
    return rng.choice([f"What is {a} {WORD[op]} {b}?", f"What is {a} {sym} {b}?", f"Calculate {a} {sym} {b}.",
                       f"{a} {sym} {b} = ?"])


class Arithmetic(Task):
    name = "arithmetic"
    max_tokens = 24

    def __init__(self, split: str = "test", n: int = 500, ops: str = "+-*", max_operand: int = 9,
                 languages: str = "en", seed: int = 0):
        if split not in SPLIT_SEEDS:
            raise TaskError(f"arithmetic: split={split!r}: must be one of {', '.join(SPLIT_SEEDS)}")
        if not ops or set(ops) - set(SYMBOL):
            raise TaskError(f"arithmetic: ops={ops!r}: use a string of + - *")
        if languages not in ("en", "zh", "en+zh"):
            raise TaskError(f"arithmetic: languages={languages!r}: must be en, zh or en+zh")
        if n < 1 or max_operand < 0:
            raise TaskError("arithmetic: n must be positive and max_operand non-negative")
        self.split, self.n, self.ops, self.max_operand, self.languages, self.seed = \
            split, n, ops, max_operand, languages, seed

    def examples(self) -> list[Example]:
        rng = random.Random(f"arithmetic/{self.seed}/{SPLIT_SEEDS[self.split]}")
        out = []
        for i in range(self.n):
            op = rng.choice(self.ops)
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            if op == "-" and b > a:
                a, b = b, a  # non-negative results, as in the SFT set
            c = a + b if op == "+" else a - b if op == "-" else a * b
            out.append(Example(f"{self.split}-{i}", phrase(rng, a, b, op, self.languages), c,
                               {"a": a, "b": b, "op": op}))
        return out

    def grade(self, ex: Example, response: str) -> Grade:
        found = INTEGER.findall(response)
        value = int(found[-1]) if found else None
        return Grade(value == ex.target, extracted=value)

    def describe(self) -> dict:
        return {"task": self.name, "split": self.split, "n": self.n, "ops": self.ops,
                "max_operand": self.max_operand, "languages": self.languages, "seed": self.seed}
