"""Model registry: config.json's ``architectures`` (or ``model_type``) -> model module.

Each module exports ``ModelArgs`` (``from_dict`` ignores unknown keys, refuses unsupported
values naming the key) and ``Model`` (``forward(tokens, cache=None, input_embeddings=None)``).
"""
from __future__ import annotations

import importlib

from .base import ConfigError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MegrezMoeForCausalLM": "megrez_moe",
    "MegrezO": "omni",
}
MODEL_TYPES = {"llama": "llama", "megrez_moe": "megrez_moe", "megrez2": "megrez_moe", "megrezo": "omni"}


def model_module(config: dict, source: str = "config.json"):
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return importlib.import_module(f".{ARCHITECTURES[arch]}", __name__)
    mtype = config.get("model_type")
    if not archs and mtype in MODEL_TYPES:
        return importlib.import_module(f".{MODEL_TYPES[mtype]}", __name__)
    raise ConfigError(f"{source}: unsupported value for 'architectures': {archs or None!r} "
                      f"(model_type {mtype!r}); supported: {', '.join(ARCHITECTURES)}")


# quantization_config["quant_method"] values this engine loads; any other is refused rather
# than read as if the stored tensors were plain weights.
SUPPORTED_QUANT_METHODS: set[str] = set()


def check_quantization(config: dict, source: str = "config.json") -> None:
    q = config.get("quantization_config")
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method not in SUPPORTED_QUANT_METHODS:
        supported = ", ".join(sorted(SUPPORTED_QUANT_METHODS)) or "none yet: use the unquantized checkpoint"
        raise ConfigError(f"{source}: unsupported value for 'quantization_config': quant_method {method!r} "
                          f"(supported: {supported})")


def build_model(config: dict, source: str = "config.json", **overrides):
    """ModelArgs and an uninitialised Model (no memory is touched when built under a meta device)."""
    check_quantization(config, source)
    module = model_module(config, source)
    args = module.ModelArgs.from_dict({**config, **overrides}, source)
    return module.Model(args)


__all__ = ["ARCHITECTURES", "ConfigError", "SUPPORTED_QUANT_METHODS", "build_model", "check_quantization",
           "model_module"]
