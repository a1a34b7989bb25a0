"""Capture with the real libraries: PortAudio through sounddevice on an ALSA `file` device, Silero VAD
through ONNX Runtime, OpenCV on a video file; the live chat loop on the tiny M3-Lite."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from capture_fixtures import (DEVICE_RATE, FifoMic, alsa_home, read_stamp, speech, stamped_video, to_raw,
                              true_segments)

CHILD = r"""
import json, sys, time
import numpy as np
from m3edge.capture import Endpointer, Microphone, Utterance
mic = Microphone().open()
ep = Endpointer()
need = int(sys.argv[1])
found = []
while mic.samples_in < need + 2 * mic.rate:  # the file, then silence (the plugin pads with zeros)
    chunk = mic.read(timeout=2)
    for ev in ep.push(chunk):
        if isinstance(ev, Utterance):
            found.append([ev.start_s, ev.end_s, len(ev.audio) / 16000])
mic.close()
print(json.dumps({"rate": mic.rate, "name": mic.name, "found": found}))
"""


@pytest.fixture(scope="module")
def fifo_mic(tmp_path_factory):
    """One FIFO-fed ALSA default device for this process: PortAudio reads ALSA's configuration once
    per process, so the in-process tests share it (the first test runs in a child of its own)."""
    tmp = tmp_path_factory.mktemp("mic")
    fifo = FifoMic(tmp / "mic.fifo")
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(alsa_home(tmp, fifo.path))
    yield fifo
    fifo.close()
    if old is not None:
        os.environ["HOME"] = old


def _in_alsa_home(tmp_path: Path, infile: Path, code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(alsa_home(tmp_path, infile))}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_vad_finds_utterances_through_real_portaudio(tmp_path):
    """espeak-ng speech with silences, read by PortAudio from an ALSA capture device: each utterance's
    start and end within 100 ms of where the signal really is."""
    import json

    sil = lambda s: np.zeros(int(s * DEVICE_RATE))  # noqa: E731
    x = np.concatenate([sil(0.8), speech("Hello there.", tmp_path), sil(1.2),
                        speech("What can you see on the table?", tmp_path), sil(1.0),
                        speech("Thanks.", tmp_path), sil(0.8)])
    raw = tmp_path / "talk.raw"
    raw.write_bytes(to_raw(x))
    r = _in_alsa_home(tmp_path, raw, CHILD, len(x))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["rate"] == DEVICE_RATE  # captured at the device's rate, resampled to 16 kHz by us
    truth = true_segments(x, DEVICE_RATE)
    assert len(truth) == 3
    assert len(got["found"]) == 3, got
    for (s, e), (gs, ge, dur) in zip(truth, got["found"]):
        assert abs(gs - s) <= 0.1 and abs(ge - e) <= 0.1, (truth, got["found"])
        assert dur >= ge - gs  # the utterance's audio covers the speech (plus padding)


def test_stream_resampler_equals_offline_resample():
    from m3edge.frontends.audio import StreamResampler, resample

    rng = np.random.default_rng(0)
    for a, b in [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 16000)]:
        x = rng.normal(size=20000)
        s, out, i = StreamResampler(a, b), [], 0
        while i < len(x):
            n = int(rng.integers(1, 2500))
            out.append(s.push(x[i : i + n]))
            i += n
        y = np.concatenate(out)
        ref = resample(x, a, b)
        assert len(ref) - 200 < len(y) <= len(ref)
        np.testing.assert_allclose(y, ref[: len(y)], atol=1e-12)


def test_camera_attaches_the_frame_current_at_the_turns_end(tiny_dir, tmp_path):
    """A video file as the camera (real OpenCV): typed turns at arbitrary moments each carry the frame
    the file shows at that moment; the frame's own pixels say which one it is."""
    from m3edge.capture import Camera, LiveChat
    from m3edge.runtime.engine import Engine
    from m3edge.runtime.sampling import SamplingParams

    clip = stamped_video(tmp_path / "clip.avi", n=250, fps=10)
    engine = Engine.load(tiny_dir)
    turns, done = [], threading.Semaphore(0)

    def on(kind, data):
        if kind == "turn":
            turns.append(data)
        elif kind in ("done", "interrupted"):
            done.release()

    with Camera(clip) as cam:
        chat = LiveChat(engine.chat(), SamplingParams(max_tokens=3), camera=cam, on_event=on)
        t = threading.Thread(target=chat.run)
        t.start()
        for delay in (0.35, 1.1, 0.6):
            time.sleep(delay)
            chat.submit("what is this?")
            assert done.acquire(timeout=30)
        chat.submit("/snap")
        chat.submit("and now?")
        assert done.acquire(timeout=30)
        chat.stop()
        t.join(10)
        t0, fps = cam.t0, cam.fps
    assert len(turns) == 4 and len(turns[3].frames) == 2  # the /snap frame + the one at the turn's end
    for turn in turns:
        f = turn.frames[-1]
        expected = int((turn.t_end - t0) * fps)
        assert f.index in (expected - 1, expected), (f.index, expected)  # current, give or take the clock tick
        assert read_stamp(f.rgb) == f.index
    assert turns[0].frames[0].index < turns[1].frames[0].index < turns[2].frames[0].index


