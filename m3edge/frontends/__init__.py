"""Media front ends: audio and images -> the float rows the M3-Lite embedders take (spec section 3)."""

from m3edge.frontends.audio import StreamResampler, audio_tokens, load_audio, log_mel, resample
from m3edge.frontends.image import image_patches, image_pixels, load_image, smart_resize

__all__ = [
    "StreamResampler",
    "audio_tokens",
    "image_patches",
    "image_pixels",
    "load_audio",
    "load_image",
    "log_mel",
    "resample",
    "smart_resize",
]
