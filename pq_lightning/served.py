"""Run a quantized model the way it is served: weights as stored, activations as configured.

:func:`load_quantized_checkpoint` reads any compressed-tensors checkpoint (ours or
llm-compressor's) without transformers' compressed-tensors loader (which rounds NVFP4 weights to
the checkpoint dtype, rounds FP8 weight scales to BF16, and in newer releases fails on mixed
checkpoints): it builds the model from its config with empty weights, reads the safetensors
itself, maps each quantized Linear's scheme (config groups, targets, ignore — matched with
compressed-tensors' own matching rules) to a :mod:`pq_lightning.formats` object, and replaces the
Linear by a :class:`ServedLinear` holding the exact served weight in fp32.

:func:`apply_fake_quant` does the same for an in-memory model from a plan, without writing a
checkpoint; it resolves the tensors exactly as :func:`pq_lightning.export.export_checkpoint`
writes them, so both paths give the same model.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .export import INDEX_NAME, linear_modules, pack_linear, resolve_packed
from .formats import QuantFormat, available_formats, get_format


@dataclass
class QuantizedLinearInfo:
    """How one Linear is served."""

    name: str
    format: str  # pq_lightning format name
    shape: tuple[int, int]
    input_global_scale: float | None = None
    group: str | None = None  # the checkpoint's config group (None for apply_fake_quant)


class _StraightThrough(torch.autograd.Function):
    """The quantized value forward, the identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ServedLinear(nn.Linear):
    """A Linear computing ``F.linear(Q_a(x), W_served, b)`` in fp32, cast back to ``x``'s dtype.

    ``weight`` holds the exact served weight (fp32, decoded from the stored tensors); ``Q_a`` is
    the format's activation fake-quant with the checkpoint's static ``input_global_scale``
    (identity for weight-only formats), through which gradients pass straight (norm tuning).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fmt: QuantFormat,
        input_global_scale: torch.Tensor | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.fmt = fmt
        igs = None if input_global_scale is None else input_global_scale.detach().float().reshape(1)
        self.register_buffer("input_global_scale", igs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if xf.requires_grad and torch.is_grad_enabled():  # gradients pass straight through the rounding
            xq = _StraightThrough.apply(xf, self.fmt.fake_quant_activation(xf.detach(), self.input_global_scale))
        else:
            xq = self.fmt.fake_quant_activation(xf, self.input_global_scale)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(xq.float(), self.weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, format={self.fmt.name}, bias={self.bias is not None}"
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# ---------------------------------------------------------------------------------------------
# In-memory plan
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def served_linears(
    model: nn.Module,
    plan: Mapping[str, str],
    quantized: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    input_amax: Mapping[str, float] | None = None,
    *,
    fused_groups: Sequence[Sequence[str]] | None = None,
) -> dict[str, ServedLinear]:
    """The served form of every planned, quantized Linear of ``model`` (the model is not changed).

    Weights are the exact values :func:`~pq_lightning.export.export_checkpoint` would write (RTN, or
    the given ``quantized`` tensors; fused siblings share NVFP4 global scales); W4A4 Linears quantize
    their input with ``input_global_scale`` from ``input_amax``.
    """
    formats, weight_gs, input_gs = resolve_packed(
        model, plan, quantized=quantized, input_amax=input_amax, fused_groups=fused_groups
    )
    linears = linear_modules(model)
    served: dict[str, ServedLinear] = {}
    for name, fmt in formats.items():
        if not fmt.quantizes_weights:
            continue
        lin = linears[name]
        packed = pack_linear(name, lin.weight, fmt, quantized=quantized, weight_gs=weight_gs, input_gs=input_gs)
        w = fmt.unpack(packed.tensors).to(lin.weight.device)
        igs = packed.tensors.get("input_global_scale")
        served[name] = ServedLinear(w, lin.bias, fmt, None if igs is None else igs.to(lin.weight.device))
    return served


def apply_fake_quant(
    model: nn.Module,
    plan: Mapping[str, str],
    quantized: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    input_amax: Mapping[str, float] | None = None,
    *,
    fused_groups: Sequence[Sequence[str]] | None = None,
) -> dict[str, QuantizedLinearInfo]:
    """Replace the planned Linears of ``model`` (in place) by their :func:`served_linears` form; BF16
    entries are left as they are."""
    infos: dict[str, QuantizedLinearInfo] = {}
    for name, served in served_linears(model, plan, quantized, input_amax, fused_groups=fused_groups).items():
        _set_submodule(model, name, served)
        igs = served.input_global_scale
        infos[name] = QuantizedLinearInfo(name, served.fmt.name, tuple(served.weight.shape),
                                          None if igs is None else float(igs))
    return infos


# ---------------------------------------------------------------------------------------------
# Scheme -> format
# ---------------------------------------------------------------------------------------------


def _args_signature(args) -> tuple | None:
    if args is None:
        return None
    dynamic = args.dynamic
    dynamic = getattr(dynamic, "value", dynamic)
    strategy = getattr(args.strategy, "value", args.strategy)
    kind = getattr(args.type, "value", args.type)
    group = args.group_size if strategy in ("group", "tensor_group") else None
    return (args.num_bits, kind, strategy, group, bool(args.symmetric), str(dynamic).lower())


def scheme_signature(scheme) -> tuple:
    """What identifies a scheme's numerics (observers and dtypes of unused fields ignored)."""
    return (_args_signature(scheme.weights), _args_signature(scheme.input_activations))


