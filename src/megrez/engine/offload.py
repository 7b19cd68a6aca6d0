"""Expert offloading driven by the pre-gate: one expert cache, two tiers.

Routed experts live in a slower tier and a fixed number of *slots* in the faster one holds
the experts in use. Two tiers share everything here -- the cache, the eviction policies, the
prefetch logic and the statistics -- and differ only in their :class:`Transfer` ("source ->
slot"):

* ``--gpu-memory-budget``: host memory -> device (:class:`HostTransfer`; CUDA copy stream);
* ``--memory-budget``: checkpoint files -> host memory (``engine.storage.StorageTransfer``;
  direct-I/O reads on a few I/O threads).

Because a Megrez2 layer's router reads the previous layer's post-attention state, layer
i+1's experts are known as soon as layer i's attention is done -- before layer i's experts
and layer i+1's attention run. The model calls the routing hooks at that moment; the hook
starts moving the missing experts, and the layer's expert computation waits only for what
has not arrived. Slots are keyed by (sharing group owner, expert): an expert brought in for
one layer serves the group's other layers for free.

One decode step around layer i (layer i+1 routed ahead):

    compute: | attn_i | route_{i+1}(y_i) | experts_i | attn_{i+1} | route_{i+2} | wait | experts_{i+1} ...
    transfer:                            | move missing experts of i+1 ........ | move missing of i+2 ...

Experts needed by the running layer are never evicted; neither are those prefetched for a
layer routed ahead, unless the running layer can get a slot no other way (a cache smaller
than two layers' experts). Policies choose among the rest.
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from ..models.moe import ExpertBank

Key = tuple[int, int]  # (sharing group owner layer, expert)

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
    hits: int = 0          # ... whose expert was resident before its layer was routed
    prefetched: int = 0    # ... moved ahead of need by the pre-gate
    misses: int = 0        # ... moved on demand while the layer waited
    stolen: int = 0        # prefetched experts evicted before use to make room for the running layer
    bytes_copied: int = 0  # expert bytes moved into slots
    copy_seconds: float = 0.0     # transfer time (GPU: copy-stream time; storage: time with a read in flight)
    stall_seconds: float = 0.0    # time computation waited for transfers (exposed transfer time)
    per_layer_stall: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    def stall(self, layer: int, seconds: float) -> None:
        self.stall_seconds += seconds
        self.per_layer_stall[layer] = self.per_layer_stall.get(layer, 0.0) + seconds

    def as_dict(self) -> dict:
        hidden = max(self.copy_seconds - self.stall_seconds, 0.0)
        return {"uses": self.uses, "hits": self.hits, "prefetched": self.prefetched, "misses": self.misses,
                "stolen": self.stolen, "hit_rate": self.hit_rate, "bytes_copied": self.bytes_copied,
                "copy_seconds": self.copy_seconds, "copy_seconds_hidden": hidden,
                "copy_seconds_exposed": self.stall_seconds,
                "per_layer_stall_seconds": dict(sorted(self.per_layer_stall.items()))}


# ------------------------------------------------------------------------------ transfers

class Transfer:
    """How an expert gets from where it lives into a cache slot. A tier implements:

    ``start(key, slot)``  begin moving expert ``key`` into ``slot``; a handle, or None when
                          it finished before returning
    ``wait(handle, layer, stats)``  make the slot usable by the computation that follows,
                          accounting any wait as a stall of ``layer``
    ``weights(slot)``     (gate [I, H], up [I, H], down [H, I]) in the compute dtype
    ``settle(handle)``    before a slot is refilled while its transfer may still run
    ``collect(stats)``    fold timings measured elsewhere (device events, I/O threads) into stats
    """

    num_slots: int
    expert_bytes: int   # bytes of one expert in a slot
    nbytes: int         # bytes of all slots (and staging buffers)
    name = "transfer"

    def start(self, key: Key, slot: int):
        raise NotImplementedError

    def wait(self, handle, layer: int, stats: OffloadStats) -> None:
        raise NotImplementedError

    def weights(self, slot: int):
        raise NotImplementedError

    def settle(self, handle) -> None:
        """A slot whose transfer may still run is about to be refilled: let it finish first
        where the tier does not order transfers itself."""

    def collect(self, stats: OffloadStats) -> None:
        pass

    def reset(self) -> None:
        pass

    def describe(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class HostTransfer(Transfer):
    """Host-memory expert banks -> slots on ``device`` (a CUDA copy stream with an event per
    copy; on a CPU a plain synchronous copy)."""

    name = "host-to-device"

    def __init__(self, host_banks: dict[int, ExpertBank], num_slots: int, device: torch.device):
        bank = next(iter(host_banks.values()))
        e, inter, hidden = bank.gate_proj.shape
        dtype = bank.gate_proj.dtype
        self.host_banks, self.device, self.num_slots = host_banks, device, num_slots
        self.gate = torch.empty(num_slots, inter, hidden, dtype=dtype, device=device)
        self.up = torch.empty(num_slots, inter, hidden, dtype=dtype, device=device)
        self.down = torch.empty(num_slots, hidden, inter, dtype=dtype, device=device)
        self.expert_bytes = 3 * inter * hidden * self.gate.element_size()
        self.nbytes = num_slots * self.expert_bytes
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._copy_events: list = []   # (start, end) CUDA events on the copy stream
        self._stall_events: list = []  # (layer, start, end) CUDA events on the compute stream
        self._sync_seconds = 0.0       # CPU: time of the (synchronous) copies

    @staticmethod
    def slot_bytes(model) -> int:
        a = model.args
        bank = next(m for m in model.modules() if isinstance(m, ExpertBank))
        return 3 * a.hidden_size * a.moe_intermediate_size * bank.gate_proj.element_size()

    def _copy(self, key: Key, slot: int, non_blocking: bool) -> None:
        bank, expert = self.host_banks[key[0]], key[1]
        self.gate[slot].copy_(bank.gate_proj[expert], non_blocking=non_blocking)
        self.up[slot].copy_(bank.up_proj[expert], non_blocking=non_blocking)
        self.down[slot].copy_(bank.down_proj[expert], non_blocking=non_blocking)

    def start(self, key: Key, slot: int):
        if not self.cuda:
            t = time.perf_counter()
            self._copy(key, slot, non_blocking=False)
            self._sync_seconds += time.perf_counter() - t
            return None
        stream = self.copy_stream
        # The slot may still be read by work already queued on the compute stream.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            self._copy(key, slot, non_blocking=True)
            end.record(stream)
        self._copy_events.append((start, end))
        return end

    def wait(self, handle, layer: int, stats: OffloadStats) -> None:
        # The compute stream waits on the copy's event: the host never blocks.
        compute = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        compute.wait_event(handle)
        end.record(compute)
        self._stall_events.append((layer, start, end))

    def weights(self, slot: int):
        return self.gate[slot], self.up[slot], self.down[slot]

    def collect(self, stats: OffloadStats) -> None:
        """Fold pending CUDA event timings into the statistics (synchronises)."""
        if not self.cuda:
            stats.copy_seconds += self._sync_seconds
            self._sync_seconds = 0.0
            return
        torch.cuda.synchronize(self.device)
        for start, end in self._copy_events:
            stats.copy_seconds += start.elapsed_time(end) / 1e3
        for layer, start, end in self._stall_events:
            stats.stall(layer, start.elapsed_time(end) / 1e3)
        self._copy_events, self._stall_events = [], []


# ------------------------------------------------------------------------------ the cache

class ExpertCache:
    """Slots for routed experts of every sharing group, keyed by (owner layer, expert), filled
    through a :class:`Transfer`.

    The model routes each MoE layer once and computes it once, in layer order, and a layer may
    be routed before the previous one computes (pre-gating): :meth:`prefetch` queues a routed
    layer, :meth:`acquire` serves the oldest queued one. A key stays protected from eviction
    while a queued layer or the running one needs it."""

    def __init__(self, transfer: Transfer, policy: LRUPolicy, prefetch: bool = True, reuse: bool = True):
        if transfer.num_slots < 1:
            raise ValueError("the expert cache needs room for at least one expert")
        self.transfer, self.policy = transfer, policy
        self.prefetch_enabled, self.reuse = prefetch, reuse
        self.num_slots = transfer.num_slots
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * self.num_slots
        self.free: list[int] = list(range(self.num_slots))[::-1]  # empty slots, lowest on top
        self.pending: dict[int, object] = {}        # slot -> transfer handle not yet waited for
        self.needed_by: dict[Key, set[int]] = {}    # key -> layers (queued or running) that need it
        self.prefetched_keys: set[Key] = set()
        self.routed: deque = deque()                 # (layer, owner, experts) routed, not yet computed
        self.running: tuple[int, list[Key]] | None = None
        self.first_layer: int | None = None
        self.stats = OffloadStats()

    @property
    def expert_bytes(self) -> int:
        return self.transfer.expert_bytes

    @property
    def nbytes(self) -> int:
        return self.transfer.nbytes

    # -- protection
    def _protect(self, layer: int, keys) -> None:
        for key in keys:
            self.needed_by.setdefault(key, set()).add(layer)

    def _release(self, layer: int, keys) -> None:
        for key in keys:
            users = self.needed_by.get(key)
            if users is not None:
                users.discard(layer)
                if not users:
                    del self.needed_by[key]
            if not self.reuse and key in self.slot_of:
                self._evict(key)  # the naive baseline: nothing survives its use, not even for the group

    def _finish_running(self) -> None:
        """The last computed layer is done (its products were issued): its keys may go."""
        if self.running is not None:
            self._release(*self.running)
            self.running = None

    # -- slot management
    def _drop(self, key: Key) -> int:
        slot = self.slot_of.pop(key)
        handle = self.pending.pop(slot, None)
        if handle is not None:  # a transfer into this slot may still be running
            self.transfer.settle(handle)
        self.key_of[slot] = None
        self.policy.forget(key)
        self.prefetched_keys.discard(key)
        return slot

    def _evict(self, key: Key) -> None:
        self.free.append(self._drop(key))

    def _free_slot(self, running: int | None = None) -> int | None:
        """A slot to fill: an empty one, else a victim among unprotected keys. With ``running``
        (a layer that must compute now), keys that only layers queued after it need may be
        taken as a last resort."""
        if self.free:
            return self.free.pop()
        candidates = [k for k in self.slot_of if k not in self.needed_by]
        if not candidates and running is not None:
            candidates = [k for k in self.slot_of if running not in self.needed_by[k]]
            if candidates:
                self.stats.stolen += 1
        if not candidates:
            return None
        return self._drop(self.policy.victim(candidates))

    def _bring(self, key: Key, running: int | None = None) -> int | None:
        slot = self._free_slot(running)
        if slot is None:
            return None
        self.slot_of[key], self.key_of[slot] = slot, key
        handle = self.transfer.start(key, slot)
        if handle is not None:
            self.pending[slot] = handle
        self.stats.bytes_copied += self.transfer.expert_bytes
        return slot

    def _ready(self, slot: int, layer: int) -> None:
        handle = self.pending.pop(slot, None)
        if handle is not None:
            self.transfer.wait(handle, layer, self.stats)

    # -- the entry points
    def prefetch(self, layer: int, owner: int, experts: list[int]) -> None:
        """Called as soon as ``layer``'s routing is known (before its attention): queue the
        layer and start moving its missing experts, as many as fit beside what must stay."""
        if self.first_layer is None or layer <= self.first_layer:
            # A new forward pass: whatever a failed one left queued is stale.
            self.first_layer = layer if self.first_layer is None else min(layer, self.first_layer)
            for queued, _, keys in self.routed:
                self._release(queued, [(o, e) for o, e in keys])
            self.routed.clear()
        self._finish_running()
        self.policy.on_layer(layer)
        keys = [(owner, e) for e in experts]
        # A later layer may not take the slots that earlier queued layers still have to fill.
        earlier_missing = sum(1 for _, _, ks in self.routed for k in ks if k not in self.slot_of)
        self.routed.append((layer, owner, keys))
        if not self.prefetch_enabled:
            return  # nothing moves ahead, so nothing needs holding for this layer yet
        self._protect(layer, keys)
        room = len(self.free) + sum(1 for k in self.slot_of if k not in self.needed_by) - earlier_missing
        for key in keys:
            if key not in self.slot_of:
                if room <= 0 or self._bring(key) is None:
                    break  # the rest come in when the layer computes
                room -= 1
                self.prefetched_keys.add(key)

    def _next_layer(self, owner: int, experts: list[int]) -> tuple[int, list[Key]]:
        if not self.routed:
            raise RuntimeError("offloaded experts were asked for without routing first (is the offload "
                               "hook in model.routing_hooks?)")
        layer, queued_owner, keys = self.routed[0]
        wanted = [(owner, e) for e in experts]
        if queued_owner != owner or not set(wanted) <= set(keys):
            raise RuntimeError(f"layer {layer} was routed to experts {sorted(e for _, e in keys)} of group "
                               f"{queued_owner}, but group {owner}'s experts {sorted(experts)} were asked for")
        return layer, wanted

    def fits_at_once(self) -> bool:
        """Whether the next layer's experts can all be in slots together (then their weights
        stay valid until the layer is done, and the bank may compute them in one go). Every
        slot the layer's experts do not hold can be taken for them (see :meth:`_free_slot`),
        so this is a matter of numbers."""
        return bool(self.routed) and len(self.routed[0][2]) <= self.num_slots

    def acquire(self, owner: int, experts: list[int], at_once: bool = False):
        """Yields (expert, (gate, up, down)) for the oldest routed layer, waiting only for
        transfers not yet done. ``at_once`` (see :meth:`fits_at_once`): every weight stays
        valid until the next layer is routed or computed. Otherwise resident experts come
        first and the rest stream through the cache, each evictable once its product is
        issued (prefill: more experts than slots)."""
        self._finish_running()
        layer, keys = self._next_layer(owner, experts)
        self.routed.popleft()
        self._protect(layer, keys)
        self.running = (layer, keys)
        for key in keys:
            self.stats.uses += 1
            if key in self.prefetched_keys:
                self.stats.prefetched += 1
                self.prefetched_keys.discard(key)
            elif key in self.slot_of:
                self.stats.hits += 1
        if at_once:
            for key in keys:  # start every missing transfer, then wait: they overlap each other
                if key not in self.slot_of:
                    self._bring_now(key, layer)
            for key in keys:
                self._ready(self.slot_of[key], layer)
                self.policy.touch(key)
            for key in keys:
                yield key[1], self.transfer.weights(self.slot_of[key])
            return
        order = [k for k in keys if k in self.slot_of] + [k for k in keys if k not in self.slot_of]
        for key in order:
            if key not in self.slot_of:
                self._bring_now(key, layer)
            slot = self.slot_of[key]
            self._ready(slot, layer)
            self.policy.touch(key)
            yield key[1], self.transfer.weights(slot)
            # Its product is issued: a later transfer into this slot comes after it.
            self._release(layer, [key])

    def _bring_now(self, key: Key, layer: int) -> None:
        """A miss: the running layer needs ``key`` now (the host time spent starting the
        transfer -- all of it for a synchronous one -- is a stall)."""
        self.stats.misses += 1
        t = time.perf_counter()
        if self._bring(key, running=layer) is None:
            raise RuntimeError(f"expert cache of {self.num_slots} slots has no evictable slot for layer {layer}; "
                               f"raise the memory budget")
        self.stats.stall(layer, time.perf_counter() - t)

    def collect_timings(self) -> None:
        """Fold the transfer's pending timings into the statistics (GPU: synchronises)."""
        self.transfer.collect(self.stats)

    def reset_stats(self) -> None:
        self.collect_timings()
        self.transfer.reset()
        self.stats = OffloadStats()

    def close(self) -> None:
        self.transfer.close()


