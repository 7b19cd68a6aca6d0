"""Every command and code block of README.md and docs/*.md, run as written, so that a doc
cannot rot silently.

Each ```bash block is split into commands and each ```python block is one program; they run
in order within a document (two documents run side by side), each document in a scratch
directory of its own where the names the docs use exist:
``./Megrez2-3x7B-A3B``, ``./Megrez-3B-Instruct`` and ``DIR`` are small random checkpoints,
the hub ids ``Infinigence/...`` resolve (offline) from a Hugging Face cache holding them,
``corpus.jsonl``, ``chat.jsonl`` and ``pt.json`` are small data files, and ``src``,
``scripts``, ``benchmarks`` point into the checkout. A ``megrez serve`` runs in the background
for the commands after it. A command exits 0 without a traceback unless a rule below says
what else it must do.

What cannot run here as written is listed in RULES, each with its reason: skipped (a GPU,
the network, hours of compute), run with a listed substitution (a smaller shape, fewer
steps, a free port), or expected to fail in a stated way. Every ``megrez`` command, skipped
or not, must still parse with today's command line. A text block is checked too: the
output shown right after a command is that command's output, a chat transcript (``> `` lines)
is what ``megrez chat`` answers, the README's layout names files that exist. A new document
in docs/ is picked up by itself; a command or block that can neither run nor be checked
here needs one line in RULES or TEXT_RULES.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import timing
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
HAS_CUDA = torch.cuda.is_available()
HUB_IDS = {"Infinigence/Megrez2-3x7B-A3B": "moe", "Infinigence/Megrez-3B-Instruct": "dense"}


@dataclass
class Rule:
    pattern: str                      # regex searched in the command
    skip: str | None = None           # reason it cannot run here
    subs: list[tuple[str, str]] = field(default_factory=list)  # (regex, replacement) applied before running
    why: str = ""                     # reason for the substitutions
    expect_rc: int = 0
    expect_err: str | None = None     # text its stderr must contain
    forbid_out: str | None = None     # text its stdout must not contain
    background: bool = False          # a server: started, used by later commands, stopped at the end
    gpu: bool = False                 # skipped without CUDA (runs as written with it)


FREE_PORT = "{port}"
RULES = [
    Rule(r"^scripts/test\.sh", skip="the test suite itself"),
    Rule(r"python -m pytest", skip="the tests themselves"),
    Rule(r"^scripts/setup\.sh|^pip install", skip="installs packages: these tests run in the installed environment"),
    Rule(r"^huggingface-cli download", skip="downloads from the Hugging Face hub (no network here)"),
    Rule(r"^torchrun --nnodes 2", skip="needs two machines"),
    Rule(r"^torchrun --nproc-per-node 8", skip="8 processes (tests/test_train_distributed.py runs FSDP2 with 2)"),
    Rule(r"^python -m scripts\.compare_architectures", skip="trains 8 models for hours on 2 cores"),
    Rule(r"Megrez-3B-Omni", skip="needs an Omni checkpoint and media files (tests/test_omni*.py run the same paths on "
                                 "a small random one)"),
    Rule(r"^lm_eval |lm_eval_local\.py", skip="lm-evaluation-harness is not installed by setup "
                                              "(pip install 'lm-eval[api]')"),
    Rule(r"^schemathesis run", skip="tests/test_server_fuzz.py runs schemathesis against the same server (slow)"),
    Rule(r"^python benchmarks/(prefix_chat|compare_load)\.py", skip="a benchmark of two servers for minutes; its "
         "result is the table after it"),
    Rule(r"^python benchmarks/vs_llama_cpp\.py --llama-bench", skip="needs a llama.cpp build (llama-bench); minutes per "
         "round at full size; its result is the table after it"),
    Rule(r"^python benchmarks/vs_llama_cpp\.py --profile", subs=[(r"--decode \d+", ""), (r"$", " --layers 2 --decode 4")],
         why="the 340M checkpoint takes a minute to write on 2 cores: the same profile of a 2-layer one"),
    Rule(r"^git worktree add", skip="needs the project's git history (the load comparison's baseline checkout)"),
    Rule(r"^python -m scripts\.train_bench --preset megrez2-200m --seq-len 2048",
         skip="a GPU throughput measurement (16 x 2048 tokens a step)"),
    Rule(r"^bash runs/rl_arithmetic\.sh", skip="the RL experiment: 35 minutes of training; its result is the table after it"),
    Rule(r"^python -m scripts\.compare_chat .*runs-out/rl-arith", skip="compares the model the RL experiment writes"),
    Rule(r"^python benchmarks/grammar_overhead\.py", subs=[(r"--batch [\d ]+", "--batch 1 2 "), (r"$", " --shape megrez2-mini")],
         why="the 350M shape takes minutes on 2 cores: the same benchmark on a small shape"),
    Rule(r"--device cuda", gpu=True),
    Rule(r"^megrez eval .*--url http://127\.0\.0\.1:8000",
         subs=[(r"--url http://127\.0\.0\.1:8000( --api-key \S+)?", "--model DIR"), (r"--task (gsm8k-sample|mmlu-dev) ", "")],
         why="no server runs at this point of the document: the same evaluation on the engine "
             "(tests/test_eval.py runs the --url backend against a live server)"),
    Rule(r"^megrez eval .*--task (gsm8k-sample|mmlu-dev)", subs=[(r"--task (gsm8k-sample|mmlu-dev) ", "")],
         why="these tasks read their data from the lm_eval package, which setup does not install"),
    Rule(r"^megrez serve .*~/\.cache/megrez",
         subs=[(r"~/\.cache/megrez", "$MEGREZ_CACHE"), (r"--model \.\.\. ", "--model DIR "),
               (r"--port \d+", f"--port {FREE_PORT}"), (r"\s*&$", "")],
         why="the scratch directory's cache, a free port", background=True),
    Rule(r"~/notes", subs=[(r"~/notes", "notes")], why="the scratch directory's notes"),
    Rule(r"^megrez bench-offload --shape megrez2-3x7b-a3b --budgets", expect_rc=2 if not HAS_CUDA else 0,
         expect_err=None if HAS_CUDA else "needs about"),
    Rule(r"^megrez bench-offload --tier storage", subs=[(r"megrez2-350m", "megrez2-mini"), (r"--output \d+", "--output 4")],
         why="the 350M shape's sweep takes minutes on 2 cores: the same command on a small shape"),
    Rule(r"^python benchmarks/gguf_memory_budget\.py",
         subs=[(r"--gguf \S+", "--gguf mini-q4_k_m.gguf --shape megrez2-mini --kv-cache-memory 1MiB"),
               (r"--budgets [\w. ]+?(?= --|$)", "--budgets 8MiB 6MiB")],
         why="the released shape's file is 4.4 GiB and every run loads it: the same command on a small shape"),
    Rule(r"^megrez bench --shape megrez2-350m", subs=[(r"megrez2-350m", "megrez2-mini"), (r"--batch 1 4 8", "--batch 1 2")],
         why="the 350M shape takes minutes on 2 cores: the same command on a small shape"),
    Rule(r"^\./run\.sh", subs=[(r"^\./run\.sh$", "megrez chat"), (r"^\./run\.sh ", "megrez ")],
         why="./run.sh is scripts/setup.sh (this test runs in its environment) followed by megrez"),
    Rule(r"^megrez train pretrain --preset", subs=[(r"--steps 2000", "--steps 3")],
         why="2,000 steps take an hour on 2 cores"),
    Rule(r"^megrez train"),
    Rule(r"^megrez serve", subs=[(r"--port \d+", f"--port {FREE_PORT}"), (r"\s*&$", "")],
         why="a free port: the machine is shared (and run in the background here, & or not)",
         background=True),
    Rule(r"^python benchmarks/load\.py",
         subs=[(r"127\.0\.0\.1:\d+", f"127.0.0.1:{FREE_PORT}"), (r"--duration \d+", "--duration 2"),
               (r"--concurrency C\b", "--concurrency 2"), (r"--concurrency \d+", "--concurrency 4"),
               (r"^python benchmarks/load\.py", "python benchmarks/load.py --prompt-words 8")],
         why="the server of the commands before, for 2 seconds, with prompts short enough for any context that "
             "server has (the fuzzing one allows 128 tokens; the default prompts, ~87 tokens on average, "
             "sometimes exceed it and are refused, which the benchmark counts as errors)"),
    Rule(r"^curl ", subs=[(r"127\.0\.0\.1:\d+", f"127.0.0.1:{FREE_PORT}")], why="the server of the commands before",
         forbid_out='"error"'),
    Rule(r"^PYTHONPATH=src python -c"),
    Rule(r"^megrez (bench|bench-offload) "),
    Rule(r"OpenAI\(base_url=(?s:.*)tool_calls\[0\]",
         subs=[(r"127\.0\.0\.1:\d+", f"127.0.0.1:{FREE_PORT}"), (r"tools=tools\)\n", 'tools=tools, tool_choice="required")\n'),
               (r'\{"city": \{"type": "string"\}\}', '{"city": {"type": "string", "maxLength": 8}}, "additionalProperties": False')],
         why="the server of the commands before; a random model never decides to call a tool by itself, so the "
             "first request requires one, with its one argument bounded so that a random model's call ends "
             "within the token limit (the rest runs as written)"),
    Rule(r"OpenAI\(base_url=", subs=[(r"127\.0\.0\.1:\d+", f"127.0.0.1:{FREE_PORT}")],
         why="the server of the commands before"),
    Rule(r'device="cuda"', subs=[(r'device="cuda", dtype="bfloat16"', 'device="cpu", dtype="float32"')],
         why="no GPU here: the same call on the CPU"),
]

# Every command that runs here runs scaled down: the docs' figures come from full-size runs, and
# here a command is checked (it parses, runs, writes what the next command reads), not measured.
# Long training runs, evaluations and load tests take minutes to hours on 2 cores at full size.
SHRINK = [
    (r"--steps \d+", "--steps 2"),
    (r"--vision-steps \d+", "--vision-steps 2"),
    (r"--vision-batch-size \d+", "--vision-batch-size 4"),
    (r"--epochs \d+", "--epochs 1"),
    (r"--samples \d+", "--samples 2"),
    (r"--pass-k [\d ]+", "--pass-k 1 2 "),
    (r"--prompts-per-step \d+", "--prompts-per-step 2"),
    (r"--group-size \d+", "--group-size 2"),
    (r"--seeds [\d ]+", "--seeds 0 "),
    (r"--duration \d+", "--duration 2"),
    (r"--rounds \d+", "--rounds 1"),
    (r"--concurrency \d+( \d+)*", "--concurrency 2"),
    (r"--max-tokens \d+", "--max-tokens 8"),
    (r"--output \d+", "--output 8"),
    (r"--reps \d+", "--reps 1"),
    (r"--task-option n=\d+", "--task-option n=4"),
    (r"^(megrez eval (?!.*--list).*)$", r"\1 --limit 3 --max-tokens 8"),
    (r'"n": \d+', '"n": 8'),
    (r"^(megrez train rl (?!.*--task-options).*)$", r"""\1 --task-options '{"n": 8}'"""),
    (r"^(megrez train rl (?!.*--eval-task-options).*)$", r"""\1 --eval-task-options '{"n": 8}'"""),
    (r"^(megrez train rl (?!.*--filter-samples).*)$", r"\1 --filter-samples 2 --max-tokens 16"),
]

# Text blocks (``` without a language, or ```text) are outputs, listings or diagrams.
TEXT_RULES = [
    (r"^> ", "transcript"),                 # a chat: "> question" lines, each followed by the answer
    (r"^src/megrez/", "layout"),            # the README's layout: every path it names exists
    (r"^compute stream", "skip: a timeline diagram"),
    (r"^main thread", "skip: a timeline diagram"),
    (r"^\$ python examples/|^# index: ", "skip: a dated, recorded run of an example (the command itself runs in "
                                         "test_every_command_and_program_in_the_docs_runs)"),
]


# ---------------------------------------------------------------------------------------- parsing

@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    text: str
    after: "Block | None" = None   # the code block right before, when only blank lines separate them


def blocks(doc: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    found, previous = [], None
    for m in re.finditer(r"^```(\w*)\n(.*?)^```[ \t]*$", text, re.M | re.S):
        b = Block(doc, text[:m.start()].count("\n") + 1, m.group(1), m.group(2))
        if previous is not None and not text[previous[1]:m.start()].strip():
            b.after = previous[0]
        found.append(b)
        previous = (b, m.end())
    return found


def commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) for each command of a bash block: comments dropped, continuations joined,
    a quoted string that spans lines kept as it is."""
    out, pending, start = [], "", 0
    for i, raw in enumerate(block.text.splitlines()):
        if not pending:
            line = strip_comment(raw.strip())
            start = block.line + 1 + i
            if not line or line.startswith("> "):  # "> text": typed into the command before it
                continue
            pending = line
        elif pending.endswith("\n"):
            pending += raw                      # inside a quoted string: the line as it is
        else:
            pending += " " + strip_comment(raw.strip())
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        if open_quote(pending):
            pending += "\n"
            continue
        out.append((start, strip_comment(pending)))
        pending = ""
    return out


