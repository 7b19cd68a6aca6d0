"""The command line as a user runs it: a subprocess per command."""
import json
import os
import sys

import pytest
import timing

from megrez import LLM, SamplingParams


def megrez(*args, stdin=None, env=None, timeout=120):
    return timing.run([sys.executable, "-m", "megrez.cli", *map(str, args)], timeout, input=stdin,
                      env={**os.environ, **(env or {})})


@pytest.mark.slow
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


@pytest.mark.slow
def test_generate_text_streams_same_as_api(tiny_moe):
    r = megrez("generate", "你好", "--model", tiny_moe, "-t", "0", "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    expected = LLM(tiny_moe).chat([{"role": "user", "content": "你好"}], SamplingParams(temperature=0, max_tokens=16))
    assert r.stdout == expected.text + "\n"


@pytest.mark.slow
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
    (["generate", "x", "--model", "/no/such/model.gguf"], "/no/such/model.gguf: no such GGUF file"),
    (["generate", "x", "--temperature", "-1"], "temperature: must be a number in [0, 100]"),
    (["generate", "--prompt-ids", "1,a", "x"], "either PROMPT or --prompt-ids"),
    (["info", "/no/such/dir"], "no such directory"),
    (["bench-offload", "--tier", "storage", "--shape", "megrez2-mini", "--scratch-dir", "/no/such/dir"],
     "--scratch-dir /no/such/dir: no such directory"),
])
def test_bad_arguments_give_one_line_errors(args, message, tiny_moe):
    r = megrez(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_broken_checkpoint_error_names_file(tiny_moe, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(tiny_moe, d)
    (d / "model.safetensors").write_bytes(b"garbage")
    r = megrez("generate", "x", "--model", d)
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_default_model_needs_no_download(tmp_path):
    r = megrez("generate", "hi", "--max-tokens", "4", "--json", env={"MEGREZ_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) <= 4
    r = megrez("info", env={"MEGREZ_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "MegrezMoeForCausalLM" in r.stdout and "pre-gated" in r.stdout


@pytest.mark.slow
def test_verify_against_transformers(tiny_dense, tiny_moe):
    r = megrez("verify", "--model", tiny_dense, "--tokens", "8")
    assert r.returncode == 0, r.stderr
    (result,) = json.loads(r.stdout.strip().splitlines()[-1])["results"]
    assert result["max_abs_logit_diff"] <= 1e-4 and result["greedy_tokens_identical"] == 8
    # A Megrez2 without modeling code: compared with the float64 reference, which must stay
    # independent of the engine (it imports nothing from the package).
    r = megrez("verify", "--model", tiny_moe)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["reference"] == "float64" and "float64 implementation" in r.stdout
    (result,) = report["results"]
    assert result["max_abs_logit_diff"] <= 1e-4 and result["greedy_tokens_identical"] == result["greedy_tokens"] == 8
    import ast

    from megrez import reference

    tree = ast.parse(open(reference.__file__).read())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("megrez") or m.startswith(".")], imported
    r = megrez("verify", "--model", tiny_moe, "--trust-remote-code")
    assert r.returncode == 2 and "no auto_map" in r.stderr


def _walk(parser, path=()):
    """Every (command path, parser) of the command line, subcommands included."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"megrez {' '.join(path + (name,))} has no help line"
                yield from _walk(sub, path + (name,))


def test_every_command_and_flag_has_help():
    import argparse

    from megrez.cli import build_parser

    missing = []
    for path, parser in _walk(build_parser()):
        for action in parser._actions:
            if action.dest in ("help", "version") or isinstance(action, argparse._SubParsersAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"megrez {' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "no help text: " + ", ".join(missing)


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--temprature", "0.2"], "megrez generate: error: unrecognized argument: --temprature "
                                                  "(did you mean --temperature?)"),
    (["chat", "--max-token", "3"], "megrez chat: error: unrecognized argument: --max-token (did you mean --max-tokens?)"),
    (["train", "sft", "--stepz", "3"], "megrez train sft: error: unrecognized argument: --stepz (did you mean --steps?)"),
    (["chta"], "did you mean 'chat'?"),
    (["generate", "hi", "--device", "gpu"], "unknown device 'gpu': choose auto, cpu, cuda or cuda:N (did you mean cuda?)"),
    (["chat", "--gpu-memory-budget", "lots"], "cannot read a memory size from 'lots'"),
])
def test_misspelt_flags_get_a_suggestion_from_their_subcommand(args, message, capsys):
    from megrez.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_version_and_chat_help_lists_the_chat_commands(capsys):
    from megrez import __version__
    from megrez.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"megrez {__version__}"
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    out = capsys.readouterr().out
    for command in ("/help", "/save FILE", "/load FILE", "/system", "/set NAME VALUE", "/reset", "/bye", "/exit"):
        assert command in out
    assert "0 means greedy (default: 1.0)" in out.replace("\n", " ").replace("  ", " ") or "(default: 1.0)" in out
