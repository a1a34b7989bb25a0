"""The live loop: microphone turns (VAD-endpointed or push-to-talk), the camera's freshest frame,
typed lines, barge-in. Sources and the chat session meet here; the engine never learns where
audio or pictures came from, and the UI (the CLI's rich view, or your own) only receives events.

    chat = LiveChat(engine.chat(), mic=Microphone(), camera=Camera(0), on_event=print)
    chat.run()      # until chat.stop() or /quit

Events passed to `on_event(kind, data)`: "state" (listening | hearing | thinking | answering),
"level" (dBFS), "turn" (Turn), "token" (GenerationChunk), "done" (last GenerationChunk or None),
"interrupted", "notice" (a sentence: a source stopped, a feature is off).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from m3edge.capture.camera import Camera, Frame
from m3edge.capture.mic import RATE, Microphone
from m3edge.capture.vad import Endpointer, Utterance
from m3edge.errors import CaptureError, M3Error


@dataclass
class Turn:
    text: str | None = None
    speech: Utterance | None = None
    frames: list[Frame] = field(default_factory=list)
    t_end: float = 0.0  # time.monotonic() when the turn ended (endpoint found, Enter pressed)

    def content(self) -> str | list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"type": "image", "image": f.rgb} for f in self.frames]
        if self.speech is not None:
            parts.append({"type": "audio", "audio": self.speech.audio, "sampling_rate": RATE})
        if not parts:
            return self.text or ""
        return parts + ([{"type": "text", "text": self.text}] if self.text else [])


class LiveChat:
    def __init__(self, session, params=None, mic: Microphone | None = None, camera: Camera | None = None,
                 endpointer: Endpointer | None = None, push_to_talk: bool = False,
                 on_event: Callable[[str, Any], None] = lambda kind, data: None):
        self.session, self.params, self.on = session, params, on_event
        self.mic, self.camera, self.ptt = mic, camera, push_to_talk
        self.endpointer = endpointer
        self.q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._talking = threading.Event()  # push-to-talk: held (toggled by Enter)
        self.snaps: list[Frame] = []
        cfg = session.engine.cfg
        if self.mic is not None and cfg.audio_config is None:
            self.notice("this model has no audio input, so the microphone is off; type your messages")
            self.mic = None
        if self.camera is not None and cfg.vision_config is None:
            self.notice("this model has no vision input, so the camera is off")
            self.camera = None

    def notice(self, msg: str) -> None:
        self.on("notice", msg)

    # ---------------------------------------------------------------- sources (own threads)
    def submit(self, line: str) -> None:
        """A typed line: a message, or /snap, /reset, /quit; an empty line toggles push-to-talk."""
        self.q.put(("line", line))

    def stop(self) -> None:
        self._stop.set()
        self.q.put(("quit", None))

    def _listen(self) -> None:
        try:
            if not self.ptt and self.endpointer is None:
                self.endpointer = Endpointer()
            held: list[np.ndarray] = []
            t_audio = 0
            while not self._stop.is_set():
                chunk = self.mic.read(timeout=0.25)
                if chunk is None:
                    continue
                self.q.put(("level", self.mic.level_db))
                t_audio += len(chunk)
                if self.ptt:
                    if self._talking.is_set():
                        held.append(chunk)
                    elif held:
                        audio = np.concatenate(held)
                        held = []
                        self.q.put(("speech", Utterance(audio, (t_audio - len(audio)) / RATE, t_audio / RATE)))
                    continue
                for ev in self.endpointer.push(chunk):
                    if isinstance(ev, Utterance):
                        self.q.put(("speech", ev))
                    elif ev[0] == "start":
                        self.q.put(("start", ev[1]))
        except CaptureError as e:
            self.q.put(("mic_lost", str(e)))
        except M3Error as e:  # the VAD model could not load
            self.q.put(("mic_lost", str(e)))

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        if self.mic is not None:
            threading.Thread(target=self._listen, name="m3edge-mic", daemon=True).start()
        self.on("state", "listening" if self.mic else "waiting")
        while not self._stop.is_set():
            try:
                kind, data = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            turn = self._handle(kind, data)
            if turn is not None:
                self._answer(turn)

    def _handle(self, kind: str, data) -> Turn | None:
        if kind == "level":
            self.on("level", data)
        elif kind == "start":
            self.on("state", "hearing")
        elif kind == "speech":
            return self._turn(speech=data)
        elif kind == "mic_lost":
            self.mic = None
            self.notice(f"{data}; the chat goes on, type your messages")
            self.on("state", "waiting")
        elif kind == "quit":
            self._stop.set()
        elif kind == "line":
            line = data.strip()
            if not line:
                if self.ptt and self.mic is not None:
                    (self._talking.clear if self._talking.is_set() else self._talking.set)()
                    self.on("state", "hearing" if self._talking.is_set() else "listening")
            elif line in ("/quit", "/exit"):
                self._stop.set()
            elif line == "/reset":
                self.session.reset()
                self.notice("conversation cleared")
            elif line == "/snap":
                f = self._frame()
                if f is not None:
                    self.snaps.append(f)
                    self.on("notice", f"snapped camera frame {f.index}; it goes with your next turn")
            else:
                return self._turn(text=line)
        return None

    def _frame(self) -> Frame | None:
        if self.camera is None:
            return None
        try:
            return self.camera.latest()
        except CaptureError as e:
            self.camera = None
            self.notice(f"{e}; the chat goes on without the camera")
            return None

    def _turn(self, text: str | None = None, speech: Utterance | None = None) -> Turn:
        t_end = time.monotonic()
        f = self._frame()  # the freshest frame at the moment the turn ended
        frames, self.snaps = self.snaps + ([f] if f is not None else []), []
        turn = Turn(text, speech, frames, t_end)
        self.on("turn", turn)
        return turn

    def _answer(self, turn: Turn) -> None:
        self.on("state", "thinking")
        gen = self.session.send(turn.content(), self.params)
        last, deferred = None, []
        try:
            for chunk in gen:
                if last is None:
                    self.on("state", "answering")
                last = chunk
                self.on("token", chunk)
                if self._barge_in(deferred):
                    gen.close()
                    self.on("interrupted", last)
                    self.on("state", "hearing")
                    break
            else:
                self.on("done", last)
                self.on("state", "listening" if self.mic else "waiting")
        except M3Error as e:
            self.notice(str(e))
            self.on("state", "listening" if self.mic else "waiting")
        for ev in deferred:
            self.q.put(ev)

    def _barge_in(self, deferred: list) -> bool:
        """Between tokens: speech starting (or push-to-talk pressed, or /quit) stops the answer."""
        while True:
            try:
                ev = self.q.get_nowait()
            except queue.Empty:
                return False
            if ev[0] == "level":
                self.on("level", ev[1])
                continue
            deferred.append(ev)
            kind, line = ev[0], ev[1].strip() if ev[0] == "line" else None
            if kind in ("start", "quit") or line in ("/quit", "/exit") or (self.ptt and line == ""):
                return True