def open_quote(text: str) -> bool:
    return text.count('"') % 2 == 1 or text.count("'") % 2 == 1


def strip_comment(command: str) -> str:
    """The command without a ``# comment`` that starts outside quotes."""
    if command.startswith("#"):
        return ""
    cut = command.find(" #")
    while cut >= 0:
        if not open_quote(command[:cut]):
            return command[:cut].rstrip()
        cut = command.find(" #", cut + 1)
    return command.rstrip()


def rule_for(code: str) -> Rule:
    for rule in RULES:
        if re.search(rule.pattern, code, re.M):
            return rule
    return Rule("")


@dataclass
class Step:
    id: str
    block: Block
    code: str
    kind: str          # "bash", "python", "text"
    rule: Rule

    @property
    def doc_name(self) -> str:
        return str(self.block.doc.relative_to(REPO))


def steps(doc: Path) -> list[Step]:
    out = []
    for b in blocks(doc):
        name = f"{doc.relative_to(REPO)}:{b.line}"
        if b.lang in ("bash", "sh", "shell"):
            for line, cmd in commands(b):
                out.append(Step(f"{doc.relative_to(REPO)}:{line}", b, cmd, "bash", rule_for(cmd)))
        elif b.lang == "python":
            out.append(Step(name, b, b.text, "python", rule_for(b.text)))
        elif b.lang in ("", "text"):
            out.append(Step(name, b, b.text, "text", Rule("")))
        else:
            raise AssertionError(f"{name}: a ```{b.lang} block: teach tests/test_docs.py how to check it")
    return out


