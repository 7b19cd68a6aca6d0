"""Training throughput of a Megrez2-architecture model: tokens/s and model FLOP utilisation
for the real training step (packed rows, FlexAttention on CUDA, bf16 autocast, AdamW, routing-bias
update), on random tokens in documents of random length.

    python -m scripts.train_bench --preset megrez2-200m --seq-len 2048 --batch-size 16      # GPU
    python -m scripts.train_bench --preset megrez2-tiny --seq-len 256 --batch-size 8 --vocab 8192   # CPU

Prints a human summary and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from megrez.models import build_model
from megrez.presets import preset_config
from megrez.train.attention import packed_context
from megrez.train.balance import ExpertLoad
from megrez.train.data import PAD_DOC, Batch, pack_stream
from megrez.train.flops import flops_per_token, peak_flops
from megrez.train.loss import loss_sum
from megrez.train.optim import build_optimizer
from megrez.train.trainer import autocast_for, enable_activation_checkpointing


def random_batch(vocab: int, batch: int, seq_len: int, gen: torch.Generator) -> Batch:
    docs, n = [], 0
    while n < batch * seq_len + 1:
        length = int(torch.randint(64, 2 * seq_len, (1,), generator=gen))
        docs.append(torch.randint(0, vocab, (length,), generator=gen).tolist())
        n += length
    rows = pack_stream(docs, seq_len)
    return Batch.from_rows(rows, slice(0, batch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="megrez2-200m")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation, allocator)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--attention", default="auto", choices=["auto", "dense", "flex"])
    ap.add_argument("--activation-checkpointing", action="store_true")
    a = ap.parse_args()

    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = build_model(preset_config(a.preset, a.vocab))
    model.init_weights(0.02)
    model.to(device).train()
    counts = model.parameter_counts()
    if a.activation_checkpointing:
        enable_activation_checkpointing(model)
    opt = build_optimizer(model, 3e-4, 0.1)
    balance = ExpertLoad(model)
    autocast = autocast_for(a.precision, device)
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(a.vocab, a.batch_size, a.seq_len, gen).to(device) for _ in range(4)]

    def step(batch):
        balance.token_mask = (batch.doc_ids != PAD_DOC).reshape(-1)
        balance.active = True
        with autocast():
            logits = model(batch.inputs, cache=packed_context(batch.doc_ids, a.attention))
        s, c = loss_sum(logits, batch, "per_token")
        balance.active = False
        (s / max(c, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance.update_biases(model, 1e-3)

    for i in range(a.warmup):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tok_s = a.steps * a.batch_size * a.seq_len / dt
    fpt = flops_per_token(model, a.seq_len)
    peak = peak_flops(device)
    result = {
        "preset": a.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "stored_params": counts["stored"], "active_params": counts["active"],
        "seq_len": a.seq_len, "batch_size": a.batch_size, "precision": a.precision, "attention": a.attention,
        "activation_checkpointing": a.activation_checkpointing, "tokens_per_s": round(tok_s, 1),
        "flops_per_token": fpt, "achieved_tflops": round(tok_s * fpt / 1e12, 4),
        "mfu": round(tok_s * fpt / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    print(f"{a.preset}: {counts['stored'] / 1e6:.1f}M stored / {counts['active'] / 1e6:.1f}M active, "
          f"{tok_s:,.0f} tokens/s, {result['achieved_tflops']:.3f} TFLOP/s"
          + (f", MFU {result['mfu']:.1%}" if peak else ""))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
