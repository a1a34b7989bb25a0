"""Audio and image front ends (spec section 3) against transformers' Whisper / Qwen2-VL references."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from m3edge.errors import MediaError
from m3edge.frontends import audio_tokens, image_patches, image_pixels, load_audio, load_image, log_mel, resample
from m3edge.frontends import audio as audio_mod
from m3edge.frontends import image as image_mod

SR = 16000


def _pad_1280(x: np.ndarray) -> np.ndarray:
    return np.pad(x, (0, -len(x) % 1280))


def _signal(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """float32 test audio at 16 kHz: white noise, or speech-like chirps with a syllable-rate envelope."""
    t = np.arange(n) / SR
    if kind == "noise":
        x = 0.1 * np.random.default_rng(seed).standard_normal(n)
    else:
        # three chirps sweeping through formant-like bands, amplitude-modulated at 4 Hz
        sweeps = [(120, 300), (800, -100), (2500, 900)]  # (start Hz, Hz/s)
        x = sum(0.2 * np.sin(2 * np.pi * (f0 * t + 0.5 * k * t * t)) for f0, k in sweeps)
        x = x * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))
    return x.astype(np.float32)


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)


@pytest.fixture(scope="module")
def whisper():
    import transformers
    return transformers.WhisperFeatureExtractor(feature_size=128)


def _whisper_log_mel(fe, x: np.ndarray) -> np.ndarray:
    # padding="longest" on one clip pads nothing, so the STFT sees the same reflect-padded ends as
    # ours and the clamp uses the same max (the default pads to 30 s of zeros, changing the last frames).
    out = fe(x, sampling_rate=SR, padding="longest", return_tensors="np")["input_features"][0]  # [128, T]
    return out.T  # [T, 128]


# ----------------------------------------------------------------------------- log-mel


def test_mel_filter_bank_matches_transformers():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    )  # [201, 128]
    ours = audio_mod.mel_filter_bank()
    assert ours.shape == (201, 128)
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("kind", ["noise", "chirps"])
@pytest.mark.parametrize("seconds", [1.0, 3.37, 0.05])
def test_log_mel_matches_whisper_extractor(whisper, kind, seconds):
    x = _pad_1280(_signal(kind, int(round(seconds * SR))))  # [n], n % 1280 == 0
    ref = _whisper_log_mel(whisper, x)
    ours = log_mel(x)
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape == (len(x) // 160, 128)
    assert np.abs(ours - ref).max() <= 1e-4


def test_log_mel_pads_to_80ms_itself(whisper):
    x = _signal("chirps", 16001)  # not a multiple of 1280
    ours = log_mel(x)
    assert ours.shape == (math.ceil(16001 / 1280) * 8, 128)
    np.testing.assert_array_equal(ours, log_mel(_pad_1280(x)))


def test_log_mel_max_is_per_30s_chunk(whisper):
    # 30 s of loud noise, then 12 s of audio 60 dB quieter: its own chunk max keeps it above the floor
    loud = _signal("noise", 480000, seed=1)
    quiet = 1e-3 * _signal("chirps", 12 * SR)
    x = np.concatenate([loud, quiet])  # [672000], a multiple of 1280
    ours = log_mel(x)
    ref = np.concatenate([_whisper_log_mel(whisper, loud), _whisper_log_mel(whisper, quiet)])
    assert ours.shape == ref.shape == (4200, 128)
    assert np.abs(ours - ref).max() <= 1e-4
    # a single global max would floor everything at loud max - 2; the quiet chunk goes well below that
    assert ours[3000:].min() < ours[:3000].max() - 2.0 - 0.25


def test_audio_tokens_shape_and_layout():
    for n in [1, 1279, 1280, 1281, 16000, 30 * SR]:
        tokens = audio_tokens(_signal("noise", n))
        assert tokens.shape == (math.ceil(n / 1280), 1024) and tokens.dtype == np.float32
    assert audio_tokens(_signal("chirps", 30 * SR)).shape == (375, 1024)

    x = _signal("chirps", 3 * SR + 77)
    tokens = audio_tokens(x)  # [N, 1024]
    mel = log_mel(x)  # [8N, 128]
    assert mel.shape[0] == 8 * tokens.shape[0]
    for i in [0, 1, tokens.shape[0] - 1]:
        np.testing.assert_array_equal(tokens[i], np.concatenate([mel[8 * i + f] for f in range(8)]))


# ----------------------------------------------------------------------------- loading and resampling


def _assert_is_sine(y: np.ndarray, freq: float, amp: float, edge: int = 1000):
    """y (16 kHz) equals amp * sin(2 pi f n / 16000) away from the ends, and its fitted amplitude is amp."""
    n = np.arange(len(y))
    inner = slice(edge, len(y) - edge)
    expected = amp * np.sin(2 * np.pi * freq * n / SR)
    assert np.abs(y[inner] - expected[inner]).max() <= 0.01 * amp
    basis = np.stack([np.sin(2 * np.pi * freq * n / SR), np.cos(2 * np.pi * freq * n / SR)], axis=1)[inner]
    coef = np.linalg.lstsq(basis, y[inner], rcond=None)[0]
    assert abs(np.hypot(*coef) - amp) <= 0.01 * amp


@pytest.mark.parametrize("sr_in", [44100, 48000, 22050, 8000])
def test_resample_keeps_frequency_and_amplitude(sr_in):
    x = _sine(440.0, sr_in, 1.0)
    y = load_audio(x, sr=sr_in)
    assert y.dtype == np.float32 and y.shape == (math.ceil(len(x) * SR / sr_in),)
    _assert_is_sine(y, 440.0, 0.5)
    f_high = min(5000.0, 0.4 * sr_in)  # upper passband too
    _assert_is_sine(resample(_sine(f_high, sr_in, 0.5), sr_in, SR), f_high, 0.5)


def test_resample_removes_frequencies_above_8khz():
    y = resample(_sine(12000.0, 44100, 0.5), 44100, SR)  # would alias to 4 kHz
    assert np.sqrt(np.mean(y[500:-500] ** 2)) < 1e-3 * 0.5


def test_resample_is_deterministic():
    x = _signal("noise", 44100)
    np.testing.assert_array_equal(resample(x, 44100, SR), resample(x.copy(), 44100, SR))


def test_16k_float_input_is_unchanged():
    x = _signal("chirps", 20000)
    np.testing.assert_array_equal(load_audio(x, sr=SR), x)


def test_stereo_is_averaged_in_either_layout():
    left = _sine(440.0, SR, 0.5, 0.6)
    right = _sine(1000.0, SR, 0.5, 0.2)
    expected = (left + right) / 2
    np.testing.assert_allclose(load_audio(np.stack([left, right], axis=1), sr=SR), expected, atol=1e-6)  # [n, 2]
    np.testing.assert_allclose(load_audio(np.stack([left, right], axis=0), sr=SR), expected, atol=1e-6)  # [2, n]


def test_integer_pcm_is_scaled():
    pcm16 = np.array([16384, -32768, 0, 32767], dtype=np.int16)
    np.testing.assert_allclose(load_audio(pcm16, sr=SR), [0.5, -1.0, 0.0, 32767 / 32768], atol=1e-7)
    pcm32 = np.array([2**30, -(2**31)], dtype=np.int32)
    np.testing.assert_allclose(load_audio(pcm32, sr=SR), [0.5, -1.0], atol=1e-7)


def test_wav_round_trip_44k1_stereo(tmp_path):
    left = _sine(440.0, 44100, 1.0, 0.5)
    stereo = np.stack([left, left], axis=1)  # [n, 2], same tone on both channels
    path = tmp_path / "tone.wav"
    sf.write(path, (stereo * 32767).astype(np.int16), 44100, subtype="PCM_16")
    y = load_audio(path)
    assert y.shape == (16000,)
    _assert_is_sine(y, 440.0, 0.5 * 32767 / 32768)
    assert load_audio(str(path), sr=44100).shape == (16000,)


def test_flac_file(tmp_path):
    path = tmp_path / "tone.flac"
    sf.write(path, _sine(440.0, SR, 0.5), SR)
    _assert_is_sine(load_audio(path), 440.0, 0.5, edge=10)


# ----------------------------------------------------------------------------- images


def _qwen_smart_resize(height, width, factor, min_pixels, max_pixels):
    """Qwen2-VL's algorithm, written out independently."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


