"""Expert offloading driven by the pre-gate.

Routed experts live in (pinned) host memory; a device-resident cache of expert slots fills
whatever the memory budget leaves after the non-expert weights and the KV cache. Because a
Megrez2 layer's router reads the previous layer's state, its experts are known *before* its
attention runs: the routing hook starts copying the missing ones on a separate stream at
that moment, and the layer's expert computation waits only for copies that have not landed.
Experts are cached per sharing group, so a copy made for one layer serves the group's other
layers for free.

One decode step, layer i of group g (owner o):

    compute stream: | route(y_{i-1}) | attention_i ............ | wait(ev) | experts_i | route(y_i) | attention_{i+1} ...
    copy stream:                     | copy missing experts of i -> ev |              | copy for i+1 ...

Policies decide which resident expert to evict; experts needed by the running layer or
already prefetched for the next one are never evicted.
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..models.moe import ExpertBank

# ------------------------------------------------------------------------------ eviction policies

class LRUPolicy:
    """Evict the least recently used expert, whatever its group."""

    name = "lru"

    def __init__(self, owners: list[int], num_layers: int, group_size: int):
        self.last_use: OrderedDict = OrderedDict()

    def on_layer(self, layer: int) -> None:
        pass

    def touch(self, key) -> None:
        self.last_use.pop(key, None)
        self.last_use[key] = None

    def forget(self, key) -> None:
        self.last_use.pop(key, None)

    def victim(self, candidates: list):
        candidates = set(candidates)
        for key in self.last_use:  # oldest first
            if key in candidates:
                return key
        return next(iter(candidates))


class GroupPolicy(LRUPolicy):
    """Built for shared expert pools: first evict from the group whose next use lies furthest
    ahead in layer order (the group that just finished is needed again only a whole token
    later), and within it the expert with the lowest decayed use count (trained MoEs have hot
    experts per group), then the least recently used."""

    name = "group"

    def __init__(self, owners: list[int], num_layers: int, group_size: int, decay: float = 0.95):
        super().__init__(owners, num_layers, group_size)
        self.num_layers, self.group_size, self.decay = num_layers, group_size, decay
        self.current = 0
        self.score: dict = {}

    def on_layer(self, layer: int) -> None:
        self.current = layer

    def touch(self, key) -> None:
        super().touch(key)
        self.score[key] = self.score.get(key, 0.0) * self.decay + 1.0

    def forget(self, key) -> None:
        super().forget(key)  # keep the score: popularity outlives residency

    def distance(self, owner: int) -> int:
        if owner <= self.current < owner + self.group_size:
            return 0
        return (owner - self.current) % self.num_layers

    def victim(self, candidates: list):
        recency = {key: n for n, key in enumerate(self.last_use)}
        return max(candidates, key=lambda k: (self.distance(k[0]), -self.score.get(k, 0.0), -recency.get(k, -1)))


POLICIES = {"lru": LRUPolicy, "group": GroupPolicy}


# ------------------------------------------------------------------------------ statistics

@dataclass
class OffloadStats:
    uses: int = 0          # (layer, expert) pairs computed
    hits: int = 0          # ... whose expert was resident before its layer asked for it
    prefetched: int = 0    # ... copied ahead of need by the pre-gate
    misses: int = 0        # ... copied on demand while the layer waited
    bytes_copied: int = 0
    copy_seconds: float = 0.0     # time spent copying (CPU: wall; GPU: copy-stream time)
    stall_seconds: float = 0.0    # time computation waited for copies (exposed copy time)
    per_layer_stall: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    def as_dict(self) -> dict:
        hidden = max(self.copy_seconds - self.stall_seconds, 0.0)
        return {"uses": self.uses, "hits": self.hits, "prefetched": self.prefetched, "misses": self.misses,
                "hit_rate": self.hit_rate, "bytes_copied": self.bytes_copied, "copy_seconds": self.copy_seconds,
                "copy_seconds_hidden": hidden, "copy_seconds_exposed": self.stall_seconds,
                "per_layer_stall_seconds": dict(self.per_layer_stall)}


# ------------------------------------------------------------------------------ the cache

class ExpertCache:
    """Device slots for routed experts of every sharing group, keyed by (owner layer, expert)."""

    def __init__(self, host_banks: dict[int, ExpertBank], num_slots: int, device: torch.device,
                 policy: LRUPolicy, prefetch: bool = True, reuse: bool = True):
        bank = next(iter(host_banks.values()))
        e, inter, hidden = bank.gate_proj.shape
        if num_slots < 1:
            raise ValueError("the expert cache needs room for at least one expert")
        self.host_banks, self.device, self.policy = host_banks, device, policy
        self.prefetch_enabled, self.reuse = prefetch, reuse
        dtype = bank.gate_proj.dtype
        self.gate = torch.empty(num_slots, inter, hidden, dtype=dtype, device=device)
        self.up = torch.empty(num_slots, inter, hidden, dtype=dtype, device=device)
        self.down = torch.empty(num_slots, hidden, inter, dtype=dtype, device=device)
        self.expert_bytes = 3 * inter * hidden * self.gate.element_size()
        self.num_slots = num_slots
        self.slot_of: dict[tuple[int, int], int] = {}
        self.key_of: list[tuple[int, int] | None] = [None] * num_slots
        self.ready: dict[int, object] = {}          # slot -> CUDA event marking its copy done
        self.protected: set[tuple[int, int]] = set()
        self.prefetched_keys: set[tuple[int, int]] = set()
        self.stats = OffloadStats()
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._copy_events: list = []   # (start, end) CUDA events on the copy stream
        self._stall_events: list = []  # (layer, start, end) CUDA events on the compute stream

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.expert_bytes

    # -- slot management
    def _free_slot(self) -> int | None:
        for slot, key in enumerate(self.key_of):
            if key is None:
                return slot
        candidates = [k for k in self.slot_of if k not in self.protected]
        if not candidates:
            return None
        victim = self.policy.victim(candidates)
        slot = self.slot_of.pop(victim)
        self.key_of[slot] = None
        self.policy.forget(victim)
        self.prefetched_keys.discard(victim)
        return slot

    def _copy_in(self, key: tuple[int, int], asynchronous: bool) -> int | None:
        owner, expert = key
        bank = self.host_banks[owner]
        slot = self._free_slot()
        if slot is None:
            return None
        self.slot_of[key], self.key_of[slot] = slot, key
        if self.cuda and asynchronous:
            stream = self.copy_stream
            # The slot may still be read by work already queued on the compute stream.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                self._copy(bank, expert, slot, non_blocking=True)
                end.record(stream)
            self.ready[slot] = end
            self._copy_events.append((start, end))
        else:
            t = time.perf_counter()
            self._copy(bank, expert, slot, non_blocking=False)
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()
            self.stats.copy_seconds += time.perf_counter() - t
            self.ready.pop(slot, None)
        self.stats.bytes_copied += self.expert_bytes
        return slot

    def _copy(self, bank: ExpertBank, expert: int, slot: int, non_blocking: bool) -> None:
        self.gate[slot].copy_(bank.gate_proj[expert], non_blocking=non_blocking)
        self.up[slot].copy_(bank.up_proj[expert], non_blocking=non_blocking)
        self.down[slot].copy_(bank.down_proj[expert], non_blocking=non_blocking)

    # -- the two entry points
    def prefetch(self, layer: int, owner: int, experts: list[int]) -> None:
        """Called as soon as ``layer``'s routing is known (before its attention): start copying
        its missing experts, as many as fit beside what must stay."""
        self.policy.on_layer(layer)
        if not self.prefetch_enabled:
            return
        for e in experts:
            key = (owner, e)
            if key not in self.slot_of:
                if self._copy_in(key, asynchronous=True) is None:
                    break  # the cache is full of protected experts: the rest stream in at compute time
                self.prefetched_keys.add(key)
            self.protected.add(key)

    def acquire(self, layer: int, owner: int, experts: list[int]):
        """Yields (expert, (gate, up, down)) device tensors, waiting only for copies not yet done.
        Resident experts come first; experts that do not fit at once stream through the cache,
        each evictable once its computation has been issued."""
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        keys = [(owner, e) for e in experts]
        self.protected.update(keys)
        order = [k for k in keys if k in self.slot_of] + [k for k in keys if k not in self.slot_of]
        for key in order:
            self.stats.uses += 1
            if key in self.slot_of:
                if key in self.prefetched_keys:
                    self.stats.prefetched += 1
                    self.prefetched_keys.discard(key)
                else:
                    self.stats.hits += 1
                slot = self.slot_of[key]
            else:
                self.stats.misses += 1
                t = time.perf_counter()
                slot = self._copy_in(key, asynchronous=False)
                if slot is None:
                    raise RuntimeError(f"expert cache of {self.num_slots} slots has no evictable slot; "
                                       f"raise the memory budget")
                self._stall(layer, time.perf_counter() - t)
            event = self.ready.pop(slot, None)
            if event is not None:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(compute)
                compute.wait_event(event)
                end.record(compute)
                self._stall_events.append((layer, start, end))
            self.policy.touch(key)
            yield key[1], (self.gate[slot], self.up[slot], self.down[slot])
            # Its computation is queued: a later copy into this slot is ordered after it.
            self.protected.discard(key)
            if not self.reuse:  # the naive baseline: nothing survives its use
                self.slot_of.pop(key, None)
                self.key_of[slot] = None

    def _stall(self, layer: int, seconds: float) -> None:
        self.stats.stall_seconds += seconds
        self.stats.per_layer_stall[layer] = self.stats.per_layer_stall.get(layer, 0.0) + seconds

    def collect_timings(self) -> None:
        """Fold pending CUDA event timings into the statistics (synchronises)."""
        if not self.cuda:
            return
        torch.cuda.synchronize(self.device)
        for start, end in self._copy_events:
            self.stats.copy_seconds += start.elapsed_time(end) / 1e3
        for layer, start, end in self._stall_events:
            self._stall(layer, start.elapsed_time(end) / 1e3)
        self._copy_events, self._stall_events = [], []


class OffloadedBank(ExpertBank):
    """An expert bank whose weights stay in host memory; computation uses cache slots."""

    weights_stay_valid = False  # a slot may be refilled once its expert's product is issued

    def __init__(self, host: ExpertBank, owner: int, cache: ExpertCache):
        torch.nn.Module.__init__(self)
        self.num_experts, self.owner = host.num_experts, owner
        self.gate_proj, self.up_proj, self.down_proj = host.gate_proj, host.up_proj, host.down_proj
        self._cache = [cache]  # a list, so the cache is not registered as a submodule
        self.current_layer = owner

    def expert_weights(self, experts: list[int]):
        return self._cache[0].acquire(self.current_layer, self.owner, experts)


class ExpertOffload:
    """Wires an :class:`ExpertCache` into a Megrez2 model whose routed experts are in host memory."""

    def __init__(self, model, device: torch.device, cache_bytes: int, policy: str = "group",
                 prefetch: bool = True, reuse: bool = True):
        args = model.args
        if not hasattr(args, "owner"):
            raise ValueError("expert offloading needs a mixture-of-experts model")
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r} (choose {', '.join(POLICIES)})")
        self.model = model
        owners = sorted({args.owner(i) for i in range(args.num_hidden_layers) if args.is_moe(i)})
        host = {o: model.layers[o].mlp.experts for o in owners}
        per_expert = 3 * args.hidden_size * args.moe_intermediate_size * host[owners[0]].gate_proj.element_size()
        slots = min(int(cache_bytes // per_expert), len(owners) * args.n_routed_experts)
        self.cache = ExpertCache(host, slots, device,
                                 POLICIES[policy](owners, args.num_hidden_layers, args.experts_shared_frequency),
                                 prefetch=prefetch, reuse=reuse)
        self.banks = {}
        for o in owners:
            bank = OffloadedBank(host[o], o, self.cache)
            model.layers[o].mlp.experts = bank
            self.banks[o] = bank
        model.routing_hooks.append(self._on_route)

    def detach(self) -> None:
        """Put the host banks back in the model (it then computes experts where they live)."""
        for o, bank in self.banks.items():
            self.model.layers[o].mlp.experts = self.cache.host_banks[o]
        self.model.routing_hooks.remove(self._on_route)

    def _on_route(self, layer: int, indices: torch.Tensor, weights: torch.Tensor) -> None:
        owner = self.model.args.owner(layer)
        self.banks[owner].current_layer = layer
        self.cache.prefetch(layer, owner, indices.unique().tolist())

    @property
    def stats(self) -> dict:
        """Counters so far; GPU copy timings are folded in by the engine after each step."""
        return {"slots": self.cache.num_slots, "cache_bytes": self.cache.nbytes, **self.cache.stats.as_dict()}

    def reset_stats(self) -> None:
        self.cache.collect_timings()
        self.cache.stats = OffloadStats()


def parse_bytes(text: str | int) -> int:
    """'6GiB', '6GB', '6G', '512MiB', '1.5g' or a number of bytes. Units are binary whichever
    way they are written: memory comes in powers of two."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 6GiB, 512MiB, or bytes)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
