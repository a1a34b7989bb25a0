"""`m3edge export QMODEL --format onnx`: the decoder as one ONNX graph for ONNX Runtime's CPU path.

The graph (opset 23 + `com.microsoft` contrib ops), batch 1, S new tokens, a KV buffer of L slots:

    inputs   input_ids int64 [1, S] (models with media or MoE); inputs_embeds float [1, S, H] (the runtime looks rows up in
             embed_tokens.bin); cos, sin float [P+S, D/2] (row p: the angles of position p, M-RoPE
             already mixed per slot); rope_pos int64 [1, S] (= P..P+S-1); seqlens_k int32 [1] (= P+S-1);
             total_seq_len int32 [] (= P+S); nontext_seen bool [1] (fusion bit of the cached prefix);
             num_logits int64 [1] (logits for the last n positions); image_patches float [Ni, 3072],
             audio_features float [Na, 1024] (models with those inputs); past_key.i / past_value.i
             float [1, kv_heads, L, D]
    outputs  logits float [1, n, V]; present_key.i / present_value.i (the same buffers: bind them
             to the past ones and the cache is updated in place)

Per layer: SkipSimplifiedLayerNormalization (residual add + RMSNorm), one MatMulNBits for q|k|v
(per-head RMSNorm for QK-norm models), GroupQueryAttention (rotary inside, causal, shared KV
buffer), MatMulNBits o, SkipSimplifiedLayerNormalization, then the MLP: one MatMulNBits for
gate|up, SiLU * up, MatMulNBits down. MoE layers route with the token's modality router, mask the
fusion experts until a non-text token was seen, take top-k, and run each expert only on the rows
routed to it (NonZero -> Gather -> expert -> ScatterND add): unselected experts cost no matmul.

Weights: every quantized linear of the artifact becomes MatMulNBits from the same integers and
scales (`matmulnbits.relayout`); a float per-group minimum (GGUF Q4_1 / Q4_K carried by the
importer) adds its share as a group-sum MatMul next to it. The embedding table, when the artifact
keeps it in bf16, becomes int8 per 64/128 values (`embed_bits=8`, llama.cpp's Q8_0 rule) or int4
per 32 (`embed_bits=4`, Q4_0's rule), used by the lookup (embed_tokens.bin, read by the runtime)
and a tied lm_head, or stays exact (`embed_bits=16`: bf16 lookup, fp32 tied lm_head); a table the
artifact already holds quantized (a GGUF's Q8_0) is carried exactly. Tensors go to `model.onnx.data` as they are
made (peak memory ~ one linear), then `onnx.checker` runs on the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from m3edge.errors import M3Error
from m3edge.export.matmulnbits import (NBits, concat_rows, dequantize_nbits, quantize_rows, relayout,
                                       unpacked_zero_points)
from m3edge.model.checkpoint import (TensorFiles, checkpoint_tensors, packed_parts, read_config, sha256_file, share,
                                     validate)
from m3edge.model.m3lite import ROUTER_NAMES, M3Config, rope_inv_freq
from m3edge.model.packing import unpack_linear
from m3edge.runtime.ort import EMBED_FILE, FORMAT, MANIFEST, cached_export_dir, find_export

GRAPH, DATA = "model.onnx", "model.onnx.data"
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "generation_config.json", "special_tokens_map.json")
OPSET = 23
_ALIGN = 4096  # external-data offsets on page boundaries (ORT can map them)


@dataclass
class ExportOptions:
    accuracy_level: int = 4  # MatMulNBits: 0/1 fp32 compute, 4 int8 activations (fastest on CPU)
    embed_bits: int = 8  # 8 / 4: int8 / int4 table (lookup + tied lm_head); 16: exact bf16 lookup

    def validate(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise M3Error(f"--accuracy-level must be 0..4, got {self.accuracy_level}")
        if self.embed_bits not in (4, 8, 16):
            raise M3Error(f"--embed-bits must be 4, 8 or 16, got {self.embed_bits}")


def write_aligned(f, arr: np.ndarray) -> int:
    """Append arr's bytes to f at the next page boundary; returns the offset."""
    off = f.tell()
    f.write(b"\0" * (-off % _ALIGN))
    f.write(np.ascontiguousarray(arr).tobytes())
    return off + -off % _ALIGN


