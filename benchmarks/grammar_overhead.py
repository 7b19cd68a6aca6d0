"""What grammar-constrained decoding costs in decode tokens/s, on the CPU benchmark shape
(megrez2-350m, random weights) with a 32K byte-level BPE tokenizer trained on the spot.

    python benchmarks/grammar_overhead.py --batch 1 8 --output 48 --reps 3

For each batch size it runs the same requests unconstrained and constrained by a JSON schema,
interleaved (plain, grammar, plain, grammar, ...), and reports decode tokens/s of each, their
ratio (the median over repetitions), and the worker time spent computing masks per token,
which runs beside the forward pass, and how much of it sampling still waited for (the part the
forward pass did not hide). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string"}, "score": {"type": "number"},
    "tags": {"type": "array", "items": {"type": "string"}}, "active": {"type": "boolean"}},
    "required": ["id", "name", "score", "tags", "active"], "additionalProperties": False}}


def tokenizer_32k(vocab: int):
    from megrez.tiny import tokenizer_files, train_tokenizer
    from megrez.tokenizer import Tokenizer

    stdlib = Path(json.__file__).parents[1]
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))]
    out = Path(tempfile.mkdtemp())
    for name, content in tokenizer_files(train_tokenizer(texts, vocab), 4096).items():
        (out / name).write_text(content, encoding="utf-8")
    return Tokenizer(out)


def run(engine, compiler, grammar, batch: int, prompt: int, output: int, seed: int) -> dict:
    import torch

    from megrez.engine import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    procs = []
    for b in range(batch):
        ids = torch.randint(10, engine.model.args.vocab_size, (prompt,), generator=gen).tolist()
        p = [compiler.processor(grammar)] if grammar else []
        procs += p
        engine.add_request(ids, SamplingParams(temperature=1.0, seed=seed + b, max_tokens=output, ignore_eos=True),
                           logits_processors=p)
    engine.step()  # prefill and the first token
    steps = []
    while engine.running:
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    warm = steps[2:]
    return {"decode_tokens_per_s": batch * len(warm) / sum(warm),
            "mask_ms_per_token": 1e3 * sum(pr.mask_seconds for pr in procs) / max(1, batch * (output + 1)),
            "exposed_ms_per_token": 1e3 * sum(pr.wait_seconds for pr in procs) / max(1, batch * (output + 1)),
            "grammar_errors": sum(pr.error is not None for pr in procs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="megrez2-350m")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--output", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    import torch

    from megrez.bench import device_name, random_model
    from megrez.engine import Engine
    from megrez.grammar import GrammarCompiler, json_schema_grammar
    from megrez.presets import PRESETS

    if a.threads:
        torch.set_num_threads(a.threads)
    vocab = PRESETS[a.shape]["vocab_size"]
    tok = tokenizer_32k(vocab)
    model = random_model(a.shape, torch.device("cpu"), torch.float32)
    compiler = GrammarCompiler(tok, model.args.vocab_size)
    grammar = json_schema_grammar(SCHEMA)
    compiler.check(grammar, "schema")
    print(f"{a.shape}: random weights, float32, {device_name(torch.device('cpu'))}, "
          f"{torch.get_num_threads()} threads; tokenizer {tok.vocab_size} tokens")
    results = []
    for batch in a.batch:
        engine = Engine(model, tok, max_num_seqs=batch, max_model_len=a.prompt + a.output + 2,
                        kv_cache_memory=1 << 40)
        run(engine, compiler, grammar, batch, 8, 4, 0)  # warm-up, both paths
        run(engine, compiler, None, batch, 8, 4, 0)
        plain, constrained = [], []
        for rep in range(a.reps):
            plain.append(run(engine, compiler, None, batch, a.prompt, a.output, rep))
            constrained.append(run(engine, compiler, grammar, batch, a.prompt, a.output, rep))
        ratios = [c["decode_tokens_per_s"] / p["decode_tokens_per_s"] for p, c in zip(plain, constrained)]
        r = {"batch": batch, "plain_tokens_per_s": statistics.median(p["decode_tokens_per_s"] for p in plain),
             "grammar_tokens_per_s": statistics.median(c["decode_tokens_per_s"] for c in constrained),
             "ratio_median": statistics.median(ratios), "ratios": ratios,
             "mask_ms_per_token": statistics.median(c["mask_ms_per_token"] for c in constrained),
             "exposed_ms_per_token": statistics.median(c["exposed_ms_per_token"] for c in constrained),
             "grammar_errors": sum(c["grammar_errors"] for c in constrained)}
        results.append(r)
        print(f"batch {batch}: plain {r['plain_tokens_per_s']:.1f} tok/s, grammar {r['grammar_tokens_per_s']:.1f} "
              f"tok/s, ratio {r['ratio_median']:.3f} (runs: {', '.join(f'{x:.3f}' for x in ratios)}); "
              f"mask {r['mask_ms_per_token']:.3f} ms/token on the worker, of which sampling waited "
              f"{r['exposed_ms_per_token']:.3f} ms/token")
    print(json.dumps({"shape": a.shape, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                      "prompt": a.prompt, "output": a.output, "results": results}))


if __name__ == "__main__":
    main()