ALL = [s for doc in DOCS for s in steps(doc)]


def megrez_argv(cmd: str) -> list[list[str]]:
    """The argument lists of every ``megrez`` invocation in a shell command."""
    out = []
    for part in re.split(r"\|\||&&|[|;&]", cmd):
        words = shlex.split(part.strip()) if part.strip() else []
        while words and re.match(r"^\w+=", words[0]):
            words = words[1:]
        if words and words[0] in ("megrez", "./run.sh"):
            out.append(words[1:] or ["chat"])
    return out


@pytest.mark.parametrize("step", [s for s in ALL if s.kind == "bash"], ids=lambda s: s.id)
def test_every_megrez_command_in_the_docs_parses(step):
    """Skipped or not, a documented command uses only options that exist."""
    from megrez.cli import build_parser

    for argv in megrez_argv(step.code):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{step.id}: `megrez {' '.join(argv)}` does not parse (exit {e.code})") from None


# ---------------------------------------------------------------------------------------- running

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_cache(root: Path, hub_id: str, source: Path) -> None:
    """A Hugging Face cache entry for ``hub_id`` holding ``source``'s files (what a download leaves)."""
    repo = root / "hub" / f"models--{hub_id.replace('/', '--')}"
    revision = "0" * 40
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)


def write_data(d: Path) -> None:
    import json

    words = ("the word was light and the light was good in the beginning God created heaven and earth "
             "床前 明月光 疑是 地上霜 举头 望明月 低头 思故乡").split()
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(120):  # long enough that the 1% validation split holds a 512-token row
            f.write(json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(600 + i % 30))},
                               ensure_ascii=False) + "\n")
    with open(d / "chat.jsonl", "w", encoding="utf-8") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                             {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}) + "\n")
    with open(d / "gsm8k_test.jsonl", "w", encoding="utf-8") as f:
        for i in range(4):
            f.write(json.dumps({"question": f"Tom has {i} apples and buys {i + 2} more. How many does he have?",
                                "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"}) + "\n")
    (d / "user.schema.json").write_text(json.dumps({"type": "object", "properties": {"name": {"type": "string"}},
                                                    "required": ["name"]}))
    (d / "yesno.gbnf").write_text('root ::= "yes" | "no"\n')
    (d / "rl.json").write_text(json.dumps({"init": "DIR", "task": "arithmetic", "out": "runs-out/rl-config",
                                           "steps": 2, "prompts_per_step": 2, "group_size": 2}))
    (d / "notes").mkdir()
    (d / "notes" / "weather.md").write_text("# 北京天气\n\n北京今天晴，气温 4°C。\n", encoding="utf-8")
    (d / "pt.json").write_text(json.dumps({"preset": "megrez2-test", "data": ["corpus.jsonl"], "out": "runs-out/cfg",
                                           "steps": 3, "seq_len": 64, "batch_size": 2, "progress": False}))


