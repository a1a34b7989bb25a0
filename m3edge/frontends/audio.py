"""Audio front end (spec section 3, "Audio"): waveform -> 16 kHz mono -> Whisper log-mel -> tokens.

    load_audio(path or array)  -> [n] float32, 16 kHz mono, in [-1, 1]
    log_mel(audio16k)          -> [T, 128] float32, T = n_padded / 160
    audio_tokens(audio16k)     -> [N, 1024] float32, N = ceil(n / 1280), 8 frames per row

The log-mel matches transformers' `WhisperFeatureExtractor(feature_size=128)` (periodic Hann
n_fft 400, hop 160, center=True with reflect padding, power spectrum, 128 Slaney mels over
0-8000 Hz, last frame dropped, log10, clamp at max - 8, (x + 4) / 4), except that the max is
taken per 30 s chunk and audio is never padded to 30 s. Everything is numpy, computed in
float64 and returned as float32.

Resampling is our own band-limited polyphase resampler: a Kaiser-windowed sinc with resampy's
"kaiser_best" parameters (64 zero crossings, beta 14.77, cutoff at 94.76% of the lower Nyquist
rate), evaluated exactly for each of the `up` phases of the rational ratio up/down. No table
interpolation and no FFT, so the result is deterministic and independent of signal length.
"""

import math
import os

import numpy as np

from m3edge.errors import MediaError

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms hop
N_MELS = 128
FRAMES_PER_TOKEN = 8
SAMPLES_PER_TOKEN = FRAMES_PER_TOKEN * HOP  # 1280 samples = 80 ms
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # 480000; the log-mel max is taken per chunk
MEL_FMAX = 8000.0

# resampy "kaiser_best" (librosa's historical default resampler).
RESAMPLE_ZERO_CROSSINGS = 64
RESAMPLE_KAISER_BETA = 14.769656459379492
RESAMPLE_ROLLOFF = 0.9475937167399596
RESAMPLE_BLOCK_ROWS = 4096  # output rows per gathered block: bounds memory to ~50 MB
RESAMPLE_PHASE_BLOCK = 256  # filters built this many phases at a time (np.i0 is slow per call)

MAX_CHANNELS = 16
FLOAT_PEAK_LIMIT = 2.0  # float input louder than this is unscaled integer PCM, not [-1, 1] audio

_INT_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}


# ----------------------------------------------------------------------------- loading


def load_audio(src, sr: int | None = None) -> np.ndarray:
    """Read a file (wav/flac/ogg/mp3 via soundfile) or take an array; return [n] float32 16 kHz mono.

    Arrays may be [n], [n, channels] (soundfile layout) or [channels, n]; channels are averaged.
    int8/int16/int32 are scaled by 1/2^(bits-1), uint8 is 8-bit offset PCM, floats are taken as
    already in [-1, 1]. `sr` is required for arrays; for a file it must be None or the file's rate.
    The output is clipped to [-1, 1] (float sources and the resampler may overshoot slightly).
    """
    if isinstance(src, (str, os.PathLike)):
        name = f"audio '{os.fspath(src)}'"
        mono, file_sr = _read_audio_file(os.fspath(src))  # [n] float64
        if sr is not None and sr != file_sr:
            raise MediaError(f"{name} is sampled at {file_sr} Hz but sr={sr} was given")
        sr = file_sr
    elif isinstance(src, np.ndarray):
        name = "audio array"
        if sr is None:
            raise MediaError("audio array needs its sample rate: pass sr=")
        mono = _to_mono(_array_to_float(src, name), name)  # [n] float64
    else:
        raise MediaError(f"audio source must be a file path or a numpy array, got {type(src).__name__}")

    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise MediaError(f"{name} has an invalid sample rate {sr!r} (need a positive integer in Hz)")
    sr = int(sr)

    if mono.size == 0:
        raise MediaError(f"{name} is empty (0 samples)")
    if not np.isfinite(mono).all():
        raise MediaError(f"{name} contains NaN or infinite samples")
    if sr != SAMPLE_RATE:
        mono = resample(mono, sr, SAMPLE_RATE)
    return np.clip(mono, -1.0, 1.0).astype(np.float32)


