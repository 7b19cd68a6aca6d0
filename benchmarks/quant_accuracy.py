"""Accuracy of quantized weights against float32: perplexity ratio, KL divergence of the
next-token distribution and top-1 agreement, teacher-forced over the same positions.

    apt-get install -y bible-kjv fortunes-zh      # the shipped model's held-out text
    python benchmarks/quant_accuracy.py --positions 4096 --out docs/quant_accuracy.json

Two models:
- the bundled trained model (src/megrez/assets/megrez2-tiny-chat) on its held-out validation
  documents (every 100th KJV chapter, every 50th poem, every 100th classical entry, exactly the
  documents ``scripts/prepare_corpus.py`` leaves out of training);
- a random Megrez2-shaped checkpoint (the megrez2-350m widths: hidden 1024, experts of 256,
  top-6, 4 shared, dense intermediate 2816; by default 4 layers and 64 experts, fewer with
  --random-layers/--random-experts) on random token sequences.

For each scheme the model is quantized while loading, exactly as ``--quantization`` does.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/ as a package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from megrez.loading import load_model, save_model  # noqa: E402
from megrez.quant.modules import quantized_bytes  # noqa: E402
from megrez.tokenizer import Tokenizer  # noqa: E402

SCHEMES = ["q8_0", "q4_k_m", "q4_0"]


def held_out_documents() -> list[str]:
    from scripts import prepare_corpus as pc

    chapters = pc.kjv_chapters(pc.kjv_verses())
    ps = pc.poems()
    poem_docs = [f"{t}\n作者：{a}\n{b}" for t, a, b in ps]
    classics = pc.classics({a for _, a, _ in ps})
    return chapters[50::100] + poem_docs[25::50] + classics[50::100]


def windows_from_text(tok: Tokenizer, docs: list[str], length: int, positions: int) -> list[list[int]]:
    out, total = [], 0
    for doc in docs:
        ids = tok.encode(doc)
        for start in range(0, max(len(ids) - 1, 0), length):
            piece = ids[start:start + length + 1]
            if len(piece) >= 16:
                out.append(piece)
                total += len(piece) - 1
        if total >= positions:
            break
    return out


@torch.no_grad()
def log_probs(model, windows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax [P, V] at every teacher-forced position, the next tokens [P])."""
    rows, targets = [], []
    for w in windows:
        x = torch.tensor([w[:-1]])
        rows.append(torch.log_softmax(model(x)[0].float(), dim=-1))
        targets.append(torch.tensor(w[1:]))
    return torch.cat(rows), torch.cat(targets)


def compare(ref: tuple, got: tuple) -> dict:
    (lp_ref, targets), (lp, _) = ref, got
    nll_ref = -lp_ref.gather(1, targets[:, None]).mean()
    nll = -lp.gather(1, targets[:, None]).mean()
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    return {"positions": int(targets.numel()), "ppl_float32": float(nll_ref.exp()), "ppl": float(nll.exp()),
            "ppl_ratio": float((nll - nll_ref).exp()), "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)),
            "top1_agreement": float((lp_ref.argmax(-1) == lp.argmax(-1)).float().mean())}


def run_model(name: str, path: Path, windows: list[list[int]]) -> list[dict]:
    t = time.time()
    base = load_model(path, device="cpu", dtype="float32")
    ref = log_probs(base, windows)
    rows = [{"model": name, "scheme": "float32", "weights_bytes": quantized_bytes(base), **compare(ref, ref)}]
    del base
    print(f"{name}: float32 done in {time.time() - t:.0f}s", file=sys.stderr)
    for scheme in SCHEMES:
        t = time.time()
        model = load_model(path, device="cpu", quantization=scheme)
        row = {"model": name, "scheme": scheme, "weights_bytes": quantized_bytes(model),
               **compare(ref, log_probs(model, windows))}
        rows.append(row)
        print(f"{name}: {scheme} {row} ({time.time() - t:.0f}s)", file=sys.stderr)
        del model
    return rows


def random_megrez2(out: Path, layers: int = 4, experts: int = 64, vocab: int = 32000) -> Path:
    from megrez.models import build_model
    from megrez.presets import PRESETS
    from megrez.tiny import TOKENIZER_CORPUS, tokenizer_files, train_tokenizer

    config = {**PRESETS["megrez2-350m"], "num_hidden_layers": layers, "n_routed_experts": experts,
              "vocab_size": vocab, "torch_dtype": "float32"}
    model = build_model(config)
    gen = torch.Generator().manual_seed(0)
    model.init_weights(std=0.02, generator=gen)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0 / config["hidden_size"] ** 0.5, generator=gen)
    model.hf_config = config
    tok = train_tokenizer(TOKENIZER_CORPUS.splitlines(), 1024)
    return save_model(model, out, dtype=torch.float32, extra_files=tokenizer_files(tok, 4096))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=4096, help="teacher-forced positions per model")
    ap.add_argument("--length", type=int, default=256, help="tokens per window")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--skip-random", action="store_true")
    ap.add_argument("--random-layers", type=int, default=4)
    ap.add_argument("--random-experts", type=int, default=64)
    ap.add_argument("--random-vocab", type=int, default=32000)
    a = ap.parse_args()
    shipped = Path(__file__).resolve().parents[1] / "src/megrez/assets/megrez2-tiny-chat"
    tok = Tokenizer(shipped)
    windows = windows_from_text(tok, held_out_documents(), a.length, a.positions)
    results = run_model("megrez2-tiny-chat (held-out text)", shipped, windows)
    if not a.skip_random:
        with tempfile.TemporaryDirectory() as d:
            path = random_megrez2(Path(d) / "random", a.random_layers, a.random_experts, a.random_vocab)
            vocab = json.loads((path / "config.json").read_text())["vocab_size"]
            gen = torch.Generator().manual_seed(1)
            n = max(1, a.positions // a.length)
            rand = [torch.randint(0, vocab, (a.length + 1,), generator=gen).tolist() for _ in range(n)]
            results += run_model(f"random Megrez2 (megrez2-350m widths, {a.random_layers} layers, {a.random_experts} "
                                 f"experts, vocab {a.random_vocab}; random tokens)", path, rand)
    summary = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "results": results}
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    if a.out:
        Path(a.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