def test_live_chat_turns_speech_into_audio_turns(tiny_dir, tmp_path, fifo_mic):
    """The real mic path into the chat loop: two spoken utterances become two audio turns with answers."""
    from m3edge.capture import LiveChat, Microphone
    from m3edge.runtime.engine import Engine
    from m3edge.runtime.sampling import SamplingParams

    fifo = fifo_mic
    events, answers = [], threading.Semaphore(0)

    def on(kind, data):
        events.append((kind, data))
        if kind == "done":
            answers.release()

    engine = Engine.load(tiny_dir)
    mic = Microphone().open()
    try:
        chat = LiveChat(engine.chat(), SamplingParams(max_tokens=4), mic=mic, on_event=on)
        t = threading.Thread(target=chat.run)
        t.start()
        for text in ("Good morning.", "Please describe the room."):
            fifo.say(speech(text, tmp_path))
            assert answers.acquire(timeout=60), events[-5:]
        chat.stop()
        t.join(10)
    finally:
        mic.close()
    turns = [d for k, d in events if k == "turn"]
    assert len(turns) == 2 and all(t.speech is not None and t.text is None for t in turns)
    assert all(0.5 < t.speech.end_s - t.speech.start_s < 3.0 for t in turns)
    states = [d for k, d in events if k == "state"]
    assert "hearing" in states and "answering" in states


def test_mic_that_stops_delivering_is_reported_once_and_chat_goes_on(tiny_dir, fifo_mic):
    """The device hangs mid-stream (real PortAudio, the FIFO goes quiet): one sentence, then typed
    turns still get answers."""
    from m3edge.capture import LiveChat, Microphone
    from m3edge.runtime.engine import Engine
    from m3edge.runtime.sampling import SamplingParams

    fifo = fifo_mic
    events, done = [], threading.Semaphore(0)
    engine = Engine.load(tiny_dir)
    mic = Microphone(stall_s=1.0).open()
    try:
        chat = LiveChat(engine.chat(), SamplingParams(max_tokens=3), mic=mic,
                        on_event=lambda k, d: (events.append((k, d)), k == "done" and done.release()))
        t = threading.Thread(target=chat.run)
        t.start()
        time.sleep(0.5)
        fifo.hang()
        deadline = time.time() + 20
        while not any(k == "notice" for k, _ in events) and time.time() < deadline:
            time.sleep(0.1)
        chat.submit("still there?")
        assert done.acquire(timeout=30)
        chat.stop()
        t.join(10)
    finally:
        fifo.resume()
        mic.close()
    notices = [d for k, d in events if k == "notice"]
    assert len(notices) == 1 and "delivered no audio" in notices[0] and "type your messages" in notices[0]
    assert chat.mic is None


def test_stream_that_finishes_by_itself_is_reported(monkeypatch):
    """PortAudio ending the stream on its own (a USB mic unplugged): mocked here, since no driver can be
    unplugged in CI; the real-library path of a device going silent is the test above."""
    from m3edge.capture.mic import Microphone
    from m3edge.errors import CaptureError

    mic = Microphone()
    mic.name, mic.stream = "usb mic", type("S", (), {"active": False})()
    import queue

    mic._q, mic._finished, mic._last = queue.Queue(), True, time.monotonic()
    with pytest.raises(CaptureError, match="stopped"):
        mic.read(timeout=0.01)


def test_no_microphone_and_no_camera_are_one_sentence(tmp_path):
    from m3edge.capture import Camera, Microphone
    from m3edge.errors import CaptureError

    with pytest.raises(CaptureError, match="no microphone 'nosuchmic'.*m3edge devices"):
        Microphone("nosuchmic").open()
    with pytest.raises(CaptureError, match="cannot open camera 7"):
        Camera(7).open()
    with pytest.raises(CaptureError, match="no such video"):
        Camera(tmp_path / "missing.mp4").open()
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video")
    with pytest.raises(CaptureError):
        Camera(bad).open()


def test_model_without_vision_or_audio_turns_that_source_off(novision_dir, smol_dir, tmp_path):
    from m3edge.capture import Camera, LiveChat
    from m3edge.runtime.engine import Engine

    notes = []
    with Camera(stamped_video(tmp_path / "c.avi", n=20)) as cam:
        chat = LiveChat(Engine.load(novision_dir).chat(), camera=cam, on_event=lambda k, d: notes.append(d))
    assert chat.camera is None and notes == ["this model has no vision input, so the camera is off"]
    notes.clear()
    chat = LiveChat(Engine.load(smol_dir).chat(), mic=object(), on_event=lambda k, d: notes.append(d))
    assert chat.mic is None and "no audio input" in notes[0]


