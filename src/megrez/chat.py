"""``megrez chat``: a conversation in the terminal.

    megrez chat --model DIR_OR_HUB_ID

Line editing and history (prompt_toolkit; readline when it is missing), multi-line input
(a paste is one message; or open a block with three double quotes and close it with three
more, or end a line with a backslash), slash commands (``/help`` lists them), and a
conversation that outlives the context: when it no longer fits, the oldest turns are left
out of the prompt (the system prompt stays) and a notice says so. Ctrl-C stops an answer
within one engine step; the interrupted exchange is left out of the conversation, so the
next turn starts from a consistent history.

Slash commands live in ``COMMANDS``; a feature adds its own with the :func:`command`
decorator::

    @command("image", usage="/image FILE", help="attach an image to the next message")
    def _image(session: ChatSession, arg: str) -> None:
        session.pending_parts.append({"type": "image", "path": arg})

Piped stdin is read one message per line (a triple-quoted block is one message).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, TextIO

from .engine.sampling import SamplingParams
from .tokenizer import text_content

ROLES = ("system", "user", "assistant", "tool")
BLOCK = '"""'


# ---------------------------------------------------------------------------------------- commands

class Quit(Exception):
    """Raised by a command to end the chat."""


@dataclass
class Command:
    name: str
    run: Callable[["ChatSession", str], None]
    usage: str
    help: str
    aliases: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {}  # name and aliases -> command


def command(name: str, *aliases: str, usage: str = "", help: str = ""):
    """Register ``fn(session, argument_text)`` as ``/name`` (and ``/alias``...)."""
    def register(fn):
        cmd = Command(name, fn, usage or f"/{name}", help, aliases)
        for key in (name, *aliases):
            COMMANDS[key] = cmd
        return fn
    return register


def commands_help() -> str:
    """One line per command, for /help and ``megrez chat --help``."""
    seen, lines = set(), []
    for cmd in COMMANDS.values():
        if cmd.name in seen:
            continue
        seen.add(cmd.name)
        names = cmd.usage + "".join(f", /{a}" for a in cmd.aliases)
        lines.append(f"  {names:28s} {cmd.help}")
    return "\n".join(lines)


INPUT_HELP = (f'Multi-line input: paste it (a paste is one message), or type {BLOCK} to open a block and {BLOCK} '
              'to close it, or end a line with \\. Start a message with // to send a text that begins with /. '
              'Ctrl-C stops an answer (the exchange is not kept); Ctrl-D or /bye quits.')


# ---------------------------------------------------------------------------------------- session

class ContextError(ValueError):
    """A message that cannot fit the context even alone."""


# Settings /set may change: name -> parser of the value.
SETTINGS = {
    "temperature": float, "top_p": float, "top_k": int, "max_tokens": int,
    "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float, "seed": int,
}