SIZES = [(224, 224), (256, 256), (1024, 1024), (1080, 1920), (3000, 4000), (33, 33), (1, 150), (10, 1990),
         (100, 19000), (2000, 20), (31, 6000), (513, 767), (48, 48), (4096, 24)]


@pytest.mark.parametrize("min_pixels,max_pixels", [(65536, 1048576), (65536, 262144), (1024, 4096 * 4096)])
def test_smart_resize_matches_qwen(min_pixels, max_pixels):
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize
    except ImportError:
        hf_smart_resize = None
    for h, w in SIZES:
        ours = image_mod.smart_resize(h, w, 32, min_pixels, max_pixels)
        assert ours == _qwen_smart_resize(h, w, 32, min_pixels, max_pixels), (h, w)
        if hf_smart_resize is not None:
            assert ours == hf_smart_resize(h, w, factor=32, min_pixels=min_pixels, max_pixels=max_pixels), (h, w)
        assert ours[0] % 32 == 0 and ours[1] % 32 == 0 and ours[0] >= 32 and ours[1] >= 32


def test_smart_resize_clamps_token_count():
    assert image_mod.smart_resize(256, 256) == (256, 256)  # 64 patches
    assert image_mod.smart_resize(100, 100) == (256, 256)
    h, w = image_mod.smart_resize(4000, 3000)
    assert h * w <= 1048576 and abs(h / w - 4 / 3) < 0.05


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(MediaError, match="aspect ratio"):
        image_mod.smart_resize(10, 2500)


