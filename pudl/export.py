"""A run's final adapter in the formats other tools load: mlx-lm, PEFT, GGUF LoRA, and a fused GGUF.

pudl trains on the GGUF's tensor layout, where llama q/k rows are permuted for llama.cpp's interleaved rope.
The GGUF formats keep that layout; mlx-lm and PEFT adapters sit on the Hugging Face directory of
`pudl.hfdir.write_hf_dir`, so the output rows of q/k LoRA B matrices are put back in Hugging Face order there.
Every format applies W + (alpha / r) · B A: PEFT's `lora_alpha / r`, llama.cpp's `adapter.lora.alpha / r`,
and mlx-lm's `scale` (a plain multiplier, written as alpha / r).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pudl.errors import UserError
from pudl.hfdir import GGUFModel, hf_name, unpermute_rope

FORMATS = ("mlx", "peft", "gguf-lora", "gguf-fused")
QUANTS = ("q8_0", "q4_0", "f16", "f32")
GGUF_TO_TARGET = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
                  "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


@dataclass(frozen=True)
class Lora:
    """A LoRA in pudl's layout: state['blk.N.attn_q.lora_a'] [in, r], ['...lora_b'] [r, out] (GGUF row order)."""

    source: Path
    rank: int
    alpha: float
    state: dict[str, np.ndarray]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def modules(self) -> list[str]:
        """'blk.N.attn_q' names, in layer order."""
        names = {k.rsplit(".", 1)[0] for k in self.state}
        return sorted(names, key=lambda n: (int(n.split(".")[1]), n))

    @property
    def targets(self) -> list[str]:
        return sorted({GGUF_TO_TARGET[m.split(".")[2]] for m in self.modules})

    def delta(self, module: str) -> np.ndarray:
        """scale · (A B)ᵀ: the [out, in] update of one weight, in float64 (GGUF row order)."""
        a = self.state[module + ".lora_a"].astype(np.float64)
        b = self.state[module + ".lora_b"].astype(np.float64)
        return self.scale * (a @ b).T


def final_adapter(run_dir: Path) -> Path:
    """The run's newest adapter: the last round's adapter.safetensors, else RUN_DIR/adapter.gguf."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    rounds = []
    for d in run_dir.glob("round-*"):
        if re.fullmatch(r"round-\d+", d.name) and (d / "adapter.safetensors").is_file():
            rounds.append((int(d.name.split("-")[1]), d / "adapter.safetensors"))
    if rounds:
        return max(rounds)[1]
    if (run_dir / "adapter.gguf").is_file():
        return run_dir / "adapter.gguf"
    raise UserError(f"{run_dir}: no adapter yet (no round-N/adapter.safetensors or adapter.gguf); "
                    "run or resume the recipe first")


def read_lora(path: Path) -> Lora:
    """A pudl adapter file (MLX safetensors with rank/alpha metadata, or a GGUF LoRA) as numpy arrays."""
    path = Path(path)
    if path.suffix == ".gguf":
        from pudl.adapters import read_gguf_lora

        g = read_gguf_lora(path)
        return Lora(path, g.rank, g.alpha, {k: np.array(v, np.float32) for k, v in g.state.items()})
    import mlx.core as mx

    try:
        state, meta = mx.load(str(path), return_metadata=True)
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
    except Exception as e:  # a foreign or damaged file
        raise UserError(f"{path}: not a pudl adapter ({e})") from None
    return Lora(path, rank, alpha, {k: np.array(v.astype(mx.float32)) for k, v in state.items()})


def run_base_model(run_dir: Path, base: str | None) -> Path:
    """The run's student GGUF: `base` when given, else the student.model of the recipe named in summary.json."""
    from pudl.models import resolve_model_path

    if base:
        return resolve_model_path(base)
    summary = Path(run_dir) / "summary.json"
    hint = "pass --base (the student's .gguf or built-in name)"
    if not summary.is_file():
        raise UserError(f"{run_dir}: no summary.json to find the base model in; {hint}")
    recipe_path = json.loads(summary.read_text()).get("recipe")
    if not recipe_path or not Path(recipe_path).is_file():
        raise UserError(f"{summary}: the run's recipe {recipe_path!r} is not found from here; {hint}")
    from pudl.recipe import load_recipe

    from pudl.runtime import student_model_path

    return student_model_path(load_recipe(recipe_path))


def check_fits(lora: Lora, model: GGUFModel):
    """Every LoRA pair matches its base weight's shape (else the run used another model)."""
    for module in lora.modules:
        name = module + ".weight"
        if name not in model.tensors:
            raise UserError(f"{lora.source}: {module} has no base weight in {model.path} (another model? --base)")
        out_dims, in_dims = model.tensors[name][0]
        a, b = lora.state[module + ".lora_a"], lora.state[module + ".lora_b"]
        if a.shape != (in_dims, lora.rank) or b.shape != (lora.rank, out_dims):
            raise UserError(f"{lora.source}: {module} does not fit {model.path} "
                            f"(LoRA {a.shape[0]}->{b.shape[1]}, base {in_dims}->{out_dims}); another model? --base")


