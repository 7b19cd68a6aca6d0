"""Megrez-3B-Omni (``MegrezO``): the language model with image and speech towers."""
from .model import Model, ModelArgs, parse_args

__all__ = ["Model", "ModelArgs", "parse_args"]
