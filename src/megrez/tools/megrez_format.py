"""Megrez's own tool-use format (Megrez-3B-Instruct, as its web search was built): function
definitions in the system prompt, calls written between ``<|function_start|>`` and
``<|function_end|>`` as ``{"name": ..., "arguments": {...}}``, and results fed back in a turn
whose role is ``observation``. The strings are the protocol: they are byte-exact.
"""
from __future__ import annotations

import json
from datetime import datetime

FUNCTION_START, FUNCTION_END = "<|function_start|>", "<|function_end|>"
ROLE_PROMPT = "你是Megrez-3B-Instruct, 将针对用户的问题给出详细的、积极的回答."
TIME_PROMPT = "The current time is {current_time}, {weekday}."
FUNCTIONS_PROMPT = "You have access to the following functions. Use them if required -\n{functions}"
OBSERVATION_ROLE = "observation"
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def time_line(now: datetime) -> str:
    """Local time, no timezone, English weekday (as the model was trained)."""
    return TIME_PROMPT.format(current_time=now.strftime("%Y-%m-%d %H:%M:%S"), weekday=WEEKDAYS[now.weekday()])


def functions_text(functions: list[dict]) -> str:
    return "\n\n".join(json.dumps(f, ensure_ascii=False, indent=4) for f in functions)


def system_prompt(functions: list[dict] | None, now: datetime, role: str = ROLE_PROMPT) -> str:
    """The role line, the time line and, when there are functions, their definitions."""
    text = role + "\n" + time_line(now)
    if functions:
        text += "\n" + FUNCTIONS_PROMPT.format(functions=functions_text(functions))
    return text


def call_text(name: str, arguments) -> str:
    """One call as the model writes it (``arguments`` an object, json.dumps' default spacing)."""
    return FUNCTION_START + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + FUNCTION_END
