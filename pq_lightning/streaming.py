"""Decoder layers streamed to the device one at a time, under a memory cap: models larger than memory.

A :class:`LayerStreamer` takes the weights of a model's decoder layers out of the model and serves
them from a :class:`WeightStore`: the safetensors files of the checkpoint (:class:`SafetensorsWeights`,
disk offload: the model never has to fit in host memory) or host-memory copies
(:class:`HostWeights`, for a device smaller than the model). A layer's tensors are put on the device
when the layer runs (a forward pre-hook) and dropped again when another layer needs the room: at most
``max_resident_layers`` layers are on the device at once, fixed by the memory cap. Everything else
(embeddings, final norm, ``lm_head``, any vision tower) stays where it is and counts against the cap.

While streamed, a layer's parameters are plain tensor attributes of their modules (``module.weight``
is a meta tensor when the layer is not resident), so ``model.parameters()``, ``model.to(...)`` and
Lightning's device moves see only the resident, non-layer weights. Forward code is unchanged:
``F.linear(x, self.weight)`` reads the attribute at call time.

Three users, all exact (the results equal an in-memory run; ``tests/test_streaming.py``):

* the probe (forward and backward, :class:`~pq_lightning.causal_lm.CausalLM` with
  ``memory_cap_gb``): autograd would keep every layer's weight alive until the backward pass (it
  saves ``Wᵀ`` to compute the input gradient), so inside :meth:`LayerStreamer.autograd_context` a
  saved tensor that is a view of a streamed weight is saved as a reference instead and re-read (the
  layer reloaded) when the backward pass needs it; a hook on each layer's output gradient reloads the
  layer before its backward pass starts, so gradient hooks inside the layer (the FisherProbe) find
  its weights;
* the GPTQ refiner (:func:`~pq_lightning.refine.refine_model`), which walks the layers in order;
* the export (:func:`~pq_lightning.export.export_checkpoint`), which reads the source tensors one
  layer at a time through :func:`full_state_items`.

Limits: the cap counts weights, not activations; a weight cast by autocast is a copy and is kept by
autograd like any activation; fine-tuning a streamed model is not supported (streamed tensors are
not parameters and get no gradient).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "HostWeights",
    "LayerStreamer",
    "SafetensorsWeights",
    "WeightStore",
    "ensure_loaded",
    "full_state_items",
    "load_streamed_model",
    "streamer_of",
    "weight_of",
]

_ATTR = "_pq_streamer"
_MODULE_ATTR = "_pq_stream_layer"
GIB = 2**30


def _gib(n: int) -> str:
    return f"{n / GIB:.6g} GiB"


# ---- weight stores ------------------------------------------------------------------------------
class WeightStore(Protocol):
    """Where streamed tensors live while they are not on the device."""

    def __contains__(self, key: str) -> bool: ...

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key`` (any device/dtype; the streamer converts it)."""

    def sample(self, key: str, positions: Sequence[int]) -> torch.Tensor:
        """The values at flat ``positions`` (1-D, the stored dtype), without reading the whole tensor."""


class SafetensorsWeights:
    """The tensors of a Hugging Face safetensors checkpoint folder (one file or a sharded index), read
    lazily: a tensor is read from disk when asked for, nothing is kept."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {k: self.folder / f for k, f in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self._file_of = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(
                f"{self.folder} holds neither model.safetensors nor model.safetensors.index.json; layer "
                "streaming reads a Hugging Face safetensors checkpoint (convert other formats, e.g. GGUF, "
                "once with save_pretrained or pq_lightning.models.save_reference)"
            )

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def keys(self) -> list[str]:
        return list(self._file_of)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[key]), framework="pt") as f:
            return f.get_tensor(key)

    def sample(self, key: str, positions: Sequence[int]) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[key]), framework="pt") as f:
            sl = f.get_slice(key)
            shape = list(sl.get_shape())
            values = []
            for pos in positions:
                index = []
                for dim in reversed(shape):
                    index.append(pos % dim)
                    pos //= dim
                index.reverse()
                values.append(sl[tuple(slice(i, i + 1) for i in index)].reshape(1))
        return torch.cat(values) if values else torch.empty(0)


class HostWeights:
    """Host-memory copies of tensors (pinned when CUDA is available, for fast copies to the GPU)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, *, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._tensors: dict[str, torch.Tensor] = {}
        for k, v in (tensors or {}).items():
            self[k] = v

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        t = value.detach().to("cpu")
        self._tensors[key] = t.pin_memory() if self.pin else t

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def sample(self, key: str, positions: Sequence[int]) -> torch.Tensor:
        return self._tensors[key].reshape(-1)[torch.tensor(list(positions), dtype=torch.long)]


