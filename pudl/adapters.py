"""Adapter files: the MLX LoRA state (safetensors) and the GGUF LoRA llama.cpp samples with.

The student trains on the GGUF's own tensor layout (q/k rows already permuted for rope), so the GGUF LoRA
needs no re-permutation: only the transpose from MLX's x @ A @ B to GGUF's (r, in) / (out, r) matrices.
llama.cpp scales the update by alpha / r, the same as `pudl.models.LoRALinear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from pudl.errors import UserError
from pudl.atomic_files import atomic_save


def save_adapter(student, path: Path):
    """The LoRA tensors as MLX safetensors (what `load_adapter` and resume read)."""
    metadata = {"rank": str(student.lora_rank), "alpha": str(student.lora_alpha)}
    atomic_save(path, lambda p: mx.save_safetensors(p, student.lora_state(), metadata=metadata))


def load_adapter(student, path: Path):
    """Load LoRA tensors saved by `save_adapter` into the student (shape-checked)."""
    try:
        state = mx.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a pudl adapter ({e})") from None
    student.load_lora_state(state)


def write_gguf_lora(student, path: Path):
    """The current LoRA as a GGUF adapter that `Llama(lora_path=...)` / `llama-cli --lora` load."""
    import gguf

    def write(tmp: str):
        writer = gguf.GGUFWriter(tmp, arch=student.args.model_type)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(student.lora_alpha))
        for name, layer in student.lora_layers.items():
            a = np.ascontiguousarray(np.array(layer.lora_a, np.float32).T)  # (r, in)
            b = np.ascontiguousarray(np.array(layer.lora_b, np.float32).T)  # (out, r)
            writer.add_tensor(f"{name}.weight.lora_a", a)
            writer.add_tensor(f"{name}.weight.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_save(path, write)


@dataclass(frozen=True)
class GGUFLora:
    rank: int
    alpha: float
    targets: list[str]  # recipe names (q_proj, ...)
    state: dict  # MLX layout, as `Student.lora_state`


def read_gguf_lora(path: Path) -> GGUFLora:
    """Read a GGUF LoRA written by `write_gguf_lora` back into MLX layout."""
    import gguf

    from pudl.models import TARGET_TO_GGUF

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a GGUF LoRA ({e})") from None
    fields = {f.name: f for f in reader.fields.values()}
    if "adapter.lora.alpha" not in fields:
        raise UserError(f"{path}: not a GGUF LoRA (no adapter.lora.alpha)")
    alpha = float(fields["adapter.lora.alpha"].parts[-1][0])
    state, targets, rank = {}, set(), None
    to_target = {v: k for k, v in TARGET_TO_GGUF.items()}
    for t in reader.tensors:
        name = t.name.replace(".weight.lora_", ".lora_")
        data = np.array(t.data, np.float32).T  # back to a [in, r] / b [r, out]
        state[name] = mx.array(np.ascontiguousarray(data))
        targets.add(to_target[name.split(".")[2]])
        if name.endswith("lora_a"):
            rank = data.shape[1]
    if rank is None:
        raise UserError(f"{path}: GGUF LoRA holds no tensors")
    return GGUFLora(rank, alpha, sorted(targets), state)
