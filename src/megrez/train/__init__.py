"""Training: packed pre-training and SFT (turn-level loss) for Megrez2 and Llama models, with
auxiliary-loss-free expert balancing, resumable checkpoints in the Hugging Face layout and
FSDP2 data parallelism. Entry points: ``megrez train pretrain|sft`` and :func:`train`."""
from .trainer import TrainConfig, Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
