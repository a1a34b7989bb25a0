"""Calibration prompts: bundled text, generated images and audio, and the user's own files.

Image and audio prompts matter for M3-Lite: without them the image/audio routers and the fusion
experts see no tokens and their experts get no Hessian (spec section 7, item 7). The generated
media are deterministic (fixed seeds), so a calibration run is reproducible.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from m3edge.errors import M3Error, MediaError
from m3edge.model.m3lite import M3Config
from m3edge.model.tokenizer import Tokenizer
from m3edge.prompt import Image, Prompt, build_prompt

TEXT_EXT = {".txt", ".md", ".text"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
AUDIO_EXT = {".wav", ".flac", ".ogg"}


def builtin_text() -> list[str]:
    """Sections of the bundled public-domain (CC0 / pre-1900) English text."""
    out = []
    for name in ("calibration.txt", "gettysburg.txt"):
        f = resources.files("m3edge.data").joinpath(name)
        if f.is_file():
            text = "\n".join(ln for ln in f.read_text().splitlines() if not ln.startswith("# m3edge"))
            out += [s.strip() for s in text.split("\n---\n") if s.strip()]
    return out


def generated_image(i: int) -> np.ndarray:
    """A deterministic synthetic picture [H, W, 3] uint8: gradients, shapes, texture and noise."""
    rng = np.random.default_rng(1000 + i)
    h, w = [(256, 256), (256, 384), (384, 256), (320, 320)][i % 4]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(0, 255, 3)[None, None] * (0.4 + 0.6 * np.stack([xx, yy, 1 - xx], -1))
    img = base.copy()
    for _ in range(rng.integers(2, 6)):  # discs and boxes of random colours
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(15, 90)
        col = rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            img[(yy * max(h, w) - cy) ** 2 + (xx * max(h, w) - cx) ** 2 < r * r] = col
        else:
            img[int(cy):int(cy + r), int(cx):int(cx + 1.5 * r)] = col
    img += 20 * np.sin(xx * rng.uniform(10, 80))[..., None] + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generated_audio(i: int) -> np.ndarray:
    """A deterministic 16 kHz clip (1.5-4 s): tones, chirps, noise bursts and silence."""
    rng = np.random.default_rng(2000 + i)
    n = int(16000 * rng.uniform(1.5, 4.0))
    t = np.arange(n) / 16000
    f0, f1 = rng.uniform(100, 400), rng.uniform(400, 4000)
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * t[-1])))
    harm = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 5))
    env = (np.sin(2 * np.pi * rng.uniform(1, 4) * t) > -0.3).astype(float)
    x = 0.3 * chirp + 0.2 * harm * env + 0.05 * rng.normal(size=n)
    x[int(n * 0.6):int(n * 0.7)] = 0  # a pause
    return (0.8 * x / np.abs(x).max()).astype(np.float32)


def _chat_ids(tok: Tokenizer, parts: list[dict]) -> list[int]:
    if tok.chat_template is None:
        raise M3Error("calibrating image/audio needs the model's chat template")
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True))


def build_calibration(cfg: M3Config, tok: Tokenizer, files: list[Path] = (), builtin: bool = True,
                      max_tokens: int = 16384, seq_len: int = 512) -> list[Prompt]:
    """Prompts of at most `seq_len` tokens, about `max_tokens` in total: a mix of text, image,
    audio and image+audio prompts (media only where the model has those inputs)."""
    from m3edge.frontends import audio_tokens, image_patches, load_audio, load_image

    texts, images, audios = [], [], []
    for f in files:
        f = Path(f)
        ext = f.suffix.lower()
        if not f.is_file():
            raise M3Error(f"calibration file '{f}' does not exist")
        if ext in TEXT_EXT:
            try:
                texts += [s for s in f.read_text().split("\n\n") if s.strip()]
            except UnicodeDecodeError:
                raise M3Error(f"calibration file '{f}' is not UTF-8 text") from None
        elif ext in IMAGE_EXT:
            images.append(load_image(f))
        elif ext in AUDIO_EXT:
            audios.append(load_audio(f))
        else:
            raise M3Error(f"calibration file '{f}' is not text (.txt/.md), an image or a wav/flac/ogg file")
    if builtin:
        texts += builtin_text()
    if not cfg.vision_config:
        if images:
            raise MediaError("the model has no vision input, so image calibration files cannot be used")
    elif builtin:
        images += [generated_image(i) for i in range(8)]
    if not cfg.audio_config:
        if audios:
            raise MediaError("the model has no audio input, so audio calibration files cannot be used")
    elif builtin:
        audios += [generated_audio(i) for i in range(8)]

    prompts: list[Prompt] = []
    total = 0
    ids_stream = tok.encode("\n\n".join(texts), add_bos=False)
    captions = ["Describe what you see.", "What is in this picture?", "Transcribe and describe the sound.",
                "Compare the picture and the recording."]
    # media prompts first (they are few and the point of the exercise), text fills the rest
    for i, img in enumerate(images):
        patches, grid = image_patches(img)
        ids = _chat_ids(tok, [{"type": "image"}, {"type": "text", "text": captions[i % 2]}])
        prompts.append(build_prompt(ids, cfg, [Image(patches, grid)]))
    for i, a in enumerate(audios):
        ids = _chat_ids(tok, [{"type": "audio"}, {"type": "text", "text": captions[2]}])
        prompts.append(build_prompt(ids, cfg, audios=[audio_tokens(a)]))
    for i in range(min(len(images), len(audios), 4)):  # mixed prompts open the fusion experts to text too
        patches, grid = image_patches(images[i])
        ids = _chat_ids(tok, [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": captions[3]}])
        ids += tok.encode(texts[i % len(texts)][:400]) if texts else []
        prompts.append(build_prompt(ids, cfg, [Image(patches, grid)], [audio_tokens(audios[-1 - i])]))
    total = sum(len(p) for p in prompts)
    for start in range(0, len(ids_stream), seq_len):
        if total >= max_tokens:
            break
        chunk = ids_stream[start:start + seq_len]
        if len(chunk) < 16:
            break
        if tok.bos_id is not None and tok.add_bos:
            chunk = [tok.bos_id] + chunk[:-1]
        prompts.append(build_prompt(chunk, cfg))
        total += len(chunk)
    if not prompts:
        raise M3Error("the calibration set is empty (no text, image or audio to calibrate with)")
    return prompts
