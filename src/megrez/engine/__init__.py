from .engine import Engine, QueueFull, Request, RequestOutput
from .sampling import SamplingParams

__all__ = ["Engine", "QueueFull", "Request", "RequestOutput", "SamplingParams"]
