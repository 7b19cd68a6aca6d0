"""The kernels' worker threads (kernels/pool.c): results never depend on how many threads ran a
product or which of them ran what; callers on several Python threads at once, and a process
forked after the workers started, get the same products."""
import os
import threading

import pytest
import torch
from test_quantized_kernels import random_weight

from megrez import kernels
from megrez.kernels import quantized as kq
from megrez.quant.formats import QType


def products(seed: int):
    """Big enough to run on the worker threads (over the kernels' 128 KiB threshold): a
    quantized two-stage expert call, a quantized product and, where built, float products."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 512, generator=g)
    experts = [(x[i:i + 1], random_weight(QType.Q8_0, 512, 512, seed + i), random_weight(QType.Q8_0, 512, 512, seed + 10 + i),
                random_weight(QType.Q6_K, 512, 512, seed + 20 + i)) for i in range(3)]
    w4 = random_weight(QType.Q4_K, 1000, 512, seed + 30)
    wf = torch.randn(300, 512, generator=g)

    def run():
        with torch.inference_mode():
            out = [*kq.experts_swiglu(experts), kq.linear(x, w4)]
            if kernels.lib_has_float_kernels(kernels.load()):
                out += [kernels.linear(x, wf), kernels.swiglu(x, wf, wf)]
            return out
    return run


def same_bits(a, b):
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def test_results_do_not_depend_on_the_thread_count(lib):
    run = products(1)
    before = torch.get_num_threads()
    try:
        outs = {}
        for n in (1, 2, 3, 5, 17):  # 17: more threads than the pool's 16 item ranges (they share)
            torch.set_num_threads(n)
            outs[n] = run()
    finally:
        torch.set_num_threads(before)
    assert all(same_bits(outs[1], o) for o in outs.values())


def test_callers_on_several_threads_at_once_get_their_own_products(lib):
    runs = [products(s) for s in (2, 3, 4)]
    expected = [r() for r in runs]
    got, errors = {}, []

    def caller(i):
        try:
            got[i] = [runs[i % 3]() for _ in range(20)]
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, outs in got.items():
        assert all(same_bits(o, expected[i % 3]) for o in outs), f"caller {i}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_process_runs_the_kernels(lib):
    run = products(5)
    expected = run()  # the workers are running now
    pid = os.fork()
    if pid == 0:  # the child: its workers did not survive the fork
        ok = False
        try:
            ok = all(same_bits(run(), expected) for _ in range(3))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("value, warned", [("abc", True), ("-5", True), ("+5", True), ("99999999", True), ("250", False)])
def test_a_malformed_wait_time_is_said_and_ignored(value, warned):
    """MEGREZ_WAIT_US that is not a whole number of microseconds (0 to 10 s) is named on stderr
    and the default is kept (pool.c parses it strictly), instead of silently meaning 0."""
    import sys

    import timing

    code = ("import torch; from megrez import kernels; lib = kernels.load(); "
            "print('loaded' if lib is not None else 'none')")
    r = timing.run([sys.executable, "-c", code], timeout=120, env={**os.environ, "MEGREZ_WAIT_US": value})
    assert r.returncode == 0, r.stderr
    if r.stdout.strip() != "loaded":
        pytest.skip("CPU kernels unavailable here")
    assert ("ignoring MEGREZ_WAIT_US=" in r.stderr) == warned, r.stderr
    if warned:
        assert repr(value) in r.stderr and "whole number of microseconds" in r.stderr


def test_the_read_probe_reads_every_value_once(lib):
    """The bandwidth probe of the benchmarks (read_probe.c) sums what it reads: every value once,
    whatever the streams per thread and the threads."""
    for n in (0, 5, 1000, 100_003):
        x = (torch.arange(n) % 7).float()  # small integers: every partial sum is exact in float32
        for streams in (1, 2, 8):
            for threads in (1, 2, 3):
                assert lib.megrez_read_probe(x.data_ptr(), n, streams, threads) == float(x.sum()), (n, streams, threads)
    assert lib.megrez_read_probe(x.data_ptr(), 10, 9, 1) == -1.0  # more streams than it walks