def test_patches_equal_conv2d_projection():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
    patches, (gh, gw) = image_patches(img)
    pixels = image_pixels(img)  # [3, H, W]
    assert (gh, gw) == (pixels.shape[1] // 32, pixels.shape[2] // 32) == (9, 16)
    assert patches.shape == (gh * gw, 3072) and patches.dtype == np.float32

    h_out = 24
    weight = torch.randn(h_out, 3072, generator=torch.Generator().manual_seed(0)) / 3072**0.5  # Linear-init scale
    bias = torch.randn(h_out, generator=torch.Generator().manual_seed(1))
    linear = torch.from_numpy(patches) @ weight.T + bias  # [gh * gw, h_out]
    conv = torch.nn.functional.conv2d(torch.from_numpy(pixels)[None], weight.view(h_out, 3, 32, 32), bias, stride=32)
    conv = conv[0].flatten(1).T  # [1, h_out, gh, gw] -> [gh * gw, h_out], raster order
    assert torch.allclose(linear, conv, atol=1e-4, rtol=0)

    gi, gj = 4, 11  # one patch by hand: channel-major [3, 32, 32]
    by_hand = pixels[:, gi * 32 : gi * 32 + 32, gj * 32 : gj * 32 + 32].ravel()  # [3 * 32 * 32]
    np.testing.assert_array_equal(patches[gi * gw + gj], by_hand)


def test_pixels_are_bicubic_resized_and_normalised():
    img = np.random.default_rng(1).integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(img).resize((512, 288), Image.BICUBIC)).astype(np.float32)
    np.testing.assert_allclose(image_pixels(img), (resized.transpose(2, 0, 1) / 255 - 0.5) / 0.5, atol=1e-6)
    patches, _ = image_patches(img)
    assert patches.min() >= -1.0 and patches.max() <= 1.0
    assert patches.min() == -1.0 and patches.max() == 1.0  # 0 and 255 both survive the resize here


