"""``megrez chat`` driven in a pseudo-terminal, as a person types into it: line editing and
history, a paste as one message, slash commands, /save and /load, a conversation longer than
the context, Ctrl-C in the middle of an answer. Conversations are checked through /save (the
JSON the chat writes) and against the Python API's answers for the same history."""
from __future__ import annotations

import json
import os
import sys

import pexpect
import pytest
import timing

from megrez import LLM, SamplingParams
from megrez.chat import ChatSession, read_conversation

PROMPT = r"\x1b\[\?2004h"  # prompt_toolkit turns bracketed paste on as each prompt starts
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


class Chat:
    def __init__(self, model, tmp_path, *flags):
        env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "MEGREZ_CACHE": str(tmp_path / "cache")}
        self.tmp = tmp_path
        self.proc = pexpect.spawn(sys.executable, ["-m", "megrez.cli", "chat", "--model", str(model), "--threads", "1",
                                                   *map(str, flags)],
                                  env=env, encoding="utf-8", dimensions=(50, 250), timeout=1, cwd=str(tmp_path))
        self.saves = 0
        self.prompt(120)

    def expect(self, pattern, timeout: float = 60):
        deadline = timing.Deadline(timeout)
        while True:
            try:
                return self.proc.expect(pattern, timeout=1)
            except pexpect.TIMEOUT:
                if deadline.expired():
                    raise AssertionError(f"no {pattern!r} in time; the screen ended with {self.proc.before[-500:]!r}")

    def prompt(self, timeout: float = 60) -> str:
        """Wait for the next prompt; returns what was printed since the last one."""
        self.expect(PROMPT, timeout)
        return self.proc.before

    def say(self, text: str, timeout: float = 60) -> str:
        self.proc.send(text + "\r")
        return self.prompt(timeout)

    def paste(self, text: str) -> str:
        self.proc.send(PASTE_START + text + PASTE_END)
        return self.say("")

    def save(self) -> dict:
        self.saves += 1
        path = self.tmp / f"save{self.saves}.json"
        out = self.say(f"/save {path}")
        assert "saved" in out, out
        return json.loads(path.read_text(encoding="utf-8"))

    def close(self) -> int:
        self.proc.send("/bye\r")
        self.expect(pexpect.EOF)
        self.proc.close()
        return self.proc.exitstatus


@pytest.fixture
def chat(tiny_moe, tmp_path):
    sessions = []

    def start(*flags):
        sessions.append(Chat(tiny_moe, tmp_path, *flags))
        return sessions[-1]

    yield start
    for c in sessions:
        if c.proc.isalive():
            c.proc.terminate(force=True)


def contents(saved: dict, role: str) -> list[str]:
    return [m["content"] for m in saved["messages"] if m["role"] == role]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def llm(tiny_moe):
    return LLM(tiny_moe, max_num_seqs=1)


@pytest.mark.slow
def test_line_editing_history_and_commands(chat):
    c = chat("-t", "0", "--max-tokens", "4")
    c.proc.send("helo")
    c.proc.send("\x1b[D")          # left arrow: edits the line instead of printing ^[[D
    c.say("l")
    c.proc.send("\x1b[A")          # up arrow: the previous message again
    c.say("")
    out = c.say("/help")
    assert "/save FILE" in out and "/set NAME VALUE" in out and "/bye" in out
    assert "unknown command /frobnicate" in c.say("/frobnicate now")
    c.say("//etc is a directory")  # // sends a text that starts with /
    c.proc.send("\x03")            # Ctrl-C at the prompt does not leave
    assert "Ctrl-D or /bye quits" in c.prompt()
    saved = c.save()
    assert contents(saved, "user") == ["hello", "hello", "/etc is a directory"]
    assert len(contents(saved, "assistant")) == 3  # no command reached the model
    c.proc.sendeof()               # Ctrl-D quits
    c.expect(pexpect.EOF)
    c.proc.close()
    assert c.proc.exitstatus == 0


@pytest.mark.slow
def test_a_paste_is_one_message_whatever_its_size(chat, llm):
    c = chat("-t", "0", "--max-tokens", "4")
    c.paste("first line\nsecond line\nthird line")
    saved = c.save()
    assert contents(saved, "user") == ["first line\nsecond line\nthird line"]
    assert len(contents(saved, "assistant")) == 1
    # Typed blocks: three quotes open and close one; a trailing backslash continues the line.
    c.proc.send('"""\r')
    c.proc.send("alpha\r")
    c.say('beta"""')
    c.proc.send("gamma\\\r")
    c.say("delta")
    assert contents(c.save(), "user")[1:] == ["alpha\nbeta", "gamma\ndelta"]
    # 11 KB in one paste arrives whole (a terminal's line discipline would cut it at 4 KB):
    # too long for the context, it is refused with its exact token count and not sent.
    big = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(220))
    assert len(big) > 11_000
    n = len(ChatSession(llm).encode([{"role": "user", "content": big}]))
    out = c.paste(big)
    assert f"this message is {n} tokens" in out and "not sent" in out
    assert len(contents(c.save(), "user")) == 3
    assert c.close() == 0


