"""The benchmark commands run end to end on a tiny shape and report consistent numbers."""
import json
import os
import sys
from pathlib import Path

import pytest
import timing

pytestmark = pytest.mark.slow  # each runs a benchmark end to end


def run(*args):
    r = timing.run([sys.executable, "-m", "megrez.cli", *args], timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bench_reports_rooflines():
    out = run("bench", "--shape", "megrez2-mini", "--device", "cpu", "--dtype", "float32", "--batch", "1", "2",
              "--prompt", "16", "--output", "6")
    assert out["read_bandwidth"] > 0 and out["matmul_flops"] > 0
    rows = out["results"]
    assert [(r["batch"], r["prompt"]) for r in rows] == [(1, 16), (2, 16)]
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and 0 < r["bandwidth_fraction"] < 1.5
        # One token reads at least every non-expert weight and top_k experts per MoE layer.
        assert r["bytes_per_step"] >= out["active_params"] * 4 * 0.5


def test_bench_quantized_counts_the_quantized_bytes():
    """--quantization allocates the scheme's types directly (random blocks) and counts the bytes
    a step reads at their quantized size."""
    f32 = run("bench", "--shape", "megrez2-mini", "--device", "cpu", "--dtype", "float32", "--prompt", "16",
              "--output", "6")
    q8 = run("bench", "--shape", "megrez2-mini", "--device", "cpu", "--dtype", "float32", "--prompt", "16",
             "--output", "6", "--quantization", "q8_0")
    assert q8["model"] == "megrez2-mini (q8_0)" and q8["active_params"] == f32["active_params"]
    (a,), (b,) = f32["results"], q8["results"]
    assert b["decode_tokens_per_s"] > 0 and 0 < b["bandwidth_fraction"] < 1.5
    # Q8_0 is 34 bytes per 32 weights; the router, norms, embedding row and KV cache stay float.
    assert 0.2 < b["bytes_per_step"] / a["bytes_per_step"] < 0.4


def test_bench_offload_keeps_tokens_identical():
    out = run("bench-offload", "--shape", "megrez2-mini", "--device", "cpu", "--dtype", "float32",
              "--budgets", "2MiB", "--batch", "1", "--output", "8", "--kv-cache-memory", "512KiB")
    rows = [r for r in out["rows"] if r["mode"] != "all-on-device"]
    assert {r["mode"] for r in rows} == {"prefetch", "lru", "cache-only", "naive"}
    assert {r["routing"] for r in rows} == {"uniform", "trace"}
    assert all(r["identical_to_all_on_device"] for r in rows)
    assert all(r["hit_rate"] == 0 for r in rows if r["mode"] == "naive")
    assert 0.3 < out["trace"]["next_token_reuse"] < 0.9


def test_bench_transformers_baseline_on_the_same_weights():
    out = run("bench", "--shape", "llama-test", "--device", "cpu", "--dtype", "float32", "--prompt", "16",
              "--output", "6", "--hf-baseline")
    (hf,) = out["transformers_baseline"]
    assert hf["decode_tokens_per_s"] > 0 and hf["engine_speedup"] > 0


def test_a_shape_too_big_for_this_machine_is_refused_before_allocating(monkeypatch, capsys):
    import megrez.loading
    from megrez.cli import main

    monkeypatch.setattr(megrez.loading, "available_host_memory", lambda: 8 << 30)
    assert main(["bench-offload", "--shape", "megrez2-3x7b-a3b", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "8.00 GiB is available" in err and "--shape megrez2-350m" in err
    assert main(["bench", "--shape", "megrez2-3x7b-a3b", "--device", "cpu"]) == 2
    assert "needs about" in capsys.readouterr().err


def test_vs_llama_cpp_with_a_llama_bench_binary(tmp_path):
    """benchmarks/vs_llama_cpp.py --llama-bench runs the binary with the same threads and sizes,
    reads its JSON and reports both engines and the ratios (a stand-in binary: CI has no
    llama.cpp), with megrez's OpenMP waiting policy passed on unless --llama-env default."""
    fake = tmp_path / "llama-bench"
    log = tmp_path / "calls.txt"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
a = sys.argv[1:]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"argv": a, "spin": os.environ.get("GOMP_SPINCOUNT")}}) + "\\n")
p, n = int(a[a.index("-p") + 1]), int(a[a.index("-n") + 1])
base = {{"build_commit": "test", "model_type": "llama test"}}
print(json.dumps([dict(base, n_prompt=p, n_gen=0, avg_ts=100.0), dict(base, n_prompt=0, n_gen=n, avg_ts=10.0)]))
""")
    fake.chmod(0o755)
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "vs_llama_cpp.py")
    common = ["--types", "q8_0", "--layers", "2", "--decode", "6", "--prefill", "16", "--threads", "1",
              "--work", str(tmp_path / "work"), "--llama-bench", str(fake)]
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_WAIT_POLICY")}
    r = timing.run([sys.executable, script, *common, "--rounds", "2"], timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    (row,) = out["rows"]
    assert row["type"] == "q8_0" and len(row["rounds"]["megrez"]) == len(row["rounds"]["llama_cpp"]) == 2
    assert row["llama_cpp"]["decode_tokens_per_s"] == 10.0 and row["llama_cpp"]["prefill_tokens_per_s"] == 100.0
    m = row["megrez"]
    assert m["decode_tokens_per_s"] > 0 and 0 < m["decode_products_share"] <= 1
    assert row["decode_ratio"] == pytest.approx(m["decode_tokens_per_s"] / 10.0)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2 and all(c["argv"][c["argv"].index("-t") + 1] == "1" for c in calls)
    assert all(c["spin"] == "1000" for c in calls)  # the policy megrez gives itself
    r = timing.run([sys.executable, script, *common, "--rounds", "1", "--llama-env", "default"], timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(log.read_text().splitlines()[-1])["spin"] is None


def test_bench_offload_storage_tier_keeps_tokens_identical(tmp_path):
    out = run("bench-offload", "--tier", "storage", "--shape", "megrez2-mini", "--checkpoint", str(tmp_path / "ckpt"),
              "--budgets", "min", "50%", "--batch", "1", "2", "--output", "4")
    rows = [r for r in out["rows"] if r["mode"] != "all-in-RAM"]
    assert {r["mode"] for r in rows} == {"prefetch", "lru", "sync", "mmap"}
    assert {r["routing"] for r in rows} == {"uniform", "trained"}
    assert all(r["identical_to_all_in_ram"] for r in rows)
    assert all(r["ceiling_tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0 for r in rows)
    assert out["sequential_read_bandwidth"] > 0 and out["io"] == "O_DIRECT"
    trained, uniform = out["trace"]["trained"], out["trace"]["uniform"]
    assert 0 < trained["next_token_reuse"] < 1 and uniform["next_token_reuse"] < 0.4
    hit = {(r["routing"], r["batch"], r["budget"]): r["hit_rate"] for r in rows if r["mode"] == "prefetch"}
    assert all(hit[k[0], k[1], "50%"] > hit[k[0], k[1], "min"] for k in hit)


def test_fused_layers_benchmark_alternates_both_paths():
    """benchmarks/fused_layers.py times decode steps as one call, with the layers fused and module
    by module, and each kind of round really ran that way."""
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "fused_layers.py")
    r = timing.run([sys.executable, script, "--shape", "llama-test", "--quantization", "q8_0", "--rounds", "2",
                    "--steps", "2", "--threads", "1"], timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["whole_step_calls"] == 2 * 2  # rounds x steps
    assert out["fused_layer_calls"] == 2 * 2 * 4  # rounds x steps x the shape's 4 layers
    assert set(out["ms_per_step"]) == {"step", "layers", "modules"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in out["ms_per_step"].values())