class DocRun:
    """Runs one document's steps in order, each once, in a shared scratch directory."""

    def __init__(self, doc: Path, root: Path, tiny_moe: Path, tiny_dense: Path):
        self.doc, self.dir = doc, root / doc.stem
        self.dir.mkdir(parents=True)
        for name in ("src", "scripts", "benchmarks", "examples", "runs"):
            (self.dir / name).symlink_to(REPO / name)
        for name, target in (("Megrez2-3x7B-A3B", tiny_moe), ("Megrez-3B-Instruct", tiny_dense), ("DIR", tiny_moe)):
            (self.dir / name).symlink_to(target)
        hf = self.dir / "hf"
        for hub_id, arch in HUB_IDS.items():
            hub_cache(hf, hub_id, tiny_moe if arch == "moe" else tiny_dense)
        write_data(self.dir)
        bindir = str(Path(sys.executable).parent)
        # A cache of its own (search index, chat history: documents run side by side); the
        # compiled kernels are shared, built once.
        cache = self.dir / ".cache"
        cache.mkdir()
        (root / "kernels").mkdir(exist_ok=True)
        (cache / "kernels").symlink_to(root / "kernels")
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "HF_HOME": str(hf),
                    "HF_HUB_OFFLINE": "1", "MEGREZ_CACHE": str(cache), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(REPO / "src")}
        self.env.pop("MEGREZ_API_KEY", None)
        self.port = free_port()
        self.done: dict[str, subprocess.CompletedProcess | None] = {}
        self.servers: list[subprocess.Popen] = []
        self.steps = steps(doc)
        self.lock = threading.Lock()

    def prepare(self, step: Step) -> str:
        code = step.code
        for pattern, replacement in step.rule.subs:
            code = re.sub(pattern, replacement, code, flags=re.M)
        if step.kind == "bash":
            for pattern, replacement in SHRINK:
                code = re.sub(pattern, replacement, code, flags=re.M)
        return code.replace(FREE_PORT, str(self.port))

    def run_upto(self, step: Step):
        """Runs the steps before ``step`` that have not run yet, then ``step``. A quick step
        needs only the quick ones before it (the slow ones may be deselected)."""
        with self.lock:
            for s in self.steps:
                if s.id not in self.done and (_marks(step) or not _marks(s) or s.id == step.id):
                    try:
                        self.done[s.id] = self.execute(s)
                    except Exception as e:  # reported by the step's own test, wherever it ran
                        self.done[s.id] = e
                if s.id == step.id:
                    if isinstance(self.done[s.id], Exception):
                        raise self.done[s.id]
                    return self.done[s.id]

    def execute(self, step: Step):
        if step.kind == "text" or step.rule.skip or (step.rule.gpu and not HAS_CUDA):
            return None
        code = self.prepare(step)
        if step.kind == "bash":
            m = re.match(r"^export (\w+)=(\S+)$", code)
            if m:
                self.env[m.group(1)] = m.group(2)
                return subprocess.CompletedProcess(code, 0, "", "")
            if step.rule.background:
                return self.start_server(code)
            return timing.run(["bash", "-c", code], timeout=600, cwd=self.dir, env=self.env)
        return timing.run([sys.executable, "-c", code], timeout=600, cwd=self.dir, env=self.env)

    def start_server(self, code: str):
        self.close()  # a document's next server takes the port of the one before
        proc = subprocess.Popen(["bash", "-c", "exec " + code + " --threads 1"], cwd=self.dir, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.servers.append(proc)
        deadline = timing.Deadline(180)
        while not deadline.expired():
            if proc.poll() is not None:
                return subprocess.CompletedProcess(code, proc.returncode, *proc.communicate())
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return subprocess.CompletedProcess(code, 0, "", "")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{code}: the server did not come up")

    def close(self):
        for proc in self.servers:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=timing.Deadline(30).remaining())
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        self.servers = []


