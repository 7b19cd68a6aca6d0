"""Prometheus text exposition (format 0.0.4) for ``GET /metrics``, written by hand so the
server needs no client library."""
from __future__ import annotations

import bisect
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative-bucket histogram. Updated only on the event loop thread, so it needs no lock."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last bucket is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Exposition:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples) -> None:
        """``samples``: a number, or a list of ``(labels dict, number)``."""
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        if not isinstance(samples, list):
            samples = [({}, samples)]
        for labels, value in samples:
            self.lines.append(f"{name}{self._labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_: str, h: Histogram) -> None:
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(list(h.bounds) + ["+Inf"], h.counts):
            running += count
            le = bound if isinstance(bound, str) else _number(bound)
            self.lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        self.lines += [f"{name}_sum {_number(h.sum)}", f"{name}_count {h.count}"]

    @staticmethod
    def _labels(labels: dict) -> str:
        if not labels:
            return ""
        return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


LIMITS = ("max_request_tokens", "max_response_bytes", "max_waiting")


def render(engine_loop, api_errors: Counter, model_name: str, limits_hit: Counter | None = None) -> str:
    engine = engine_loop.engine
    stats = engine.stats
    e = Exposition()
    blocks = engine.blocks
    e.metric("megrez_requests_running", "gauge", "Requests being decoded.", len(engine.running))
    e.metric("megrez_requests_waiting", "gauge", "Requests queued for admission.", len(engine.waiting))
    e.metric("megrez_requests_max_waiting", "gauge", "Bound of the waiting queue.", engine.max_waiting)
    e.metric("megrez_max_num_seqs", "gauge", "Most sequences decoded at once.", engine.max_num_seqs)
    e.metric("megrez_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks held by requests.",
             float(engine.cache_usage))
    e.metric("megrez_kv_cache_block_size", "gauge", "Tokens per KV cache block.", engine.block_size)
    e.metric("megrez_kv_cache_blocks", "gauge", "KV cache blocks: held by requests (used), unused but holding a "
             "cached prefix (cached), empty (free).",
             [({"state": "used"}, blocks.num_used), ({"state": "cached"}, blocks.num_cached),
              ({"state": "free"}, blocks.num_free - blocks.num_cached)])
    e.metric("megrez_max_model_len", "gauge", "Tokens one sequence may hold (prompt and output).",
             engine.max_model_len)
    queried, hit = blocks.stats["query_tokens"], blocks.stats["hit_tokens"]
    e.metric("megrez_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", queried)
    e.metric("megrez_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", hit)
    e.metric("megrez_prefix_cache_hit_ratio", "gauge", "Prompt tokens found in the prefix cache, of those looked "
             "up (since start).", hit / queried if queried else 0.0)
    e.metric("megrez_prefix_cache_evicted_blocks_total", "counter", "Cached blocks reused for other content.",
             blocks.stats["evicted_blocks"])
    e.metric("megrez_preemptions_total", "counter", "Requests preempted for lack of KV cache blocks.",
             stats["preemptions"])
    e.metric("megrez_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", stats["prompt_tokens"])
    e.metric("megrez_prefill_tokens_total", "counter", "Prompt tokens computed (not found in the prefix cache).",
             stats["prefill_tokens"])
    e.metric("megrez_generation_tokens_total", "counter", "Tokens generated.", stats["generation_tokens"])
    e.metric("megrez_engine_steps_total", "counter", "Engine steps run.", stats["steps"])
    e.metric("megrez_requests_finished_total", "counter", "Engine requests finished, by finish reason.",
             [({"finish_reason": r}, n) for r, n in sorted(engine_loop.finished.items())])
    e.metric("megrez_api_errors_total", "counter", "Error responses, by HTTP status (499: the client hung up "
             "before the answer).", [({"status": s}, n) for s, n in sorted(api_errors.items())])
    hit = limits_hit or Counter()
    e.metric("megrez_request_limits_hit_total", "counter", "Requests refused, or their max_tokens lowered, by a "
             "per-request limit.", [({"limit": name}, hit[name]) for name in LIMITS])
    e.histogram("megrez_time_to_first_token_seconds", "Time from submission to the first token.", engine_loop.ttft)
    e.histogram("megrez_request_latency_seconds", "Time from submission to the last token.", engine_loop.latency)
    e.metric("megrez_model_info", "gauge", "The served model.", [({"model": model_name}, 1)])
    if engine.offload is not None:
        s = engine.offload.stats
        e.metric("megrez_expert_cache_slots", "gauge", "Routed experts the device cache holds.", s["slots"])
        e.metric("megrez_expert_cache_hit_ratio", "gauge", "Expert uses served from the cache without a copy.",
                 float(s["hit_rate"]))
        e.metric("megrez_expert_uses_total", "counter", "Expert uses, by how the expert got to the device.",
                 [({"source": k}, s[k]) for k in ("hits", "prefetched", "misses")])
        e.metric("megrez_expert_copy_bytes_total", "counter", "Bytes of experts copied to the device.",
                 s["bytes_copied"])
        e.metric("megrez_expert_copy_seconds_total", "counter", "Time spent copying experts, by whether "
                 "computation waited for it.", [({"kind": "hidden"}, float(s["copy_seconds_hidden"])),
                                                ({"kind": "exposed"}, float(s["copy_seconds_exposed"]))])
        e.metric("megrez_expert_stall_seconds_total", "counter", "Time each layer waited for its experts.",
                 [({"layer": str(layer)}, float(v)) for layer, v in s["per_layer_stall_seconds"].items()])
        if s["tier"] == "storage-to-ram":
            e.metric("megrez_expert_read_bytes_total", "counter", "Bytes read from the checkpoint files for "
                     "routed experts (with direct-I/O alignment).", s["bytes_read"])
            e.metric("megrez_expert_reads_total", "counter", "Reads issued for routed experts.", s["reads"])
            e.metric("megrez_expert_read_bandwidth_bytes_per_second", "gauge", "Bytes read per second of I/O time "
                     "(time with a read in flight).", float(s["read_bandwidth"]))
    return e.text()
