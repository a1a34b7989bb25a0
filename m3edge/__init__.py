"""m3edge: run the M3-Lite multimodal MoE (and Llama-family models) on the edge.

The embedding API (see m3edge/runtime/engine.py for the concurrency model):

    from m3edge import Engine
    with Engine.load("./model") as engine:          # or Engine.load() for the embedded default
        chat = engine.chat(system="You are a museum guide.")
        for chunk in chat.send("Hello!"):           # a streaming iterator ...
            print(chunk.text, end="", flush=True)
        reply = chat.reply("And then?", on_chunk=lambda c: print(c.text, end=""))  # ... or a callback

Names are imported on first use, so `import m3edge` stays light (the ONNX Runtime path never loads torch).
"""

_API = {"Engine": "m3edge.runtime.engine", "ChatSession": "m3edge.runtime.engine",
        "GenerationChunk": "m3edge.runtime.engine", "Reply": "m3edge.runtime.engine", "Limits": "m3edge.runtime.engine",
        "LimitError": "m3edge.runtime.engine", "ContextOverflowError": "m3edge.runtime.engine",
        "SamplingParams": "m3edge.runtime.sampling", "M3Error": "m3edge.errors"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'm3edge' has no attribute {name!r}")
