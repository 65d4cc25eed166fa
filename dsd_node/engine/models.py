"""Loading models and pipeline shards: a shard holds only its own layers' weights.

A decoder-only causal LM is seen as: token embeddings (plus learned position embeddings for
GPT-2-like models), a list of decoder layers, a final norm and an LM head. Any family with that
shape loads without new code; a family without it gets an error naming what is missing.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn

from dsd_node.engine.device import DTYPES as DTYPES  # re-exported: the dtype names
from dsd_node.engine.device import checkpoint_dtype, resolve_device, resolve_dtype

EMBEDDED_TARGET = "embedded:target"
EMBEDDED_DRAFTER = "embedded:drafter"


class ModelError(ValueError):
    """A model that cannot be loaded or sharded, with a message meant for the user."""


def resolve_model_path(source: str) -> Path:
    """A local directory for `source`: "embedded:target", a local path, or a Hugging Face hub id."""
    if source.startswith("embedded:"):
        path = Path(str(files("dsd_node") / "embedded" / source.split(":", 1)[1]))
        if not (path / "config.json").exists():
            raise ModelError(f"unknown embedded model {source!r} (have embedded:target, embedded:drafter)")
        return path
    path = Path(source).expanduser()
    if not path.exists() and looks_like_path(source):
        raise ModelError(f"no such directory: {source}")
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # network, auth, unknown repo: one clear message
        raise ModelError(f"cannot load model {source!r}: not a local directory, and the hub said: {e}") from e


def looks_like_path(source: str) -> bool:
    """"./x", "../x", "/x", "~/x", ".", or more than one separator: a path (a hub id is "org/name" or "name")."""
    return source in (".", "..") or source.startswith(("./", "../", "/", "~")) or source.count("/") > 1 \
        or (os.sep != "/" and os.sep in source)


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(source))


def check_same_tokenizer(target_tok, drafter_tok, target: str, drafter: str) -> None:
    """Refuse a target/drafter pair whose tokenizers differ: draft token ids would mean other text."""
    if target_tok.get_vocab() != drafter_tok.get_vocab():
        raise ModelError(
            f"drafter {drafter!r} does not share the tokenizer of target {target!r} "
            f"(vocabularies differ: {len(target_tok)} vs {len(drafter_tok)} tokens); pick a drafter of the same family"
        )


def weights_hash(source: str) -> str:
    """A short hash identifying a model's weights: config plus the name, size and head of each weight file."""
    path = resolve_model_path(source)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


@dataclass
class Parts:
    """Where the pieces of a causal LM live inside its Hugging Face module tree."""

    layers_name: str  # e.g. "model.layers"
    embed_name: str  # e.g. "model.embed_tokens"
    pos_embed_name: str | None  # e.g. "transformer.wpe" (learned absolute positions), else None
    norm_name: str  # e.g. "model.norm"
    head_name: str  # e.g. "lm_head"
    rotary_name: str | None  # e.g. "model.rotary_emb"