class ChatSession:
    """A conversation with one model: the system prompt, the messages, the sampling settings,
    and which leading turns no longer fit in the context."""

    def __init__(self, llm, params: SamplingParams | None = None, system: str | None = None,
                 out: TextIO | None = None, err: TextIO | None = None,
                 after_answer: Callable[[float], None] | None = None):
        self.llm = llm
        self.params = params or SamplingParams()
        self.system = system or None
        self.messages: list[dict] = []   # the whole conversation, without the system prompt
        self.start = 0                   # messages[start:] are in the prompt; older ones did not fit
        self.pending_parts: list = []    # content parts to send with the next user message
        self.embeddings = None           # image/audio vectors of the last encoded prompt
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.after_answer = after_answer

    # ------------------------------------------------------------------------------ state
    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def notice(self, text: str) -> None:
        print(f"({text})", file=self.err, flush=True)

    def conversation(self) -> list[dict]:
        """The whole conversation in OpenAI form (system prompt first)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(m) for m in self.messages]

    def reset(self) -> None:
        self.messages, self.start, self.pending_parts = [], 0, []

    def user_message(self, text: str) -> dict:
        if not self.pending_parts:
            return {"role": "user", "content": text}
        parts, self.pending_parts = [*self.pending_parts, {"type": "text", "text": text}], []
        return {"role": "user", "content": parts}

    def answer_reserve(self) -> int:
        """Tokens kept free for the answer when older turns are dropped: the token limit
        (yours, else generation_config's), at most half the context; a quarter without one."""
        limit = self.params.max_tokens or self.llm.tokenizer.generation_config.get("max_new_tokens")
        n = self.max_model_len
        return max(1, min(int(limit) if limit else n // 4, n // 2))

    def encode(self, messages: list[dict]) -> list[int]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        # Images and audio (Megrez-3B-Omni) are encoded here; their vectors go with the prompt.
        ids, self.embeddings = self.llm.encode_conversation(system + messages, check_length=False)
        return ids

    def fit(self, message: dict) -> tuple[list[int], int]:
        """The prompt for ``message`` after the conversation, and the new ``start``: the oldest
        turns are dropped (whole turns, from a user message to the next) until the answer has
        room. Raises ContextError when the message does not fit even alone."""
        start, n = self.start, self.max_model_len
        reserve = self.answer_reserve()
        while True:
            ids = self.encode(self.messages[start:] + [message])
            if len(ids) + reserve <= n:
                return ids, start
            later = [i for i in range(start + 1, len(self.messages)) if self.messages[i]["role"] == "user"]
            if later:
                start = later[0]
            elif start < len(self.messages):
                start = len(self.messages)
            elif len(ids) < n:
                return ids, start  # fits, with less room for the answer than usual
            else:
                what = "with the system prompt " if self.system else ""
                raise ContextError(f"this message is {len(ids)} tokens {what}in the chat format, and the context "
                                   f"holds {n} (--max-model-len): it was not sent; shorten it")

    # ------------------------------------------------------------------------------ a turn
    def ask(self, text: str) -> str | None:
        """Send one user message and stream the answer. Returns the answer, or None when it
        was interrupted or refused (the conversation is then unchanged)."""
        message = self.user_message(text)
        try:
            ids, start = self.fit(message)
        except ValueError as e:  # ContextError, or an image/audio file that cannot be used
            print(f"megrez: {e}", file=self.err, flush=True)
            return None
        dropped = sum(1 for m in self.messages[self.start:start] if m["role"] == "user")
        if start > self.start:
            self.start = start
            self.notice(f"the conversation outgrew the {self.max_model_len}-token context: the oldest "
                        f"{dropped or 1} turn(s) are left out of the prompt from now on (/save keeps them)")
        t0 = time.perf_counter()
        text_out, finish, n_out = self._generate(ids)
        self.out.write("\n")
        self.out.flush()
        if finish is None:
            self.notice("interrupted: this question and the partial answer are left out of the conversation")
            return None
        if finish == "length":
            limit = self.llm.last_request.params.max_tokens
            if limit is not None and n_out >= limit:
                self.notice(f"answer cut at max_tokens={limit}; /set max_tokens N for longer answers")
            else:
                self.notice(f"answer cut: the {self.max_model_len}-token context is full")
        self.messages += [message, {"role": "assistant", "content": text_out}]
        if self.after_answer is not None:
            self.after_answer(time.perf_counter() - t0)
        return text_out

    def _generate(self, ids: list[int]) -> tuple[str, str | None, int]:
        """Stream one answer. Ctrl-C asks it to stop after the current engine step (a second
        Ctrl-C interrupts at once); returns (text, finish reason or None if stopped, tokens)."""
        stop = threading.Event()
        handler_set = False
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                if stop.is_set():
                    raise KeyboardInterrupt
                stop.set()
            previous = signal.signal(signal.SIGINT, on_sigint)
            handler_set = True
        parts, finish, n = [], None, 0
        outputs = self.llm.stream_outputs(ids, self.params, self.embeddings)
        try:
            for out in outputs:
                if out.new_text:
                    parts.append(out.new_text)
                    self.out.write(out.new_text)
                    self.out.flush()
                n = out.completion_tokens
                if out.finished:
                    finish = out.finish_reason
                    break
                if stop.is_set():
                    break
        except KeyboardInterrupt:
            finish = None
        finally:
            outputs.close()  # cancels an unfinished request and frees its slot
            if handler_set:
                signal.signal(signal.SIGINT, previous)
        return "".join(parts), finish, n

    # ------------------------------------------------------------------------------ files
    def save(self, path: str | Path) -> int:
        path = Path(path).expanduser()
        data = {"model": str(self.llm.path), "messages": self.conversation()}
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"{path}: cannot write ({e.strerror or e})") from None
        return len(data["messages"])

    def load(self, path: str | Path) -> int:
        system, messages = read_conversation(path)
        self.system = system if system is not None else self.system
        self.reset()
        self.messages = messages
        return len(messages)


def read_conversation(path: str | Path) -> tuple[str | None, list[dict]]:
    """A saved conversation: ``{"messages": [...]}`` or a bare list of messages (OpenAI form).
    A leading system message becomes the system prompt."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON conversation ({e})") from None
    raw = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a list of messages or an object with \"messages\"")
    system, messages = None, []
    for i, m in enumerate(raw):
        where = f"{path}: messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"{where}: expected {{\"role\": one of {', '.join(ROLES)}, \"content\": ...}}")
        content = text_content(m.get("content"), f"{where}.content")
        if m["role"] == "system" and i == 0:
            system = content
        else:
            messages.append({"role": m["role"], "content": content})
    return system, messages


# ---------------------------------------------------------------------------------------- built-in commands

@command("help", "?", usage="/help", help="list the commands")
def _help(session: ChatSession, arg: str) -> None:
    print(f"Commands:\n{commands_help()}\n{INPUT_HELP}", file=session.err)


@command("bye", "exit", "quit", usage="/bye", help="leave the chat (also Ctrl-D)")
def _bye(session: ChatSession, arg: str) -> None:
    raise Quit


@command("reset", "clear", usage="/reset", help="start a new conversation (keeps the system prompt and settings)")
def _reset(session: ChatSession, arg: str) -> None:
    session.reset()
    session.notice("conversation cleared")


@command("system", usage="/system [TEXT]", help='show or set the system prompt (/system "" removes it)')
def _system(session: ChatSession, arg: str) -> None:
    if not arg:
        session.notice(f"system prompt: {session.system!r}" if session.system else "no system prompt")
        return
    session.system = None if arg in ('""', "''") else arg
    session.notice("system prompt removed" if session.system is None else "system prompt set")


def _setting_text(session: ChatSession) -> str:
    own = {f.name: getattr(session.params, f.name) for f in fields(session.params) if f.name in SETTINGS}
    defaults = session.params.with_defaults(session.llm.tokenizer.generation_config)
    parts = []
    for name in SETTINGS:
        if own[name] is not None and not (name.endswith("_penalty") and own[name] == 0.0 and "presence" in name
                                           or name == "frequency_penalty" and own[name] == 0.0):
            parts.append(f"{name}={own[name]}")
        elif name == "seed":
            parts.append("seed=random")
        elif name == "max_tokens" and defaults.max_tokens is None:
            parts.append("max_tokens=none (until a stop or a full context)")
        else:
            parts.append(f"{name}={getattr(defaults, name)} (default)")
    return ", ".join(parts)


@command("set", usage="/set NAME VALUE",
         help=f"change a sampling setting ({', '.join(SETTINGS)}; VALUE 'default' unsets it); /set alone shows them")
def _set(session: ChatSession, arg: str) -> None:
    words = arg.split()
    if words[:1] == ["parameter"]:  # Ollama's spelling: /set parameter temperature 0.2
        words = words[1:]
    if not words:
        session.notice(_setting_text(session))
        return
    if words[0] == "system":
        _system(session, arg.split(None, 1)[1] if len(arg.split(None, 1)) > 1 else "")
        return
    name = words[0].replace("-", "_")
    if name == "temp":
        name = "temperature"
    if name not in SETTINGS or len(words) != 2:
        raise ValueError(f"usage: /set NAME VALUE with NAME one of {', '.join(SETTINGS)}")
    if words[1] == "default":
        value = None if name != "presence_penalty" and name != "frequency_penalty" else 0.0
    else:
        try:
            value = SETTINGS[name](words[1])
        except ValueError:
            raise ValueError(f"/set {name}: expected {'an integer' if SETTINGS[name] is int else 'a number'}, "
                             f"got {words[1]!r}") from None
    params = replace(session.params, **{name: value}).validate()
    session.params = params
    session.notice(f"{name} = {value if value is not None else 'default'}")


@command("show", usage="/show", help="the model, context use and settings")
def _show(session: ChatSession, arg: str) -> None:
    used = len(session.encode(session.messages[session.start:])) if session.messages or session.system else 0
    left_out = sum(1 for m in session.messages[:session.start] if m["role"] == "user")
    session.notice(f"model {session.llm.path}; context {used}/{session.max_model_len} tokens, "
                   f"{len(session.messages)} messages ({left_out} turn(s) left out); {_setting_text(session)}")


@command("save", usage="/save FILE", help="write the conversation to FILE (JSON, OpenAI message format)")
def _save(session: ChatSession, arg: str) -> None:
    if not arg:
        raise ValueError("usage: /save FILE")
    n = session.save(arg)
    session.notice(f"saved {n} messages to {arg}")


@command("load", usage="/load FILE", help="continue a conversation saved with /save (or any JSON message list)")
def _load(session: ChatSession, arg: str) -> None:
    if not arg:
        raise ValueError("usage: /load FILE")
    n = session.load(arg)
    session.notice(f"loaded {n} messages from {arg}" + (" and its system prompt" if session.system else ""))


def run_command(session: ChatSession, line: str) -> None:
    name, _, arg = line[1:].partition(" ")
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise ValueError(f"unknown command /{name}: /help lists them (start a message with // to send it as text)")
    cmd.run(session, arg.strip())


# ---------------------------------------------------------------------------------------- input

def join_block(text: str) -> str:
    """A triple-quoted block without its quotes; backslash-continued lines joined."""
    s = text.strip()
    if s.startswith(BLOCK):
        s = s[len(BLOCK):]
        if s.endswith(BLOCK):
            s = s[: -len(BLOCK)]
        return s.strip("\n")
    return text


def needs_more(text: str) -> bool:
    """Whether the text typed so far is an open multi-line block."""
    s = text.strip()
    if s.startswith(BLOCK):
        return not (len(s) >= 2 * len(BLOCK) and s.endswith(BLOCK))
    return text.endswith("\\")


class PlainReader:
    """Lines from a file or a terminal without prompt_toolkit (readline, when the platform has
    it, gives line editing). A triple-quoted block or backslash continuation spans lines."""

    def __init__(self, stream: TextIO, interactive: bool):
        self.stream, self.interactive = stream, interactive
        if interactive:
            try:
                import readline  # noqa: F401  (importing it turns on line editing for input())
            except ImportError:
                pass

    def _line(self, prompt: str) -> str | None:
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                return None
        line = self.stream.readline()
        return line.rstrip("\n") if line else None

    def read(self) -> str | None:
        text = self._line("> ")
        if text is None:
            return None
        while needs_more(text):
            more = self._line("... ")
            if more is None:
                break
            text = (text[:-1] if text.endswith("\\") and not text.strip().startswith(BLOCK) else text + "\n") + more
        return join_block(text)


class TerminalReader:
    """prompt_toolkit: line editing, history across sessions, bracketed paste (a paste is one
    message, whatever its size or line count), Alt-Enter for a new line."""

    def __init__(self, history_file: Path | None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        kb = KeyBindings()

        @kb.add("enter")
        def _enter(event):
            buf = event.current_buffer
            if needs_more(buf.text):
                if buf.text.endswith("\\") and not buf.text.strip().startswith(BLOCK):
                    buf.delete_before_cursor(1)
                buf.insert_text("\n")
            else:
                buf.validate_and_handle()

        @kb.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        history = InMemoryHistory()
        if history_file is not None:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                history = FileHistory(str(history_file))
            except OSError:
                pass
        self.session = PromptSession(history=history, key_bindings=kb, multiline=True,
                                     prompt_continuation=lambda width, line, wrap: "... ".rjust(width))

    def read(self) -> str | None:
        while True:
            try:
                return join_block(self.session.prompt("> "))
            except EOFError:
                return None
            except KeyboardInterrupt:
                print("(Ctrl-D or /bye quits)", file=sys.stderr, flush=True)


def history_path() -> Path:
    return Path(os.environ.get("MEGREZ_CACHE", Path.home() / ".cache" / "megrez")) / "chat_history"


def make_reader(stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout):
    interactive = stdin.isatty()
    if interactive and stdout.isatty():
        try:
            return TerminalReader(history_path()), True
        except Exception:  # prompt_toolkit missing or the terminal unusable: plain input()
            pass
    return PlainReader(stdin, interactive), interactive


# ---------------------------------------------------------------------------------------- the loop

def repl(session: ChatSession, reader=None, interactive: bool | None = None) -> int:
    if reader is None:
        reader, interactive = make_reader()
    if interactive:
        print(f"megrez chat: {session.llm.path} ({session.max_model_len}-token context). "
              f"/help lists commands, /bye quits; {BLOCK} opens a multi-line block.", file=session.err, flush=True)
    while True:
        text = reader.read()
        if text is None:
            if interactive:
                print(file=session.err)
            return 0
        stripped = text.strip()
        if not stripped:
            continue
        if stripped.startswith("/") and not stripped.startswith("//"):
            try:
                run_command(session, stripped)
            except Quit:
                return 0
            except ValueError as e:
                print(f"megrez: {e}", file=session.err, flush=True)
            continue
        message = text if "\n" in text else stripped  # a multi-line message keeps its layout
        if stripped.startswith("//"):
            message = message.strip()[1:]
        try:
            session.ask(message)
        except KeyboardInterrupt:  # before or after the answer streamed: the conversation is unchanged
            session.notice("interrupted")