def _spawn_chat(args, home: Path):
    import pexpect

    env = {**os.environ, "HOME": str(home), "COLUMNS": "120"}
    exe = str(Path(sys.executable).parent / "m3edge")
    child = pexpect.spawn(exe, ["chat", *map(str, args)], env=env, encoding="utf-8", timeout=90,
                          dimensions=(40, 120))
    child.logfile_read = open(home / "pty.log", "w")
    return child


def test_chat_mic_camera_in_a_pty(tiny_dir, tmp_path):
    """`m3edge chat --mic --camera VIDEO` as a user runs it: two spoken turns, each answered, each
    carrying the camera's frame; /quit leaves cleanly."""
    import pexpect

    fifo = FifoMic(tmp_path / "mic.fifo")
    home = alsa_home(tmp_path, fifo.path)
    clip = stamped_video(tmp_path / "clip.avi", n=300, fps=10)
    child = _spawn_chat([tiny_dir, "--mic", "--camera", clip, "--max-tokens", "6"], home)
    try:
        child.expect("mic: default at 44100 Hz")
        child.expect(r"camera: .*clip\.avi \(10 fps\)")
        for text in ("Hello there.", "What do you see?"):
            fifo.say(speech(text, tmp_path))
            child.expect(r"you> \[speech \d\.\d s\] \[camera frame \d+\]")
            child.expect(r"m3> ")
            child.expect(r"\[\d+ tokens, [\d.]+ tok/s, first token \d+ ms\]")
            assert "(interrupted)" not in child.before
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
        fifo.close()
    assert child.exitstatus == 0


def test_chat_without_mic_or_camera_says_so_and_goes_on(tiny_dir, tmp_path):
    """No such microphone, no camera 7: one sentence each, then a typed message is answered."""
    import pexpect

    fifo = FifoMic(tmp_path / "mic.fifo")
    home = alsa_home(tmp_path, fifo.path)
    child = _spawn_chat([tiny_dir, "--mic", "--mic-device", "nosuchmic", "--camera", "7", "--max-tokens", "4"],
                        home)
    try:
        child.expect(r"note:.*no microphone 'nosuchmic'.*the chat goes on without the microphone")
        child.expect(r"note:.*cannot open camera 7.*the chat goes on without the camera")
        child.sendline("hello")
        child.expect("you> hello")
        child.expect(r"\[\d+ tokens")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
        fifo.close()
    assert "Traceback" not in (home / "pty.log").read_text()


def test_speaking_during_an_answer_stops_it(tiny_dir, tmp_path, fifo_mic):
    """Barge-in, real mic path: a second utterance starting while the model answers interrupts the
    answer; the partial answer stays in the history and the new utterance becomes the next turn."""
    from m3edge.capture import LiveChat, Microphone
    from m3edge.runtime.engine import Engine
    from m3edge.runtime.sampling import SamplingParams

    events, answering, finished = [], threading.Event(), threading.Semaphore(0)

    def on(kind, data):
        events.append((kind, data))
        if kind == "state" and data == "answering":
            answering.set()
        if kind in ("done", "interrupted"):
            finished.release()

    engine = Engine.load(tiny_dir)
    mic = Microphone().open()
    try:
        chat = LiveChat(engine.chat(), SamplingParams(max_tokens=3000, temperature=1.0, seed=0), mic=mic, on_event=on)
        t = threading.Thread(target=chat.run)
        t.start()
        fifo_mic.say(speech("Tell me a long story.", tmp_path))
        assert answering.wait(60)
        fifo_mic.say(speech("Stop, please.", tmp_path))
        assert finished.acquire(timeout=60)
        chat.params = SamplingParams(max_tokens=3)
        assert finished.acquire(timeout=60)
        chat.stop()
        t.join(10)
    finally:
        mic.close()
    kinds = [k for k, _ in events if k in ("turn", "interrupted", "done")]
    assert kinds == ["turn", "interrupted", "turn", "done"], kinds
    assert chat.session.messages[1]["role"] == "assistant"  # the partial reply was kept


def test_devices_lists_the_alsa_input(tmp_path):
    fifo = FifoMic(tmp_path / "mic.fifo")
    try:
        env = {**os.environ, "HOME": str(alsa_home(tmp_path, fifo.path)), "COLUMNS": "120"}
        r = subprocess.run([str(Path(sys.executable).parent / "m3edge"), "devices"], env=env, capture_output=True,
                           text=True, timeout=60)
    finally:
        fifo.close()
    assert r.returncode == 0, r.stderr
    assert "default" in r.stdout and "44100 Hz" in r.stdout and "ALSA" in r.stdout
    assert "ONNX Runtime:" in r.stdout and "CUDA kernels:" in r.stdout
