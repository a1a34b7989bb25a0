"""Live capture: microphone (PortAudio + Silero VAD), camera (OpenCV), and the live chat loop."""

from m3edge.capture.camera import Camera, Frame, list_cameras
from m3edge.capture.live import LiveChat, Turn
from m3edge.capture.mic import Microphone, list_inputs
from m3edge.capture.vad import Endpointer, SileroVAD, Utterance

__all__ = ["Camera", "Endpointer", "Frame", "LiveChat", "Microphone", "SileroVAD", "Turn", "Utterance",
           "list_cameras", "list_inputs"]