class OffloadedBank(ExpertBank):
    """An expert bank whose weights live elsewhere; computation uses cache slots."""

    def __init__(self, host: ExpertBank, owner: int, cache: ExpertCache):
        torch.nn.Module.__init__(self)
        self.num_experts, self.owner = host.num_experts, owner
        self.gate_proj, self.up_proj, self.down_proj = host.gate_proj, host.up_proj, host.down_proj
        self._cache = [cache]  # a list, so the cache is not registered as a submodule

    @property
    def weights_stay_valid(self) -> bool:
        # Asked right before the experts are: true when the layer's experts fit in the cache
        # together, so the bank may compute them all in one kernel call.
        return self._cache[0].fits_at_once()

    def expert_weights(self, experts: list[int]):
        cache = self._cache[0]
        return cache.acquire(self.owner, experts, at_once=cache.fits_at_once())
class ExpertOffload:
    """Wires an :class:`ExpertCache` into a Megrez2 model. Without ``storage`` the routed
    experts are the model's banks in host memory, cached on ``device``; with ``storage`` (an
    ``engine.storage.ExpertStore``) they stay in the checkpoint files and are read into slots
    in host memory."""

    def __init__(self, model, device: torch.device, cache_bytes: int, policy: str = "group",
                 prefetch: bool = True, reuse: bool = True, storage=None, io_threads: int = 4):
        args = model.args
        if not hasattr(args, "owner"):
            raise ValueError("expert offloading needs a mixture-of-experts model")
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r} (choose {', '.join(POLICIES)})")
        self.model, self.policy_name = model, policy
        self.budget: dict | None = None  # how a memory budget was split (llm.plan_offload)
        owners = sorted({args.owner(i) for i in range(args.num_hidden_layers) if args.is_moe(i)})
        host = {o: model.layers[o].mlp.experts for o in owners}
        total = len(owners) * args.n_routed_experts
        if storage is None:
            slots = min(int(cache_bytes // HostTransfer.slot_bytes(model)), total)
            transfer = HostTransfer(host, max(slots, 0), device) if slots >= 1 else None
        else:
            from .storage import StorageTransfer

            slots = min(StorageTransfer.slots_for(storage, cache_bytes, io_threads), total)
            transfer = StorageTransfer(storage, max(slots, 0), io_threads=io_threads) if slots >= 1 else None
        if transfer is None:
            raise ValueError("the expert cache needs room for at least one expert")
        self.cache = ExpertCache(transfer,
                                 POLICIES[policy](owners, args.num_hidden_layers, args.experts_shared_frequency),
                                 prefetch=prefetch, reuse=reuse)
        self.banks = {}
        for o in owners:
            bank = OffloadedBank(host[o], o, self.cache)
            model.layers[o].mlp.experts = bank
            self.banks[o] = bank
        self.host_banks = host
        model.routing_hooks.append(self._on_route)

    @property
    def tier(self) -> str:
        return self.cache.transfer.name

    def detach(self) -> None:
        """Put the original banks back in the model (host memory: it then computes experts
        where they live) and release the cache."""
        for o in self.banks:
            self.model.layers[o].mlp.experts = self.host_banks[o]
        self.model.routing_hooks.remove(self._on_route)
        self.cache.close()

    def _on_route(self, layer: int, indices: torch.Tensor, weights: torch.Tensor) -> None:
        self.cache.prefetch(layer, self.model.args.owner(layer), indices.unique().tolist())

    @property
    def stats(self) -> dict:
        """Counters so far (GPU copy timings are folded in by the engine after each step)."""
        if not getattr(self.cache.transfer, "cuda", False):
            self.cache.collect_timings()
        return {"tier": self.tier, "policy": self.policy_name, "prefetch": self.cache.prefetch_enabled,
                "slots": self.cache.num_slots, "cache_bytes": self.cache.nbytes, **self.cache.stats.as_dict(),
                **self.cache.transfer.describe(), **({"budget_split": self.budget} if self.budget else {})}

    def reset_stats(self) -> None:
        self.cache.reset_stats()


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
