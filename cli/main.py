"""The `m3edge` command: thin typer commands over library functions, rendered with rich.

Heavy imports (torch, tokenizers) happen inside commands so `--help` stays instant. A user
mistake raises `M3Error` somewhere below; `main()` prints its one sentence and exits 1.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from m3edge.errors import M3Error

app = typer.Typer(
    name="m3edge", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="m3edge: run the M3-Lite multimodal MoE (and Llama-family models) on the edge.",
)
console = Console()
err = Console(stderr=True)

# sampling options shared by `generate` and `chat`
TEMPERATURE = typer.Option(0.0, help="0 = greedy.")
TOP_K = typer.Option(0, help="Keep the k most likely tokens (0 = off).")
TOP_P = typer.Option(1.0, help="Nucleus sampling mass (1 = off).")
REPETITION_PENALTY = typer.Option(1.0, help="> 1 discourages repeats.")
SEED = typer.Option(None, help="Seed for reproducible sampling.")

MODEL_ARG = typer.Argument(None, help="Checkpoint directory. Omit it to use the embedded default "
                                      "(SmolLM2-135M-Instruct), imported on first use.", show_default=False)


@contextmanager
def progress_bar(what: str) -> Iterator:
    """A rich bar driven by the library's progress(name, i, n) callbacks; it appears on the first
    callback, so a command that fails during its checks prints only its error."""
    bar = Progress(TextColumn(f"[bold]{what}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=err)
    task = None

    def update(name: str, i: int, n: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("", total=n)
        bar.update(task, completed=i, total=n, description=name[-48:])

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


BACKEND = typer.Option("auto", help="auto (a quantized model: cuda where a GPU and the kernels are there, else "
                                     "ort; torch otherwise) | torch (reference) | ort (ONNX Runtime on the CPU; "
                                     "exports the model once, cached) | cuda (native int4 kernels, CUDA graphs).")


def load_engine(model: Optional[Path], backend: str, max_context: Optional[int] = None,
                overflow: str = "drop_oldest", limits=None):
    from m3edge.runtime.engine import Engine

    model = prepare_model(model, backend)
    with progress_bar("loading") as update:  # shows only where the load reports (the cuda backend's repack)
        return Engine.load(model, backend=backend, max_context=max_context, overflow=overflow, limits=limits,
                           progress=update)


def prepare_model(model: Optional[Path], backend: str) -> Path:
    """What the backend will run, made once: the default model imported (for the CPU path as the GGUF
    stores it, int4), and a quantized checkpoint that runs on ONNX Runtime exported into the cache."""
    from m3edge.model.importers import ensure_default_model
    from m3edge.runtime.backends import default_quantized, wants_ort

    if model is None:
        with progress_bar("importing the default model") as update:
            model = ensure_default_model(update, quantized=default_quantized(backend))
    if wants_ort(model, backend):
        from m3edge.export.onnx import ensure_onnx

        with progress_bar("exporting to ONNX (once)") as update:
            ensure_onnx(model, update)
    return model


@app.command()
def synth(
    preset: str = typer.Option("tiny", help="tiny | lite-24g | lite-16g"),
    out: Path = typer.Option(..., help="Output checkpoint directory."),
    layers: Optional[int] = typer.Option(None, help="Cut the depth to N layers (full-size presets are ~64 GB)."),
    seed: int = typer.Option(0, help="Random seed of the weights."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Write a random-weight M3-Lite checkpoint with a working tokenizer.

    Example: m3edge synth --preset lite-16g --layers 2 --out /tmp/lite16
    """
    from m3edge.model.synth import synth as run

    with progress_bar(f"synth {preset}") as update:
        path = run(preset, out, layers=layers, seed=seed, force=force, progress=update)
    console.print(f"wrote [bold]{path}[/]")


