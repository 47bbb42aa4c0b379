"""Host weight cache: each model component's weights in shared memory once per engine.

The first worker that loads a component (text encoder, transformer, VAE ...) from the model
folder publishes every tensor of it into one engine-owned shared-memory segment, next to a JSON
manifest (class, config, tensor table). Any later load of that component in any worker of the
engine -- a move to another stage, a replacement after a crash, a second instance -- builds the
module skeleton on the meta device and points its parameters and buffers at the segment: no
safetensors read or parse, no copy on the CPU (the weights are shared pages, so N instances of
a stage hold one copy), one host->device copy on a GPU.

    weights.attach(segment_prefix, run_dir)            # once per worker process
    pipe = pretrained(StableDiffusion3Pipeline, path, transformer=None, ...)
        -> from_pretrained(path, ..., text_encoder=<from the cache>, ...)
    weights.publish(pipe)                              # after a load from disk

Segments carry the engine's prefix: they go when the engine closes, and a worker that outlives
a killed engine unlinks them with the rest (stages/worker.py). A cache that cannot be built
(no room in /dev/shm, a module that cannot be rebuilt on meta) only costs the disk load.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..engine.transport.base import byte_view, dtype_from_name
from ..engine.transport.shm import Segment, ShmFull
from ..engine.transport.shm_files import unlink_segment

log = logging.getLogger("dfuse.weights")

PAGE = 4096
_cache: "HostWeights | None" = None


_variant: str | None = None  # the engine's `variant` (fp16): every from_pretrained of this process loads it


def attach(segment_prefix: str, run_dir: str, variant: str | None = None) -> None:
    """Use the engine's cache in this process (workers call this before loading a stage)."""
    global _cache, _variant
    _cache = HostWeights(segment_prefix, run_dir)
    _variant = variant


def pretrained(cls, path, **kwargs) -> Any:
    """`cls.from_pretrained(path, **kwargs)`, taking components the cache holds from it.

    A pipeline class gets the cached components it would otherwise load (those not passed
    explicitly); a model class with `subfolder=` is returned from the cache whole."""
    dtype = kwargs.get("dtype")
    if _variant is not None:
        kwargs["variant"] = _variant
    subfolder = kwargs.get("subfolder")
    if subfolder is not None:
        module = _cache.restore(subfolder, dtype) if _cache is not None else None
        if module is None:
            module = cls.from_pretrained(path, **kwargs)
        module._cache_name = subfolder  # how publish() files it
        return module
    if _cache is None:
        return cls.from_pretrained(path, **kwargs)
    wanted = [name for name in _component_names(path) if name not in kwargs]
    cached = {name: m for name in wanted if (m := _cache.restore(name, dtype)) is not None}
    return cls.from_pretrained(path, **kwargs, **cached)


def publish(model: Any, dtype: torch.dtype) -> None:
    """Put every component of a loaded stage model in the cache (those not there yet)."""
    if _cache is not None:
        for name, module in _modules(model).items():
            _cache.publish(name, dtype, module)


