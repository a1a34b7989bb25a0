"""Microphone capture through PortAudio (`sounddevice`): the device's own rate in, 16 kHz out.

    mic = Microphone(device=None)          # None: the system's default input
    mic.open()
    while True:
        chunk = mic.read()                 # float32 mono at 16 kHz, ~32 ms; raises CaptureError when lost

The PortAudio callback only copies the block into a queue; resampling and everything else run on
the reader's thread. A device that disappears shows up as the stream finishing on its own, or as
no audio for `stall_s` seconds (a blocked driver); either raises CaptureError once.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from m3edge.errors import CaptureError
from m3edge.frontends.audio import StreamResampler

RATE = 16000


def _sd():
    try:
        import sounddevice as sd
    except OSError as e:  # the Python package is there, the PortAudio library is not
        raise CaptureError(f"PortAudio is not installed ({e}); on Debian/Ubuntu: apt-get install libportaudio2") from None
    except ImportError:
        raise CaptureError("microphone capture needs the sounddevice package: pip install sounddevice") from None
    return sd


def list_inputs() -> list[dict]:
    """Audio inputs PortAudio sees: index, name, channels, default sample rate, host API."""
    sd = _sd()
    apis = sd.query_hostapis()
    return [{"index": d["index"], "name": d["name"], "channels": d["max_input_channels"],
             "rate": int(d["default_samplerate"]), "api": apis[d["hostapi"]]["name"]}
            for d in sd.query_devices() if d["max_input_channels"] > 0]


def _device_index(sd, device: int | str | None) -> dict:
    try:
        info = sd.query_devices(device, "input")
    except (ValueError, sd.PortAudioError) as e:
        what = "no default microphone" if device is None else f"no microphone '{device}'"
        raise CaptureError(f"{what} ({e}); `m3edge devices` lists the inputs") from None
    if info["max_input_channels"] < 1:
        raise CaptureError(f"device '{info['name']}' has no input channels; `m3edge devices` lists the inputs")
    return info


class Microphone:
    def __init__(self, device: int | str | None = None, block_s: float = 0.032, stall_s: float = 2.0):
        self.device, self.block_s, self.stall_s = device, block_s, stall_s
        self.stream = None
        self.name, self.rate = "", 0
        self.level_db = -120.0  # RMS of the latest chunk, dBFS
        self.samples_in = 0  # device-rate samples received so far

    def open(self) -> "Microphone":
        sd = _sd()
        info = _device_index(sd, self.device)
        self.name, self.rate = info["name"], int(info["default_samplerate"])
        self._q: queue.Queue = queue.Queue()
        self._finished = False
        self._resampler = StreamResampler(self.rate, RATE)
        try:
            self.stream = sd.InputStream(device=info["index"], samplerate=self.rate, channels=1, dtype="int16",
                                         blocksize=max(1, int(self.rate * self.block_s)), callback=self._callback,
                                         finished_callback=self._on_finished)
            self.stream.start()
        except sd.PortAudioError as e:
            raise CaptureError(f"cannot open microphone '{self.name}' at {self.rate} Hz ({e})") from None
        self._last = time.monotonic()
        return self

    def _callback(self, indata, frames, t, status) -> None:  # PortAudio's thread: copy and return
        self._q.put(indata[:, 0].copy())

    def _on_finished(self) -> None:
        self._finished = True

    def read(self, timeout: float = 0.5) -> np.ndarray | None:
        """The next chunk at 16 kHz (float32), or None if none came within `timeout`."""
        try:
            raw = self._q.get(timeout=timeout)
        except queue.Empty:
            if self.stream is None:
                raise CaptureError("the microphone is closed") from None
            if self._finished or not self.stream.active:
                raise CaptureError(f"microphone '{self.name}' stopped (disconnected?)") from None
            if time.monotonic() - self._last > self.stall_s:
                raise CaptureError(f"microphone '{self.name}' delivered no audio for {self.stall_s:.0f} s "
                                   "(disconnected?)") from None
            return None
        self._last = time.monotonic()
        self.samples_in += len(raw)
        x = raw.astype(np.float32) / 32768.0
        self.level_db = float(20 * np.log10(np.sqrt(np.mean(x * x)) + 1e-6))
        return self._resampler.push(x).astype(np.float32)

    def close(self, timeout: float = 1.0) -> None:
        """Stop capturing. A driver stuck in a read can block PortAudio's close forever, so it runs on
        a daemon thread and is abandoned after `timeout` seconds."""
        stream, self.stream = self.stream, None
        if stream is None:
            return

        def shut():
            try:
                stream.abort()
                stream.close()
            except Exception:  # noqa: BLE001 - closing a device that already vanished
                pass

        t = threading.Thread(target=shut, name="m3edge-mic-close", daemon=True)
        t.start()
        t.join(timeout)

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()
