"""lm-evaluation-harness end to end against ``megrez serve``, on local task files (no downloads).

    pip install lm-eval
    python benchmarks/lm_eval_local.py                      # the bundled model
    python benchmarks/lm_eval_local.py --model DIR --out runs-out/lm-eval

Starts ``megrez serve`` on a free loopback port and runs lm-eval's ``local-completions``
backend on two tasks written here: ``megrez_kjv_mc`` (multiple choice, scored by
loglikelihood: which of four continuations follows a King James Bible verse opening) and
``megrez_poem_gen`` (generate_until: the next line of a Tang poem, exact match). lm-eval
tokenizes through the server's /tokenize, /detokenize and /tokenizer_info routes.

Then every loglikelihood lm-eval logged is recomputed by the engine itself, in process:
once with the same prompt-logprob path the server used (must agree to the printed digit) and
once as a plain forward pass over the whole sequence without any cache (agrees to float32
rounding). Prints the scores and the largest differences, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import serve_process

# (verse opening, its continuation): King James Bible, public domain.
VERSES = [
    ("In the beginning God created", " the heaven and the earth."),
    ("And God said, Let there be light:", " and there was light."),
    ("The LORD is my shepherd;", " I shall not want."),
    ("For God so loved the world, that he gave", " his only begotten Son"),
    ("Jesus wept.", " And the Jews said, Behold how he loved him!"),
    ("And God saw the light, that it was good: and God divided", " the light from the darkness."),
    ("Blessed are the meek:", " for they shall inherit the earth."),
    ("Blessed are the pure in heart:", " for they shall see God."),
    ("He maketh me to lie down in green pastures:", " he leadeth me beside the still waters."),
    ("Ask, and it shall be given you; seek,", " and ye shall find;"),
    ("In the beginning was the Word, and the Word was with God,", " and the Word was God."),
    ("For all have sinned,", " and come short of the glory of God;"),
    ("Thy word is a lamp unto my feet,", " and a light unto my path."),
    ("To every thing there is a season,", " and a time to every purpose under the heaven:"),
    ("The heavens declare the glory of God;", " and the firmament sheweth his handywork."),
    ("Vanity of vanities, saith the Preacher,", " vanity of vanities; all is vanity."),
]
# (first line, second line): Tang poems, public domain.
POEMS = [
    ("床前明月光，", "疑是地上霜。"), ("举头望明月，", "低头思故乡。"), ("白日依山尽，", "黄河入海流。"),
    ("欲穷千里目，", "更上一层楼。"), ("春眠不觉晓，", "处处闻啼鸟。"), ("夜来风雨声，", "花落知多少。"),
    ("红豆生南国，", "春来发几枝。"), ("慈母手中线，", "游子身上衣。"), ("锄禾日当午，", "汗滴禾下土。"),
    ("千山鸟飞绝，", "万径人踪灭。"), ("独在异乡为异客，", "每逢佳节倍思亲。"), ("两个黄鹂鸣翠柳，", "一行白鹭上青天。"),
]

MC_TASK = """task: megrez_kjv_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_TASK = """task: megrez_poem_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{first}}}}"
doc_to_target: "{{{{second}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
filter_list:
  - name: first-line
    filter:
      - function: regex
        regex_pattern: "^([^。]*。)"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "kjv_mc.jsonl", "w", encoding="utf-8") as f:
        for i, (context, answer) in enumerate(VERSES):
            # Three distractors: other verses' continuations, chosen deterministically.
            others = [VERSES[(i + k) % len(VERSES)][1] for k in (3, 7, 11)]
            choices = others[: i % 4] + [answer] + others[i % 4:]
            f.write(json.dumps({"context": context, "choices": choices, "answer": i % 4}, ensure_ascii=False) + "\n")
    with open(root / "poem_gen.jsonl", "w", encoding="utf-8") as f:
        for first, second in POEMS:
            f.write(json.dumps({"first": first, "second": second}, ensure_ascii=False) + "\n")
    (root / "megrez_kjv_mc.yaml").write_text(MC_TASK.format(data=root / "kjv_mc.jsonl"), encoding="utf-8")
    (root / "megrez_poem_gen.yaml").write_text(GEN_TASK.format(data=root / "poem_gen.jsonl"), encoding="utf-8")
    return root


def engine_loglikelihoods(a, requests: list[tuple[list[int], list[int]]]) -> tuple[list[float], list[float]]:
    """(prompt-logprob path of the engine, plain cache-free forward) for each (context, continuation)."""
    import torch

    from megrez import LLM, SamplingParams

    llm = LLM(a.model, device="cpu", max_num_seqs=1)
    engine = llm.engine
    via_engine, plain = [], []
    for context, continuation in requests:
        ids = context + continuation
        req = engine.add_request(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
        prompt_lp = None
        while req.finish_reason is None:
            for out in engine.step():
                if out.request_id == req.request_id and out.prompt_logprobs is not None:
                    prompt_lp = out.prompt_logprobs
        via_engine.append(sum(e.logprob for e in prompt_lp[len(context):]))
        with torch.no_grad():
            lp = llm.model(torch.tensor([ids]))[0].float().log_softmax(-1)
        plain.append(sum(float(lp[p, ids[p + 1]]) for p in range(len(context) - 1, len(ids) - 1)))
    return via_engine, plain


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into context and continuation tokens (TemplateAPI._encode_pair)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--out", default=None, help="where task files and lm-eval samples go (default: a temp dir)")
    p.add_argument("--threads", type=int, default=1, help="server threads (default 1: lm-eval runs beside it)")
    a = p.parse_args(argv)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megrez.llm import default_model
    from megrez.tokenizer import Tokenizer

    a.model = a.model or str(default_model())
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="megrez-lm-eval-"))
    tasks = write_tasks(out / "tasks")
    server, url = serve_process.start(["--log-level", "warning", "--served-model-name", "megrez", "--threads",
                                       str(a.threads), "--model", a.model])
    try:
        t = time.perf_counter()
        results = simple_evaluate(
            model="local-completions",
            model_args=f"model=megrez,base_url={url}/v1/completions,tokenizer_backend=remote,"
                       f"max_length=1024,num_concurrent=1,max_retries=1",
            tasks=["megrez_kjv_mc", "megrez_poem_gen"], task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        seconds = time.perf_counter() - t
    finally:
        serve_process.stop(server)
    scores = {task: {k: v for k, v in r.items() if isinstance(v, (int, float)) and "stderr" not in k}
              for task, r in results["results"].items()}
    tok = Tokenizer(a.model)
    samples = results["samples"]["megrez_kjv_mc"]
    requests, reported = [], []
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            requests.append(encode_pair(tok, context, continuation))
            reported.append(float(resp[0][0]))
    via_engine, plain = engine_loglikelihoods(a, requests)
    diff_engine = max(abs(x - y) for x, y in zip(reported, via_engine))
    diff_plain = max(abs(x - y) for x, y in zip(reported, plain))
    summary = {"model": a.model, "scores": scores, "loglikelihood_requests": len(reported),
               "max_abs_diff_vs_engine": diff_engine, "max_abs_diff_vs_plain_forward": diff_plain,
               "lm_eval_seconds": seconds, "out": str(out)}
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    for task, s in scores.items():
        print(f"{task:18s} " + "  ".join(f"{k} {v:.4f}" for k, v in s.items()))
    print(f"{len(reported)} loglikelihoods: max |lm-eval - engine| = {diff_engine:.2e}, "
          f"max |lm-eval - plain forward| = {diff_plain:.2e}")
    print(json.dumps(summary))
    ok = diff_engine <= 1e-5 * max(1.0, max(abs(x) for x in reported)) and diff_plain < 1e-3
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
