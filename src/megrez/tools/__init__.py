"""OpenAI-style tool calling over Megrez's tool format: request fields (``spec``), the prompt
(``render``, ``megrez_format``) and the calls read back from the model's text (``parser``)."""
from .megrez_format import FUNCTION_END, FUNCTION_START, OBSERVATION_ROLE
from .parser import ToolCall, ToolCallParser, parse_tool_calls
from .render import render_messages
from .spec import ToolError, ToolSpec, parse_tools

__all__ = ["FUNCTION_END", "FUNCTION_START", "OBSERVATION_ROLE", "ToolCall", "ToolCallParser", "ToolError",
           "ToolSpec", "parse_tool_calls", "parse_tools", "render_messages"]