class _Graph:
    """Nodes, inputs and initializers; large initializers stream into the external-data file."""

    def __init__(self, data_path: Path):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.data = open(data_path, "wb")
        self.data_name = data_path.name
        self._n = 0
        self.shared: dict[str, str] = {}  # key -> name of a constant made once (`const_once`)

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", out: list[str] | None = None,
           **attrs) -> list[str]:
        outs = out or [self.name(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"n_{op_type}"),
                                           domain=domain or None, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]

    def const(self, name: str, arr: np.ndarray, elem: int | None = None) -> str:
        """An initializer; `elem` overrides the element type of the raw bytes (bf16 held as uint16)."""
        arr = np.asarray(arr)
        arr = arr if arr.flags.c_contiguous else arr.copy()  # (np.ascontiguousarray makes 0-d arrays 1-d)
        t = TensorProto(name=name, dims=list(arr.shape), data_type=elem or helper.np_dtype_to_tensor_dtype(arr.dtype))
        if arr.nbytes < 1024:
            t.raw_data = arr.tobytes()
            self.inits.append(t)
            return name
        off = write_aligned(self.data, arr)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(off)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        return name

    def const_once(self, name: str, make: Callable[[], np.ndarray]) -> str:
        """A constant that several nodes share, made on first use."""
        if name not in self.shared:
            self.shared[name] = self.const(name, make())
        return self.shared[name]

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def save(self, path: Path) -> None:
        self.data.close()
        g = helper.make_graph(self.nodes, "m3edge_decoder", self.inputs, self.outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="m3edge")
        m.ir_version = 10
        onnx.save_model(m, str(path))