# Documents run side by side, each command on one thread: a document's commands wait on one
# another, documents do not.
DOC_WORKERS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_moe, tiny_dense, request):
    made: dict[Path, DocRun] = {}
    made_lock = threading.Lock()
    root = tmp_path_factory.mktemp("docs")

    def get(doc: Path) -> DocRun:
        with made_lock:
            if doc not in made:
                made[doc] = DocRun(doc, root, tiny_moe, tiny_dense)
            return made[doc]

    # The selected command steps, last of each document first seen in test order: workers run
    # each document up to there while the tests wait for their own step's result.
    last: dict[Path, Step] = {}
    for item in request.session.items:
        step = getattr(item, "callspec", None) and item.callspec.params.get("step")
        if item.originalname == "test_every_command_and_program_in_the_docs_runs" and step is not None \
                and not step.rule.skip:
            last[step.block.doc] = step
    pool = ThreadPoolExecutor(max_workers=DOC_WORKERS, thread_name_prefix="doc")
    for doc, step in last.items():
        pool.submit(lambda doc=doc, step=step: get(doc).run_upto(step))
    yield get
    pool.shutdown(wait=True, cancel_futures=True)
    for run in made.values():
        run.close()


QUICK = r"^\./run\.sh"  # the quick run (scripts/test.sh) runs the quick start; CI runs every step