@app.command("import")
def import_cmd(
    src: Optional[Path] = typer.Argument(None, help="A llama-family .gguf file, or an HF safetensors directory "
                                                    "(Llama, Mistral, Qwen3, Qwen3-MoE, Mixtral). Omit it to "
                                                    "import the embedded SmolLM2-135M-Instruct.",
                                         show_default=False),
    out: Path = typer.Option(..., help="Output M3 checkpoint directory."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    dequantize: bool = typer.Option(False, "--dequantize", help="GGUF: write every tensor in float32 instead "
                                                                "of keeping its quantized blocks."),
    requant_bits: int = typer.Option(8, help="GGUF: bits for tensors whose grid cannot be carried (Q5_*, Q6_K, "
                                             "...), re-quantized by RTN, group 32: 8 (symmetric) or 4 (with zero "
                                             "points)."),
):
    """Convert a checkpoint into the M3 layout (validated).

    A GGUF file's Q4_0, Q4_1, Q8_0 and Q4_K tensors keep their own integers and scales (lossless: the
    weights equal llama.cpp's dequantization bit for bit); other quantized tensors are re-quantized and
    listed; float tensors stay float32. The report lands in OUT/manifest.json. HF safetensors are
    imported in full precision (quantize them with `m3edge quantize`).

    Example: m3edge import ./SmolLM2-135M-Instruct.Q4_1.gguf --out ./smollm2
    """
    from m3edge.model.importers import import_checkpoint
    from m3edge.model.scheme import Scheme

    if requant_bits not in (4, 8):
        raise M3Error(f"--requant-bits must be 4 or 8, got {requant_bits}")
    requant = Scheme(8, 32, True) if requant_bits == 8 else Scheme(4, 32, False)
    with progress_bar("import") as update:
        path = import_checkpoint(src, out, force=force, progress=update, dequantize=dequantize, requant=requant)
    manifest = path / "manifest.json"
    if manifest.exists():
        _import_report(json.loads(manifest.read_text()))
    console.print(f"wrote [bold]{path}[/]")


def _import_report(manifest: dict) -> None:
    """One row per (source type, what became of it), with a tensor count."""
    rows: dict[tuple[str, str, bool], int] = {}
    for t in manifest.get("tensors", {}).values():
        key = (t["source"], t["stored"], t["lossless"])
        rows[key] = rows.get(key, 0) + 1
    table = Table("source type", "stored as", "lossless", "tensors")
    for (src, how, exact), n in sorted(rows.items()):
        table.add_row(src, how, "yes" if exact else "[yellow]no: re-quantized[/]", str(n))
    console.print(table)
    console.print(f"compressed-tensors: {manifest.get('compressed_tensors')}")


@app.command()
def info(model: Optional[Path] = MODEL_ARG):
    """Config summary, parameter counts and memory estimates of a checkpoint.

    Example: m3edge info ./tiny
    """
    from m3edge.model.checkpoint import read_config
    from m3edge.model.importers import ensure_default_model
    from m3edge.model.m3lite import count_params, kv_bytes_per_token, weight_bytes

    if model is None:
        with progress_bar("importing the default model") as update:
            model = ensure_default_model(update)
    cfg = read_config(model)
    total, active = count_params(cfg)
    t = Table(title=str(model), show_header=False)
    kind = "MoE" if cfg.num_experts else "dense"
    rows = [
        ("architecture", f"{kind}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                         f"{cfg.num_attention_heads}q/{cfg.num_key_value_heads}kv heads x {cfg.head_dim}"),
        ("experts", f"{cfg.num_experts} routed ({cfg.num_fusion_experts} fusion), top-{cfg.num_experts_per_tok}, "
                    f"{cfg.num_shared_experts} shared" if cfg.num_experts else "-"),
        ("modalities", ", ".join(["text"] + (["image"] if cfg.vision_config else [])
                                 + (["audio"] if cfg.audio_config else []))),
        ("vocab / context", f"{cfg.vocab_size} / {cfg.max_position_embeddings}"),
        ("parameters", f"{_count(total)} total, {_count(active)} active per token"),
        ("KV cache", f"{kv_bytes_per_token(cfg) / 1024:.1f} KiB/token in fp16, "
                     f"{kv_bytes_per_token(cfg, 4) / 1024:.1f} in fp32 (ONNX Runtime)"),
        ("stored as", _stored_as(cfg, model)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    m = Table(title="weight memory")
    for col in ("backend / format", "weights", "+ KV at 8K"):
        m.add_column(col)
    for label, bits, g, kv in (("torch bf16", 16, 128, 2), ("cuda int4 g128", 4, 128, 2), ("ort int8 g128", 8, 128, 4),
                               ("ort int4 g128", 4, 128, 4), ("ort int4 g32", 4, 32, 4)):
        w = weight_bytes(cfg, bits, g)
        m.add_row(label, _bytes(w), _bytes(w + 8192 * kv_bytes_per_token(cfg, kv)))
    console.print(m)


def _stored_as(cfg, model: Path) -> str:
    """The checkpoint's own weight formats (linears per scheme) and its size on disk."""
    from collections import Counter

    from m3edge.model.checkpoint import checkpoint_tensors

    disk = _bytes(sum(f.stat().st_size for f in Path(model).glob("*.safetensors")))
    schemes = Counter(s for _, s in checkpoint_tensors(cfg)[1].values())
    if not schemes:
        return f"{cfg.torch_dtype}, {disk} on disk"
    forms = "; ".join(f"{n} x {s.describe()}" for s, n in schemes.most_common())
    return f"{forms}; {disk} on disk"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop):
    from m3edge.runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or []))


def _content(text: str, images: List[Path], audios: List[Path]):
    if not images and not audios:
        return text
    parts = [{"type": "image", "image": str(p)} for p in images] + [{"type": "audio", "audio": str(p)} for p in audios]
    return parts + [{"type": "text", "text": text}]


def _stream(chunks) -> None:
    last = None
    for chunk in chunks:
        if chunk.notice:
            err.print(f"[yellow]note:[/] {chunk.notice}")
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if last is not None:
        err.print(f"[dim][{last.generated_tokens} tokens, {last.tokens_per_s:.1f} tok/s, "
                  f"first token {last.ttft_s * 1000:.0f} ms, {last.finish_reason}][/]")



@app.command()
def generate(
    model: Optional[Path] = MODEL_ARG,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message."),
    image: List[Path] = typer.Option([], help="Attach an image (repeatable)."),
    audio: List[Path] = typer.Option([], help="Attach an audio file (repeatable)."),
    system: Optional[str] = typer.Option(None, help="A system message."),
    max_tokens: int = typer.Option(128, help="Stop after this many new tokens."),
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    repetition_penalty: float = REPETITION_PENALTY,
    seed: Optional[int] = SEED,
    stop: List[str] = typer.Option([], help="Stop string (repeatable); the output ends before it."),
    backend: str = BACKEND,
):
    """Generate one reply, streamed to stdout.

    Example: m3edge generate --prompt "Name three rivers." --max-tokens 40
    """
    engine = load_engine(model, backend)
    msgs = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": _content(prompt, image, audio)}]
    _stream(engine.generate(msgs, _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)))


