"""Building blocks shared by every Megrez text model: config errors, RMSNorm, rotary
embeddings, grouped-query attention, the SwiGLU MLP and the attention contexts.

An *attention context* owns what differs between training, a plain forward pass and
cached generation: the position of every token and how attention is computed
(causal over the sequence, against a KV cache, or block-diagonal over packed documents).
Models only project, rotate and call ``ctx.attend``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from . import structure
from ..quant.formats import QuantTensor


class ConfigError(ValueError):
    """config.json holds a value this implementation does not support."""


@dataclass
class BaseArgs:
    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json"):
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        missing = [f.name for f in fields(cls) if f.name not in kwargs and f.default is _REQUIRED]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(map(repr, missing))}")
        args = cls(**kwargs)
        args.validate(source)
        return args

    def validate(self, source: str) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_REQUIRED: Any = object()


def require(cond: bool, source: str, key: str, value: Any, supported: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: unsupported value for {key!r}: {value!r} (supported: {supported})")


def validate_common(args, source: str) -> None:
    """Checks for keys shared by the Llama and Megrez2 configs."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings"):
        v = getattr(args, key)
        require(isinstance(v, int) and v > 0, source, key, v, "a positive integer")
    require(args.hidden_act == "silu", source, "hidden_act", args.hidden_act, "'silu'")
    if args.num_key_value_heads is None:
        args.num_key_value_heads = args.num_attention_heads
    require(isinstance(args.num_key_value_heads, int) and args.num_key_value_heads > 0
            and args.num_attention_heads % args.num_key_value_heads == 0,
            source, "num_key_value_heads", args.num_key_value_heads,
            f"a positive divisor of num_attention_heads={args.num_attention_heads}")
    if args.head_dim is None:
        require(args.hidden_size % args.num_attention_heads == 0, source, "num_attention_heads",
                args.num_attention_heads, f"a divisor of hidden_size={args.hidden_size}, or set head_dim")
        args.head_dim = args.hidden_size // args.num_attention_heads
    require(isinstance(args.head_dim, int) and args.head_dim > 0 and args.head_dim % 2 == 0,
            source, "head_dim", args.head_dim, "a positive even integer")
    require(isinstance(args.rope_theta, (int, float)) and args.rope_theta > 0, source, "rope_theta",
            args.rope_theta, "a positive number")
    rs = args.rope_scaling
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
        require(kind in ("default", "linear"), source, "rope_scaling", rs,
                "null or {'rope_type': 'linear', 'factor': f}")
        if kind == "linear":
            f = rs.get("factor")
            require(isinstance(f, (int, float)) and f >= 1, source, "rope_scaling.factor", f, "a number >= 1")
    require(isinstance(args.rms_norm_eps, (int, float)) and args.rms_norm_eps > 0, source, "rms_norm_eps",
            args.rms_norm_eps, "a positive number")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (y := kernels.decode_ops.rms_norm(x, self.weight, self.eps)) is not None:  # CPU inference
            return y
        # Normalise in float32 whatever the compute dtype, as the reference implementations do.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Rotary:
    """Rotate-half RoPE (the Hugging Face convention, so checkpoints need no permutation)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None):
        self.head_dim = head_dim
        self.theta = float(theta)
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        self.position_scale = 1.0 / float(scaling["factor"]) if kind == "linear" else 1.0
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            self._inv_freq[device] = (1.0 / (self.theta ** exponent)).to(device)
        return self._inv_freq[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions [B, T] -> cos/sin [B, 1, T, head_dim], computed in float32.
        freqs = positions.float()[..., None] * self.position_scale * self.inv_freq(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Linear(nn.Linear):
    """nn.Linear whose inference on a few rows (decoding on a CPU) uses the decode kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, args, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        bias = bool(getattr(args, "attention_bias", False))
        h = args.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, ctx, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = kernels.linear_many(x, [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight],
                                      [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        # A context may attend to one new token per row itself, RoPE included (the KV cache's
        # decode kernel); None where it does not apply.
        step = getattr(ctx, "attend_step", None)
        if step is not None and (out := step(self.layer_idx, q, k, v, cos, sin, self.n_heads)) is not None:
            return self.o_proj(out)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, nh, T, hd]
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)     # [B, nkv, T, hd]
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = ctx.attend(self.layer_idx, q, k, v)                                    # [B, nh, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj.bias is None:
            return self.down_proj(kernels.swiglu(x, self.gate_proj.weight, self.up_proj.weight))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def sdpa(q, k, v, mask=None, is_causal=False):
    """Scaled dot-product attention with grouped K/V heads, without materialising copies."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


class CausalContext:
    """Plain causal attention over the tokens of one forward pass (no cache)."""

    def __init__(self, batch: int, length: int, device: torch.device):
        self.positions = torch.arange(length, device=device).expand(batch, length)

    def attend(self, layer_idx, q, k, v):
        return sdpa(q, k, v, is_causal=True)


class PackedContext:
    """Several documents packed in one row: each token attends only to earlier tokens of its
    own document, and positions restart at every document start.

    ``doc_ids`` [B, T] numbers the documents of each row (any integers, equal within a document,
    documents contiguous)."""

    def __init__(self, doc_ids: torch.Tensor):
        b, t = doc_ids.shape
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        idx = torch.arange(t, device=doc_ids.device).expand(b, t)
        start_pos = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
        self.positions = idx - start_pos
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
        causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
        self.mask = (same_doc & causal)[:, None]  # [B, 1, T, T]

    def attend(self, layer_idx, q, k, v):
        return sdpa(q, k, v, mask=self.mask)


class DecoderLayer(nn.Module):
    """Pre-norm residual block. The attention half is shared by all models; the MLP half is
    called by the model, because an MoE layer needs more than the layer's own input."""

    def __init__(self, args, layer_idx: int, mlp: nn.Module):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = mlp

    def attention_block(self, h, ctx, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), ctx, cos, sin)
        return h, self.post_attention_layernorm(h)

    def decode_step(self, h, ctx, cos, sin, with_mlp: bool):
        """The attention half (and, ``with_mlp``, the MLP) at one new token per row in one
        kernel call, for quantized weights on the CPU: (h after it, the post-attention norm's
        output), the bits of :meth:`attention_block` and the MLP run one by one; None where it
        does not apply."""
        step = getattr(ctx, "step_cache", None)
        if step is None or h.shape[1] != 1 or (cache := step(self.self_attn.layer_idx)) is None:
            return None
        if (weights := self.quantized_weights(with_mlp)) is None:
            return None
        b = h.shape[0]
        hd = cache[0].shape[-1]
        out = kernels.decode_ops.decode_layer(
            h.view(b, -1), (self.input_layernorm.weight, self.post_attention_layernorm.weight),
            self.input_layernorm.eps, *weights, cos.reshape(b, hd), sin.reshape(b, hd), *cache,
            self.self_attn.n_heads, hd ** -0.5)
        if out is None:
            return None
        return out[0].view(b, 1, -1), out[1].view(b, 1, -1)

    def step_args(self, with_mlp: bool):
        """This layer described for the one-call decode step (kernels.decode_ops.layer_args:
        quantized attention, and with_mlp its SwiGLU MLP), or None where it does not apply."""
        if (weights := self.quantized_weights(with_mlp)) is None:
            return None
        attn, norm1, norm2 = self.self_attn, self.input_layernorm, self.post_attention_layernorm
        return kernels.decode_ops.layer_args(norm1.weight.shape[0], (norm1.weight, norm2.weight), norm1.eps, *weights,
                                             attn.n_heads, attn.n_kv, attn.head_dim, attn.head_dim ** -0.5)

    def quantized_weights(self, with_mlp: bool):
        """((q, k, v, o), (gate, up, down) or None): this layer's QuantTensors for the decode
        kernels, or None where one is not quantized, a projection has a bias, or (``with_mlp``)
        the MLP is not a plain SwiGLU MLP."""
        attn, mlp = self.self_attn, self.mlp
        projs = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        if with_mlp:
            if type(mlp) is not MLP:
                return None
            projs += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        weights = [getattr(p, "weight", None) for p in projs]
        if not all(isinstance(w, QuantTensor) for w in weights) or any(p.bias is not None for p in projs):
            return None
        return tuple(weights[:4]), tuple(weights[4:]) if with_mlp else None


