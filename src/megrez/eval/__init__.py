"""Evaluation on the engine: tasks with verified answers (arithmetic, maths via math-verify,
multiple choice, HumanEval in a sandbox, IFEval-style checks), accuracy with confidence
intervals, pass@k, per-item JSONL. Entry points: ``megrez eval`` and :func:`evaluate`."""
from .harness import EvalConfig, evaluate
from .tasks import TASKS, get_task

__all__ = ["EvalConfig", "TASKS", "evaluate", "get_task"]
