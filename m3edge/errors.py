"""Typed errors for user mistakes. Each message is one sentence naming what was wrong.

The CLI catches `M3Error` and prints its message without a traceback; anything else is a
bug and keeps its traceback.
"""


class M3Error(Exception):
    """Base class: a problem with the user's input, files or environment."""


class ConfigError(M3Error, ValueError):
    """A config.json value is missing, of the wrong type or out of range."""


class CheckpointError(M3Error):
    """A checkpoint directory or tensor file is missing, corrupt or does not match its config."""


class ImportSourceError(M3Error):
    """A source checkpoint (GGUF, HF safetensors) cannot be imported."""


class MediaError(M3Error, ValueError):
    """An image or audio input cannot be read or is empty."""


class CaptureError(M3Error):
    """A microphone or camera cannot be opened, or stopped delivering."""
