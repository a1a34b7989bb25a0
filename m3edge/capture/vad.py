"""Voice activity: the Silero VAD model (the ONNX file inside the `silero-vad` package, run with ONNX
Runtime) and an endpointer that turns its per-window speech probabilities into utterances.

Silero takes 512 new samples at 16 kHz (32 ms) plus the previous window's last 64 samples, and
carries a recurrent state. The endpointer follows the package's own `get_speech_timestamps`
rule: speech starts at the first window with p >= threshold, and ends at the first window with
p < threshold - 0.15 once that quiet lasts `min_silence_s`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np

from m3edge.errors import CaptureError

WINDOW, CONTEXT, RATE = 512, 64, 16000


def _model_path() -> str:
    try:
        p = resources.files("silero_vad").joinpath("data", "silero_vad.onnx")
    except ModuleNotFoundError:
        raise CaptureError("voice activity detection needs the silero-vad package: pip install silero-vad") from None
    if not p.is_file():
        raise CaptureError(f"the silero-vad package has no model file at {p}")
    return str(p)


class SileroVAD:
    def __init__(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CaptureError("voice activity detection needs onnxruntime: pip install onnxruntime") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(_model_path(), opts, providers=["CPUExecutionProvider"])
        self.reset()

    def reset(self) -> None:
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros(CONTEXT, np.float32)

    def __call__(self, window: np.ndarray) -> float:
        """Speech probability of one 512-sample window at 16 kHz."""
        x = np.concatenate([self.context, window.astype(np.float32)])[None]
        p, self.state = self.session.run(None, {"input": x, "state": self.state, "sr": np.array(RATE, np.int64)})
        self.context = x[0, -CONTEXT:]
        return float(p.ravel()[0])


@dataclass
class Utterance:
    audio: np.ndarray  # 16 kHz float32: the speech plus `pad_s` either side
    start_s: float  # stream time (seconds of audio since the endpointer started) of the speech onset
    end_s: float  # ... and of its end


FRAME = 160  # 10 ms


def refine(seg: np.ndarray, start: int, end: int, off: int, reach: float = 0.2) -> tuple[int, int]:
    """Snap the VAD's window-grid boundaries (32 ms steps, and the model's own lag) to the signal:
    the first / last 10 ms frame within `reach` seconds whose level is above both the segment's
    quiet floor + 10 dB and its peak - 40 dB. `seg[off]` is sample `start`; returns (start, end)."""
    n = len(seg) // FRAME
    if n < 3:
        return start, end
    db = 10 * np.log10(np.mean(seg[: n * FRAME].reshape(n, FRAME).astype(np.float64) ** 2, axis=1) + 1e-12)
    thr = max(np.percentile(db, 5) + 10, db.max() - 40)
    loud = np.flatnonzero(db >= thr)
    if not len(loud):
        return start, end
    r = int(reach * RATE)
    lo = [f * FRAME for f in loud if abs(f * FRAME - off) <= r]
    hi = [(f + 1) * FRAME for f in loud if abs((f + 1) * FRAME - (off + end - start)) <= r]
    return (start - off + lo[0] if lo else start), (start - off + hi[-1] if hi else end)


class Endpointer:
    """Feed 16 kHz chunks; `push` returns ("start", t) when speech begins and an Utterance when it ends."""

    def __init__(self, vad: SileroVAD | None = None, threshold: float = 0.5, min_silence_s: float = 0.4,
                 min_speech_s: float = 0.15, pad_s: float = 0.2, max_s: float = 30.0):
        self.vad = vad or SileroVAD()
        self.threshold, self.min_silence_s, self.min_speech_s = threshold, min_silence_s, min_speech_s
        self.pad_s, self.max_s = pad_s, max_s
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self.pending = np.zeros(0, np.float32)  # samples not yet in a full window
        self.n = 0  # samples consumed into windows
        self.audio: list[np.ndarray] = []  # windows since the pre-roll started
        self.audio0 = 0  # sample index of audio[0]
        self.start: int | None = None  # speech onset (sample index)
        self.quiet_from: int | None = None  # first quiet window after speech
        self.speaking = False
        self.prob = 0.0

    def push(self, chunk: np.ndarray) -> list:
        events = []
        self.pending = np.concatenate([self.pending, chunk.astype(np.float32)])
        while len(self.pending) >= WINDOW:
            w, self.pending = self.pending[:WINDOW], self.pending[WINDOW:]
            events += self._window(w)
        return events

    def _window(self, w: np.ndarray) -> list:
        t = self.n
        self.n += WINDOW
        self.prob = p = self.vad(w)
        self.audio.append(w)
        pad = int(self.pad_s * RATE)
        if self.start is None:
            while len(self.audio) > 1 and sum(map(len, self.audio[1:])) >= pad:  # keep only the pre-roll
                self.audio0 += len(self.audio.pop(0))
            if p >= self.threshold:
                self.start, self.quiet_from = t, None
                return [("start", t / RATE)]
            return []
        if p >= self.threshold - 0.15:
            self.quiet_from = None
        elif self.quiet_from is None:
            self.quiet_from = t
        too_long = self.n - self.start >= self.max_s * RATE
        if self.quiet_from is not None and (self.n - self.quiet_from >= self.min_silence_s * RATE) or too_long:
            end = self.n if too_long else self.quiet_from
            start, self.start, self.quiet_from = self.start, None, None
            audio = np.concatenate(self.audio)
            a0 = max(0, start - pad - self.audio0)
            seg = audio[a0 : end + pad - self.audio0]
            off = start - (self.audio0 + a0)  # seg[off] is sample `start`
            keep = audio[-(pad // WINDOW + 1) * WINDOW:]  # the pre-roll of a next utterance
            self.audio, self.audio0 = [keep], self.n - len(keep)
            if end - start < self.min_speech_s * RATE:
                return [("noise", start / RATE)]
            start, end = refine(seg, start, end, off)
            return [Utterance(seg, start / RATE, end / RATE)]
        return []