def hf_lora(lora: Lora, model: GGUFModel) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Hugging Face module path -> (A [r, in], B [out, r]) with q/k output rows in Hugging Face order."""
    n_heads = int(model.hparam("attention.head_count"))
    n_kv = int(model.hparam("attention.head_count_kv", n_heads))
    out = {}
    for module in lora.modules:
        a = lora.state[module + ".lora_a"].T  # [r, in]
        b = lora.state[module + ".lora_b"].T  # [out, r]
        kind = module.split(".")[2]
        if kind in ("attn_q", "attn_k"):
            b = unpermute_rope(b, n_heads if kind == "attn_q" else n_kv)
        out[hf_name(module + ".weight")[: -len(".weight")]] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    return out


def _hf_base(model: GGUFModel, hf_base: Path | None) -> str:
    """Where the Hugging Face base lives: written from the GGUF on first use, so adapter and base agree."""
    if hf_base is None:
        return str(model.path)
    from pudl.hfdir import write_hf_dir

    if not (hf_base / "config.json").is_file():
        write_hf_dir(model.path, hf_base)
    return str(hf_base.resolve())


def write_mlx(lora: Lora, model: GGUFModel, out: Path, base_ref: str):
    """mlx-lm adapter directory: adapters.safetensors (lora_a [in, r], lora_b [r, out]) + adapter_config.json."""
    from pudl.hfdir import save_safetensors

    tensors = {}
    for path, (a, b) in hf_lora(lora, model).items():
        tensors[path + ".lora_a"], tensors[path + ".lora_b"] = a.T, b.T
    out.mkdir(parents=True)
    save_safetensors(tensors, out / "adapters.safetensors")
    keys = sorted({".".join(p.split(".")[3:]) for p in hf_lora(lora, model)})  # 'self_attn.q_proj'
    config = {
        "model": base_ref,
        "fine_tune_type": "lora",
        "num_layers": int(model.hparam("block_count")),
        # mlx-lm multiplies the update by `scale` itself (no division by rank): pudl's alpha / rank
        "lora_parameters": {"rank": lora.rank, "scale": lora.scale, "dropout": 0.0, "keys": keys},
        "pudl": {"alpha": lora.alpha, "source": str(lora.source)},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_peft(lora: Lora, model: GGUFModel, out: Path, base_ref: str):
    """PEFT LoRA directory: adapter_model.safetensors + adapter_config.json (peft_type LORA)."""
    from pudl.hfdir import save_safetensors

    tensors = {}
    for path, (a, b) in hf_lora(lora, model).items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a
        tensors[f"base_model.model.{path}.lora_B.weight"] = b
    out.mkdir(parents=True)
    save_safetensors(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": lora.targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_gguf_lora(lora: Lora, model: GGUFModel, out: Path):
    """The GGUF LoRA llama.cpp loads (`--lora`, `Llama(lora_path=...)`): a, b in GGUF row order."""
    import gguf

    writer = gguf.GGUFWriter(str(out), arch=model.arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(lora.alpha))
    for module in lora.modules:
        writer.add_tensor(f"{module}.weight.lora_a", np.ascontiguousarray(lora.state[module + ".lora_a"].T))
        writer.add_tensor(f"{module}.weight.lora_b", np.ascontiguousarray(lora.state[module + ".lora_b"].T))
    _finish(writer)


def write_gguf_fused(lora: Lora, model: GGUFModel, out: Path, quant: str = "q8_0", on_tensor=None):
    """Base + merged LoRA as one GGUF at `quant` (norms stay float32), metadata and tokenizer from the base."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    qtype = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "f16": Q.F16, "f32": Q.F32}[quant]
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[quant]
    writer = gguf.GGUFWriter(str(out), arch=model.arch)
    model.copy_metadata(writer, replace={"general.file_type": int(file_type)})
    if "general.file_type" not in model.fields:
        writer.add_file_type(int(file_type))
    modules = set(lora.modules)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for name in model.tensors:
        w = model.tensor(name)
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in modules:
            w = (w.astype(np.float64) + lora.delta(module)).astype(np.float32)
        if w.ndim == 1 or w.shape[-1] % block:  # norms (and rows that do not fill a block) stay float32
            writer.add_tensor(name, w)
        elif qtype == Q.F32:
            writer.add_tensor(name, w)
        elif qtype == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(w, qtype), raw_dtype=qtype)
        if on_tensor:
            on_tensor()
    _finish(writer)


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_run(run_dir: str | Path, fmt: str, out: str | Path, base: str | None = None, quant: str = "q8_0",
               hf_base: str | Path | None = None, force: bool = False, on_tensor=None) -> dict:
    """Export RUN_DIR's final adapter as `fmt` to `out`; returns what was written (for the CLI to print)."""
    if fmt not in FORMATS:
        raise UserError(f"--to {fmt!r}: unknown format (choose {', '.join(FORMATS)})")
    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: unknown (choose {', '.join(QUANTS)})")
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not force:
        raise UserError(f"--out {out}: already exists (pass --force to replace it)")
    lora = read_lora(final_adapter(run_dir))
    model = GGUFModel(run_base_model(run_dir, base))
    check_fits(lora, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    _remove(tmp)
    if fmt in ("mlx", "peft"):
        base_ref = _hf_base(model, Path(hf_base) if hf_base else None)
        (write_mlx if fmt == "mlx" else write_peft)(lora, model, tmp, base_ref)
    elif fmt == "gguf-lora":
        write_gguf_lora(lora, model, tmp)
    else:
        write_gguf_fused(lora, model, tmp, quant, on_tensor=on_tensor)
    _remove(out)
    os.replace(tmp, out)
    info = {"format": fmt, "out": str(out.resolve()), "adapter": str(lora.source), "base": str(model.path),
            "rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets}
    if fmt in ("mlx", "peft"):
        info["hf_base"] = base_ref
    if fmt == "gguf-fused":
        info["quant"] = quant
    return info


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
