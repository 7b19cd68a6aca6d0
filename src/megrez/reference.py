"""An independent float64 Megrez2 forward pass, written from the architecture description
(cross-layer expert sharing, pre-gated routing, group-limited sigmoid routing) and sharing no
code with the rest of the package: it imports nothing from it (tested). No cache, no batching
tricks: the whole sequence is recomputed for every call. The parity tests and ``megrez
verify`` compare the engine with it.

``Broken`` switches each break one architectural rule on purpose; the tests use them to
show that the checkpoint is sensitive to every rule the package must honour.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass(frozen=True)
class Broken:
    router_reads_current_layer: bool = False   # rule: router input is y of the PREVIOUS layer
    non_owner_uses_other_group: bool = False   # rule: layers use their own group's owner bank
    bias_in_weights: bool = False              # rule: bias selects, unbiased scores weigh
    ignore_groups: bool = False                # rule: only the topk_group best groups compete
    ignore_scaling: bool = False               # rule: routed output times routed_scaling_factor


class Megrez2Reference:
    def __init__(self, path: str | Path, bias_mode: str = "own", broken: Broken = Broken()):
        path = Path(path)
        self.cfg = json.loads((path / "config.json").read_text())
        self.w = {}
        for f in sorted(path.glob("*.safetensors")):
            self.w.update({k: v.to(torch.float64) for k, v in load_file(str(f)).items()})
        self.bias_mode, self.broken = bias_mode, broken

    # --- helpers, each a line of the facts file ------------------------------------------------
    def rms(self, x, name):
        eps = self.cfg["rms_norm_eps"]
        return self.w[name] * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def lin(self, x, name):
        return x @ self.w[name].T

    def swiglu(self, x, prefix):
        g = self.lin(x, prefix + "gate_proj.weight")
        return self.lin(g * torch.sigmoid(g) * self.lin(x, prefix + "up_proj.weight"), prefix + "down_proj.weight")

    def attention(self, x, i):
        c = self.cfg
        T = x.shape[0]
        nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim") or c["hidden_size"] // nh
        p = f"model.layers.{i}.self_attn."
        q = self.lin(x, p + "q_proj.weight").view(T, nh, hd)
        k = self.lin(x, p + "k_proj.weight").view(T, nkv, hd)
        v = self.lin(x, p + "v_proj.weight").view(T, nkv, hd)
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]

        def rope(t):
            half = hd // 2
            rot = torch.cat([-t[..., half:], t[..., :half]], -1)
            return t * cos + rot * sin

        q, k = rope(q), rope(k)
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, nh * hd)
        return self.lin(out, p + "o_proj.weight")

    def owner(self, i):
        k, f = self.cfg["first_k_dense_replace"], self.cfg["experts_shared_frequency"]
        return ((i - k) // f) * f + k

    def select(self, route_in, i):
        c = self.cfg
        E, K = c["n_routed_experts"], c["num_experts_per_tok"]
        G, TG = c["n_group"], c["topk_group"]
        s = torch.sigmoid(self.lin(route_in, f"model.layers.{i}.mlp.gate.weight"))
        bias_layer = {"own": i, "owner": self.owner(i), "none": None}[self.bias_mode]
        bias = self.w[f"model.layers.{bias_layer}.mlp.gate.e_score_correction_bias"] if bias_layer is not None else 0
        choice = s + bias
        picks, weights = [], []
        for t in range(route_in.shape[0]):
            ct = choice[t].clone()
            if not self.broken.ignore_groups:
                size = E // G
                gscore = [sorted(ct[g * size:(g + 1) * size].tolist(), reverse=True)[:2] for g in range(G)]
                gscore = torch.tensor([sum(v) for v in gscore])
                keep = set(torch.argsort(gscore, descending=True)[:TG].tolist())
                for e in range(E):
                    if e // size not in keep:
                        ct[e] = float("-inf")
            idx = torch.argsort(ct, descending=True)[:K]
            wt = (choice[t] if self.broken.bias_in_weights else s[t])[idx]
            if c["norm_topk_prob"]:
                wt = wt / wt.sum()
            if not self.broken.ignore_scaling:
                wt = wt * c["routed_scaling_factor"]
            picks.append(idx)
            weights.append(wt)
        return picks, weights

    def logits(self, ids: list[int]) -> torch.Tensor:
        c = self.cfg
        h = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        y_prev = None
        groups = sorted({self.owner(i) for i in range(c["first_k_dense_replace"], c["num_hidden_layers"])})
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = h + self.attention(self.rms(h, p + "input_layernorm.weight"), i)
            y = self.rms(h, p + "post_attention_layernorm.weight")
            if i < c["first_k_dense_replace"]:
                h = h + self.swiglu(y, p + "mlp.")
            else:
                route_in = y if (self.broken.router_reads_current_layer or y_prev is None) else y_prev
                picks, weights = self.select(route_in, i)
                owner = self.owner(i)
                if self.broken.non_owner_uses_other_group and owner != i:
                    owner = groups[(groups.index(owner) + 1) % len(groups)]
                routed = torch.zeros_like(h)
                for t in range(len(ids)):
                    for e, wt in zip(picks[t].tolist(), weights[t]):
                        routed[t] += wt * self.swiglu(y[t], f"model.layers.{owner}.mlp.experts.{e}.")
                h = h + routed + self.swiglu(y, p + "mlp.shared_experts.")
            y_prev = y
        h = self.rms(h, "model.norm.weight")
        return self.lin(h, "lm_head.weight")

    def greedy(self, ids: list[int], n: int) -> list[int]:
        ids, out = list(ids), []
        for _ in range(n):
            nxt = int(self.logits(ids)[-1].argmax())
            out.append(nxt)
            ids.append(nxt)
        return out
