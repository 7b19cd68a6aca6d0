"""An agent framework as a client: the OpenAI Agents SDK drives a tool-calling loop against
``megrez serve`` (Chat Completions, ``tools``, ``tool_choice``, ``role: "tool"`` results).

    pip install openai-agents
    python examples/agents_tool_loop.py                       # starts `megrez serve` on the bundled model
    python examples/agents_tool_loop.py --url http://127.0.0.1:8000/v1 --model megrez2

The first model call uses ``tool_choice="required"``: the server constrains the answer to a
call whose arguments follow the tool's JSON schema (the bundled 9.9M-parameter model would
rarely choose a tool by itself). The SDK runs the tool, sends the result back, and resets
tool_choice to "auto" for the model's final answer, as it does for any model.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
City = Literal["北京", "上海", "Paris"]  # an enum in the tool's schema: a call can only name these
WEATHER = {"北京": "晴, -6°C 至 4°C", "上海": "小雨, 6°C 至 10°C", "Paris": "cloudy, 8°C"}


def start_server(model: str | None) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "megrez.cli", "serve", "--port", str(port), "--served-model-name", "megrez",
           "--log-level", "warning", "--max-num-seqs", "4"] + (["--model", model] if model else [])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"megrez serve exited with {proc.returncode}")
        time.sleep(0.1)
    raise SystemExit("megrez serve did not start")


async def main_async(url: str, model: str, question: str) -> None:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # nothing leaves this machine

    @function_tool
    def get_weather(city: City) -> str:
        """Today's weather in a city."""
        return WEATHER.get(city, f"no data for {city!r}")

    client = AsyncOpenAI(base_url=url, api_key=os.environ.get("MEGREZ_API_KEY", "none"))
    agent = Agent(name="weather", instructions="Answer weather questions; use get_weather.",
                  model=OpenAIChatCompletionsModel(model=model, openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", temperature=0.7, max_tokens=128),
                  tools=[get_weather])
    result = await Runner.run(agent, question, max_turns=4)
    print(f"user: {question}")
    for item in result.new_items:
        kind = type(item).__name__
        if kind == "ToolCallItem":
            print(f"tool call: {item.raw_item.name}({item.raw_item.arguments}) id={item.raw_item.call_id}")
        elif kind == "ToolCallOutputItem":
            print(f"tool result: {item.output}")
        elif kind == "MessageOutputItem":
            text = "".join(getattr(c, "text", "") for c in item.raw_item.content)
            print(f"assistant: {text}")
    calls = [i for i in result.new_items if type(i).__name__ == "ToolCallItem"]
    print(json.dumps({"tool_calls": len(calls), "model_calls": len(result.raw_responses),
                      "final_output": result.final_output}, ensure_ascii=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server's /v1 URL (default: start one)")
    ap.add_argument("--model", default="megrez", help="served model name")
    ap.add_argument("--checkpoint", default=None, help="with no --url: the checkpoint to serve (default: bundled)")
    ap.add_argument("--question", default="北京今天天气怎么样？")
    a = ap.parse_args()
    proc = None
    if a.url is None:
        proc, a.url = start_server(a.checkpoint)
    try:
        asyncio.run(main_async(a.url, a.model, a.question))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)


if __name__ == "__main__":
    main()