CHAT_HELP = """commands: /image FILE  /audio FILE  (attach to your next message)
          /reset  (forget the conversation)   /quit  (or Ctrl-D)"""


@app.command()
def chat(
    model: Optional[Path] = MODEL_ARG,
    system: Optional[str] = typer.Option(None, help="A system message."),
    image: List[Path] = typer.Option([], help="Attach an image to the first message."),
    audio: List[Path] = typer.Option([], help="Attach an audio file to the first message."),
    max_tokens: int = typer.Option(256, help="Longest reply in tokens."),
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    repetition_penalty: float = REPETITION_PENALTY,
    seed: Optional[int] = SEED,
    max_context: Optional[int] = typer.Option(None, help="Context window in tokens (default: the model's)."),
    overflow: str = typer.Option("drop_oldest", help="When the context is full: drop_oldest | error."),
    backend: str = BACKEND,
    mic: bool = typer.Option(False, "--mic", help="Talk: each utterance (found by voice activity detection) "
                                                 "is a turn; speaking during an answer stops it."),
    mic_device: Optional[str] = typer.Option(None, help="Input device index or name (`m3edge devices`)."),
    ptt: bool = typer.Option(False, "--ptt", help="Push-to-talk instead of voice detection: Enter starts "
                                                 "and ends a spoken turn."),
    camera: Optional[str] = typer.Option(None, help="Camera index, video file or image sequence "
                                                   "(frames_%03d.png); bare --camera means camera 0. The "
                                                   "freshest frame goes with each turn; /snap adds one now."),
):
    """Chat with a model in the terminal, streaming its replies.

    Type a message and press Enter. /image FILE and /audio FILE attach media to your next
    message; /reset starts over; /quit leaves. With --mic and/or --camera a live view shows the
    state (listening / hearing / thinking / answering), the mic level and what each turn carries.

    Example: m3edge chat ./tiny --image cat.png
             m3edge chat ./m3-int4 --mic --camera
    """
    from m3edge.runtime.engine import ContextOverflowError

    engine = load_engine(model, backend, max_context, overflow)
    session = engine.chat(system)
    params = _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, [])
    if mic or camera is not None:
        return _live_chat(engine, session, params, mic, mic_device, ptt, camera)
    pending_images, pending_audio = list(image), list(audio)
    console.print(f"[bold]m3edge chat[/] - {engine.model_dir.name} ({engine.backend.name} backend)")
    console.print(f"[dim]{CHAT_HELP}[/]")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/reset":
                session.reset()
                pending_images, pending_audio = [], []
                console.print("[dim](conversation cleared)[/]")
            elif cmd in ("/image", "/audio") and arg:
                p = Path(arg).expanduser()
                if not p.is_file():
                    err.print(f"[red]error:[/] no such file: {p}")
                    continue
                (pending_images if cmd == "/image" else pending_audio).append(p)
                console.print(f"[dim](attached {p.name} to your next message)[/]")
            else:
                console.print(f"[dim]{CHAT_HELP}[/]")
            continue
        sys.stdout.write("m3> ")
        sys.stdout.flush()
        try:
            _stream(session.send(_content(line, pending_images, pending_audio), params))
        except (ContextOverflowError, M3Error) as e:
            sys.stdout.write("\n")
            err.print(f"[red]error:[/] {e}", soft_wrap=True)
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            err.print("[dim](interrupted)[/]")
        pending_images, pending_audio = [], []