class _Exporter:
    def __init__(self, src: Path, cfg: M3Config, files: TensorFiles, g: _Graph, opt: ExportOptions):
        self.src, self.cfg, self.files, self.g, self.opt = src, cfg, files, g, opt
        self.packed = checkpoint_tensors(cfg)[1]  # weight name -> (module, scheme)
        self.report: dict[str, dict] = {}
        self.H = cfg.hidden_size

    # -- weights
    def _f32(self, name: str) -> np.ndarray:
        return self.files.get(name).float().numpy()

    def _nbits(self, weight: str) -> NBits:
        module, scheme = self.packed[weight]
        u = unpack_linear(packed_parts(self.files, module), scheme)
        nb = relayout(*(None if t is None else t.numpy() for t in (u.q, u.scale, u.zero)), scheme,
                      None if u.minimum is None else u.minimum.numpy())
        self.report[module] = {"bits": scheme.bits, "group": scheme.group, "symmetric": scheme.symmetric,
                               "block": nb.block, "carried": "exact"}
        if scheme.float_min:
            self.report[module].update(float_min=True, carried="exact (float minimum: group-sum fp32 MatMul)")
        return nb

    def _same_scheme(self, weights: list[str]) -> bool:
        schemes = {self.packed[w][1] for w in weights if w in self.packed}
        return len(schemes) == 1 and all(w in self.packed for w in weights)

    def matmul_nbits(self, x: str, w: NBits, name: str, out: str | None = None) -> str:
        g = self.g
        ins = [x, g.const(f"{name}.B", w.B), g.const(f"{name}.scales", w.scales)]
        if w.zero_points is not None:
            ins.append(g.const(f"{name}.zero_points", w.zero_points))
        y = g.op("MatMulNBits", ins, 1, "com.microsoft", out=None if out is None or w.mins is not None else [out],
                 K=w.K, N=w.N, bits=w.bits, block_size=w.block, accuracy_level=self.opt.accuracy_level)[0]
        if w.mins is None:
            return y
        # + sum_g (x summed over block g) * min[:, g]: [T, n_blocks] @ [n_blocks, N], broadcast onto y
        nb = w.mins.shape[1]
        ind = g.const_once(f"block_sum.{w.K}x{w.block}",  # [K, n_blocks] of 0/1: x @ ind = x summed per block
                           lambda: np.kron(np.eye(nb, dtype=np.float32), np.ones((w.block, 1), np.float32)))
        sums = g.op1("MatMul", [x, ind])
        term = g.op1("MatMul", [sums, g.const(f"{name}.mins_t", w.mins.T.copy())])
        return g.op("Add", [y, term], out=[out] if out else None)[0]

    def linears(self, x: str, prefix: str, projs: list[str]) -> list[str]:
        """y_p = x @ W_p^T for p in projs; one fused MatMulNBits + Split when their schemes agree."""
        weights = [f"{prefix}.{p}.weight" for p in projs]
        if len(projs) > 1 and self._same_scheme(weights):
            y, widths = self.fused(x, prefix, projs)
            return self.g.op("Split", [y, self.g.const(self.g.name("split"), np.array(widths, np.int64))],
                             len(projs), axis=-1)
        return [self.linear(x, w) for w in weights]

    def fused(self, x: str, prefix: str, projs: list[str]) -> tuple[str, list[int]]:
        """One MatMulNBits over the stacked rows of linears with one scheme; returns (y, their widths)."""
        parts = [self._nbits(f"{prefix}.{p}.weight") for p in projs]
        return self.matmul_nbits(x, concat_rows(parts), f"{prefix}.{'_'.join(projs)}"), [p.N for p in parts]

    def linear(self, x: str, weight: str) -> str:
        """MatMulNBits for a packed weight; a linear the checkpoint keeps in float (`quantize --exclude`)
        stays exact as an fp32 MatMul."""
        module = weight.removesuffix(".weight")
        if weight in self.packed:
            return self.matmul_nbits(x, self._nbits(weight), module)
        self.report[module] = {"bits": 16, "carried": "exact (not quantized in the checkpoint): fp32 MatMul"}
        return self.float_matmul(x, weight)

    def float_matmul(self, x: str, weight: str, const: str | None = None, out: str | None = None) -> str:
        """x @ W^T with W [out, in] from the checkpoint, stored transposed in fp32 (as `const`)."""
        wt = self.g.const(const or weight.removesuffix(".weight") + ".weight_t", self._f32(weight).T.copy())
        return self.g.op("MatMul", [x, wt], out=[out] if out else None)[0]

    # -- blocks
    def swiglu(self, x: str, prefix: str) -> str:
        gate, up = self.linears(x, prefix, ["gate_proj", "up_proj"])
        act = self.g.op1("Mul", [gate, self.g.op1("Sigmoid", [gate])])
        return self.linears(self.g.op1("Mul", [act, up]), prefix, ["down_proj"])[0]

    def rms(self, x: str, weight: str, skip: str | None = None) -> tuple[str, str]:
        """RMSNorm(x [+ skip]) -> (normed, sum); `sum` is x itself without a skip."""
        eps = float(self.cfg.rms_norm_eps)
        w = self.g.const(weight, self._f32(weight))
        if skip is None:
            return self.g.op1("RMSNormalization", [x, w], axis=-1, epsilon=eps, stash_type=1), x
        outs = [self.g.name("norm"), "", "", self.g.name("resid")]
        self.g.op("SkipSimplifiedLayerNormalization", [x, skip, w], domain="com.microsoft", out=outs, epsilon=eps)
        return outs[0], outs[3]

    def head_norm(self, x: str, weight: str, heads: int) -> str:
        D = self.cfg.head_dim
        shaped = self.g.op1("Reshape", [x, self.g.const(self.g.name("shape"), np.array([1, -1, heads, D], np.int64))])
        normed = self.rms(shaped, weight)[0]
        return self.g.op1("Reshape", [normed, self.g.const(self.g.name("shape"), np.array([1, -1, heads * D], np.int64))])

    def attention(self, i: int, x: str, io: dict[str, str]) -> str:
        cfg, p = self.cfg, f"model.layers.{i}.self_attn"
        nh, nkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if cfg.attention_bias:
            raise M3Error("attention biases are not supported by the ONNX export yet")
        projs = ["q_proj", "k_proj", "v_proj"]
        if cfg.use_qk_norm or not self._same_scheme([f"{p}.{n}.weight" for n in projs]):
            q, k, v = self.linears(x, p, projs)
            if cfg.use_qk_norm:
                q = self.head_norm(q, f"{p}.q_norm.weight", nh)
                k = self.head_norm(k, f"{p}.k_norm.weight", nkv)
            qkv = [q, k, v]
        else:  # packed q|k|v straight into GroupQueryAttention
            qkv = [self.fused(x, p, projs)[0], "", ""]
        outs = [self.g.name("attn"), f"present_key.{i}", f"present_value.{i}"]
        self.g.op("GroupQueryAttention", qkv + [f"past_key.{i}", f"past_value.{i}", io["seqlens_k"],
                                                io["total_seq_len"], io["cos"], io["sin"], io["rope_pos"]],
                  domain="com.microsoft", out=outs, num_heads=nh, kv_num_heads=nkv, do_rotary=1,
                  rotary_interleaved=0, scale=float(D ** -0.5))
        return self.linears(outs[0], p, ["o_proj"])[0]

    def moe(self, i: int, x: str, io: dict[str, str]) -> str:
        cfg, g, p = self.cfg, self.g, f"model.layers.{i}.mlp"
        E, F, k, H = cfg.num_experts, cfg.num_fusion_experts, cfg.num_experts_per_tok, self.H
        xt = g.op1("Reshape", [x, g.const(g.name("shape"), np.array([-1, H], np.int64))])  # [T, H]
        logits = None
        for m, r in enumerate(ROUTER_NAMES[: len(cfg.router_modalities)]):  # spec 4: the token's modality router
            lm = self.float_matmul(xt, f"{p}.{r}.weight")
            logits = (g.op1("Where", [io["is_mod"][m], lm, g.const(g.name("zero"), np.zeros(1, np.float32))])
                      if logits is None else g.op1("Where", [io["is_mod"][m], lm, logits]))
        if F:  # fusion experts only once a non-text token is in the prefix
            col = np.zeros(E, bool)
            col[E - F:] = True
            blocked = g.op1("And", [io["no_fusion"], g.const(g.name("fusion_cols"), col)])
            logits = g.op1("Where", [blocked, g.const(g.name("ninf"), np.array([-np.inf], np.float32)), logits])
        kk = g.const(g.name("k"), np.array([k], np.int64))
        if cfg.norm_topk_prob:
            vals, idx = g.op("TopK", [logits, kk], 2, axis=-1)
            w = g.op1("Softmax", [vals], axis=-1)
        else:
            w, idx = g.op("TopK", [g.op1("Softmax", [logits], axis=-1), kk], 2, axis=-1)
        if cfg.routed_scaling_factor != 1.0:
            w = g.op1("Mul", [w, g.const(g.name("rsf"), np.array([cfg.routed_scaling_factor], np.float32))])
        # [T, k, E] one-hot of the choices -> per-expert weight [E, T] and row selection [E, T]
        onehot = g.op1("Cast", [g.op1("Equal", [g.op1("Unsqueeze", [idx, g.const(g.name("ax"), np.array([-1], np.int64))]),
                                               g.const(g.name("experts"), np.arange(E, dtype=np.int64))])], to=TensorProto.FLOAT)
        ax1 = g.const(g.name("ax"), np.array([1], np.int64))
        wexp = g.op1("ReduceSum", [g.op1("Mul", [onehot, g.op1("Unsqueeze", [w, g.const(g.name("ax"), np.array([-1], np.int64))])]), ax1],
                     keepdims=0)  # [T, E]
        hit = g.op1("ReduceMax", [onehot, ax1], keepdims=0)  # [T, E]
        wexp_t, hit_t = g.op1("Transpose", [wexp], perm=[1, 0]), g.op1("Transpose", [hit], perm=[1, 0])
        acc = g.op1("Mul", [xt, g.const(g.name("zero"), np.zeros(1, np.float32))])  # [T, H] zeros
        for e in range(E):
            ei = g.const(g.name("e"), np.array(e, np.int64))
            rows = g.op1("NonZero", [g.op1("Gather", [hit_t, ei], axis=0)])  # [1, n]
            rows1 = g.op1("Squeeze", [rows, g.const(g.name("ax"), np.array([0], np.int64))])  # [n] (n may be 0)
            y = self.swiglu(g.op1("Gather", [xt, rows1], axis=0), f"{p}.experts.{e}")  # [n, H]
            we = g.op1("Gather", [g.op1("Gather", [wexp_t, ei], axis=0), rows1], axis=0)  # [n]
            y = g.op1("Mul", [y, g.op1("Unsqueeze", [we, g.const(g.name("ax"), np.array([-1], np.int64))])])
            acc = g.op1("ScatterND", [acc, g.op1("Transpose", [rows], perm=[1, 0]), y], reduction="add")
        if cfg.num_shared_experts:
            acc = g.op1("Add", [acc, self.swiglu(xt, f"{p}.shared_experts")])
        return g.op1("Reshape", [acc, g.const(g.name("shape"), np.array([1, -1, H], np.int64))])

    def embed_table(self, out_dir: Path) -> NBits | None:
        """Write the token table to EMBED_FILE for the runtime's own lookup (a memory map: only the rows
        of tokens seen are ever read, and the graph holds no second copy next to a tied lm_head's
        prepacked one). Returns the quantized table when embed_bits < 16 (a tied lm_head reuses it)."""
        bits = self.opt.embed_bits
        if "model.embed_tokens.weight" in self.packed:  # the artifact's own grid (an imported Q8_0 table)
            nb = self._nbits("model.embed_tokens.weight")
            parts = {"B": nb.B, "scales": nb.scales}
            if nb.zero_points is not None:
                parts["zero_points"] = unpacked_zero_points(nb)
            if nb.mins is not None:
                parts["mins"] = nb.mins
            bits = nb.bits
        elif bits == 16:  # exact: bf16 bits, widened to fp32 at lookup
            table = self.files.get("model.embed_tokens.weight")
            parts = {"table": table.to(torch.bfloat16).view(torch.uint16).numpy()}
            self.report["model.embed_tokens"] = {"bits": 16, "carried": "exact (bf16)"}
            nb = None
        else:
            t32 = self._f32("model.embed_tokens.weight")
            nb = quantize_rows(t32, bits, embed_block(self.H, bits))
            err = float(np.abs(dequantize_nbits(nb) - t32).max())
            self.report["model.embed_tokens"] = {"bits": bits, "group": nb.block, "symmetric": True,
                                                 "carried": f"quantized at export from bf16 (max abs error {err:.3g})"}
            parts = {"B": nb.B, "scales": nb.scales}
        layout = {"bits": bits, "block": nb.block if nb else None, "hidden": self.H}
        with open(out_dir / EMBED_FILE, "wb") as f:
            for name, arr in parts.items():
                layout[name] = {"offset": write_aligned(f, arr), "shape": list(arr.shape), "dtype": arr.dtype.name}
        self.embedding = layout
        return nb

    def media(self, h: str, name: str, tok: int, feats: str) -> str:
        g, H = self.g, self.H
        p = f"model.{name}"
        y = g.op1("Add", [self.float_matmul(feats, f"{p}.proj_in.weight"),
                          g.const(f"{p}.proj_in.bias", self._f32(f"{p}.proj_in.bias"))])
        y = g.op1("Gelu", [y], "com.microsoft")
        y = g.op1("Add", [self.float_matmul(y, f"{p}.proj_out.weight"),
                          g.const(f"{p}.proj_out.bias", self._f32(f"{p}.proj_out.bias"))])  # [n, H]
        pos = g.op1("NonZero", [g.op1("Equal", [g.op1("Reshape", ["input_ids", g.const(g.name("shape"), np.array([-1], np.int64))]),
                                                  g.const(g.name("tok"), np.array([tok], np.int64))])])  # [1, n]
        h2 = g.op1("Reshape", [h, g.const(g.name("shape"), np.array([-1, H], np.int64))])
        h2 = g.op1("ScatterND", [h2, g.op1("Transpose", [pos], perm=[1, 0]), y])
        return g.op1("Reshape", [h2, g.const(g.name("shape"), np.array([1, -1, H], np.int64))])

    def build(self, out_dir: Path, progress: Callable[[str, int, int], None] | None) -> None:
        cfg, g = self.cfg, self.g
        D, nkv, V = cfg.head_dim, cfg.num_key_value_heads, cfg.vocab_size
        F32, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
        if cfg.vision_config is not None or cfg.audio_config is not None or cfg.num_experts:
            g.input("input_ids", I64, [1, "S"])  # placeholders and modality routing read the ids
        io = {"cos": g.input("cos", F32, ["P_plus_S", D // 2]), "sin": g.input("sin", F32, ["P_plus_S", D // 2]),
              "rope_pos": g.input("rope_pos", I64, [1, "S"]), "seqlens_k": g.input("seqlens_k", I32, [1]),
              "total_seq_len": g.input("total_seq_len", I32, [])}
        g.input("nontext_seen", TensorProto.BOOL, [1])
        g.input("num_logits", I64, [1])
        table = self.embed_table(out_dir)
        h = g.input("inputs_embeds", F32, [1, "S", self.H])
        for name, sub, tok, feat in (("vision_embed", cfg.vision_config, cfg.image_token_id, "image_patches"),
                                     ("audio_embed", cfg.audio_config, cfg.audio_token_id, "audio_features")):
            if sub is not None:
                g.input(feat, F32, [f"N_{feat}", sub.embed_in_dim])
                h = self.media(h, name, tok, feat)
        for i in range(cfg.num_hidden_layers):
            for kv in ("key", "value"):
                g.input(f"past_{kv}.{i}", F32, [1, nkv, "L", D])
        if cfg.num_experts:  # modality masks [T, 1] and the fusion rule (spec 4), once per graph
            flat = g.op1("Reshape", ["input_ids", g.const("flat_shape", np.array([-1], np.int64))])
            col = g.const("col_axis", np.array([-1], np.int64))
            mods = [g.op1("Equal", [flat, g.const(g.name("tok"), np.array([t if t is not None else -1], np.int64))])
                    for t in (cfg.image_token_id, cfg.audio_token_id)]
            nontext = g.op1("Or", mods)
            text = g.op1("Not", [nontext])
            io["is_mod"] = [g.op1("Unsqueeze", [m, col]) for m in [text] + mods]
            seen = g.op1("Greater", [g.op1("CumSum", [g.op1("Cast", [nontext], to=I32), g.const("zero_axis", np.array(0, np.int64))]),
                                     g.const("zero_i32", np.array([0], np.int32))])
            fusion_ok = g.op1("Or", [seen, "nontext_seen"])
            io["no_fusion"] = g.op1("Unsqueeze", [g.op1("Not", [fusion_ok]), col])
        delta = None
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            x, h = self.rms(h, f"{p}.input_layernorm.weight", delta)
            attn = self.attention(i, x, io)
            x, h = self.rms(h, f"{p}.post_attention_layernorm.weight", attn)
            delta = self.moe(i, x, io) if cfg.is_moe_layer(i) else self.swiglu(x, f"{p}.mlp.shared_experts")
            if progress:
                progress(f"export to ONNX: layer {i}", i + 1, cfg.num_hidden_layers)
        h = g.op1("Add", [h, delta])
        last = g.op1("Slice", [h, g.op1("Neg", ["num_logits"]), g.const("int_max", np.array([2**62], np.int64)),
                               g.const("seq_axis", np.array([1], np.int64))])
        x = self.rms(last, "model.norm.weight")[0]
        if cfg.tie_word_embeddings:
            if table is not None:
                self.matmul_nbits(x, table, "lm_head", out="logits")
                self.report["lm_head"] = {"bits": table.bits, "group": table.block,
                                          "carried": f"tied: the int{table.bits} embedding table"}
            else:
                self.float_matmul(x, "model.embed_tokens.weight", const="lm_head.weight_t", out="logits")
                self.report["lm_head"] = {"bits": 16, "carried": "tied: exact fp32"}
        else:
            g.op("Identity", [self.linear(x, "lm_head.weight")], out=["logits"])
        g.output("logits", F32, [1, "n", V])
        for i in range(cfg.num_hidden_layers):
            for kv in ("key", "value"):
                g.output(f"present_{kv}.{i}", F32, [1, nkv, "L", D])


def embed_block(hidden: int, bits: int = 8) -> int:
    """Values per scale of the quantized embedding table. int8: the largest of 128/64 dividing the
    hidden size, else 32 (MatMulNBits reads 8-bit blocks of 64/128 faster than llama.cpp's 32 as a
    tied lm_head); int4: 32, as llama.cpp's Q4_0."""
    return 32 if bits == 4 else next((b for b in (128, 64) if hidden % b == 0), 32)


def runtime_config(cfg: M3Config) -> dict:
    """What the ONNX runtime needs besides the graph (it never imports torch or the model file)."""
    return {
        "num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_inv_freq": [float(v) for v in rope_inv_freq(cfg).tolist()],
        "mrope_section": (cfg.rope_scaling or {}).get("mrope_section"),
        "image_token_id": cfg.image_token_id if cfg.vision_config is not None else None,
        "audio_token_id": cfg.audio_token_id if cfg.audio_config is not None else None,
        "image_embed_dim": cfg.vision_config.embed_in_dim if cfg.vision_config is not None else None,
        "audio_embed_dim": cfg.audio_config.embed_in_dim if cfg.audio_config is not None else None,
    }


def export_onnx(src: str | os.PathLike, out: str | os.PathLike, opt: ExportOptions | None = None, force: bool = False,
                progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Export a quantized checkpoint to OUT (model.onnx + model.onnx.data + manifest + tokenizer files).

    OUT appears only when complete (written next to it, then renamed)."""
    opt = opt or ExportOptions()
    opt.validate()
    src, out = Path(src), Path(out)
    cfg = read_config(src)
    if not cfg.quantization_config:
        raise M3Error(f"{src} is not quantized; run `m3edge quantize {src} --out QDIR` and export QDIR "
                      "(the ONNX path runs int4/int8 weights only)")
    if out.exists() and not force:
        raise M3Error(f"{out} exists; pass --force to replace it")
    files = TensorFiles(src)
    validate(cfg, files)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        g = _Graph(tmp / DATA)
        ex = _Exporter(src, cfg, files, g, opt)
        ex.build(tmp, progress)
        g.save(tmp / GRAPH)
        files.close()
        onnx.checker.check_model(str(tmp / GRAPH))
        for name in SIDE_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        manifest = {
            "format": FORMAT, "graph": GRAPH, "external_data": DATA, "opset": OPSET,
            "source": {"path": str(src.resolve()), "manifest_sha256": sha256_file(src / "manifest.json")
                       if (src / "manifest.json").exists() else None},
            "accuracy_level": opt.accuracy_level, "embed_bits": opt.embed_bits,
            "runtime": runtime_config(cfg),
            "embedding": ex.embedding,
            "files": {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in (GRAPH, DATA, EMBED_FILE)},
            "tensors": ex.report,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        share(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_onnx(model_dir: str | os.PathLike, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """An ONNX export of `model_dir`: itself if it is one, else its cached export, made (again) when
    missing or of another format (`m3edge.runtime.ort.cached_export_dir`)."""
    found = find_export(model_dir)
    if found is not None:
        return found
    out = cached_export_dir(model_dir)
    return export_onnx(model_dir, out, force=out.exists(), progress=progress)
