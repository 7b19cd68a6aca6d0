"""Megrez-3B-Omni encoder speed at the released shapes with random weights, each tower built
alone (SigLIP-400M navit + resampler: 1.7 GB in float32; Whisper-large-v3 encoder: 2.6 GB), so
it runs in little memory: one 720x1480 image's source crop and one slice, and a 10 s clip.

    python scripts/bench_omni_encoders.py [--threads N]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch


def timed(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--audio-seconds", type=int, default=10)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from PIL import Image

    from megrez.models.omni.audio import AudioArgs, AudioModule
    from megrez.models.omni.model import whisper_sinusoids
    from megrez.models.omni.vision import VisionArgs, VisionModule
    from megrez.multimodal.audio import audio_features
    from megrez.multimodal.image import slice_image
    from megrez.presets import PRESETS

    cfg = PRESETS["megrez-3b-omni"]
    out = {"threads": torch.get_num_threads(), "dtype": "float32"}
    g = torch.Generator().manual_seed(0)

    vision = VisionModule(VisionArgs.from_dict(cfg["vision_config"], "preset"), cfg["hidden_size"], cfg["query_num"]).eval()
    for prm in vision.parameters():
        prm.data.normal_(0, 0.02, generator=g)
    img = Image.fromarray(torch.randint(0, 256, (1480, 720, 3), generator=g, dtype=torch.uint8).numpy())
    crops = slice_image(img).crops
    with torch.inference_mode():
        vision(crops[:1])  # warm-up
        src = timed(lambda: vision(crops[:1]))
        one_slice = timed(lambda: vision(crops[1:2]))
    out.update(vision_params_m=round(sum(q.numel() for q in vision.parameters()) / 1e6, 1),
               source_crop_s=round(src, 2), slice_crop_s=round(one_slice, 2),
               image_720x1480_s_estimate=round(src + (len(crops) - 1) * one_slice, 1), crops=len(crops))
    print(f"vision: source crop {src:.2f}s, one slice {one_slice:.2f}s -> 720x1480 ({len(crops)} crops) "
          f"~{out['image_720x1480_s_estimate']}s", file=sys.stderr)
    vision = None  # free it before building the audio tower
    gc.collect()

    audio = AudioModule(AudioArgs.from_dict(cfg["audio_config"], "preset")).eval()
    for name, prm in audio.named_parameters():
        prm.data.normal_(0, 0.02, generator=g)
    pe = audio.audio.positional_embedding
    pe.copy_(whisper_sinusoids(*pe.shape))
    feats = audio_features(0.1 * torch.randn(a.audio_seconds * 16000, generator=g))
    with torch.inference_mode():
        audio(feats.mels, feats.mel_lens)
        t_audio = timed(lambda: audio(feats.mels, feats.mel_lens))
    t_mel = timed(lambda: audio_features(0.1 * torch.randn(a.audio_seconds * 16000, generator=g)))
    out.update(audio_params_m=round(sum(q.numel() for q in audio.parameters()) / 1e6, 1),
               audio_seconds=a.audio_seconds, audio_encode_s=round(t_audio, 2),
               audio_encode_s_per_audio_s=round(t_audio / a.audio_seconds, 3), log_mel_s=round(t_mel, 3))
    print(f"audio: {a.audio_seconds}s clip encoded in {t_audio:.2f}s ({t_audio / a.audio_seconds:.3f}s per second "
          f"of audio); log-mel {t_mel:.3f}s", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
