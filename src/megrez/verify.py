"""``megrez verify``: compare this engine with Hugging Face ``transformers`` on a checkpoint you
have, logit for logit, so faithfulness can be checked on the real weights.

    megrez verify --model ./Megrez-3B-Instruct
    megrez verify --model ./Megrez2-3x7B-A3B --trust-remote-code      # the checkpoint's own modeling code

For a Megrez2 checkpoint it tries every ``--router-bias`` mode and says which one reproduces
the reference. ``transformers`` is needed only for this command (``pip install transformers``).
"""
from __future__ import annotations

import json

import torch

from .engine import SamplingParams
from .loading import load_model, read_json, resolve_model_path
from .tokenizer import Tokenizer

DEFAULT_PROMPT = "Megrez2 是一个混合专家模型。Explain mixture-of-experts models in one sentence."


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
        raise ValueError(f"{path}/config.json has no auto_map: the checkpoint ships no modeling code to compare with")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                              trust_remote_code=trust_remote_code)
    return model.eval()


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
    ref = reference_model(path, dtype, a.trust_remote_code)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0].float()
    ref_tokens = greedy_reference(ref, ids, a.tokens)
    del ref
    moe = "MegrezMoeForCausalLM" in (read_json(path / "config.json").get("architectures") or [])
    modes = ["own", "owner", "none"] if moe else [None]
    report = {"model": str(path), "dtype": a.dtype, "prompt_tokens": len(ids), "results": []}
    from .llm import LLM

    for mode in modes:
        overrides = {"router_bias": mode} if mode else {}
        ours = load_model(path, device="cpu", dtype=dtype, **overrides)
        with torch.no_grad():
            logits = ours(torch.tensor([ids]))[0].float()
        llm = LLM(path, device="cpu", dtype=a.dtype, router_bias=mode, max_num_seqs=1)
        tokens = llm.generate(ids, SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)).token_ids
        agree = next((i for i, (x, y) in enumerate(zip(tokens, ref_tokens)) if x != y), len(ref_tokens))
        report["results"].append({
            "router_bias": mode, "max_abs_logit_diff": (logits - ref_logits).abs().max().item(),
            "argmax_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            "greedy_tokens_identical": agree, "greedy_tokens": len(ref_tokens)})
    best = min(report["results"], key=lambda r: r["max_abs_logit_diff"])
    report["best_router_bias"] = best["router_bias"]
    scale = ref_logits.abs().max().item()
    for r in report["results"]:
        label = f"router_bias={r['router_bias']}: " if r["router_bias"] else ""
        print(f"{label}max |logit diff| {r['max_abs_logit_diff']:.3g} (logits up to {scale:.3g}), argmax agrees on "
              f"{r['argmax_agreement']:.1%} of {len(ids)} positions, greedy tokens identical for "
              f"{r['greedy_tokens_identical']}/{r['greedy_tokens']}")
    if moe:
        print(f"closest to the reference: --router-bias {best['router_bias']}")
    print(json.dumps(report))
    return report


def register(sub) -> None:
    p = sub.add_parser("verify", help="compare logits and greedy tokens with Hugging Face transformers")
    p.add_argument("--model", "-m", required=True, help="checkpoint directory or hub id")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to compare on (default: a short bilingual prompt)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare (default 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of both models (float32 for the tightest comparison)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the checkpoint's own modeling code (needed for Megrez2)")
    p.set_defaults(func=lambda a: verify(a) and 0)
