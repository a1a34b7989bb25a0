"""Image front end (spec section 3, "Image"): picture -> RGB -> smart_resize -> 32x32 patches.

    load_image(path, array or PIL image) -> [H, W, 3] uint8 RGB
    smart_resize(h, w)                   -> (h', w'), multiples of 32, area in [64, 1024] patches
    image_patches(image)                 -> ([gh * gw, 3072] float32 in [-1, 1], (gh, gw))

Pixel handling follows Qwen2-VL / Qwen3-VL: RGB conversion composites transparency onto white
(transformers `convert_to_rgb`, Qwen's `do_convert_rgb`), files are turned upright by their
EXIF orientation (transformers `load_image`), bicubic resize to the `smart_resize` size (PIL
BICUBIC), scale 1/255, mean = std = 0.5. Patches are channel-major, in raster order, so
`patches @ W.T + b` equals Conv2d(3, H, kernel=stride=32) with weight W.view(H, 3, 32, 32).
"""

import math
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from m3edge.errors import MediaError

PATCH = 32
MIN_PIXELS = 65536  # 64 patches, 256 x 256
MAX_PIXELS = 1048576  # 1024 patches, 1024 x 1024
MEAN = 0.5
STD = 0.5
MAX_ASPECT_RATIO = 200  # Qwen2-VL's limit


def load_image(src) -> np.ndarray:
    """Read a file, PIL image or array; return [H, W, 3] uint8 RGB.

    Arrays: [H, W] gray, [H, W, 1] gray, [H, W, 3] RGB or [H, W, 4] RGBA, channels last.
    Integer arrays must hold 0..255; float arrays must hold 0..1 (scaled by 255 and rounded).
    Alpha (array or file) is composited onto a white background, as Qwen's processors do.
    """
    if isinstance(src, (str, os.PathLike)):
        image = _open_image_file(os.fspath(src))
    elif isinstance(src, Image.Image):
        image = src
    elif isinstance(src, np.ndarray):
        image = _array_to_pil(src)
    else:
        raise MediaError(f"image source must be a file path, PIL image or numpy array, got {type(src).__name__}")
    if image.width == 0 or image.height == 0:
        raise MediaError(f"image is empty ({image.width}x{image.height} pixels)")
    return np.array(_to_rgb(image), dtype=np.uint8)  # [H, W, 3], a writable copy


def _open_image_file(path: str) -> Image.Image:
    if not os.path.exists(path):
        raise MediaError(f"image file '{path}' does not exist")
    if os.path.isdir(path):
        raise MediaError(f"image path '{path}' is a directory, not a file")
    try:
        with Image.open(path) as f:
            f.load()  # decode now, so truncated files fail here and the file handle closes
            image = ImageOps.exif_transpose(f)
    except UnidentifiedImageError:
        raise MediaError(f"cannot read image '{path}': not an image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise MediaError(f"cannot read image '{path}': {reason}") from None
    return image


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]  # [H, W, 1] -> [H, W]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise MediaError(f"image array must be [H, W], [H, W, 3] or [H, W, 4] (channels last), got shape {a.shape}")
    if a.size == 0:
        raise MediaError(f"image array is empty (shape {a.shape})")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise MediaError("image array contains NaN or infinite values")
        if a.min() < 0.0 or a.max() > 1.0:
            raise MediaError(
                f"float image array must hold values in [0, 1], got [{a.min():.4g}, {a.max():.4g}] "
                "(pass 0..255 pixels as uint8)"
            )
        a = np.round(a.astype(np.float64) * 255.0)
    elif a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 255:
            raise MediaError(f"integer image array must hold values in 0..255, got {a.min()}..{a.max()}")
    else:
        raise MediaError(f"image array has unsupported type {a.dtype} (use uint8 0..255 or float 0..1)")
    return Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)))  # [H, W] -> L, [H, W, 3|4] -> RGB|RGBA


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers `convert_to_rgb`: alpha (or palette transparency) is composited onto white.

    16-bit gray is scaled to 8 bits first; other modes use PIL's `convert("RGB")`.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # 16-bit gray PNG/TIFF: PIL's convert would clip it to white
        gray16 = np.asarray(image).astype(np.float64)  # [H, W] 0..65535
        return Image.fromarray(np.round(gray16 / 257.0).astype(np.uint8)).convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def smart_resize(
    h: int, w: int, factor: int = PATCH, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Qwen2-VL's `smart_resize`: sides rounded to multiples of `factor`, aspect ratio kept,
    area brought into [min_pixels, max_pixels] (too big: shrink and floor; too small: grow and ceil).
    """
    if factor < 1 or not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need factor >= 1 and 0 < min_pixels <= max_pixels, got {factor}, {min_pixels}, {max_pixels}")
    if h < 1 or w < 1:
        raise MediaError(f"image is empty ({w}x{h} pixels)")
    if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
        raise MediaError(f"image aspect ratio {max(h, w) / min(h, w):.1f} ({w}x{h}) exceeds {MAX_ASPECT_RATIO}")
    h_bar = round(h / factor) * factor
    w_bar = round(w / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar = math.ceil(h * beta / factor) * factor
        w_bar = math.ceil(w * beta / factor) * factor
    return h_bar, w_bar


def image_pixels(src, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Anything `load_image` takes -> resized, normalised [3, H', W'] float32 in [-1, 1]."""
    rgb = load_image(src)  # [H, W, 3] uint8
    h, w = smart_resize(rgb.shape[0], rgb.shape[1], PATCH, min_pixels, max_pixels)
    if (h, w) != rgb.shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BICUBIC))  # [h, w, 3] uint8
    x = rgb.astype(np.float32) / 255.0
    x = (x - MEAN) / STD  # [h, w, 3] in [-1, 1]
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, h, w]


def image_patches(
    src, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Anything `load_image` takes -> ([gh * gw, 3072] float32 patches, (gh, gw)).

    Row r = gi * gw + gj is patch (gi, gj) in raster order, flattened channel-major as [3, 32, 32].
    """
    x = image_pixels(src, min_pixels, max_pixels)  # [3, H, W]
    gh, gw = x.shape[1] // PATCH, x.shape[2] // PATCH
    x = x.reshape(3, gh, PATCH, gw, PATCH)  # [3, gh, 32, gw, 32]
    x = x.transpose(1, 3, 0, 2, 4)  # [gh, gw, 3, 32, 32]
    return np.ascontiguousarray(x.reshape(gh * gw, 3 * PATCH * PATCH)), (gh, gw)  # [gh * gw, 3072]