def format_for_scheme(scheme) -> QuantFormat:
    """The registered format whose compressed-tensors scheme has ``scheme``'s numerics."""
    if scheme.output_activations is not None:
        raise ValueError("output activation quantization is not supported by the served model")
    sig = scheme_signature(scheme)
    for name in available_formats():
        fmt = get_format(name)
        if not fmt.quantizes_weights:
            continue
        ref = fmt.scheme(["_"])
        if ref is not None and scheme_signature(ref) == sig:
            return fmt
    raise ValueError(
        f"no registered format serves the scheme weights={sig[0]} input_activations={sig[1]} "
        f"(registered: {available_formats()}). Register a QuantFormat for it with "
        "pq_lightning.formats.register_format."
    )


# ---------------------------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------------------------


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if getattr(config, "vision_config", None) is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {path}")
    return files


def _module_schemes(model: nn.Module, qconfig) -> dict[str, tuple[str, object]]:
    """Module name -> (group name, scheme), with compressed-tensors' own matching rules."""
    from compressed_tensors.utils.match import match_named_modules, match_targets

    target_to_group: dict[str, tuple[str, object]] = {}
    for gname, scheme in qconfig.config_groups.items():
        for target in scheme.targets:
            target_to_group[target] = (gname, scheme)
    out: dict[str, tuple[str, object]] = {}
    for name, module in match_named_modules(model, list(target_to_group), qconfig.ignore or []):
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"the checkpoint quantizes {name} ({type(module).__name__}); only Linear layers "
                "can be served here"
            )
        matched = match_targets(name, module, list(target_to_group))
        out[name] = target_to_group[matched[0]]
    return out


@torch.no_grad()
def load_quantized_checkpoint(
    path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, QuantizedLinearInfo]]:
    """Load a compressed-tensors checkpoint into a model that runs exactly as served.

    Returns the model (eval mode; quantized Linears are :class:`ServedLinear`) and, per quantized
    Linear, its format and static input global scale. Non-quantized tensors load in ``dtype``.
    """
    from accelerate import init_empty_weights
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    qdict = getattr(config, "quantization_config", None)
    if qdict is not None:
        delattr(config, "quantization_config")
        qdict = qdict if isinstance(qdict, dict) else qdict.to_dict()
        if qdict.get("quant_method") != "compressed-tensors":
            raise ValueError(
                f"{path} is quantized with {qdict.get('quant_method')!r}; only compressed-tensors "
                "checkpoints are read here"
            )
        status = qdict.get("quantization_status", "compressed")
        if status != "compressed" and qdict.get("format") not in (None, "dense"):
            raise ValueError(f"{path} has quantization_status={status!r}; expected 'compressed'")
        qconfig = QuantizationConfig.model_validate(qdict)
    else:
        qconfig = None

    cls = _model_class(config)
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, dtype=dtype)
        else:  # a concrete PreTrainedModel class
            model = cls._from_config(config, dtype=dtype)
    schemes = _module_schemes(model, qconfig) if qconfig is not None else {}
    formats = {name: format_for_scheme(scheme) for name, (_, scheme) in schemes.items()}

    pending: dict[str, dict[str, torch.Tensor]] = {name: {} for name in formats}
    unexpected: list[str] = []
    dev = torch.device(device)
    for shard in _shard_files(path):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                module_name, _, leaf = key.rpartition(".")
                if module_name in pending and leaf != "bias":
                    pending[module_name][leaf] = f.get_tensor(key)
                    continue
                try:
                    owner = model.get_submodule(module_name) if module_name else model
                except AttributeError:
                    unexpected.append(key)
                    continue
                t = f.get_tensor(key)
                if t.is_floating_point():
                    t = t.to(dtype)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = nn.Parameter(t.to(dev), requires_grad=False)
                elif leaf in owner._buffers:
                    owner._buffers[leaf] = t.to(dev)
                else:
                    unexpected.append(key)
    if unexpected:
        warnings.warn(
            f"{len(unexpected)} checkpoint tensors have no place in the model, e.g. {unexpected[:5]}",
            stacklevel=2,
        )

    infos: dict[str, QuantizedLinearInfo] = {}
    for name, fmt in formats.items():
        tensors = pending[name]
        lin = model.get_submodule(name)
        try:
            w = fmt.unpack(tensors)
        except KeyError as e:
            raise KeyError(f"{name}: the checkpoint lacks tensors of its {fmt.name} scheme: {e}") from None
        if tuple(w.shape) != (lin.out_features, lin.in_features):
            raise ValueError(
                f"{name}: stored weight decodes to {tuple(w.shape)}, the model expects "
                f"{(lin.out_features, lin.in_features)}"
            )
        igs = tensors.get("input_global_scale")
        if fmt.static_input_scale and igs is None:
            raise KeyError(f"{name}: {fmt.name} needs input_global_scale, which the checkpoint lacks")
        bias = lin.bias if lin.bias is not None and lin.bias.device.type != "meta" else None
        if lin.bias is not None and bias is None:
            raise KeyError(f"{name}.bias is missing from the checkpoint")
        served = ServedLinear(w.to(dev), bias, fmt, None if igs is None else igs.to(dev))
        _set_submodule(model, name, served)
        gname = schemes[name][0]
        infos[name] = QuantizedLinearInfo(
            name, fmt.name, tuple(w.shape), None if igs is None else float(igs), gname
        )

    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, b in model.named_buffers() if b is not None and b.device.type == "meta"]
    if missing:
        raise KeyError(f"{len(missing)} model tensors are missing from {path}, e.g. {missing[:5]}")
    model.to(dev)
    model.eval()
    return model, infos