class HostWeights:
    def __init__(self, segment_prefix: str, run_dir: str):
        self.prefix = segment_prefix
        self.dir = Path(run_dir) / "weights"
        self._segments: dict[str, Segment] = {}  # mapped here: the restored modules view them

    def _key(self, name: str, dtype) -> str:
        return f"{name}.{str(dtype).removeprefix('torch.')}"

    def restore(self, name: str, dtype) -> torch.nn.Module | None:
        key = self._key(name, dtype)
        try:
            manifest = json.loads((self.dir / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None  # not published (yet)
        try:
            segment = self._segments.get(key) or Segment(manifest["segment"])
            module = _rebuild(manifest, segment.data)
        except Exception as e:  # a component this cache cannot rebuild: load it from disk
            log.warning("host weight cache: could not rebuild %s (%s); loading it from disk", key, e)
            return None
        self._segments[key] = segment
        return module

    def publish(self, name: str, dtype, module: torch.nn.Module) -> None:
        key = self._key(name, dtype)
        manifest_path = self.dir / f"{key}.json"
        if manifest_path.exists():
            return
        tensors, offsets, size = [], {}, 0
        for tensor_name, kind, tensor in _tensors(module):
            storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
            if storage not in offsets:  # tied weights are stored once and stay tied
                # Keep the tensor's address modulo a page: CPU kernels pick their code path by
                # alignment, so a copy aligned otherwise computes different last bits than
                # diffusers' own pipeline, whose weights sit in the mmapped safetensors file.
                size += (tensor.data_ptr() - size) % PAGE
                offsets[storage] = size
                size += tensor.numel() * tensor.element_size()
            tensors.append([tensor_name, kind, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offsets[storage]])
        segment_name = f"{self.prefix}wt_{key}"
        try:
            segment = Segment(segment_name, max(size, 1), create=True)
        except FileExistsError:
            return  # another worker is publishing it right now
        except ShmFull as e:  # /dev/shm too small for this component: the cache is only a shortcut
            log.warning("host weight cache: no room in shared memory for %s (%d MiB): %s; later loads of it "
                        "read it from disk", key, size >> 20, e)
            return
        except OSError as e:
            log.warning("host weight cache: cannot create a segment for %s (%d MiB): %s; later loads of it "
                        "read it from disk", key, size >> 20, e)
            return
        try:
            for (tensor_name, kind, tensor), (_, _, dtype_name, shape, offset) in zip(_tensors(module), tensors):
                byte_view(segment.data, offset, tuple(shape), tensor.dtype).copy_(tensor.detach())
            manifest = {"segment": segment_name, "bytes": size, "tensors": tensors, **_describe(module)}
            self.dir.mkdir(mode=0o700, exist_ok=True)
            tmp = manifest_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(manifest))
            os.replace(tmp, manifest_path)  # readers see a complete manifest or none
        except OSError as e:  # e.g. the run dir's disk is full: no manifest, so no segment either
            unlink_segment(segment_name)
            log.warning("host weight cache: cannot publish %s (%s); later loads of it read it from disk", key, e)
            return
        self._segments[key] = segment


def _tensors(module: torch.nn.Module):
    """(name, "param" | "buffer", tensor) for every tensor, tied names included."""
    for name, p in module.named_parameters(remove_duplicate=False):
        yield name, "param", p
    for name, b in module.named_buffers(remove_duplicate=False):
        yield name, "buffer", b


def _describe(module: torch.nn.Module) -> dict:
    cls = type(module)
    config = module.config
    if hasattr(config, "to_dict") and not isinstance(config, dict):  # transformers
        return {"library": "transformers", "class": _path(cls), "config_class": _path(type(config)),
                "config": config.to_dict()}
    return {"library": "diffusers", "class": _path(cls), "config": dict(config)}


def _rebuild(manifest: dict, data: torch.Tensor) -> torch.nn.Module:
    cls = _import(manifest["class"])
    with torch.device("meta"):
        if manifest["library"] == "transformers":
            config = _import(manifest["config_class"]).from_dict(manifest["config"])
            module = cls._from_config(config)
        else:
            module = cls.from_config(manifest["config"])
    for name, kind, dtype, shape, offset in manifest["tensors"]:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        view = byte_view(data, offset, tuple(shape), dtype_from_name(dtype))
        if kind == "param":
            owner._parameters[leaf] = torch.nn.Parameter(view, requires_grad=False)
        else:
            owner._buffers[leaf] = view
    left = [f"{m}.{k}" for m, sub in module.named_modules() for k, v in vars(sub).items()
            if isinstance(v, torch.Tensor) and v.is_meta]
    left += [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"tensors the cache does not hold: {left[:5]}")
    return module.eval()


def _modules(model: Any) -> dict[str, torch.nn.Module]:
    """The named nn.Module components of a stage model: a pipeline, a (pipeline, scheduler)
    pair, or one model with a `_cache_name` (the VAE of a decoder stage)."""
    if isinstance(model, (tuple, list)):
        found = {}
        for part in model:
            found.update(_modules(part))
        return found
    components = getattr(model, "components", None)
    if isinstance(components, dict):
        return {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}
    if isinstance(model, torch.nn.Module) and getattr(model, "_cache_name", None):
        return {model._cache_name: model}
    return {}


def _component_names(path) -> list[str]:
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return []
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]


def _path(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(path: str):
    module, _, name = path.partition(":")
    if module.split(".")[0] not in ("diffusers", "transformers"):  # the manifest names only these
        raise ValueError(f"refusing to import {path!r} from a weight manifest")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj
