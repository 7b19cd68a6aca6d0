"""``megrez quantize MODEL OUT.gguf --type q4_k_m``: a checkpoint to a GGUF file that llama.cpp
reads too (Llama models exactly as its converter writes them)."""
from __future__ import annotations

import sys
from pathlib import Path

from .recipe import SCHEMES


def cmd_quantize(a) -> int:
    from ..loading import load_model, resolve_model_path
    from ..loading.gguf import tokenizer_path, write_gguf
    from ..quant.modules import quantized_bytes
    from ..quant.recipe import QUANTIZED_SCHEMES

    out = Path(a.out)
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"{out}: the output is a GGUF file; name it *.gguf")
    if out.exists() and not a.force:
        raise ValueError(f"{out} exists (use --force to replace it)")
    path = resolve_model_path(a.model)
    scheme = a.type
    quantized = scheme in QUANTIZED_SCHEMES
    print(f"loading {path}" + (f" and quantizing to {scheme}" if quantized else ""), file=sys.stderr)
    model = load_model(path, device="cpu", dtype="float32", quantization=scheme if quantized else None,
                       progress=True if a.progress else None)
    write_gguf(model, out, scheme, tokenizer_path(path), progress=True if a.progress else None)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB; weights in memory {quantized_bytes(model) / 2**20:.1f} MiB)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write a checkpoint as a GGUF file (q8_0, q4_0, q4_k_m, f16, bf16, f32)")
    p.add_argument("model", help="checkpoint directory, hub id or GGUF file")
    p.add_argument("out", help="output .gguf file (written atomically)")
    p.add_argument("--type", "-t", default="q4_k_m", choices=list(SCHEMES),
                   help="q8_0 | q4_0 | q4_k_m (llama.cpp's mixes) | f16 | bf16 | f32 (default: q4_k_m)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--progress", action="store_true", help="always show progress bars")
    p.set_defaults(func=cmd_quantize)