@pytest.mark.slow
def test_save_then_load_restores_the_conversation(chat, llm, tmp_path):
    c = chat("-t", "0", "--max-tokens", "6", "--system", "You are terse.")
    c.say("hello")
    c.say("what is the capital of France?")
    first = c.save()
    assert first["messages"][0] == {"role": "system", "content": "You are terse."}
    c.say("/reset")
    c.say("/system You are verbose.")
    assert contents(c.save(), "user") == []
    out = c.say(f"/load {tmp_path / 'save1.json'}")
    assert "loaded 4 messages" in out and "system prompt" in out
    assert c.save()["messages"] == first["messages"]
    # The next answer continues the loaded conversation, as the API answers it.
    c.say("and of Germany?")
    after = c.save()
    system, history = read_conversation(tmp_path / f"save{c.saves}.json")
    assert system == "You are terse." and history[:4] == first["messages"][1:]
    expected = llm.chat(first["messages"] + [{"role": "user", "content": "and of Germany?"}], greedy(6)).text
    assert contents(after, "assistant")[-1] == expected
    assert c.close() == 0


@pytest.mark.slow
def test_a_conversation_beyond_the_context_keeps_going(chat, llm):
    context, max_tokens = 160, 12
    c = chat("-t", "0", "--max-tokens", max_tokens, "--max-model-len", context, "--system", "Be brief.")
    notices = ""
    questions = [f"question {i}: tell me about the number {i * 7}" for i in range(10)]
    for q in questions:
        notices += c.say(q)
    assert "outgrew the 160-token context" in notices and "Traceback" not in notices
    saved = c.save()
    assert contents(saved, "user") == questions  # nothing is lost from the saved conversation
    # The last answer is the API's answer for the newest turns that leave room for max_tokens,
    # with the system prompt kept.
    msgs = saved["messages"]
    system, turns = msgs[:1], msgs[1:-2]
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"]
    session = ChatSession(llm, greedy(max_tokens), system="Be brief.")
    start = next(s for s in starts
                 if len(llm.tokenizer.encode_chat(system + turns[s:] + [msgs[-2]])) + max_tokens <= context)
    assert start > 0
    assert session.answer_reserve() == max_tokens
    expected = llm.chat(system + turns[start:] + [msgs[-2]], greedy(max_tokens)).text
    assert msgs[-1]["content"] == expected
    assert c.close() == 0


@pytest.mark.slow
def test_ctrl_c_mid_answer_keeps_the_history_consistent(chat, llm):
    c = chat("-t", "0", "--max-tokens", "6")
    c.say("hi")
    first = c.save()
    long_prompt = "hello"
    # The precondition: greedy decoding does not stop by itself for a while after this prompt.
    question = first["messages"] + [{"role": "user", "content": long_prompt}]
    assert llm.chat(question, greedy(60)).finish_reason == "length"
    c.say("/set max_tokens 400")
    c.proc.send(long_prompt + "\r")
    c.expect(r"\x1b\[\?2004l")        # the prompt has ended: the answer is on its way
    c.expect(r".")                    # and its first characters have arrived
    c.proc.send("\x03")
    out = c.prompt(60)
    assert "interrupted" in out and "answer cut" not in out and "Traceback" not in out
    saved = c.save()
    assert saved["messages"] == first["messages"]  # neither the question nor the partial answer
    c.say("/set max_tokens 6")
    c.say("what now?")
    after = c.save()
    expected = llm.chat(first["messages"] + [{"role": "user", "content": "what now?"}], greedy(6)).text
    assert contents(after, "assistant")[-1] == expected
    assert c.close() == 0


@pytest.mark.slow
def test_set_changes_sampling_and_max_tokens_cut_is_shown(chat):
    c = chat("--max-tokens", "3")
    out = c.say("/set temperature 0.2")
    assert "temperature = 0.2" in out
    assert "temperature must be a number in [0, 100]" in c.say("/set temperature -1").replace(":", "")
    out = c.say("/set")
    assert "temperature=0.2" in out and "max_tokens=3" in out
    out = c.say("hello")
    assert "answer cut at max_tokens=3" in out
    assert c.close() == 0
