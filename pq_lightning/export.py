"""Write a mixed-precision compressed-tensors checkpoint that vLLM and transformers load as is.

Every body Linear gets the format its plan names; the tensors written are exactly those the
format object packs (or those GPTQ already chose, passed in ``quantized``), never re-quantized by
compressed-tensors' compressors. ``config.json`` carries a compressed-tensors
``quantization_config`` built with compressed-tensors' own classes and serializer:

* one config group per format present, ``targets`` = the exact module names of its Linears (plain
  names, not regexes: vLLM's ``hf_to_vllm_mapper`` rewrites plain names for multimodal models but
  leaves ``re:`` patterns alone), and a per-group ``format`` (``nvfp4-pack-quantized``,
  ``float-quantized``, ``naive-quantized``) chosen by compressed-tensors' ``infer_module_format``;
* top-level ``format`` = the one format when only one is present, else ``mixed-precision``;
* ``ignore`` = every other Linear (``lm_head``, vision / audio towers, BF16 body Linears);
* ``quantization_status: compressed``.

Fused siblings (q/k/v, gate/up), which vLLM runs as one matmul, must share one format, one
per-tensor weight scale when the format declares ``shares_global_scale`` (NVFP4's
``weight_global_scale``) and one ``input_global_scale`` when it has ``static_input_scale``; this is
checked, and the shared scales are derived here for RTN.

The write is atomic: tensors stream module by module into shards in a temporary folder beside
``out_dir``, which replaces ``out_dir`` only once complete.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .architectures import fused_groups, model_type_of
from .atomic import atomic_dir, check_out_dir
from .formats import QuantFormat, get_format
from .integrity import files_table
from .streaming import full_state_items, weight_of

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "pq_manifest.json"

#: Files copied from ``source_dir`` (tokenizer, chat template, generation and processor configs).
SOURCE_FILE_PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "feature_extractor_config.json",
)


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote; sizes are read back from the files on disk."""

    out_dir: Path
    linear_bytes: dict[str, int]
    bpp_body: float
    n_shards: int
    format_counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Plan resolution (shared with pq_lightning.served.apply_fake_quant)
# ---------------------------------------------------------------------------------------------


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def default_fused_groups(model: nn.Module, names: Sequence[str]) -> list[list[str]]:
    """The architecture's fused sets (q/k/v, gate/up) among ``names`` (:mod:`pq_lightning.architectures`);
    given every Linear of the model, a set the plan holds in part is checked too (its absent members
    are BF16, so the set cannot be served with one scheme)."""
    return [list(g) for g in fused_groups(names, model_type_of(model)) if len(g) > 1]


def manifest_stage_key(ckpt: str | Path) -> str | None:
    """The stage key recorded in a checkpoint this project wrote ("" if it has none), else None."""
    path = Path(ckpt) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("manifest", {}).get("stage_key", "")
    except (OSError, ValueError):
        return ""


