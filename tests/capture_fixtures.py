"""Real devices without hardware (shared/REAL_DEVICES_WITHOUT_HARDWARE.md): an ALSA `file` PCM as the
default capture device, so PortAudio (through sounddevice) reads a file or a FIFO like a microphone;
espeak-ng speech; an OpenCV-written video whose frames carry their index as 8 black/white bars."""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

DEVICE_RATE = 44100  # what PortAudio reports for ALSA's default device; the raw file is at this rate


def speech(text: str, tmp: Path) -> np.ndarray:
    """espeak-ng speech as float mono at DEVICE_RATE."""
    from m3edge.frontends.audio import load_audio, resample

    wav = tmp / f"tts_{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True)
    return resample(load_audio(str(wav)), 16000, DEVICE_RATE)


def true_segments(x: np.ndarray, rate: int, gap_s: float = 0.4) -> list[tuple[float, float]]:
    """Where the signal is not silent (|x| > -60 dBFS), merging gaps shorter than gap_s."""
    idx = np.flatnonzero(np.abs(x) > 1e-3)
    cuts = np.flatnonzero(np.diff(idx) > gap_s * rate)
    starts = [idx[0]] + [idx[c + 1] for c in cuts]
    ends = [idx[c] + 1 for c in cuts] + [idx[-1] + 1]
    return [(s / rate, e / rate) for s, e in zip(starts, ends)]


def to_raw(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def alsa_home(tmp: Path, infile: Path) -> Path:
    """A HOME whose .asoundrc makes ALSA's default capture device read `infile` (raw s16le mono)."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    (home / ".asoundrc").write_text(
        'pcm.!default {\n  type file\n  slave.pcm "null"\n  file "/dev/null"\n'
        f'  infile "{infile}"\n  format "raw"\n}}\n')
    return home


class FifoMic:
    """The far end of a FIFO the ALSA device reads: silence every 20 ms (a live, quiet room), and
    `say(samples)` puts speech in as one write. `hang()` stops writing: the device stops delivering.
    (The `file` plugin pads short reads with silence, so only the order of sounds is kept, not time.)"""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # never EOF for the reader, no blocking open
        fcntl.fcntl(self.fd, 1031, 1 << 20)  # F_SETPIPE_SZ: 1 MiB, so an utterance is one write
        self.lock = threading.Lock()
        self.running, self.hung = True, False
        self.thread = threading.Thread(target=self._room, daemon=True)
        self.thread.start()

    def _room(self) -> None:
        quiet = bytes(2 * DEVICE_RATE // 50)
        while self.running:
            if not self.hung:
                with self.lock:
                    try:
                        os.write(self.fd, quiet)
                    except BlockingIOError:  # nobody reads (no stream open): the room stays quiet
                        pass
            time.sleep(0.02)

    def say(self, x: np.ndarray) -> None:
        data, deadline = memoryview(to_raw(x)), time.time() + 30
        with self.lock:
            while data and time.time() < deadline:
                try:
                    data = data[os.write(self.fd, data):]
                except BlockingIOError:
                    time.sleep(0.01)

    def hang(self) -> None:
        self.hung = True

    def resume(self) -> None:
        self.hung = False

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        os.close(self.fd)


def stamped_video(path: Path, n: int = 300, fps: float = 10.0) -> Path:
    """An MJPG .avi whose frame i shows i's 8 bits as white (1) / dark (0) vertical bars."""
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (128, 96))
    for i in range(n):
        img = np.full((96, 128, 3), 30, np.uint8)
        for b in range(8):
            if i >> b & 1:
                img[:, b * 16 : (b + 1) * 16] = 230
        w.write(img)
    w.release()
    return path


def read_stamp(rgb: np.ndarray) -> int:
    bars = rgb[:, :128].reshape(rgb.shape[0], 8, 16, 3)[:, :, 4:12].mean(axis=(0, 2, 3))
    return int(sum(1 << b for b in range(8) if bars[b] > 128))