def _live_chat(engine, session, params, mic: bool, mic_device, ptt: bool, camera) -> None:
    from m3edge.capture import Camera, LiveChat, Microphone
    from m3edge.errors import CaptureError
    from m3edge.cli.live import run_live

    console.print(f"[bold]m3edge chat[/] - {engine.model_dir.name} ({engine.backend.name} backend)")
    console.print("[dim]speak, or type a message and press Enter; /snap adds the camera's frame to your next turn; "
                  + ("Enter starts and ends a spoken turn; " if ptt else "") + "/reset; /quit (or Ctrl-D)[/]")
    device = int(mic_device) if mic_device and mic_device.isdigit() else mic_device
    m = c = None
    if mic:
        try:
            m = Microphone(device).open()
            console.print(f"[dim]mic: {m.name} at {m.rate} Hz -> 16 kHz[/]", highlight=False)
        except CaptureError as e:
            err.print(f"[yellow]note:[/] {e}; the chat goes on without the microphone", soft_wrap=True, highlight=False)
    if camera is not None:
        try:
            c = Camera(camera).open()
            console.print(f"[dim]camera: {camera} ({c.fps:.0f} fps)[/]", highlight=False)
        except CaptureError as e:
            err.print(f"[yellow]note:[/] {e}; the chat goes on without the camera", soft_wrap=True, highlight=False)
    chat = LiveChat(session, params, mic=m, camera=c, push_to_talk=ptt)
    try:
        run_live(chat, console)
    finally:
        for src in (m, c):
            if src is not None:
                src.close()