def _marks(step: Step):
    return [] if re.match(QUICK, step.code) else [pytest.mark.slow]


@pytest.mark.parametrize("step", [pytest.param(s, marks=_marks(s), id=s.id) for s in ALL if s.kind != "text"])
def test_every_command_and_program_in_the_docs_runs(step, runs):
    if step.rule.skip:
        pytest.skip(step.rule.skip)
    if step.rule.gpu and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    result = runs(step.block.doc).run_upto(step)
    where = f"{step.id}: {step.code.splitlines()[0][:100]}"
    assert result.returncode == step.rule.expect_rc, \
        f"{where}\nexit {result.returncode}\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, f"{where}\n{result.stderr[-3000:]}"
    if step.rule.expect_err:
        assert step.rule.expect_err in result.stderr, f"{where}\n{result.stderr[-3000:]}"
    if step.rule.forbid_out:
        assert step.rule.forbid_out not in result.stdout, f"{where}\n{result.stdout[-3000:]}"


# ---------------------------------------------------------------------------------------- text blocks

def text_kind(step: Step) -> str:
    for pattern, kind in TEXT_RULES:
        if re.search(pattern, step.code):
            return kind
    if step.block.after is not None and step.block.after.lang in ("bash", "sh", "shell"):
        return "output"
    if step.doc_name == "docs/shipped-model.md":
        return "sample"
    return "unknown"


