"""megrez: run, serve and train the Megrez model family (Megrez2 MoE, Megrez-3B)."""
import os as _os

# Idle OpenMP threads (torch's and MKL's pool; the CPU kernels have their own, kernels/pool.c) spin by default for
# about 3 ms (GNU libgomp) or 200 ms (Intel's runtime) before they sleep. Where other processes
# use some of the cores, the spinning thread takes the core the working one needs, and decoding
# slows down tens of times (docs/performance.md, benchmarks/busy_threads.py). A short spin still
# catches back-to-back parallel regions on an idle machine. The runtime reads these when torch
# is first imported (so this only helps where megrez is imported first); the user's settings win.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"} & set(_os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "1000"
    _os.environ["KMP_BLOCKTIME"] = "0"
from .engine import SamplingParams
from .llm import LLM, Completion

__version__ = "0.1.0"
__all__ = ["LLM", "Completion", "SamplingParams", "__version__"]