def test_gray_and_rgba_inputs_become_rgb():
    gray = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # [256, 256]
    rgb = load_image(gray)
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == gray).all() and (rgb[..., 1] == gray).all() and (rgb[..., 2] == gray).all()
    assert load_image(gray[..., None]).shape == (256, 256, 3)

    rgba = np.zeros((256, 256, 4), dtype=np.uint8)
    rgba[:128] = (10, 20, 30, 255)  # opaque top half
    rgba[128:] = (10, 20, 30, 0)  # transparent bottom half -> white, as Qwen's convert_to_rgb
    out = load_image(rgba)
    assert out.shape == (256, 256, 3)
    assert (out[:128] == (10, 20, 30)).all() and (out[128:] == 255).all()

    patches, grid = image_patches(Image.fromarray(rgba))
    assert grid == (8, 8) and patches.shape == (64, 3072)
    assert patches.min() >= -1.0 and patches.max() <= 1.0

    floats = load_image(np.full((40, 40, 3), 0.5))
    assert (floats == 128).all()


def test_image_file_round_trip(tmp_path):
    img = np.random.default_rng(2).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(img).save(path)
    np.testing.assert_array_equal(load_image(path), img)
    gray16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 16-bit PNG keeps its range
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(load_image(tmp_path / "g16.png")[..., 0], np.round(gray16 / 257), atol=0)


# ----------------------------------------------------------------------------- bad input


def _media_error(fn, *args, **kwargs) -> str:
    with pytest.raises(MediaError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 200
    return msg


def test_bad_audio_inputs(tmp_path):
    assert "does not exist" in _media_error(load_audio, tmp_path / "missing.wav")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    assert "cannot read audio" in _media_error(load_audio, text) and "notes.wav" in _media_error(load_audio, text)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1)), 16000)
    assert "empty.wav" in _media_error(load_audio, empty) and "0 samples" in _media_error(load_audio, empty)
    assert "0 samples" in _media_error(load_audio, np.zeros(0, np.float32), sr=SR)
    assert "NaN" in _media_error(load_audio, np.array([0.0, np.nan, 0.1]), sr=SR)
    assert "NaN" in _media_error(load_audio, np.array([0.0, np.inf]), sr=44100)
    assert "sr=" in _media_error(load_audio, np.zeros(100, np.float32))
    assert "sample rate" in _media_error(load_audio, np.zeros(100, np.float32), sr=0)
    assert "peak" in _media_error(load_audio, np.full(100, 1000.0), sr=SR)  # int16 values stored as float
    assert "ambiguous" in _media_error(load_audio, np.zeros((40, 40)), sr=SR)
    assert "unsupported" in _media_error(load_audio, np.zeros(10, np.complex64), sr=SR)
    assert "file path or a numpy array" in _media_error(load_audio, [0.0, 0.1], sr=SR)
    assert "0 samples" in _media_error(log_mel, np.zeros(0, np.float32))
    assert "NaN" in _media_error(audio_tokens, np.array([np.nan], np.float32))
    assert "1-D" in _media_error(log_mel, np.zeros((2, 1600), np.float32))


def test_bad_image_inputs(tmp_path):
    assert "does not exist" in _media_error(load_image, tmp_path / "missing.png")
    fake = tmp_path / "fake.png"
    fake.write_text("not a png\n")
    assert _media_error(load_image, fake) == f"cannot read image '{fake}': not an image file"
    png = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:60])  # truncated file
    assert "cut.png" in _media_error(load_image, png)
    assert "empty" in _media_error(load_image, np.zeros((0, 10, 3), np.uint8))
    assert "empty" in _media_error(image_patches, np.zeros((0, 0), np.uint8))
    assert "channels last" in _media_error(load_image, np.zeros((3, 64, 64), np.uint8))
    assert "[0, 1]" in _media_error(load_image, np.full((8, 8, 3), 200.0))
    assert "0..255" in _media_error(load_image, np.full((8, 8), 300, np.int32))
    assert "NaN" in _media_error(load_image, np.full((8, 8), np.nan))
    assert "PIL image" in _media_error(load_image, 42)