class Backbone(nn.Module):
    def __init__(self, args, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class TransformerLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head, with Hugging Face tensor names
    (``model.layers.N...``, ``lm_head.weight``). Subclasses build the layers and run them."""

    args: Any

    def __init__(self, args, layers: list[nn.Module]):
        super().__init__()
        self.args = args
        self.model = Backbone(args, layers)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(args.head_dim, args.rope_theta, args.rope_scaling)
        # (structure.count() when built, the settings it was built for, kernels.moe_step.Plan or None)
        self._step_plan = (None, None, None)

    @property
    def layers(self):
        return self.model.layers

    # One decoding token in one kernel call. A subclass describes its layers for kernels.moe_step
    # (_build_decode_plan) and calls decode_all_layers first in run_layers.
    def decode_all_layers(self, h, ctx, cos, sin):
        """One token (batch 1) with quantized weights on the CPU: every layer in one kernel call
        (kernels.moe_step), the bits of the layer-by-layer loop; the routing hooks (MoE models)
        are called after it, in layer order, with each layer's routing. None where it does not
        apply (a routing override, offloaded experts, float weights, more than one token)."""
        step = getattr(ctx, "step_cache", None)
        if (step is None or h.shape[0] != 1 or h.shape[1] != 1 or getattr(self, "routing_override", None) is not None
                or not kernels.enabled or torch.is_grad_enabled()):
            return None
        plan = self._decode_plan()
        if plan is None:
            return None
        caches = [step(i) for i in range(len(self.layers))]
        if any(c is None for c in caches):
            return None
        _, _, tables, lengths = caches[0]
        out = kernels.moe_step.run(plan, h.view(1, -1), cos, sin, [c[0] for c in caches], [c[1] for c in caches],
                                   tables, lengths)
        if out is None:
            return None
        h, indices, weights = out
        for i in plan.moe_layers:
            for hook in self.routing_hooks:
                hook(i, indices[i:i + 1], weights[i:i + 1])
        return h.view(1, 1, -1)

    def _decode_plan(self):
        # A replaced weight, bias or module anywhere changes structure.count(): the plan is built again.
        settings = self._plan_settings()
        built_at, built_for, plan = self._step_plan
        if built_at != structure.count() or built_for != settings:
            built_at = structure.count()
            plan = self._build_decode_plan(tuple(self._plan_inputs()))
            self._step_plan = (built_at, settings, plan)
        return plan

    def _plan_settings(self) -> tuple:
        """What a decode plan was built for besides the modules (a change rebuilds it)."""
        return (len(self.layers),)

    def _plan_inputs(self) -> list:
        """Every module, parameter, buffer and quantized weight the model holds now: whatever a
        decode plan points into is among them (the plan keeps them alive until it is rebuilt)."""
        held = []
        for module in self.modules():
            held += [module, *module._parameters.values(), *module._buffers.values()]
            held += [v for v in vars(module).values() if isinstance(v, QuantTensor)]
        return held

    def _build_decode_plan(self, keep: tuple):
        """The layers described for kernels.moe_step, or None (the layer loop runs)."""
        return None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H]: what ``input_embeddings`` replaces (rows of it, for
        multimodal prompts)."""
        return self.model.embed_tokens(tokens)

    def forward(self, tokens: torch.Tensor | None, cache=None, input_embeddings: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None):
        """tokens [B, T] -> logits [B, T, vocab], or [B, vocab] at position ``logits_at[b]`` of
        each row (prefill needs only the last prompt token's). ``cache`` is an attention context:
        a KV-cache view from the engine, a packed-documents context, or None (plain causal)."""
        h = self.model.embed_tokens(tokens) if input_embeddings is None else input_embeddings
        ctx = cache if cache is not None else CausalContext(h.shape[0], h.shape[1], h.device)
        cos, sin = self.rotary.cos_sin(ctx.positions, h.dtype)
        h = self.run_layers(h, ctx, cos, sin)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]  # [B, H]
        return self.lm_head(self.model.norm(h))

    def run_layers(self, h, ctx, cos, sin):
        raise NotImplementedError

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim): what a KV cache for this model must hold."""
        return self.args.num_hidden_layers, self.args.num_key_value_heads, self.args.head_dim

    # Checkpoint naming. Most parameters are stored under their own name; subclasses map the
    # exceptions (stacked expert banks) in ``checkpoint_names``.
    def checkpoint_names(self) -> dict[str, tuple[str, int | None]]:
        """Every tensor a checkpoint must hold: HF name -> (our parameter name, index into its
        first dimension or None)."""
        names = {}
        for name, _ in self.named_parameters():
            names[name] = (name, None)
        for name, buf in self.named_buffers():
            names[name] = (name, None)
        for mname, module in self.named_modules():  # quantized weights (megrez.quant.modules)
            for attr in getattr(module, "quant_tensors", ()):
                names[f"{mname}.{attr}"] = (f"{mname}.{attr}", None)
        if self.args.tie_word_embeddings:
            names.pop("lm_head.weight", None)
        return names

    def stored_parameters(self) -> int:
        """Parameters held, quantized weights (megrez.quant.modules) counted by their logical shape."""
        n = sum(p.numel() for p in self.parameters())
        seen = set()
        for module in self.modules():
            for attr in getattr(module, "quant_tensors", ()):
                qt = getattr(module, attr)
                if id(qt.data) not in seen:
                    seen.add(id(qt.data))
                    n += qt.data.shape[:-1].numel() * qt.shape[-1]
        return n

    def parameter_counts(self) -> dict[str, int]:
        """Stored parameters, and those one token actually uses."""
        stored = self.stored_parameters()
        return {"stored": stored, "active": stored}

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation used for new checkpoints and training from scratch: normal(0, std)
        for every linear and embedding weight and expert bank, zeros for biases, ones for norms."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for _, b in self.named_buffers():
            b.zero_()
