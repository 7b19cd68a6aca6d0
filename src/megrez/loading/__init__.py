"""Checkpoints: resolve a directory or hub id, read config.json, load the weights straight
into a model built on the meta device, and save them back. One module per concern:

    common       errors, paths, dtype/device, atomic writes
    safetensors  the Hugging Face layout (sharded safetensors + config.json)
    model        building a model and copying checkpoint tensors into it

Every failure is a :class:`CheckpointError` naming the file and tensor at fault.
"""
from ..models import ConfigError
from .common import (
                     DTYPES,
                     TOKENIZER_FILES,
                     CheckpointError,
                     atomic_directory,
                     available_host_memory,
                     read_json,
                     resolve_device,
                     resolve_dtype,
                     resolve_model_path,
)
from .model import load_model, load_weights, materialize
from .safetensors import INDEX_NAME, WEIGHTS_NAME, SafetensorsFile, checkpoint_shards, model_config, save_model

__all__ = ["CheckpointError", "ConfigError", "load_model", "save_model", "resolve_model_path", "read_json",
           "checkpoint_shards", "resolve_device", "resolve_dtype", "atomic_directory", "materialize", "load_weights",
           "model_config", "SafetensorsFile", "DTYPES", "TOKENIZER_FILES", "WEIGHTS_NAME", "INDEX_NAME",
           "available_host_memory"]
