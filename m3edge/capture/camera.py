"""Camera capture through OpenCV: a device index, a video file or an image sequence ("f_%03d.png").

A background thread keeps reading so `latest()` is always the freshest frame, as a live camera
needs (OpenCV buffers otherwise hand out stale frames). Files play at their own frame rate in real
time and loop, so a file stands in for a camera: the frame returned is the one current now.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m3edge.errors import CaptureError


def _cv2():
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # one clear sentence from us, not its warnings
    try:
        import cv2
    except ImportError:
        raise CaptureError("camera capture needs OpenCV: pip install opencv-python-headless") from None
    return cv2


@dataclass
class Frame:
    rgb: np.ndarray  # [H, W, 3] uint8
    index: int  # frame number: in the file for files, since opening for cameras
    t: float  # time.monotonic() when it became current


def list_cameras(max_index: int = 8) -> list[dict]:
    """Cameras OpenCV can open: /dev/video* on Linux, else indices 0..max_index-1 probed."""
    cv2 = _cv2()
    if sys.platform.startswith("linux"):
        candidates = sorted(int(p.name[5:]) for p in Path("/dev").glob("video*") if p.name[5:].isdigit())
    else:
        candidates = list(range(max_index))
    out = []
    for i in candidates:
        cap = cv2.VideoCapture(i)
        if cap.isOpened():
            out.append({"index": i, "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                        "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), "fps": cap.get(cv2.CAP_PROP_FPS)})
        cap.release()
    return out


class Camera:
    def __init__(self, source: int | str | Path = 0, stall_s: float = 3.0):
        self.source = int(source) if isinstance(source, str) and source.isdigit() else source
        self.is_file = not isinstance(self.source, int)
        self.stall_s = stall_s
        self.cap = None
        self._frame: Frame | None = None
        self._error: str | None = None
        self._stop = threading.Event()

    def open(self) -> "Camera":
        cv2 = _cv2()
        src = str(self.source) if self.is_file else self.source
        if self.is_file and "%" not in src and not Path(src).exists():
            raise CaptureError(f"no such video or image sequence: {src}")
        self.cap = cv2.VideoCapture(src)
        if not self.cap.isOpened():
            what = f"video '{src}'" if self.is_file else f"camera {src}"
            raise CaptureError(f"cannot open {what}; `m3edge devices` lists the cameras")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and 0 < fps < 1000 else 30.0
        ok, bgr = self.cap.read()
        if not ok:
            self.cap.release()
            raise CaptureError(f"cannot read a frame from {'video ' + repr(src) if self.is_file else f'camera {src}'}")
        self.t0 = time.monotonic()
        self._publish(bgr, 0)
        self._thread = threading.Thread(target=self._run, name="m3edge-camera", daemon=True)
        self._thread.start()
        return self

    def _publish(self, bgr: np.ndarray, index: int) -> None:
        self._frame = Frame(bgr[..., ::-1].copy(), index, time.monotonic())

    def _run(self) -> None:
        cv2 = _cv2()
        i, played = 0, 0  # index in the file; frames played since open (sets the file's clock)
        while not self._stop.is_set():
            ok, bgr = self.cap.read()
            if not ok and self.is_file and i > 0:  # end of the file: loop
                self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, bgr = self.cap.read()
                i = -1
            if not ok:
                self._error = (f"camera {self.source} stopped delivering frames (disconnected?)" if not self.is_file
                               else f"cannot read video '{self.source}' any more")
                return
            i, played = i + 1, played + 1
            if self.is_file:  # real time: frame `played` is current from t0 + played / fps
                delay = self.t0 + played / self.fps - time.monotonic()
                if self._stop.wait(max(0.0, delay)):
                    return
            self._publish(bgr, i)

    def latest(self) -> Frame:
        """The freshest frame; raises CaptureError if the camera stopped."""
        if self.cap is None:
            raise CaptureError("the camera is not open")
        if self._error:
            raise CaptureError(self._error)
        if not self.is_file and time.monotonic() - self._frame.t > self.stall_s:
            raise CaptureError(f"camera {self.source} delivered no frame for {self.stall_s:.0f} s (disconnected?)")
        return self._frame

    def close(self) -> None:
        self._stop.set()
        if self.cap is not None:
            if getattr(self, "_thread", None):
                self._thread.join(timeout=2)
            self.cap.release()
            self.cap = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()
