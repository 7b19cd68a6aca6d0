"""Tokenizer, chat template and streaming detokenisation for Hugging Face checkpoints.

Reads ``tokenizer.json`` with the ``tokenizers`` library and renders the checkpoint's own
``chat_template`` (tokenizer_config.json, or a ``chat_template.jinja`` file) with a sandboxed
jinja2 environment, the way ``transformers`` does; falls back to the Megrez chat format.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

# The chat format of Megrez-3B-Instruct, used when a checkpoint ships no template.
MEGREZ_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|role_start|>system<|role_end|>你是Megrez-3B-Instruct，将针对用户的问题给出详细的、积极的回答。<|turn_end|>' }}"
    "{% endif %}{{ '<|role_start|>' + message['role'] + '<|role_end|>' + message['content'] + '<|turn_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|role_start|>assistant<|role_end|>' }}{% endif %}"
)
TURN_END = "<|turn_end|>"
MEGREZ_SPECIAL_TOKENS = ["<|eos|>", "<|role_start|>", "<|role_end|>", "<|turn_end|>",
                         "<|function_start|>", "<|function_end|>"]


class TokenizerError(ValueError):
    """A tokenizer file or chat template cannot be used; the message names the file."""


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def text_content(content: Any, where: str = "content") -> str:
    """A message's content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for n, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ValueError(f"{where}[{n}]: only text parts are supported "
                                 f"(got {part.get('type') if isinstance(part, dict) else type(part).__name__})")
        return "".join(parts)
    raise ValueError(f"{where}: expected a string or a list of text parts, got {type(content).__name__}")


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{file}: file not found (a checkpoint needs tokenizer.json)")
        try:
            self.hf = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise TokenizerError(f"{file}: cannot be read by the tokenizers library ({e})") from None
        self.config = _read_optional_json(path / "tokenizer_config.json")
        generation = _read_optional_json(path / "generation_config.json")
        model_config = _read_optional_json(path / "config.json")

        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template_source = "tokenizer_config.json" if template else "built-in Megrez format"
        self.chat_template = template or MEGREZ_CHAT_TEMPLATE
        self._template = _compile_template(self.chat_template, path / "tokenizer_config.json")
        # A template that reads ``tools`` renders tool definitions and calls itself; otherwise
        # megrez.tools writes them in the Megrez format.
        self.template_takes_tools = "tools" in _template_variables(self.chat_template)

        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        stop = set()
        for source in (generation.get("eos_token_id"), model_config.get("eos_token_id")):
            if isinstance(source, int):
                stop.add(source)
            elif isinstance(source, list):
                stop.update(i for i in source if isinstance(i, int))
        # Megrez-3B-Instruct's tokenizer_config names "<|turn_end>" (sic) as eos: look up only
        # tokens that exist, and always stop on the real end-of-turn token.
        for token in (self.eos_token, TURN_END):
            tid = self.hf.token_to_id(token) if token else None
            if tid is not None:
                stop.add(tid)
        self.stop_token_ids = frozenset(stop)
        self.generation_config = generation
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

    # -------------------------------------------------------------------------------- text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not): a long text tokenized in one thread
        # then does not stall the others (the server's event loop, the engine).
        return self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    # -------------------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        msgs = normalize_messages(messages)
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except TemplateRaised as e:
            raise ValueError(f"chat template refused the conversation: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template already wrote any special tokens it wants (as transformers does).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def detokenizer(self, skip_special_tokens: bool = True) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, skip_special_tokens)


def normalize_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role', 'content'} objects")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{n}]: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{n}].role: expected a non-empty string")
        out.append({**m, "content": text_content(m.get("content"), f"messages[{n}].content")})
    return out


class StreamingDetokenizer:
    """Turns tokens into text deltas one token at a time. A delta is held back while the
    text decoded so far ends in an incomplete UTF-8 sequence, so multi-byte characters
    (Chinese, emoji) are never split or replaced. Only a short window is re-decoded per token."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window re-decoded for context
        self.read = 0    # tokens whose text has been emitted
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        new_text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation), decoded as it is."""
        if self.read == len(self.ids):
            return ""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        new_text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        delta = new_text[len(prefix_text):]
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta


class TemplateRaised(Exception):
    pass


def _raise(message):
    raise TemplateRaised(message)


def _compile_template(source: str, where: Path):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"{where}: chat_template is not a valid jinja2 template ({e})") from None


def _template_variables(source: str) -> set[str]:
    from jinja2 import Environment, meta
    from jinja2.ext import loopcontrols

    return meta.find_undeclared_variables(Environment(extensions=[loopcontrols]).parse(source))


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data