# ---- the streamer -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slot:
    layer: int
    module: nn.Module
    attr: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class _SavedWeight:
    """What autograd keeps of a saved view of a streamed weight: where to find it again."""

    slot: _Slot
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class LayerStreamer:
    """Serve a model's decoder-layer weights from ``store``, at most ``max_resident_layers`` at a time.

    Args:
        model: a Hugging Face causal LM; its decoder layers' parameters (real or on the meta device)
            are taken out of the model when the streamer is attached, the rest stays.
        store: where the layer weights are read from, keyed by ``model.state_dict()`` names.
        memory_cap_bytes: bound on the weights on the device (the model's other parameters and
            buffers plus the resident layers); ``None``: one layer at a time.
        device: where layers are put; ``None``: the device of the input embeddings at load time
            (so the streamer follows ``model.to(...)`` and Lightning's device placement).
        dtype: the layers' dtype on the device; ``None``: each parameter's dtype when attached.

    Use :meth:`attach` (or :func:`load_streamed_model`) and :meth:`detach`. ``loads`` counts layer
    loads and ``peak_resident_bytes`` the largest weight footprint seen (checked against the cap).
    """

    def __init__(
        self,
        model: nn.Module,
        store: WeightStore,
        *,
        memory_cap_bytes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        from .models import language_model_layers

        if getattr(model, _ATTR, None) is not None:
            raise ValueError("the model already has a LayerStreamer attached; detach it first")
        self.model, self.store = model, store
        self.device = None if device is None else torch.device(device)
        self.layers_name, self.layers = language_model_layers(model)
        self.slots: list[list[_Slot]] = []
        for i, layer in enumerate(self.layers):
            slots = []
            for sub, module in layer.named_modules():
                for attr, p in module.named_parameters(recurse=False):
                    key = f"{self.layers_name}.{i}.{sub + '.' if sub else ''}{attr}"
                    if key not in store:
                        raise KeyError(
                            f"{key} is not in the weight store; layer streaming needs checkpoint keys equal "
                            "to the model's parameter names (architectures that rename or merge weights on "
                            "load are not supported)"
                        )
                    slots.append(_Slot(i, module, attr, key, tuple(p.shape), dtype or p.dtype))
            self.slots.append(slots)
        self.slot_of_key = {s.key: s for slots in self.slots for s in slots}
        self.layer_bytes = [sum(s.nbytes for s in slots) for slots in self.slots]
        self.other_bytes = 0  # the model's own parameters and buffers, counted when attached
        self.memory_cap_bytes = memory_cap_bytes
        self._resident: OrderedDict[int, torch.device] = OrderedDict()  # layer -> the device it was read onto
        self._storage_of: dict[int, _Slot] = {}
        self._handles: list[Any] = []
        self._state_keys: list[str] = []
        self.loads = 0
        self.loading_paused = False  # forwards that do not touch the layer weights (see paused_loading)
        self.peak_resident_bytes = 0
        self.max_resident_layers = 1
        self._attached = False

    # ---- attach / detach ------------------------------------------------------------------
    def _other_bytes(self) -> int:
        seen, total = set(), 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.device.type != "meta" and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def attach(self) -> LayerStreamer:
        """Take the layer parameters out of the model (to meta placeholders) and install the hooks."""
        self._state_keys = list(self.model.state_dict().keys())
        for slots in self.slots:
            for s in slots:
                del s.module._parameters[s.attr]
                setattr(s.module, s.attr, torch.empty(s.shape, dtype=s.dtype, device="meta"))
        for i, layer in enumerate(self.layers):
            for sub in layer.modules():
                object.__setattr__(sub, _MODULE_ATTR, (self, i))
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(layer.register_forward_hook(self._post_hook(i)))
        object.__setattr__(self.model, _ATTR, self)
        self._attached = True
        self.other_bytes = other = self._other_bytes()
        largest = max(self.layer_bytes, default=0)
        if self.memory_cap_bytes is not None:
            room = self.memory_cap_bytes - other
            if room < largest:
                self.detach()
                raise ValueError(
                    f"memory cap {_gib(self.memory_cap_bytes)} cannot hold the model's non-layer weights "
                    f"({_gib(other)}) plus one decoder layer ({_gib(largest)}); raise it to at least "
                    f"{_gib(other + largest)}"
                )
            self.max_resident_layers = max(1, room // max(largest, 1))
        return self

    def detach(self) -> None:
        """Put every layer's weights back into the model as parameters (read from the store)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for i, slots in enumerate(self.slots):
            tensors = self._read(i) if self._attached else None
            for j, s in enumerate(slots):
                if tensors is not None:
                    if s.attr in s.module.__dict__:
                        delattr(s.module, s.attr)
                    s.module.register_parameter(s.attr, nn.Parameter(tensors[j], requires_grad=False))
            for sub in self.layers[i].modules():
                sub.__dict__.pop(_MODULE_ATTR, None)
        self._resident.clear()
        self._storage_of.clear()
        self.model.__dict__.pop(_ATTR, None)
        self._attached = False

    # ---- residency ------------------------------------------------------------------------
    def target_device(self) -> torch.device:
        """Where layers are put: ``device``, else where the input embeddings are now."""
        if self.device is not None:
            return self.device
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight.device
        return torch.device("cpu")

    def _read(self, i: int, device: torch.device | None = None) -> list[torch.Tensor]:
        device = self.target_device() if device is None else device
        out = []
        for s in self.slots[i]:
            t = self.store.get(s.key)
            if tuple(t.shape) != s.shape:
                raise ValueError(f"{s.key}: the store holds shape {tuple(t.shape)}, the model expects {s.shape}")
            out.append(t.to(device=device, dtype=s.dtype, non_blocking=False).contiguous())
        return out

    def is_resident(self, i: int) -> bool:
        return i in self._resident

    def resident_layers(self) -> list[int]:
        return list(self._resident)

    def load(self, i: int) -> None:
        """Make layer ``i`` resident on the target device (evicting the least recently used layers
        beyond the cap). A layer resident on another device is read again: its weights are not
        parameters, so ``model.to(...)`` (Lightning's setup and teardown) does not move them."""
        device = self.target_device()
        if i in self._resident:
            if self._resident[i] == device:
                self._resident.move_to_end(i)
                return
            self.release(i)
        while len(self._resident) >= self.max_resident_layers:
            self.release(next(iter(self._resident)))
        for s, t in zip(self.slots[i], self._read(i, device), strict=True):
            setattr(s.module, s.attr, t)
            self._storage_of[t.untyped_storage().data_ptr()] = s
        self._resident[i] = device
        self.loads += 1
        resident = self.other_bytes + sum(self.layer_bytes[j] for j in self._resident)
        self.peak_resident_bytes = max(self.peak_resident_bytes, resident)

    def release(self, i: int) -> None:
        """Drop layer ``i``'s tensors from the device (back to meta placeholders)."""
        if i not in self._resident:
            return
        for s in self.slots[i]:
            t = getattr(s.module, s.attr)
            self._storage_of.pop(t.untyped_storage().data_ptr(), None)
            setattr(s.module, s.attr, torch.empty(s.shape, dtype=s.dtype, device="meta"))
        del self._resident[i]

    def release_all(self) -> None:
        """Drop every resident layer (the next :meth:`load` reads it onto the device of that moment)."""
        for i in list(self._resident):
            self.release(i)

    def tensor(self, key: str) -> torch.Tensor:
        """A streamed tensor by state-dict key (its layer loaded)."""
        slot = self.slot_of_key.get(key)
        if slot is None:
            raise KeyError(f"{key} is not a streamed tensor")
        self.load(slot.layer)
        return getattr(slot.module, slot.attr)

    # ---- hooks (picklable: a model with a streamer survives ddp_spawn) --------------------
    def _pre_hook(self, i: int) -> _LoadBeforeForward:
        return _LoadBeforeForward(self, i)

    def _post_hook(self, i: int) -> _LoadBeforeBackward:
        return _LoadBeforeBackward(self, i)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _storage_of={})

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for i in self._resident:  # storages are new in this process
            for s in self.slots[i]:
                self._storage_of[getattr(s.module, s.attr).untyped_storage().data_ptr()] = s

    def _pack(self, t: torch.Tensor) -> Any:
        if t.device.type == "meta" or not self._storage_of:
            return t
        try:
            slot = self._storage_of.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without a storage (subclasses)
            return t
        if slot is None:
            return t
        base = getattr(slot.module, slot.attr)
        return _SavedWeight(slot, tuple(t.shape), tuple(t.stride()), t.storage_offset() - base.storage_offset())

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _SavedWeight):
            return saved
        self.load(saved.slot.layer)
        base = getattr(saved.slot.module, saved.slot.attr)
        return base.as_strided(saved.size, saved.stride, base.storage_offset() + saved.offset)

    @contextmanager
    def paused_loading(self) -> Iterator[None]:
        """Forwards inside this do not load layers before they run: for passes whose layers do not
        compute (the refiner's capture of each layer's call arguments)."""
        before, self.loading_paused = self.loading_paused, True
        try:
            yield
        finally:
            self.loading_paused = before

    @contextmanager
    def autograd_context(self) -> Iterator[None]:
        """Run forward passes whose backward pass is wanted inside this: saved views of streamed
        weights are kept as references and re-read in the backward pass (see the module docstring)."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    # ---- state ----------------------------------------------------------------------------
    def state_keys(self) -> list[str]:
        """Every ``state_dict`` key of the model as it was before streaming, in order."""
        return list(self._state_keys)


class _LoadBeforeForward:
    def __init__(self, streamer: LayerStreamer, layer: int) -> None:
        self.streamer, self.layer = streamer, layer

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not self.streamer.loading_paused:
            self.streamer.load(self.layer)


class _LoadBeforeBackward(_LoadBeforeForward):
    """Reload the layer as soon as its backward pass starts (before gradient hooks inside it run)."""

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:  # type: ignore[override]
        out = output[0] if isinstance(output, (tuple, list)) else output
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._on_grad)

    def _on_grad(self, grad: torch.Tensor) -> None:
        self.streamer.load(self.layer)


# ---- helpers for the users of a model -----------------------------------------------------------
def streamer_of(model: nn.Module) -> LayerStreamer | None:
    """The streamer attached to ``model`` (``None`` when its layers are in memory)."""
    return model.__dict__.get(_ATTR)


def ensure_loaded(module: nn.Module) -> None:
    """Make the decoder layer holding ``module`` resident, if it is streamed (no-op otherwise)."""
    entry = module.__dict__.get(_MODULE_ATTR)
    if entry is not None:
        entry[0].load(entry[1])


def is_streamed(module: nn.Module) -> bool:
    return module.__dict__.get(_MODULE_ATTR) is not None


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    """``model.get_submodule(name).weight``, its layer loaded first when streamed."""
    module = model.get_submodule(name)
    ensure_loaded(module)
    return module.weight


def full_state_items(model: nn.Module, *, from_store: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict().items()`` of the whole model, streamed layers included (loaded one layer
    at a time, in state-dict order, so each layer is read once). ``from_store``: a streamed tensor is
    read from its store in the model's dtype without loading its layer (what a fingerprint needs)."""
    streamer = streamer_of(model)
    state = model.state_dict()
    if streamer is None:
        yield from state.items()
        return
    slots = streamer.slot_of_key
    for key in streamer.state_keys():
        if key in slots:
            yield key, (streamer.store.get(key).to(slots[key].dtype) if from_store else streamer.tensor(key))
        elif key in state:
            yield key, state[key]


def sampled_values(model: nn.Module, key: str, positions: Sequence[int]) -> torch.Tensor | None:
    """For a streamed tensor, its values at flat ``positions`` in the model's dtype (read from the store
    without loading the layer); ``None`` when ``key`` is not streamed."""
    streamer = streamer_of(model)
    if streamer is None:
        return None
    slot = streamer.slot_of_key.get(key)
    if slot is None:
        return None
    return streamer.store.sample(key, positions).to(slot.dtype)


def streamed_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """State-dict key -> (shape, dtype) of every streamed tensor."""
    streamer = streamer_of(model)
    if streamer is None:
        return {}
    return {s.key: (s.shape, s.dtype) for slots in streamer.slots for s in slots}


# ---- loading ------------------------------------------------------------------------------------
def load_streamed_model(
    folder: str | Path | None,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
    memory_cap_gb: float | None = None,
    offload: str = "disk",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A Hugging Face causal LM whose decoder layers stream from disk (or host memory) to the device.

    Args:
        folder: a Hugging Face folder with safetensors weights (GGUF and hub ids: convert first), or
            the short name of an embedded model converted to one (``gemma3-270m``).
        gguf_file: refused (a GGUF loads whole); present so callers can pass their arguments through.
        dtype: the weights' dtype in use.
        memory_cap_gb: bound on the weights held on the device at once (see :class:`LayerStreamer`).
        offload: ``"disk"`` (layers are read from the checkpoint files whenever they are loaded;
            host memory never holds the model) or ``"host"`` (layers are read once into host memory).
        device: where layers run (``None``: where the embeddings are, after any ``model.to``).

    The model is built with empty (meta) weights; the non-layer weights are read from the checkpoint,
    tied weights tied, and the layers attached to a :class:`LayerStreamer` (``streamer_of(model)``).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .embedded import EMBEDDED
    from .models import _model_class_for, language_model_layers, resolve_dtype, resolve_model_source

    if offload not in ("disk", "host"):
        raise ValueError(f"offload must be 'disk' or 'host', got {offload!r}")
    if folder is not None and str(folder) in EMBEDDED and gguf_file is None:
        folder, gguf_file = resolve_model_source(str(folder))  # gemma3-270m: its converted folder
    if folder is None or gguf_file is not None or str(folder).endswith(".gguf"):
        raise ValueError(
            "layer streaming reads a Hugging Face folder with safetensors weights; a GGUF model (the default "
            "model included) loads whole. Save it once (pq_lightning.models.save_reference or save_pretrained) "
            "and pass that folder as the model, or drop memory_cap_gb."
        )
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"layer streaming needs a local Hugging Face folder with safetensors weights; {folder} is not a "
            "folder (for a GGUF or hub model, save it once with save_pretrained and stream that folder)"
        )
    store: WeightStore = SafetensorsWeights(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"layer streaming needs an explicit dtype (e.g. 'bfloat16'), got {dtype!r}")
    model_cls = _model_class_for(config)
    with init_empty_weights():
        model = model_cls.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    layers_name, _ = language_model_layers(model)
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    for key, t in list(model.state_dict(keep_vars=True).items()):
        if key.startswith(layers_name + ".") or t.device.type != "meta" or key in tied:
            continue  # layers stream; tied copies (lm_head = embeddings) are tied below, not loaded twice
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        if key not in store:
            raise KeyError(f"{key} is not in {folder}; the checkpoint does not match the model's parameter names")
        value = store.get(key).to(dtype=torch_dtype if t.is_floating_point() else t.dtype)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    if offload == "host":
        host = HostWeights()
        for key in [k for k in model.state_dict() if k.startswith(layers_name + ".")]:
            host[key] = store.get(key)
        store = host
    cap = None if memory_cap_gb is None else int(memory_cap_gb * GIB)
    LayerStreamer(model, store, memory_cap_bytes=cap, device=device, dtype=torch_dtype).attach()
    model.eval()
    return model


def release_streamed_layers(model: nn.Module) -> None:
    """Drop ``model``'s resident streamed layers, if it streams any: a LightningModule's ``teardown``
    calls it, since Lightning moves the model's parameters off the device, not streamed layers."""
    streamer = streamer_of(model)
    if streamer is not None:
        streamer.release_all()
