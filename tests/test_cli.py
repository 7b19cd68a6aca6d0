"""The command line as a user runs it: a subprocess per command."""
import json
import os
import subprocess
import sys

import pytest

from megrez import LLM, SamplingParams


def megrez(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "megrez.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_create_tiny_info_and_generate_json(tmp_path):
    out = tmp_path / "m"
    r = megrez("create-tiny", out, "--arch", "moe")
    assert r.returncode == 0, r.stderr
    r = megrez("info", out)
    assert r.returncode == 0, r.stderr
    assert "1-3: MoE, 16 routed experts x 32 owned by layer 1" in r.stdout and "active per token" in r.stdout
    r = megrez("generate", "--model", out, "--prompt-ids", "5,77,300", "--temperature", "0", "--max-tokens", "12",
               "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    expected = LLM(out).generate([5, 77, 300], SamplingParams(temperature=0, max_tokens=12))
    assert data["token_ids"] == expected.token_ids and data["text"] == expected.text
    r = megrez("create-tiny", out)
    assert r.returncode == 2 and "exists and is not empty" in r.stderr


def test_generate_text_streams_same_as_api(tiny_moe):
    r = megrez("generate", "你好", "--model", tiny_moe, "-t", "0", "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    expected = LLM(tiny_moe).chat([{"role": "user", "content": "你好"}], SamplingParams(temperature=0, max_tokens=16))
    assert r.stdout == expected.text + "\n"


def test_chat_with_piped_stdin_keeps_history(tiny_moe):
    r = megrez("chat", "--model", tiny_moe, "-t", "0", "--max-tokens", "6", stdin="hello\n/reset\n你好\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    llm = LLM(tiny_moe)
    p = SamplingParams(temperature=0, max_tokens=6)
    assert lines[0] == llm.chat([{"role": "user", "content": "hello"}], p).text
    assert lines[1] == llm.chat([{"role": "user", "content": "你好"}], p).text  # /reset dropped "hello"


@pytest.mark.parametrize("args,message", [
    (["generate", "x", "--model", "/no/such/dir"], "/no/such/dir: no such directory"),
    (["generate", "x", "--temperature", "-1"], "temperature: must be a number in [0, 100]"),
    (["generate", "--prompt-ids", "1,a", "x"], "either PROMPT or --prompt-ids"),
    (["info", "/no/such/dir"], "no such directory"),
])
def test_bad_arguments_give_one_line_errors(args, message, tiny_moe):
    r = megrez(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_broken_checkpoint_error_names_file(tiny_moe, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(tiny_moe, d)
    (d / "model.safetensors").write_bytes(b"garbage")
    r = megrez("generate", "x", "--model", d)
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_default_model_needs_no_download(tmp_path):
    r = megrez("generate", "hi", "--max-tokens", "4", "--json", env={"MEGREZ_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) <= 4
    r = megrez("info", env={"MEGREZ_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "MegrezMoeForCausalLM" in r.stdout and "pre-gated" in r.stdout


def test_verify_against_transformers(tiny_dense, tiny_moe):
    r = megrez("verify", "--model", tiny_dense, "--tokens", "8")
    assert r.returncode == 0, r.stderr
    (result,) = json.loads(r.stdout.strip().splitlines()[-1])["results"]
    assert result["max_abs_logit_diff"] <= 1e-4 and result["greedy_tokens_identical"] == 8
    r = megrez("verify", "--model", tiny_moe)
    assert r.returncode == 2 and "--trust-remote-code" in r.stderr