def _read_audio_file(path: str) -> tuple[np.ndarray, int]:
    """-> ([n] float64 mono, sample rate). Channels are averaged."""
    import soundfile as sf  # only needed for files

    if not os.path.exists(path):
        raise MediaError(f"audio file '{path}' does not exist")
    if os.path.isdir(path):
        raise MediaError(f"audio path '{path}' is a directory, not a file")
    try:
        # float64 scales integer PCM by 1/2^(bits-1), the same rule as for arrays.
        data, file_sr = sf.read(path, dtype="float64", always_2d=True)  # [n, channels]
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        reason = getattr(e, "error_string", None) or " ".join(str(e).split()) or type(e).__name__
        raise MediaError(f"cannot read audio '{path}': {reason}") from None
    return data.mean(axis=1), int(file_sr)  # [n, channels] -> [n]


def _array_to_float(a: np.ndarray, name: str) -> np.ndarray:
    """Integer PCM or float samples -> float64 in nominal [-1, 1], any shape."""
    if a.dtype in _INT_SCALE:
        return a.astype(np.float64) / _INT_SCALE[a.dtype]
    if a.dtype == np.uint8:
        return (a.astype(np.float64) - 128.0) / 128.0
    if a.dtype.kind == "f":
        out = a.astype(np.float64)
        finite = out[np.isfinite(out)]
        if finite.size and np.abs(finite).max() > FLOAT_PEAK_LIMIT:
            raise MediaError(
                f"{name} is float with peak {np.abs(finite).max():.4g}, but float audio must be in [-1, 1] "
                "(pass integer PCM with its integer dtype)"
            )
        return out
    raise MediaError(f"{name} has unsupported sample type {a.dtype} (use int8/16/32, uint8 or float)")


def _to_mono(a: np.ndarray, name: str) -> np.ndarray:
    """[n], [n, c] or [c, n] -> [n] float64, channels averaged. The shorter axis is the channel axis."""
    if a.ndim == 1:
        return a
    if a.ndim != 2:
        raise MediaError(f"{name} must be 1-D or 2-D (samples x channels), got shape {a.shape}")
    n0, n1 = a.shape
    if n0 == 0 or n1 == 0:
        return np.zeros(0)
    if n1 <= MAX_CHANNELS and n0 > n1:
        return a.mean(axis=1)  # [n, c] -> [n]
    if n0 <= MAX_CHANNELS and n1 > n0:
        return a.mean(axis=0)  # [c, n] -> [n]
    raise MediaError(
        f"{name} has ambiguous shape {a.shape}: expected [samples, channels] or [channels, samples] "
        f"with at most {MAX_CHANNELS} channels"
    )


