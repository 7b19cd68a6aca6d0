"""The OpenAI tool-calling request fields (``tools``, ``tool_choice``, ``parallel_tool_calls``)
checked into one :class:`ToolSpec`. Errors are :class:`ToolError`, naming the field at fault."""
from __future__ import annotations

import re
from dataclasses import dataclass

NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_TOOLS = 128


class ToolError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class ToolSpec:
    functions: list[dict]        # OpenAI function objects: name, description, parameters
    choice: str = "auto"         # "auto" | "none" | "required" | "function" (one named function)
    name: str | None = None      # the function tool_choice names
    parallel: bool = True

    @property
    def offered(self) -> list[dict]:
        """The definitions the model is shown (none when it must not call)."""
        return [] if self.choice == "none" else self.functions

    @property
    def forced(self) -> list[dict]:
        """The functions a call is constrained to (empty when calling is optional)."""
        if self.choice == "required":
            return self.functions
        if self.choice == "function":
            return [f for f in self.functions if f["name"] == self.name]
        return []


def parse_tools(tools, tool_choice=None, parallel_tool_calls=None) -> ToolSpec | None:
    """None when the request has no tools (and no tool_choice that needs them)."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError("parallel_tool_calls", "expected true or false")
    functions = _functions(tools)
    choice, name = _choice(tool_choice, {f["name"] for f in functions})
    if not functions:
        return None
    return ToolSpec(functions, choice, name, True if parallel_tool_calls is None else parallel_tool_calls)


def _functions(tools) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError("tools", "expected an array of {type: 'function', function: {...}} objects")
    if len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"at most {MAX_TOOLS} tools are allowed (got {len(tools)})")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ToolError(where, "expected an object")
        if tool.get("type") != "function":
            raise ToolError(f"{where}.type", f"only 'function' tools are supported (got {tool.get('type')!r})")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function", "required: an object with name, description and parameters")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"{where}.function.name", "required: 1 to 64 letters, digits, '_', '-' or '.'")
        if name in seen:
            raise ToolError(f"{where}.function.name", f"{name!r} is defined twice")
        seen.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"{where}.function.description", "expected a string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters", "expected a JSON schema object")
        # "strict" is OpenAI's switch for schema-following; the model is not shown it.
        out.append({k: v for k, v in fn.items() if k != "strict"})
    return out


def _choice(tool_choice, names: set[str]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not names:
            raise ToolError("tool_choice", "'required' needs at least one tool in tools")
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ToolError("tool_choice.function.name", "required: the name of a function in tools")
        if name not in names:
            raise ToolError("tool_choice.function.name", f"{name!r} is not one of the tools")
        return "function", name
    raise ToolError("tool_choice", "expected 'auto', 'none', 'required' or "
                                   "{'type': 'function', 'function': {'name': ...}}")