@pytest.mark.parametrize("step", [s for s in ALL if s.kind == "text"], ids=lambda s: s.id)
def test_every_text_block_in_the_docs_is_true(step, runs, request):
    kind = text_kind(step)
    if kind == "unknown":
        raise AssertionError(f"{step.id}: a text block tests/test_docs.py cannot check: add it to TEXT_RULES")
    if kind.startswith("skip:"):
        pytest.skip(kind[5:].strip())
    if kind == "layout":
        names = re.findall(r"(?:^|\s)((?:src|tests|runs|scripts|benchmarks)/[\w./-]*)", step.code)
        missing = [n for n in names if not (REPO / n.rstrip(",")).exists()]
        assert names and not missing, f"{step.id}: the layout names files that do not exist: {missing}"
        return
    if kind == "output":
        previous = [s for s in ALL if s.block is step.block.after]
        result = runs(step.block.doc).run_upto(previous[-1])
        assert result is not None and result.returncode == 0
        assert result.stdout.strip() == step.code.strip(), f"{step.id}: {previous[-1].code} printed\n{result.stdout}"
        return
    if kind == "transcript":
        questions, answers = [], []
        for line in step.code.strip().splitlines():
            if line.startswith("> "):
                questions.append(line[2:])
                answers.append([])
            else:
                answers[-1].append(line)
        result = timing.run([sys.executable, "-m", "megrez.cli", "chat", "--threads", "1"], timeout=300,
                            input="".join(q + "\n" for q in questions), env=runs(step.block.doc).env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines() == ["\n".join(a) for a in answers], result.stdout
        return
    if kind == "sample":
        check_shipped_sample(step, request.getfixturevalue("bundled"))


@pytest.fixture(scope="module")
def bundled():
    from megrez import LLM

    return LLM(max_num_seqs=1)


def check_shipped_sample(step: Step, bundled):
    """docs/shipped-model.md: "**user:** PROMPT" then the greedy answer in a block; the raw
    completions after it are sampled (temperature 0.7), which rounding can change across CPUs."""
    head = "\n".join(step.block.doc.read_text(encoding="utf-8").splitlines()[: step.block.line - 1]) + "\n"
    prompts = re.findall(r"\*\*user:\*\* (.+)\n", head)
    if "Raw completions" in head or not prompts:
        pytest.skip("a sampled raw completion (temperature 0.7): rounding across CPUs can change it")
    from megrez import SamplingParams

    out = bundled.chat([{"role": "user", "content": prompts[-1]}], SamplingParams(temperature=0, max_tokens=80))
    assert out.text.strip() == step.code.strip(), f"{step.id}: {prompts[-1]!r} now answers {out.text!r}"


def test_the_docs_have_commands_to_check():
    assert len([s for s in ALL if s.kind == "bash"]) > 30 and any(s.kind == "python" for s in ALL)