# ----------------------------------------------------------------------------- resampling


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited polyphase resampling of a 1-D signal by the rational factor sr_out / sr_in.

    Output sample n sits at input time t = n * down / up (up/down = sr_out/sr_in in lowest
    terms) and is sum_k x[k] h(t - k), with h a Kaiser-windowed sinc low-pass whose cutoff is
    RESAMPLE_ROLLOFF times the lower of the two Nyquist rates. t - floor(t) takes only `up`
    values, so outputs are grouped by phase and each group is a strided matvec with one exact
    filter. The signal is zero outside its ends. Output length is ceil(n * up / down).
    """
    x = np.asarray(x, dtype=np.float64)
    assert x.ndim == 1, "resample expects a 1-D signal"
    if sr_in == sr_out:
        return x.copy()
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    n_in = x.shape[0]
    n_out = -(-n_in * up // down)

    cutoff = RESAMPLE_ROLLOFF * min(1.0, up / down)  # fraction of the input Nyquist rate
    half_width = RESAMPLE_ZERO_CROSSINGS / cutoff  # filter half-length in input samples
    k = int(math.ceil(half_width))
    taps = 2 * k + 2  # input offsets j = -k .. k+1 around floor(t) cover |t - (floor(t) + j)| <= half_width
    x_pad = np.zeros(n_in + taps)
    x_pad[k : k + n_in] = x  # x_pad[i + k] = x[i]
    windows = np.lib.stride_tricks.sliding_window_view(x_pad, taps)  # [n_in + 1, taps], a view
    offsets = np.arange(taps) - k  # j

    y = np.empty(n_out)
    n_phases = min(up, n_out)  # output n0 + m * up has the same phase as n0
    for first in range(0, n_phases, RESAMPLE_PHASE_BLOCK):
        n0s = np.arange(first, min(first + RESAMPLE_PHASE_BLOCK, n_phases))  # [P]
        tau = ((n0s * down) % up / up)[:, None] - offsets[None, :]  # [P, taps], t - (floor(t) + j)
        filters = _kaiser_sinc(tau, cutoff, half_width)  # [P, taps]
        for n0, h in zip(n0s.tolist(), filters):
            # outputs n0, n0 + up, ... read input windows starting at floor(t) - k = base0, base0 + down, ...
            base0 = (n0 * down) // up
            rows = windows[base0::down][: len(range(n0, n_out, up))]  # [M, taps], a view
            out = y[n0::up]  # [M], a view
            for r in range(0, rows.shape[0], RESAMPLE_BLOCK_ROWS):
                out[r : r + RESAMPLE_BLOCK_ROWS] = rows[r : r + RESAMPLE_BLOCK_ROWS] @ h
    return y


class StreamResampler:
    """`resample` for a signal that arrives in pieces (a microphone): feed chunks, get the output
    samples whose filter window is complete. The concatenated output equals `resample` of the
    whole signal sample for sample, except the last ~half_width / down outputs, which wait for
    input that has not arrived yet."""

    def __init__(self, sr_in: int, sr_out: int):
        g = math.gcd(sr_in, sr_out)
        self.up, self.down = sr_out // g, sr_in // g
        cutoff = RESAMPLE_ROLLOFF * min(1.0, self.up / self.down)
        half_width = RESAMPLE_ZERO_CROSSINGS / cutoff
        self.k = int(math.ceil(half_width))
        taps = 2 * self.k + 2
        tau = (np.arange(self.up) / self.up)[:, None] - (np.arange(taps) - self.k)[None, :]
        self.filters = _kaiser_sinc(tau, cutoff, half_width)  # [up, taps]: one filter per phase
        self.buf = np.zeros(self.k)  # input samples from absolute index buf0 on (zeros before the start)
        self.buf0 = -self.k
        self.n = 0  # next output sample

    def push(self, x: np.ndarray) -> np.ndarray:
        if self.up == self.down:
            return np.asarray(x, dtype=np.float64).copy()
        self.buf = np.concatenate([self.buf, np.asarray(x, dtype=np.float64).ravel()])
        end = self.buf0 + len(self.buf)  # absolute index one past the last input
        taps = self.filters.shape[1]
        # output n needs inputs floor(n*down/up) - k .. floor(n*down/up) + k + 1 < end
        n_end = max(self.n, ((end - self.k - 1) * self.up + self.up - 1) // self.down)
        n = np.arange(self.n, n_end)
        while len(n) and (n[-1] * self.down) // self.up + self.k + 1 >= end:  # integer-exact guard
            n = n[:-1]
        if not len(n):
            return np.zeros(0)
        base = (n * self.down) // self.up - self.k - self.buf0
        windows = np.lib.stride_tricks.sliding_window_view(self.buf, taps)
        y = np.einsum("mt,mt->m", windows[base], self.filters[(n * self.down) % self.up])
        self.n = int(n[-1]) + 1
        drop = (self.n * self.down) // self.up - self.k - self.buf0  # inputs no output needs any more
        if drop > 0:
            self.buf, self.buf0 = self.buf[drop:], self.buf0 + drop
        return y


def _kaiser_sinc(tau: np.ndarray, cutoff: float, half_width: float) -> np.ndarray:
    """Low-pass taps at offsets tau (input samples): cutoff * sinc(cutoff * tau) * Kaiser(tau / half_width).

    `cutoff` is a fraction of the input Nyquist rate, so the taps of one phase sum to ~1 (unit DC gain).
    """
    ramp = np.sqrt(np.clip(1.0 - (tau / half_width) ** 2, 0.0, None))
    window = np.i0(RESAMPLE_KAISER_BETA * ramp) / np.i0(RESAMPLE_KAISER_BETA)
    return np.where(np.abs(tau) <= half_width, cutoff * np.sinc(cutoff * tau) * window, 0.0)


# ----------------------------------------------------------------------------- log-mel


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mel / 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    log_step = 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * log_step, 3.0 * f / 200.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(log_step * (m - 15.0)), 200.0 * m / 3.0)


def mel_filter_bank(
    n_freqs: int = N_FFT // 2 + 1, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE, fmax: float = MEL_FMAX
) -> np.ndarray:
    """[n_freqs, n_mels] float64 Slaney-scale, Slaney-normalised (area) triangular filters from 0 Hz to fmax.

    Same construction as librosa / transformers `mel_filter_bank(..., norm="slaney", mel_scale="slaney")`.
    """
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)  # [n_mels + 2] filter edges and centres
    fft_freqs = np.linspace(0, sample_rate // 2, n_freqs)  # [n_freqs]
    widths = np.diff(hz_points)  # [n_mels + 1]
    slopes = hz_points[None, :] - fft_freqs[:, None]  # [n_freqs, n_mels + 2]
    rising = -slopes[:, :-2] / widths[:-1]  # [n_freqs, n_mels]
    falling = slopes[:, 2:] / widths[1:]  # [n_freqs, n_mels]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= 2.0 / (hz_points[2:] - hz_points[:-2])  # area normalisation: ~constant energy per band
    return filters


_MEL_FILTERS = mel_filter_bank()  # [201, 128]
_HANN = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann, [400]


def _check_audio16k(audio16k) -> np.ndarray:
    a = np.asarray(audio16k)
    if a.ndim != 1:
        raise MediaError(f"16 kHz audio must be a 1-D array of samples, got shape {a.shape}")
    if a.size == 0:
        raise MediaError("audio is empty (0 samples)")
    if a.dtype.kind != "f":
        raise MediaError(f"16 kHz audio must be float samples in [-1, 1], got {a.dtype} (use load_audio)")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise MediaError("audio contains NaN or infinite samples")
    return a


def pad_to_token(audio: np.ndarray) -> np.ndarray:
    """Zero-pad a 1-D signal at the end to a multiple of SAMPLES_PER_TOKEN (80 ms)."""
    pad = -audio.shape[0] % SAMPLES_PER_TOKEN
    return np.pad(audio, (0, pad)) if pad else audio


def _log_mel_chunk(chunk: np.ndarray) -> np.ndarray:
    """One <= 30 s chunk (length a multiple of HOP) -> [len / HOP, 128] float64, with its own max."""
    padded = np.pad(chunk, N_FFT // 2, mode="reflect")  # center=True, torch/Whisper reflect padding
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]  # [len / HOP + 1, 400]
    spectrum = np.fft.rfft(frames * _HANN, axis=-1)  # [F, 201] complex
    power = spectrum.real**2 + spectrum.imag**2  # [F, 201]
    mel = power[:-1] @ _MEL_FILTERS  # [F - 1, 128]; Whisper drops the last STFT frame
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)  # 80 dB dynamic range below this chunk's max
    return (log_spec + 4.0) / 4.0


def log_mel(audio16k: np.ndarray) -> np.ndarray:
    """Whisper 128-bin log-mel of 16 kHz mono audio -> [T, 128] float32, T = padded length / 160.

    The audio is zero-padded to a multiple of 1280 samples, then cut into 30 s chunks; each
    chunk is featurised on its own (own reflect padding, own max) and the results concatenated.
    """
    audio = pad_to_token(_check_audio16k(audio16k))  # [n], n % 1280 == 0
    chunks = [_log_mel_chunk(audio[s : s + CHUNK_SAMPLES]) for s in range(0, audio.shape[0], CHUNK_SAMPLES)]
    return np.concatenate(chunks, axis=0).astype(np.float32)  # [n / 160, 128]


def audio_tokens(audio16k: np.ndarray) -> np.ndarray:
    """16 kHz mono audio -> [N, 1024] float32, N = ceil(n / 1280): 8 log-mel frames per row, frame-major.

    Row i is concat(frame 8i, 8i+1, ..., 8i+7), each frame 128 mels, i.e. mel.reshape(N, 8 * 128).
    """
    audio = pad_to_token(_check_audio16k(audio16k))
    n_tokens = audio.shape[0] // SAMPLES_PER_TOKEN
    mel = log_mel(audio)  # [T, 128]
    assert mel.shape == (FRAMES_PER_TOKEN * n_tokens, N_MELS), f"log-mel has {mel.shape[0]} frames, want {8 * n_tokens}"
    return mel.reshape(n_tokens, FRAMES_PER_TOKEN * N_MELS)  # [N, 1024]
