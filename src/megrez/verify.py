"""``megrez verify``: compare this engine with an independent implementation on a checkpoint
you have, logit for logit, so faithfulness can be checked on the real weights.

    megrez verify --model ./Megrez-3B-Instruct                        # transformers' LlamaForCausalLM
    megrez verify --model ./Megrez2-3x7B-A3B --trust-remote-code      # the checkpoint's own modeling code
    megrez verify --model tiny-moe                                    # a Megrez2 without modeling code

Against the checkpoint's own modeling code it tries every ``--router-bias`` mode and says which
one reproduces it. A Megrez2 checkpoint without ``--trust-remote-code`` (or without modeling
code, as ``megrez create-tiny`` writes them) is compared with ``megrez.reference``: a float64
forward pass written from the architecture description that shares no code with the engine,
in the ``--router-bias`` mode asked for. ``transformers`` is needed only for the first two
(``pip install transformers``).
"""
from __future__ import annotations

import json

import torch

from .engine import SamplingParams
from .loading import available_host_memory, load_model, read_json, resolve_model_path
from .tokenizer import Tokenizer

DEFAULT_PROMPT = "Megrez2 是一个混合专家模型。Explain mixture-of-experts models in one sentence."
REFERENCE_TOKENS = 8  # the float64 reference recomputes the whole sequence per token


def reference_model(path, dtype: torch.dtype, trust_remote_code: bool):
    try:
        import transformers
    except ModuleNotFoundError:
        raise ValueError("megrez verify compares against Hugging Face transformers: pip install transformers") \
            from None
    config = read_json(path / "config.json")
    archs = config.get("architectures") or []
    if "LlamaForCausalLM" not in archs and not trust_remote_code:
        raise ValueError(f"{path}: transformers has no built-in {', '.join(archs) or 'model'}; pass "
                         f"--trust-remote-code to use the checkpoint's own modeling code (auto_map in config.json)")
    if trust_remote_code and "LlamaForCausalLM" not in archs and "auto_map" not in config:
        raise ValueError(f"{path}/config.json has no auto_map: the checkpoint ships no modeling code to compare "
                         f"with; without --trust-remote-code a Megrez2 is compared with megrez's float64 reference")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                              trust_remote_code=trust_remote_code)
    return model.eval()


class Float64Reference:
    """megrez.reference behind the interface verify needs (logits of a sequence, greedy tokens)."""

    def __init__(self, path, bias_mode: str):
        from .reference import Megrez2Reference

        self.ref = Megrez2Reference(path, bias_mode=bias_mode)

    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.ref.logits(ids).float()

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self.ref.greedy(ids, n)


def _check_reference_fits(path) -> None:
    from .loading import checkpoint_shards

    stored = sum(f.stat().st_size for f in checkpoint_shards(path))
    need = stored * 4  # 16-bit weights on disk -> float64 (float32 on disk: twice that, still bounded)
    free = available_host_memory()
    if free is not None and need > 0.8 * free:
        raise ValueError(f"{path}: the float64 reference needs about {need / 2**30:.1f} GiB and "
                         f"{free / 2**30:.1f} GiB are available; pass --trust-remote-code to compare with the "
                         f"checkpoint's own modeling code (in transformers) instead")


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):  # no cache, no generate(): nothing of the reference's engine is trusted
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def verify(a) -> dict:
    path = resolve_model_path(a.model)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    tokenizer = Tokenizer(path)
    ids = tokenizer.encode_chat([{"role": "user", "content": a.prompt}]) if not a.raw else tokenizer.encode(a.prompt)
    config = read_json(path / "config.json")
    moe = "MegrezMoeForCausalLM" in (config.get("architectures") or [])
    if moe and not a.trust_remote_code:
        return verify_float64(a, path, ids)
    ref = reference_model(path, dtype, a.trust_remote_code)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0].float()
    ref_tokens = greedy_reference(ref, ids, a.tokens)
    del ref
    modes = ["own", "owner", "none"] if moe else [None]
    report = {"model": str(path), "dtype": a.dtype, "prompt_tokens": len(ids), "reference": "transformers",
              "results": [compare(path, ids, a.dtype, mode, ref_logits, ref_tokens) for mode in modes]}
    best = min(report["results"], key=lambda r: r["max_abs_logit_diff"])
    report["best_router_bias"] = best["router_bias"]
    print_results(report, ref_logits)
    if moe:
        print(f"closest to the reference: --router-bias {best['router_bias']}")
    print(json.dumps(report))
    return report


def verify_float64(a, path, ids) -> dict:
    mode = a.router_bias or read_json(path / "config.json").get("router_bias") or "own"
    print(f"megrez verify: transformers has no built-in Megrez2, so {path} is compared with megrez.reference, a "
          f"float64 implementation written from the architecture description that shares no code with the engine "
          f"(--router-bias {mode}; --trust-remote-code compares with the checkpoint's own modeling code instead)")
    _check_reference_fits(path)
    ref = Float64Reference(path, mode)
    with torch.no_grad():
        ref_logits = ref.logits(ids)
        ref_tokens = ref.greedy(ids, min(a.tokens, REFERENCE_TOKENS))
    report = {"model": str(path), "dtype": a.dtype, "prompt_tokens": len(ids), "reference": "float64",
              "results": [compare(path, ids, a.dtype, mode, ref_logits, ref_tokens)]}
    report["best_router_bias"] = mode
    print_results(report, ref_logits)
    print(json.dumps(report))
    return report


def compare(path, ids: list[int], dtype_name: str, mode: str | None, ref_logits, ref_tokens: list[int]) -> dict:
    from .llm import LLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    overrides = {"router_bias": mode} if mode else {}
    ours = load_model(path, device="cpu", dtype=dtype, **overrides)
    with torch.no_grad():
        logits = ours(torch.tensor([ids]))[0].float()
    llm = LLM(path, device="cpu", dtype=dtype_name, router_bias=mode, max_num_seqs=1)
    tokens = llm.generate(ids, SamplingParams(temperature=0, max_tokens=len(ref_tokens), ignore_eos=True)).token_ids
    agree = next((i for i, (x, y) in enumerate(zip(tokens, ref_tokens)) if x != y), len(ref_tokens))
    return {"router_bias": mode, "max_abs_logit_diff": (logits - ref_logits).abs().max().item(),
            "argmax_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            "greedy_tokens_identical": agree, "greedy_tokens": len(ref_tokens)}


def print_results(report: dict, ref_logits) -> None:
    scale = ref_logits.abs().max().item()
    for r in report["results"]:
        label = f"router_bias={r['router_bias']}: " if r["router_bias"] else ""
        print(f"{label}max |logit diff| {r['max_abs_logit_diff']:.3g} (logits up to {scale:.3g}), argmax agrees on "
              f"{r['argmax_agreement']:.1%} of {report['prompt_tokens']} positions, greedy tokens identical for "
              f"{r['greedy_tokens_identical']}/{r['greedy_tokens']}")


def register(sub) -> None:
    p = sub.add_parser("verify", help="compare logits and greedy tokens with Hugging Face transformers")
    p.add_argument("--model", "-m", required=True, help="checkpoint directory or hub id")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to compare on (default: a short bilingual prompt)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare (default 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of both models (float32 for the tightest comparison)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="Megrez2: compare with the checkpoint's own modeling code in transformers (runs that code) "
                        "instead of megrez's float64 reference")
    p.add_argument("--router-bias", default=None, choices=["own", "owner", "none"],
                   help="Megrez2 with the float64 reference: the mode to compare in (default: the checkpoint's, "
                        "else own)")
    p.set_defaults(func=lambda a: verify(a) and 0)