@app.command()
def serve(
    model: Optional[Path] = MODEL_ARG,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (anything but loopback needs --api-key)."),
    port: int = typer.Option(8080, help="TCP port (0: any free one, printed)."),
    api_key: Optional[str] = typer.Option(None, envvar="M3EDGE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (env M3EDGE_API_KEY)."),
    backend: str = BACKEND,
    max_context: Optional[int] = typer.Option(None, help="Context window in tokens (default: the model's)."),
    max_image_pixels: int = typer.Option(4096 * 4096, help="Largest image a request may send (width x height)."),
    max_audio_seconds: float = typer.Option(120.0, help="Longest audio a request may send."),
    max_body_mb: float = typer.Option(32.0, help="Largest request body, base64 media included."),
    max_active: int = typer.Option(4, help="Generations running at once (they share the engine token by token)."),
    max_queued: int = typer.Option(16, help="Requests waiting for a slot; beyond that: 503."),
    static: Optional[Path] = typer.Option(None, help="Serve this folder at / (e.g. examples/kiosk)."),
):
    """Serve the model over a local OpenAI-compatible HTTP API (chat completions, streaming).

    POST /v1/chat/completions takes text, image_url (data: URLs) and input_audio (base64 wav) parts;
    GET /v1/models and /health. Loopback only unless --api-key is set.

    Example: m3edge serve --port 8080 --static examples/kiosk
    """
    from m3edge.runtime.engine import Limits
    from m3edge.server import ServeOptions, check_options, serve as run

    opt = ServeOptions(host=host, port=port, api_key=api_key, max_body_bytes=int(max_body_mb * 2**20),
                       max_active=max_active, max_queued=max_queued, static_dir=static)
    check_options(opt)  # before loading anything
    engine = load_engine(model, backend, max_context, overflow="error",
                         limits=Limits(max_image_pixels=max_image_pixels, max_audio_seconds=max_audio_seconds))
    name = engine.model_dir.name

    def ready(app) -> None:
        where = f"http://{host}:{app.port}"
        console.print(f"serving [bold]{name}[/] ({engine.backend.name}) on {where}/v1"
                      + (f", page at {where}/" if static else "") + "; Ctrl-C stops", highlight=False)
        sys.stdout.flush()

    try:
        run(engine, opt, name, ready)
    except OSError as e:
        raise M3Error(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


@app.command()
def devices():
    """List audio inputs and cameras (with indices and sample rates), and which backends can run.

    Example: m3edge devices
    """
    from m3edge.capture import list_cameras, list_inputs
    from m3edge.errors import CaptureError

    t = Table(title="audio inputs")
    for col in ("index", "name", "channels", "rate", "host API"):
        t.add_column(col)
    try:
        for d in list_inputs():
            t.add_row(str(d["index"]), d["name"], str(d["channels"]), f"{d['rate']} Hz", d["api"])
        console.print(t if t.rows else "[yellow]no audio inputs found[/]")
    except CaptureError as e:
        console.print(f"[yellow]audio:[/] {e}")
    try:
        cams = list_cameras()
        t = Table(title="cameras")
        for col in ("index", "size", "fps"):
            t.add_column(col)
        for d in cams:
            t.add_row(str(d["index"]), f"{d['width']}x{d['height']}", f"{d['fps']:.0f}")
        console.print(t if cams else "[yellow]no cameras found[/] (a video file works too: --camera clip.mp4)")
    except CaptureError as e:
        console.print(f"[yellow]camera:[/] {e}")
    console.print(f"CUDA kernels: {_cuda_status()}")
    console.print(f"ONNX Runtime: {_ort_status()}")


def _cuda_status() -> str:
    import torch

    from m3edge.runtime.backends import cuda_reason

    why = cuda_reason()  # builds the kernels on first use where a GPU is visible
    if why:
        return f"no ({why})"
    return f"yes, {torch.cuda.get_device_name(0)} (the cuda backend runs int4 checkpoints)"


def _ort_status() -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        return "not installed (pip install onnxruntime)"
    return f"{ort.__version__}, providers {', '.join(ort.get_available_providers())}"


@app.command()
def export(
    src: Path = typer.Argument(..., help="Quantized M3 checkpoint directory (from `m3edge quantize`).",
                               show_default=False),
    out: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    format: str = typer.Option("onnx", "--format", help="onnx (the only format so far)."),
    accuracy_level: int = typer.Option(4, help="MatMulNBits compute: 4 = int8 activations (fastest on CPUs), "
                                               "0 = fp32."),
    embed_bits: int = typer.Option(8, help="Embedding table (and a tied lm_head): 8 = int8 per 64/128 values, "
                                           "4 = int4 per 32 (smaller, faster, less exact), 16 = exact bf16."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Export a quantized checkpoint for ONNX Runtime's CPU path.

    Every int4/int8 linear becomes com.microsoft.MatMulNBits from the same integers and scales;
    attention is GroupQueryAttention with an in-place KV cache; MoE layers run only the experts
    each token selects. OUT holds model.onnx, model.onnx.data, export_manifest.json and the
    tokenizer, and runs with `m3edge chat OUT`.

    Example: m3edge export ./m3-int4 --format onnx --out ./m3-int4-onnx
    """
    from m3edge.export.onnx import ExportOptions, export_onnx

    if format != "onnx":
        raise M3Error(f"unknown export format '{format}' (available: onnx)")
    with progress_bar("export onnx") as update:
        path = export_onnx(src, out, ExportOptions(accuracy_level, embed_bits), force=force, progress=update)
    mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    console.print(f"wrote {path} ({mb:.1f} MiB); run it with: m3edge chat {path}")


@app.command()
def quantize(
    src: Path = typer.Argument(..., help="Full-precision M3 checkpoint directory.", show_default=False),
    out: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    bits: int = typer.Option(4, help="4 or 8."),
    group: int = typer.Option(128, help="Inputs per scale: 32, 64, 128, or -1 for one per output row."),
    sym: bool = typer.Option(False, "--sym", help="Symmetric (no zero points)."),
    method: str = typer.Option("rtn", help="rtn | awq (activation-aware scaling and grid search) | gptq "
                                           "(GPTQ on the AWQ-scaled weights and grid)."),
    awq_scale: bool = typer.Option(True, "--awq-scale/--no-awq-scale",
                                   help="awq/gptq: AWQ's input-channel scaling (up rows -> down, v rows -> o)."),
    calib: List[Path] = typer.Option([], help="Calibration file: text (.txt/.md), image or wav (repeatable)."),
    no_builtin_calib: bool = typer.Option(False, "--no-builtin-calib", help="Use only the --calib files."),
    calib_tokens: int = typer.Option(16384, help="About this many calibration tokens."),
    min_expert_tokens: int = typer.Option(16, help="Experts routed fewer tokens fall back to RTN."),
    calibrate_all_experts: bool = typer.Option(False, "--calibrate-all-experts",
                                               help="Every calibration token feeds every expert's statistics."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: columns by descending Hessian diagonal "
                                                              "(static groups, same file format)."),
    partial_groups: bool = typer.Option(False, "--partial-groups",
                                        help="Allow a group that does not divide a layer's inputs: the last "
                                             "group of each row is shorter (compressed-tensors reads it)."),
    damp: float = typer.Option(0.01, help="GPTQ damping, a fraction of the Hessian's mean diagonal."),
    lm_head_bits: int = typer.Option(8, help="8 (int8) or 0 (keep bf16)."),
    tune_scales: int = typer.Option(0, "--tune-scales", metavar="EPOCHS",
                                    help="Then tune the group scales end to end for EPOCHS epochs: KL to the "
                                         "float model on the calibration prompts, integers unchanged. Holds "
                                         "the float and the quantized model in RAM at once. 0: off."),
    include: List[str] = typer.Option([], help="Regex: quantize only matching linear weights (repeatable)."),
    exclude: List[str] = typer.Option([], help="Regex: keep matching linear weights in bf16 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run with the same options."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Quantize a checkpoint to int4/int8 with per-expert, per-group scales, layer by layer.

    Routers, norms, embeddings and the image/audio embedders stay bf16; lm_head goes int8. The
    output is a compressed-tensors pack-quantized checkpoint with a sha256 manifest.

    Example: m3edge quantize ./m3 --out ./m3-int4 --bits 4 --group 128 --method gptq
    """
    from m3edge.quantize.pipeline import Options, quantize_checkpoint
    from m3edge.model.scheme import Scheme

    opt = Options(scheme=Scheme(bits, group, sym), method=method, lm_head_bits=lm_head_bits, include=include,
                  exclude=exclude, calib=[str(c) for c in calib], builtin_calib=not no_builtin_calib,
                  calib_tokens=calib_tokens, min_expert_tokens=min_expert_tokens,
                  calibrate_all_experts=calibrate_all_experts, act_order=act_order,
                  partial_groups=partial_groups, damp=damp, awq_scale=awq_scale, tune_epochs=tune_scales)
    with progress_bar(f"quantize {method} int{bits} g{group}") as update:
        path, reports = quantize_checkpoint(src, out, opt, force=force, resume=resume, progress=update,
                                            log=lambda m: err.print(f"[dim]{m}[/]"))
    t = Table(title=f"{path}")
    for col in ("layer", "time", "weight error", "in", "out", "RTN fallback experts"):
        t.add_column(col, justify="right")
    for r in reports:
        t.add_row(str(r.layer), f"{r.seconds:.1f} s", f"{r.rel_error:.4f}", _bytes(r.bytes_in), _bytes(r.bytes_out),
                  ", ".join(map(str, r.rtn_fallback)) or "-")
    console.print(t)
    starved = [(r.layer, r.rtn_fallback) for r in reports if r.rtn_fallback]
    if starved:
        console.print(f"[yellow]{sum(len(e) for _, e in starved)} expert(s) had fewer than {min_expert_tokens} "
                      "calibration tokens and were quantized with RTN:[/] "
                      + "; ".join(f"layer {i}: {', '.join(map(str, e))}" for i, e in starved))
    if any(r.expert_tokens for r in reports):
        e = Table(title="calibration tokens per expert (min / median / max over experts)")
        for col in ["layer"] + list(reports[0].expert_tokens or {}):
            e.add_column(col, justify="right")
        for r in reports:
            if r.expert_tokens:
                cells = []
                for counts in r.expert_tokens.values():
                    c = sorted(counts)
                    cells.append(f"{c[0]} / {c[len(c) // 2]} / {c[-1]}")
                e.add_row(str(r.layer), *cells)
        console.print(e)
        console.print(f"[dim]per-expert counts: {path / 'quantization_report.json'}[/]")


eval_app = typer.Typer(help="Measure model quality: perplexity, routing agreement.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("ppl")
def eval_ppl(
    model: Optional[Path] = MODEL_ARG,
    text: Path = typer.Option(..., help="A UTF-8 text file."),
    window: int = typer.Option(512, help="Tokens per non-overlapping window."),
    backend: str = typer.Option("torch", help="torch (the fp32 reference on the checkpoint's weights) | ort "
                                              "(ONNX Runtime on its export, as `m3edge chat` runs it)."),
):
    """Perplexity over non-overlapping windows (no BOS unless the tokenizer adds one).

    Example: m3edge eval ppl ./smollm2-int4 --text /usr/share/common-licenses/GPL-3 --backend ort
    """
    import torch

    from m3edge.eval import perplexity, text_ids
    from m3edge.model.checkpoint import load_model
    from m3edge.model.importers import ensure_default_model
    from m3edge.model.tokenizer import Tokenizer

    from m3edge.runtime.backends import resolve_backend

    model = model or ensure_default_model()
    tok = Tokenizer.from_dir(model)
    ids = text_ids(tok, text)
    if backend not in ("torch", "ort"):
        raise M3Error(f"unknown backend '{backend}' (torch or ort)")
    if resolve_backend(backend, model) == "ort":
        from m3edge.export.onnx import ensure_onnx
        from m3edge.runtime.ort import OrtDecoder

        with progress_bar("loading") as update:
            m = OrtDecoder(ensure_onnx(model, update))
    else:
        m = load_model(model, dtype=torch.float32)
    with progress_bar("ppl") as update:
        r = perplexity(m, tok, ids, window, progress=update)
    console.print(f"perplexity {r.ppl:.4f} over {r.tokens} predicted tokens ({r.windows} windows of {window}, "
                  f"BOS {'prepended' if r.bos else 'not added'})")


@eval_app.command("routing")
def eval_routing(
    qmodel: Path = typer.Argument(..., help="The quantized checkpoint.", show_default=False),
    ref: Path = typer.Option(..., "--ref", help="The full-precision reference checkpoint."),
    calib_tokens: int = typer.Option(4096, help="About this many tokens of the built-in mixed prompts."),
):
    """Top-k expert agreement of a quantized model with its reference, per modality.

    Example: m3edge eval routing ./m3-int4 --ref ./m3
    """
    import torch

    from m3edge.eval import routing_agreement
    from m3edge.model.checkpoint import load_model
    from m3edge.model.tokenizer import Tokenizer
    from m3edge.quantize.calib import build_calibration

    a, b = load_model(qmodel, dtype=torch.float32), load_model(ref, dtype=torch.float32)
    prompts = build_calibration(b.cfg, Tokenizer.from_dir(ref), max_tokens=calib_tokens)
    agree = routing_agreement(a, b, prompts)
    t = Table(title="top-k agreement with the reference")
    t.add_column("modality")
    t.add_column("agreement", justify="right")
    for k, v in agree.items():
        t.add_row(k, f"{v:.4f}")
    console.print(t)


def main() -> None:
    args = sys.argv
    for i, a in enumerate(args):  # a bare `--camera` means camera 0
        if a == "--camera" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            args.insert(i + 1, "0")
            break
    try:
        app()
    except M3Error as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