def read_manifest(ckpt: str | Path) -> dict | None:
    """The ``pq_manifest.json`` of a checkpoint this project wrote (None: absent or unreadable)."""
    try:
        record = json.loads((Path(ckpt) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def checkpoint_problems(ckpt: str | Path) -> list[str]:
    """How a checkpoint folder differs from what its manifest says was written (sizes and sha256 of
    every file); empty when it is whole."""
    from .integrity import table_problems

    record = read_manifest(ckpt)
    if record is None:
        return [f"{MANIFEST_NAME} is missing or unreadable"]
    if not isinstance(record.get("files"), dict):
        return [f"{MANIFEST_NAME} lists no files (written by an older pq-lightning)"]
    return table_problems(ckpt, record["files"])


def checkpoint_digest(ckpt: str | Path) -> str:
    """16 hex characters identifying a checkpoint's files (from the sha256 its manifest lists)."""
    from .integrity import table_digest

    return table_digest((read_manifest(ckpt) or {}).get("files") or {})


@dataclass
class PackedLinear:
    """The resolved on-disk state of one planned Linear."""

    name: str
    fmt: QuantFormat
    tensors: dict[str, torch.Tensor]  # exactly what goes on disk under ``name.``, bias excluded


def _validate_plan(
    linears: Mapping[str, nn.Linear], plan: Mapping[str, str], fused_groups: Sequence[Sequence[str]]
) -> dict[str, QuantFormat]:
    formats: dict[str, QuantFormat] = {}
    for name, fmt_name in plan.items():
        if name not in linears:
            raise ValueError(
                f"plan names {name!r}, which is not an nn.Linear of the model; plan keys must be "
                "module names as in model.named_modules() (e.g. 'model.layers.0.self_attn.q_proj')"
            )
        fmt = get_format(fmt_name)
        if fmt.quantizes_weights:
            reason = fmt.unsupported_reason(tuple(linears[name].weight.shape))
            if reason is not None:
                raise ValueError(
                    f"plan puts {name} in {fmt.name}, which cannot take it: {reason}. "
                    "Give this Linear another format in the plan (e.g. fp8 or bf16)."
                )
        formats[name] = fmt
    for group in fused_groups:
        names = [n for n in group if n in formats and formats[n].quantizes_weights]
        kinds = {formats[n].name if n in formats else "bf16" for n in group}
        if names and len(kinds) > 1:
            detail = ", ".join(f"{n}={formats[n].name if n in formats else 'bf16'}" for n in group)
            raise ValueError(
                f"fused siblings must share one format (vLLM runs them as one matmul): {detail}. "
                "Give every member of the group the same format in the plan."
            )
    return formats


def _check_given(name: str, fmt: QuantFormat, given: Mapping[str, torch.Tensor], shape: tuple) -> None:
    missing = [t for t in fmt.tensor_names if t not in given]
    if missing:
        raise ValueError(
            f"quantized[{name!r}] lacks {missing} for format {fmt.name} (needs {list(fmt.tensor_names)}); "
            "pass the tensors the format's pack() returns"
        )
    w = fmt.unpack(given)
    if tuple(w.shape) != tuple(shape):
        raise ValueError(
            f"quantized[{name!r}] decodes to shape {tuple(w.shape)}, the Linear has {tuple(shape)}"
        )


def resolve_packed(
    model: nn.Module,
    plan: Mapping[str, str],
    *,
    quantized: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    input_amax: Mapping[str, float] | None = None,
    fused_groups: Sequence[Sequence[str]] | None = None,
) -> tuple[dict[str, QuantFormat], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Check ``plan`` and fix the shared scales of every quantized Linear.

    Returns ``(formats, weight_global_scale, input_global_scale)``: the format of each planned
    Linear, and for formats with ``shares_global_scale`` (NVFP4) the weight scale to pack with
    (shared by fused siblings; absent for ``quantized`` Linears, whose tensors are written as given)
    and for formats with ``static_input_scale`` (W4A4 NVFP4) the ``input_global_scale``
    (``448*6/amax``, the max amax over fused siblings).
    ``fused_groups=None`` takes the architecture's fused sets (q/k/v, gate/up) among the plan's Linears.
    """
    quantized = quantized or {}
    input_amax = input_amax or {}
    linears = linear_modules(model)
    if fused_groups is None:
        fused_groups = default_fused_groups(model, list(linears))
    formats = _validate_plan(linears, plan, fused_groups)
    unknown = sorted(set(quantized) - set(formats))
    if unknown:
        raise ValueError(f"quantized holds Linears the plan does not name: {unknown[:5]}")
    for name, given in quantized.items():
        if formats[name].quantizes_weights:
            _check_given(name, formats[name], given, tuple(linears[name].weight.shape))

    group_of: dict[str, list[str]] = {}
    for group in fused_groups:
        members = [n for n in group if n in formats and formats[n].quantizes_weights]
        for n in members:
            group_of[n] = members

    weight_gs: dict[str, torch.Tensor] = {}
    input_gs: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, fmt in formats.items():
        if name in done or not fmt.quantizes_weights:
            continue
        members = group_of.get(name, [name])
        done.update(members)
        if fmt.shares_global_scale:
            key = fmt.global_scale_tensor
            given = [quantized[m][key].float().reshape(1) for m in members if m in quantized]
            if given:
                if any(not torch.equal(g, given[0]) for g in given) or len(given) != len(members):
                    raise ValueError(
                        f"fused siblings {members} must share one {key}; the given tensors do not "
                        f"(quantize the group with one shared scale: {fmt.name}.shared_global_scale)"
                    )
            else:
                gs = fmt.shared_global_scale(weight_of(model, m) for m in members)
                for m in members:
                    weight_gs[m] = gs
        if fmt.static_input_scale:
            given_igs = [
                quantized[m]["input_global_scale"]
                for m in members
                if "input_global_scale" in quantized.get(m, {})
            ]
            if given_igs:
                if len(given_igs) != len(members) or any(not torch.equal(g, given_igs[0]) for g in given_igs):
                    raise ValueError(f"fused siblings {members} must share one input_global_scale")
                igs = given_igs[0].float().reshape(1)
            else:
                missing = [m for m in members if m not in input_amax]
                if missing:
                    raise ValueError(
                        f"{fmt.name} quantizes activations with a static input_global_scale, but "
                        f"input_amax has no calibrated amax for {missing}. Run the calibration "
                        "(FisherProbe / amax observer) over these Linears and pass input_amax, or "
                        "give them a weight-only format (nvfp4a16)."
                    )
                igs = fmt.calibrate_input_global_scale(max(float(input_amax[m]) for m in members))
            for m in members:
                input_gs[m] = igs.float().reshape(1)
    return formats, weight_gs, input_gs


def pack_linear(
    name: str,
    weight: torch.Tensor,
    fmt: QuantFormat,
    *,
    quantized: Mapping[str, Mapping[str, torch.Tensor]] | None,
    weight_gs: Mapping[str, torch.Tensor],
    input_gs: Mapping[str, torch.Tensor],
) -> PackedLinear:
    """The exact on-disk tensors of one planned Linear (bias excluded)."""
    if not fmt.quantizes_weights:
        return PackedLinear(name, fmt, {"weight": weight.detach().to(torch.bfloat16)})
    given = (quantized or {}).get(name)
    if given is not None:
        tensors = {k: given[k] for k in fmt.tensor_names}
    elif name in weight_gs:
        tensors = fmt.pack(weight.detach(), global_scale=weight_gs[name])
    else:
        tensors = fmt.pack(weight.detach())
    tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}
    if name in input_gs:
        tensors["input_global_scale"] = input_gs[name].detach().float().reshape(1).cpu().clone()
    return PackedLinear(name, fmt, tensors)


# ---------------------------------------------------------------------------------------------
# quantization_config
# ---------------------------------------------------------------------------------------------


def build_quantization_config(formats: Mapping[str, QuantFormat], all_linears: Sequence[str]):
    """compressed-tensors ``QuantizationConfig`` for these formats (``None`` when all BF16)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    by_format: dict[str, list[str]] = {}
    for name in all_linears:
        fmt = formats.get(name)
        if fmt is not None and fmt.quantizes_weights:
            by_format.setdefault(fmt.name, []).append(name)
    if not by_format:
        return None
    groups = {}
    group_formats = set()
    for i, (fmt_name, targets) in enumerate(by_format.items()):
        scheme = get_format(fmt_name).scheme(list(targets))
        scheme.format = infer_module_format(nn.Linear, scheme).value
        group_formats.add(scheme.format)
        groups[f"group_{i}"] = scheme
    ignore = [n for n in all_linears if n not in formats or not formats[n].quantizes_weights]
    top = next(iter(group_formats)) if len(group_formats) == 1 else CompressionFormat.mixed_precision.value
    return QuantizationConfig(
        config_groups=groups,
        format=top,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )


def _write_config(model: nn.Module, out: Path, qconfig) -> None:
    from compressed_tensors.compressors import ModelCompressor

    config = deepcopy(model.config)
    for cfg in (config, *[getattr(config, k, None) for k in ("text_config",)]):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    if qconfig is not None:
        # compressed-tensors' own serializer: what its loaders (transformers, vLLM) parse
        ModelCompressor(quantization_config=qconfig).update_config(str(out))


# ---------------------------------------------------------------------------------------------
# Tensors on disk
# ---------------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _checkpoint_name_fn(model: nn.Module):
    """Module-name -> checkpoint-name mapping (transformers' reverse weight renaming)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming
    except ImportError:  # pragma: no cover - older transformers
        return lambda k: k
    convs = getattr(model, "_weight_conversions", None)
    if convs is None:
        try:
            convs = get_model_conversion_mapping(model, add_legacy=False)
        except Exception:  # noqa: BLE001 - a non-HF model
            convs = []
        convs = [c for c in convs if not isinstance(c, PrefixChange)]
    if not convs:
        return lambda k: k
    if any(isinstance(c, WeightConverter) for c in convs):
        raise NotImplementedError(
            f"{type(model).__name__} loads with weight converters (merged / split tensors, e.g. fused "
            "MoE experts); export handles dense models whose checkpoint keys are module names or plain "
            "renames of them"
        )
    from transformers.core_model_loading import rename_source_key

    renamings = [c.reverse_transform() for c in convs[::-1] if isinstance(c, WeightRenaming)]

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, [], reverse=True)[0]

    return rename


def _tied_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> set[str]:
    """State-dict keys that are tied to another key (written once, under the source name)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    out = set()
    for target, source in tied.items():
        if target in state and source in state and state[target] is not None and state[source] is not None:
            a, b = state[target], state[source]
            if a.device.type == "meta" or a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
                out.add(target)
    return out


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _stream_tensors(
    model: nn.Module,
    formats: Mapping[str, QuantFormat],
    *,
    quantized,
    weight_gs,
    input_gs,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) in state-dict order, one planned Linear packed at a time."""
    state = model.state_dict(keep_vars=False)
    skip = _tied_keys(model, state)
    items = full_state_items(model)  # streamed decoder layers are read one layer at a time
    rename = _checkpoint_name_fn(model)
    planned_weights = {f"{n}.weight": n for n in formats}
    for key, tensor in items:
        if key in skip:
            if key in planned_weights:
                raise ValueError(
                    f"{planned_weights[key]} is tied to another weight ({key}); a tied Linear "
                    "(e.g. lm_head with tie_word_embeddings) stays BF16 - take it out of the plan"
                )
            continue
        if tensor.device.type == "meta":
            raise ValueError(f"{key} is on the meta device; load the model's weights before exporting")
        name = planned_weights.get(key)
        if name is not None:
            packed = pack_linear(
                name, tensor, formats[name], quantized=quantized, weight_gs=weight_gs, input_gs=input_gs
            )
            base = rename(name + ".weight").rsplit(".", 1)[0]
            for tname, t in packed.tensors.items():
                yield f"{base}.{tname}", t.contiguous()
            continue
        t = tensor.detach().cpu()
        t = t.to(torch.bfloat16) if t.is_floating_point() else t
        yield rename(key), t.clone(memory_format=torch.contiguous_format)


def _write_shards(items: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> int:
    """Write shards ``model-0000i-of-0000N.safetensors`` and the index; returns N."""
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    written: list[tuple[Path, list[str]]] = []
    total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        path = out / f".shard-{len(written) + 1:05d}.safetensors"
        _save_shard(shard, path)
        written.append((path, list(shard)))
        shard, shard_bytes = {}, 0

    seen: set[str] = set()
    for key, t in items:
        if key in seen:
            raise ValueError(f"checkpoint key {key} written twice; check tied weights and renamings")
        seen.add(key)
        nbytes = _tensor_bytes(t)
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[key] = t
        shard_bytes += nbytes
        total += nbytes
    flush()
    n = len(written)
    weight_map: dict[str, str] = {}
    for i, (path, keys) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        path.rename(out / final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return n


def safetensors_tensor_bytes(path: str | Path) -> dict[str, int]:
    """Bytes each tensor occupies in one ``.safetensors`` file, read from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def checkpoint_tensor_bytes(out_dir: str | Path) -> dict[str, int]:
    """Bytes on disk of every tensor of a (sharded or single-file) safetensors checkpoint."""
    out_dir = Path(out_dir)
    index = out_dir / INDEX_NAME
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else [p.name for p in sorted(out_dir.glob("*.safetensors"))]
    )
    if not files:
        raise FileNotFoundError(f"no safetensors files in {out_dir}")
    sizes: dict[str, int] = {}
    for f in files:
        sizes.update(safetensors_tensor_bytes(out_dir / f))
    return sizes


def linear_bytes_from_checkpoint(out_dir: str | Path, linear_names: Sequence[str]) -> dict[str, int]:
    """Bytes on disk of each Linear's tensors (weights and scales, not bias)."""
    sizes = checkpoint_tensor_bytes(out_dir)
    wanted = set(linear_names)
    out = {n: 0 for n in linear_names}
    for key, nbytes in sizes.items():
        module, _, leaf = key.rpartition(".")
        if module in wanted and leaf != "bias":
            out[module] += nbytes
    missing = [n for n, b in out.items() if b == 0]
    if missing:
        raise KeyError(f"no tensors on disk for Linears {missing[:5]} in {out_dir}")
    return out


def body_bpp_from_checkpoint(out_dir: str | Path, body_linear_names: Sequence[str]) -> float:
    """Bits per parameter of the body: bytes on disk of its Linears' tensors * 8 / their params.

    Parameter counts come from the checkpoint's own tensors: ``weight`` ``[out, in]``, or
    ``weight_packed`` ``[out, in/2]`` (two FP4 codes per byte).
    """
    out_dir = Path(out_dir)
    nbytes = linear_bytes_from_checkpoint(out_dir, body_linear_names)
    shapes = _checkpoint_shapes(out_dir)
    params = 0
    for n in body_linear_names:
        if f"{n}.weight" in shapes:
            params += math.prod(shapes[f"{n}.weight"])
        elif f"{n}.weight_packed" in shapes:
            out, half = shapes[f"{n}.weight_packed"]
            params += out * half * 2
        else:
            raise KeyError(f"{n} has neither weight nor weight_packed in {out_dir}")
    return sum(nbytes.values()) * 8 / params


def _checkpoint_shapes(out_dir: Path) -> dict[str, list[int]]:
    index = out_dir / INDEX_NAME
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else [p.name for p in sorted(out_dir.glob("*.safetensors"))]
    )
    shapes: dict[str, list[int]] = {}
    for f in files:
        with open(out_dir / f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


# ---------------------------------------------------------------------------------------------
# Side files and manifest
# ---------------------------------------------------------------------------------------------


def _copy_side_files(out: Path, model: nn.Module, tokenizer, source_dir: str | None) -> None:
    if source_dir is not None:
        src = Path(source_dir)
        if not src.is_dir():
            raise FileNotFoundError(f"source_dir {src} is not a folder")
        for pattern in SOURCE_FILE_PATTERNS:
            for p in src.glob(pattern):
                if p.is_file():
                    shutil.copy2(p, out / p.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None and not (out / "generation_config.json").exists():
        try:
            gen.save_pretrained(str(out))
        except Exception:  # noqa: BLE001 - a default generation config that fails validation
            pass


def package_versions() -> dict[str, str]:
    """Versions of the packages a checkpoint or a report depends on (manifest and report.json)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("pq-lightning", "torch", "lightning", "transformers", "compressed-tensors", "safetensors",
                "torchmetrics"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def export_checkpoint(
    model: nn.Module,
    plan: Mapping[str, str],
    out_dir: str | Path,
    *,
    quantized: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    input_amax: Mapping[str, float] | None = None,
    fused_groups: Sequence[Sequence[str]] | None = None,
    tokenizer=None,
    source_dir: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 2**30,
    manifest: Mapping | None = None,
) -> ExportResult:
    """Write ``model`` as a compressed-tensors checkpoint with each planned Linear in its format.

    Args:
        model: a Hugging Face ``PreTrainedModel`` holding the source (BF16) weights.
        plan: body Linear name -> format name; every other Linear stays BF16 (in ``ignore``).
        out_dir: the checkpoint folder; refused when it exists and is not empty, unless
            ``overwrite`` (then replaced only once the new checkpoint is complete).
        quantized: name -> the exact packed tensors (e.g. chosen by GPTQ), written as given;
            other quantized Linears are packed here by RTN (``fmt.pack``).
        input_amax: name -> calibrated input amax, needed by every W4A4 NVFP4 Linear
            (``input_global_scale = 448*6/amax``, the max amax over fused siblings).
        fused_groups: sibling groups sharing NVFP4 global scales (e.g. ``Plan.groups``); ``None``
            takes the architecture's (q/k/v, gate/up), ``()`` declares none.
        tokenizer, source_dir: tokenizer to save and/or a folder whose tokenizer, chat template,
            generation and processor files are copied.
        max_shard_bytes: upper bound of one shard's tensor bytes.
        manifest: extra entries for ``pq_manifest.json`` (e.g. the source fingerprint).
    """
    out_dir = Path(out_dir).resolve()
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    check_out_dir(out_dir, overwrite=overwrite)  # refuse before the work, not after
    if fused_groups is None:
        fused_groups = default_fused_groups(model, list(linear_modules(model)))
    formats, weight_gs, input_gs = resolve_packed(
        model, plan, quantized=quantized, input_amax=input_amax, fused_groups=fused_groups
    )
    rename = _checkpoint_name_fn(model)
    linears = linear_modules(model)
    ckpt_linears = [rename(f"{n}.weight").rsplit(".", 1)[0] for n in linears]
    ckpt_formats = {rename(f"{n}.weight").rsplit(".", 1)[0]: f for n, f in formats.items()}
    qconfig = build_quantization_config(ckpt_formats, ckpt_linears)

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        n_shards = _write_shards(
            _stream_tensors(model, formats, quantized=quantized, weight_gs=weight_gs, input_gs=input_gs),
            tmp,
            max_shard_bytes,
        )
        _write_config(model, tmp, qconfig)
        _copy_side_files(tmp, model, tokenizer, source_dir)
        body = [rename(f"{n}.weight").rsplit(".", 1)[0] for n in plan]
        on_disk = {k.rpartition(".")[0] for k in checkpoint_tensor_bytes(tmp)}
        tied = [c for c in ckpt_linears if c not in on_disk]  # e.g. lm_head tied to the embeddings
        linear_bytes = linear_bytes_from_checkpoint(tmp, [c for c in ckpt_linears if c in on_disk])
        linear_bytes.update({c: 0 for c in tied})
        bpp = body_bpp_from_checkpoint(tmp, body) if body else float("nan")
        counts: dict[str, int] = {}
        for f in formats.values():
            counts[f.name] = counts.get(f.name, 0) + 1
        record = {
            "plan_summary": {"format_counts": counts, "n_body_linears": len(plan)},
            "bpp_body": bpp,
            "body_bytes": sum(linear_bytes[n] for n in body),
            "n_shards": n_shards,
            "versions": package_versions(),
            "fused_groups": [list(g) for g in fused_groups],
            **({"manifest": dict(manifest)} if manifest else {}),
        }
        record["files"] = files_table(tmp)  # what "up to date" checks before this checkpoint is reused
        (tmp / MANIFEST_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return ExportResult(
        out_dir=out_dir,
        linear_bytes={n: linear_bytes[c] for n, c in zip(linears, ckpt_linears, strict=True)},
        bpp_body=bpp,
        n_shards=n_shards,
        format_counts=counts,
    )
