"""Multimodal inputs for Megrez-3B-Omni: reading images and audio, turning them into model
inputs (crops, log-mel features), and building prompts whose placeholder tokens the
encoders' vectors replace. Needs the ``omni`` extra: ``pip install 'megrez[omni]'``."""


class MediaError(ValueError):
    """An image or audio input cannot be used; the message names the part at fault."""


__all__ = ["MediaError"]