def _find_parts(model: nn.Module, num_layers: int) -> Parts:
    names = dict(model.named_modules())
    layers = [n for n, m in names.items() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    base = layers[0].rsplit(".", 1)[0] if layers and "." in layers[0] else ""
    prefix = f"{base}." if base else ""
    norm = next((prefix + n for n in ("norm", "ln_f", "final_layernorm", "final_layer_norm") if prefix + n in names), None)
    rotary = prefix + "rotary_emb" if prefix + "rotary_emb" in names else None
    pos = prefix + "wpe" if prefix + "wpe" in names else None
    missing = [what for what, found in
               (("a list of decoder layers", layers), ("token embeddings", embed), ("an LM head", head), ("a final norm", norm))
               if not found]
    if missing:
        raise ModelError(f"{type(model).__name__} is not a decoder-only LM of the supported shape: no {', no '.join(missing)}")
    by_id = {id(m): n for n, m in names.items()}
    return Parts(layers[0], by_id[id(embed)], pos, norm, by_id[id(head)], rotary)


def _safetensors_device(device: torch.device) -> str:
    """The device string safetensors reads straight onto ("cpu", "cuda:N", "mps")."""
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def _checkpoint_tensors(path: Path, wanted: set[str], aliases: dict[str, str],
                        device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Read only the wanted tensors from the safetensors files of `path`, each straight onto `device`."""
    from safetensors import safe_open

    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelError(f"{path} has no .safetensors weights (only safetensors checkpoints are supported)")
    out: dict[str, torch.Tensor] = {}
    target = _safetensors_device(device or torch.device("cpu"))
    for shard in shards:
        with safe_open(str(shard), framework="pt", device=target) as f:
            for key in f.keys():
                name = aliases.get(key, key)
                if name in wanted:
                    out[name] = f.get_tensor(key)
    return out


@dataclass
class Shard:
    """Layers [start, end) of a causal LM: the first shard embeds, the last applies norm and LM head."""

    model_id: str
    config: object
    start: int
    end: int
    num_layers: int
    layers: nn.ModuleList
    embed: nn.Module | None
    pos_embed: nn.Module | None
    norm: nn.Module | None
    head: nn.Module | None
    rotary: nn.Module | None
    dtype: torch.dtype
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size


def num_layers_of(config) -> int:
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not n:
        raise ModelError(f"config of type {type(config).__name__} names no number of decoder layers")
    return int(n)


def _resolve(config, dtype: str | torch.dtype, device: str | torch.device) -> tuple[torch.dtype, torch.device]:
    dev = resolve_device(device)
    try:
        return resolve_dtype(dtype, dev, checkpoint_dtype(config)), dev
    except ValueError as e:
        raise ModelError(str(e)) from e


def _materialize(keep: dict[str, nn.Module], tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Give the meta-device modules in `keep` the checkpoint's tensors (already on their device), in `dtype`.

    The tensors are assigned, not copied into preallocated parameters: the device never holds a
    module twice. Tied weights stay one tensor. Integer buffers keep their dtype."""
    converted: dict[int, torch.Tensor] = {}

    def cast(v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            return v
        if id(v) not in converted:
            converted[id(v)] = v.to(dtype)
        return converted[id(v)]

    for name, mod in keep.items():
        prefix = name + "."
        sd = {k[len(prefix):]: cast(v) for k, v in tensors.items() if k.startswith(prefix)}
        mod.load_state_dict(sd, strict=True, assign=True)
        left = [n for n, t in [*mod.named_parameters(), *mod.named_buffers()] if t.is_meta]
        if left:  # a non-persistent buffer the checkpoint cannot provide
            raise ModelError(f"{type(mod).__name__} ({name}) has state that is not in the checkpoint: {left[:3]}")
        mod.requires_grad_(False)
        mod.eval()


def load_shard(source: str, start: int = 0, end: int | None = None, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu") -> Shard:
    """Load layers [start, end) of `source` onto `device`, reading only those layers' weights (plus embeddings/head
    at the ends) from the safetensors files, straight onto the device: the module tree is built on the meta
    device, so neither the whole model nor the shard ever sits in host memory on its way to a GPU.

    dtype: auto | bfloat16 | float16 | float32 (or a torch.dtype); device: auto | cpu | cuda | cuda:N | mps
    (or a torch.device). See dsd_node.engine.device for what auto means."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(source)
    config = AutoConfig.from_pretrained(path)
    dt, dev = _resolve(config, dtype, device)
    n = num_layers_of(config)
    end = n if end is None else end
    if not 0 <= start < end <= n:
        raise ModelError(f"layer range {start}:{end} is not inside the model's {n} layers (0:{n})")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    parts = _find_parts(model, n)
    keep: dict[str, nn.Module] = {f"{parts.layers_name}.{i}": model.get_submodule(parts.layers_name)[i] for i in range(start, end)}
    if start == 0:
        keep[parts.embed_name] = model.get_submodule(parts.embed_name)
        if parts.pos_embed_name:
            keep[parts.pos_embed_name] = model.get_submodule(parts.pos_embed_name)
    if end == n:
        keep[parts.norm_name] = model.get_submodule(parts.norm_name)
        keep[parts.head_name] = model.get_submodule(parts.head_name)
    wanted = {f"{name}.{p}" for name, mod in keep.items() for p in mod.state_dict()}
    # checkpoints may omit the base-model prefix (GPT-2 on the hub: "h.0..." for "transformer.h.0...")
    prefix = parts.layers_name.split(".")[0] + "."
    aliases = {w[len(prefix):]: w for w in wanted if w.startswith(prefix)}
    head_w, embed_w = f"{parts.head_name}.weight", f"{parts.embed_name}.weight"
    tied = end == n and getattr(config, "tie_word_embeddings", False)
    if tied:
        aliases[embed_w[len(prefix):]] = embed_w
    tensors = _checkpoint_tensors(path, wanted | ({embed_w} if tied else set()), aliases, dev)
    if tied and head_w not in tensors and embed_w in tensors:
        tensors[head_w] = tensors[embed_w]
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise ModelError(f"checkpoint {path} lacks {len(missing)} tensors this shard needs, e.g. {missing[:3]}")
    _materialize(keep, tensors, dt)
    del tensors
    rotary = None
    if parts.rotary_name:  # its buffers are computed from the config, in float32 as Hugging Face does
        rotary = type(model.get_submodule(parts.rotary_name))(config=config).to(dev).eval()
    layers = nn.ModuleList([keep[f"{parts.layers_name}.{i}"] for i in range(start, end)])
    return Shard(
        model_id=source, config=config, start=start, end=end, num_layers=n, layers=layers,
        embed=keep.get(parts.embed_name), pos_embed=keep.get(parts.pos_embed_name) if parts.pos_embed_name else None,
        norm=keep.get(parts.norm_name), head=keep.get(parts.head_name), rotary=rotary, dtype=dt, device=dev,
    )


def max_positions(config_or_source) -> int | None:
    """The most positions the model can attend over (max_position_embeddings / n_positions), None if unbounded.

    Takes a config, a Shard, or a model source (see resolve_model_path)."""
    if isinstance(config_or_source, Shard):
        config = config_or_source.config
    elif isinstance(config_or_source, (str, Path)):
        config = load_config(str(config_or_source))
    else:
        config = getattr(config_or_source, "config", config_or_source)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def split_layers(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Cut num_layers into `stages` contiguous ranges as evenly as possible."""
    if not 1 <= stages <= num_layers:
        raise ModelError(f"cannot cut {num_layers} layers into {stages} stages (need 1 to {num_layers})")
    bounds = [round(i * num_layers / stages) for i in range(stages + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def parse_layers(spec: str) -> tuple[int, int]:
    """Parse "A:B" into (A, B)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
    if not m or int(m[1]) >= int(m[2]):
        raise ValueError(f"bad layer range {spec!r}: expected A:B with A < B, e.g. 0:4")
    return int(m[1]), int(m[2])


def load_config(source: str):
    """The model's Hugging Face config (no weights read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(source))


def model_num_layers(source: str) -> int:
    return num_layers_of(load_config(source))
