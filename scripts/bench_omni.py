"""Megrez-3B-Omni speed at the released shapes with random weights (CPU by default):
image encode time (one 720 x 1480 image = 7 crops), audio encode time per second of audio,
and time to first token / decode speed for the official benchmark setup (8 sequences of 128
text tokens + one 720 x 1480 image, 128 output tokens), with a text-only prompt of the same
length measured in the same run as the baseline.

    python scripts/bench_omni.py [--dtype float32|bfloat16] [--device cpu] [--skip-ttft]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--out-tokens", type=int, default=128)
    p.add_argument("--skip-ttft", action="store_true")
    a = p.parse_args()

    from megrez.engine import Engine, SamplingParams
    from megrez.loading.model import available_host_memory, materialize
    from megrez.models import build_model
    from megrez.multimodal.audio import audio_features
    from megrez.multimodal.image import slice_image
    from megrez.presets import PRESETS

    cfg = PRESETS["megrez-3b-omni"]
    with torch.device("meta"):
        model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(a.dtype)
    free = available_host_memory() or 0
    fits = n_params * 4 + (3 << 30) < min(21 << 30, 0.9 * free)  # weights, KV cache and activations
    if dtype is None or (dtype == torch.float32 and not fits):
        if dtype == torch.float32:
            print(f"# float32 does not fit in the {free / 2**30:.1f} GiB available: bfloat16", file=sys.stderr)
        dtype = torch.float32 if fits else torch.bfloat16
    device = torch.device(a.device)
    materialize(model, device, dtype)
    t = time.perf_counter()
    model.init_weights(std=0.02, generator=torch.Generator(device=device).manual_seed(0))
    model.eval().requires_grad_(False)
    print(f"# {n_params / 1e9:.2f}B parameters in {dtype}, initialised in {time.perf_counter() - t:.0f}s on "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", file=sys.stderr)
    results = {"dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
               "params_b": round(n_params / 1e9, 3)}

    from PIL import Image

    g = torch.Generator().manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (1480, 720, 3), generator=g, dtype=torch.uint8).numpy())
    crops = slice_image(img).crops
    with torch.inference_mode():
        model.encode_images(crops[:1])  # warm-up
        times = []
        for _ in range(2):
            t = time.perf_counter()
            model.encode_images(crops)
            times.append(time.perf_counter() - t)
    results["image_720x1480_crops"] = len(crops)
    results["image_encode_s"] = round(min(times), 3)
    print(f"image encode (720x1480, {len(crops)} crops): {min(times):.2f}s", file=sys.stderr)

    for seconds in (10, 30):
        feats = audio_features(0.1 * torch.randn(seconds * 16000, generator=g))
        with torch.inference_mode():
            t = time.perf_counter()
            model.encode_audio(feats.mels, feats.mel_lens)
            dt = time.perf_counter() - t
        results[f"audio_{seconds}s_encode_s"] = round(dt, 3)
        results[f"audio_{seconds}s_encode_s_per_audio_s"] = round(dt / seconds, 4)
        print(f"audio encode ({seconds}s): {dt:.2f}s = {dt / seconds:.3f}s per second of audio", file=sys.stderr)

    if not a.skip_ttft:
        image_vectors = model.encode_images(crops).reshape(-1, cfg["hidden_size"])
        n_img = image_vectors.shape[0]
        vocab = cfg["vocab_size"]
        text = torch.randint(0, vocab, (128,), generator=g).tolist()
        prompt = text[:64] + [min(120001, vocab - 1)] * n_img + text[64:]
        embeds = [(64, image_vectors)]
        engine = Engine(model, None, max_num_seqs=a.seqs, max_model_len=len(prompt) + a.out_tokens + 8,
                        kv_cache_memory=(len(prompt) + a.out_tokens + 8) * a.seqs * 2 * 32 * 10 * 64 * 4 + (64 << 20))
        params = SamplingParams(temperature=0, max_tokens=a.out_tokens, ignore_eos=True)
        for label, emb in (("text_only", None), ("image", embeds)):
            t = time.perf_counter()
            reqs = [engine.add_request(prompt, params, embeddings=emb) for _ in range(a.seqs)]
            engine.run_to_completion(reqs)
            total = time.perf_counter() - t
            ttft = max(r.first_token_time for r in reqs) - t
            decode = total - ttft
            results[f"{label}_ttft_s"] = round(ttft, 2)
            results[f"{label}_decode_tok_s"] = round(a.seqs * (a.out_tokens - 1) / max(decode, 1e-9), 2)
            results[f"{label}_prefill_tok_s"] = round(a.seqs * len(prompt) / ttft, 1)
            print(f"{label}: {a.seqs} x {len(prompt)} prompt tokens, TTFT {ttft:.1f}s, decode "
                  f"{results[f'{label}_decode_tok_s']} tok/s", file=sys.stderr)
        results["prompt_tokens"] = len(prompt)
        results["ttft_ratio_image_vs_text"] = round(results["image_ttft_s"] / results["text_only_ttft_s"], 3)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
