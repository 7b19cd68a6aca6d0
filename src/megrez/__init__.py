"""megrez: run, serve and train the Megrez model family (Megrez2 MoE, Megrez-3B)."""
from .engine import SamplingParams
from .llm import LLM, Completion

__version__ = "0.1.0"
__all__ = ["LLM", "Completion", "SamplingParams", "__version__"]
