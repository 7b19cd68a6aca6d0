"""Grammar-constrained decoding (llguidance): JSON schemas, JSON objects, Lark/GBNF grammars
and the Megrez tool-call format, enforced token by token through the engine's per-request
logits processors. See docs/structured-output.md."""
from .compile import (
                      GrammarError,
                      json_object_grammar,
                      json_schema_grammar,
                      lark_grammar,
                      regex_grammar,
                      tool_call_grammar,
)
from .processor import GrammarCompiler, GrammarProcessor

__all__ = ["GrammarCompiler", "GrammarError", "GrammarProcessor", "json_object_grammar", "json_schema_grammar",
           "lark_grammar", "regex_grammar", "tool_call_grammar"]
