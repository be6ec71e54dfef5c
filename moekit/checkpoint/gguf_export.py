"""`moekit export-gguf`: a model directory written as one GGUF file that llama.cpp (and everything built on it:
llama-cpp-python, Ollama, LM Studio) runs, with the `gguf` package, llama.cpp's own Python library.

Types (TYPES): f32 / f16 / bf16; q8_0 and q4_0 (llama.cpp's blocks of 32); mxfp4 (the routed experts in MXFP4, as
ggml-org ships gpt-oss, the other matrices q8_0). Norms, biases, sinks and routers stay fp32, as llama.cpp's converter
keeps them; a matrix whose rows are not a whole number of blocks stays fp32. The same type for every matrix (no
per-layer mixture): what is measured against moekit is the same bits everywhere.

It streams: each tensor is made (dequantized where moekit holds it quantized), quantized and appended to a
temporary data file before the next; the header, which needs every tensor's shape, is written last in front of it.
The result appears under its name only when complete (temporary name, fsync, rename)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from moekit.checkpoint.files import checkpoint_dir, fsync_path
from moekit.checkpoint.gguf_arch import arch_for, gguf_tensors, metadata
from moekit.train.tokenizer import ByteTokenizer

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "mxfp4")
ALIGNMENT = 32  # the gguf package's default data alignment
# llama.cpp refuses a BPE vocabulary without merges and the gguf package drops empty arrays: one merge of two
# symbols that never form (no merge makes a two-character symbol) keeps the byte vocabulary exactly bytes.
INERT_MERGE = "ĀĀ ĀĀ"


def _qtypes(export_type: str):
    """{tensor kind: GGMLQuantizationType} of an export type."""
    import gguf

    Q = gguf.GGMLQuantizationType
    matrix = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "mxfp4": Q.Q8_0}[export_type]
    kinds = {"vector": Q.F32, "router": Q.F32, "matrix": matrix, "embedding": matrix, "head": matrix}
    return {**kinds, "experts": Q.MXFP4 if export_type == "mxfp4" else matrix}


def _file_type(export_type: str):
    import gguf

    F = gguf.LlamaFileType
    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
        "mxfp4": F.MOSTLY_MXFP4_MOE,
    }[export_type]


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    """The tensor's bytes in qtype: float arrays for F32/F16, uint8 [..., bytes per row] for the block types."""
    import gguf

    Q = gguf.GGMLQuantizationType
    a = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _storage(shape: tuple[int, ...], qtype):
    """qtype, or F32 where the rows are not whole blocks of it (llama.cpp's converter keeps those in float too)."""
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F32


def _byte_level_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes: a BPE vocabulary without merges is exactly moekit's byte
    tokenizer (token b is byte b)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _add_tokenizer(writer, directory: Path, vocab_size: int) -> str:
    """The model's vocabulary in the file: its tokenizer.json's BPE, moekit's bytes, or none (ids only). Returns
    which."""
    import gguf

    path = directory / "tokenizer.json"
    if path.is_file():
        tok = json.loads(path.read_text())
        model = tok.get("model", {})
        if model.get("type") == "BPE":
            vocab = dict(model["vocab"])
            control = {a["content"]: a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
            vocab.update({a["content"]: a["id"] for a in tok.get("added_tokens", [])})
            by_id = {i: s for s, i in vocab.items()}
            tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
            types = [
                gguf.TokenType.CONTROL
                if tokens[i] in control
                else gguf.TokenType.NORMAL
                if i in by_id
                else gguf.TokenType.UNUSED
                for i in range(vocab_size)
            ]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges or [INERT_MERGE])  # a merge-less BPE: its pieces are its tokens
            writer.add_add_bos_token(False)
            return "bpe"
    if vocab_size == ByteTokenizer.vocab_size and not path.is_file():
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(_byte_level_tokens())
        writer.add_token_types([gguf.TokenType.NORMAL] * 256)  # BYTE means <0xXX> text to llama.cpp
        writer.add_token_merges([INERT_MERGE])
        writer.add_add_bos_token(False)
        return "bytes"
    writer.add_tokenizer_model("none")
    return "none"


def _add_metadata(writer, cfg, arch: str) -> None:
    import gguf

    for method, value in metadata(cfg, arch):
        if method == "add_rope_scaling_type":
            value = {"linear": gguf.RopeScalingType.LINEAR, "yarn": gguf.RopeScalingType.YARN}[value]
        elif method == "add_expert_gating_func":
            value = gguf.ExpertGatingFuncType(value)
        getattr(writer, method)(value)


def export_gguf(
    model_dir: str | Path,
    out: str | Path,
    export_type: str = "f16",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the model at model_dir as the GGUF file out; returns a report (architecture, tensors and bytes per
    storage type, vocabulary kind)."""
    import gguf

    import moekit

    if export_type not in TYPES:
        raise ValueError(f"--type {export_type!r} is invalid: allowed one of {', '.join(TYPES)}")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists (moekit never overwrites an export)")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent}: no such directory")
    directory = checkpoint_dir(model_dir)
    model = moekit.from_pretrained(directory, dtype=None)  # per tensor to fp32 below, never the whole model
    cfg = model.config
    arch = arch_for(cfg)
    qtypes = _qtypes(export_type)
    tmp, data_tmp = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.data.tmp")
    counts: dict[str, dict[str, int]] = {}
    try:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_name(cfg.name or directory.name)
        writer.add_file_type(_file_type(export_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_metadata(writer, cfg, arch)
        vocabulary = _add_tokenizer(writer, directory, cfg.vocab_size)
        tensors = list(gguf_tensors(model, arch))
        with open(data_tmp, "wb") as data:
            for done, t in enumerate(tensors, 1):
                with torch.no_grad():
                    w = t.get()
                qtype = _storage(tuple(w.shape), qtypes[t.kind])
                encoded = _encode(w, qtype)
                raw = None if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else qtype
                writer.add_tensor_info(t.name, encoded.shape, encoded.dtype, encoded.nbytes, raw_dtype=raw)
                encoded.tofile(data)
                data.write(b"\0" * (-encoded.nbytes % ALIGNMENT))
                c = counts.setdefault(qtype.name, {"tensors": 0, "bytes": 0})
                c["tensors"] += 1
                c["bytes"] += encoded.nbytes
                if progress:
                    progress(done, len(tensors))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        with open(data_tmp, "rb") as data:
            shutil.copyfileobj(data, fout, 16 * 2**20)
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.replace(tmp, out)
        fsync_path(out.parent)
    finally:
        for path in (tmp, data_tmp):
            path.unlink(missing_ok=True)
    return {
        "out": str(out),
        "architecture": arch.name,
        "type": export_type,
        "vocabulary": vocabulary,
        "storage": counts,
    }
