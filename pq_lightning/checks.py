"""Inputs of ``quantize`` checked before the work starts, each refusal one line that says what to do.

Three moments: :func:`check_settings` before anything is read (budgets, names, paths);
:func:`check_model_source` from the model's config and file headers, before its weights load
(a causal LM, enough positions for the windows, whole safetensors files); :func:`checked_fingerprint`
while the loaded weights are hashed (no NaN / Inf).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


def expand_path(path: str | None) -> str | None:
    """``~`` and ``$VARS`` expanded, as a shell would (None stays None)."""
    return None if path is None else os.path.expandvars(os.path.expanduser(str(path)))


def expand_paths(output_dir: str, model: str | None, calibration: Any, evaluation: Any) -> tuple:
    """``output_dir``, ``model``, ``calibration.source`` and ``evaluation.path`` with ``~`` / ``$VARS`` expanded."""
    from .data import BUILTIN, GENERATED, HF_PREFIX

    source = calibration.source
    if source not in (BUILTIN, GENERATED) and not source.startswith(HF_PREFIX):
        calibration = dataclasses.replace(calibration, source=expand_path(source))
    evaluation = dataclasses.replace(evaluation, path=expand_path(evaluation.path))
    return expand_path(output_dir), expand_path(model), calibration, evaluation


# ---- settings -------------------------------------------------------------------------------------
def check_settings(*, targets: Sequence[tuple[float | None, float | None]], formats: Sequence[str], estimator: str,
                   include: Sequence[str] | None, exclude: Sequence[str] | None, pins: Mapping | None,
                   bans: Mapping | None, calibration: Any, evaluation: Any, memory_cap_gb: float | None,
                   offload: str) -> None:
    """Everything that can be refused without reading the model or the data."""
    from .cost import ESTIMATORS
    from .plan import budget_label

    for bits, size in targets:
        name, value = ("target_bits", bits) if bits is not None else ("target_size_gb", size)
        if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise UserError(f"--{name} must be a positive number, got {value}")
    labels = [budget_label(*t) for t in targets]
    if len(set(labels)) < len(labels):
        raise UserError(f"a budget is given twice ({', '.join(labels)}); give each budget once")
    if estimator not in ESTIMATORS:
        raise UserError(f"--estimator {estimator!r} is unknown; choose one of {', '.join(ESTIMATORS)}")
    check_format_names(formats, pins, bans)
    for what, rxs in (("include", include), ("exclude", exclude), ("pins", pins), ("bans", bans)):
        for rx in rxs or ():
            _check_regex(what, rx)
    _check_source(calibration.source)
    if evaluation.enabled and evaluation.path is not None and not Path(evaluation.path).is_file():
        raise UserError(f"--evaluation.path {evaluation.path} is not a file; pass the evaluation text "
                        "(e.g. wikitext-2-raw-test.txt) or --evaluation.enabled false")
    if evaluation.window < 1 or evaluation.batch_size < 1 or (evaluation.max_windows or 1) < 1:
        raise UserError("--evaluation.window, --evaluation.batch_size and --evaluation.max_windows must be >= 1")
    if memory_cap_gb is not None and not memory_cap_gb > 0:
        raise UserError(f"--memory_cap_gb must be a positive number of GiB, got {memory_cap_gb}")
    if offload not in ("disk", "host"):
        raise UserError(f"--offload must be 'disk' or 'host', got {offload!r}")


def check_format_names(formats: Sequence[str], pins: Mapping | None, bans: Mapping | None, *,
                       pins_in_menu: bool = True) -> None:
    """Every format named in the menu, a pin or a ban is registered (names are exact, lower case) and,
    with ``pins_in_menu``, every pinned format is on the menu."""
    from .formats import available_formats

    known = available_formats()

    def check(name: Any, where: str) -> None:
        if name not in known:
            raise UserError(f"{where}: unknown format {name!r}; registered formats: {', '.join(known)}")

    for f in formats:
        check(f, "--formats")
    menu = [*formats, "bf16"]
    for rx, fmt in (pins or {}).items():
        check(fmt, f"--pins {rx!r}")
        if pins_in_menu and fmt not in menu:
            raise UserError(f"--pins {rx!r} -> {fmt!r} is not in the format menu {menu}; add it to --formats")
    for rx, banned in (bans or {}).items():
        if isinstance(banned, str):
            raise UserError(f"--bans {rx!r} takes a list of formats, e.g. [{banned!r}]")
        for fmt in banned:
            check(fmt, f"--bans {rx!r}")


def pin_of(name: str, pins: Mapping[str, str]) -> tuple[str, str] | None:
    """``(regex, format)`` of the pin on Linear ``name`` (None: unpinned); pinned to two formats is an error."""
    hits = {(rx, fmt) for rx, fmt in pins.items() if re.search(rx, name)}
    if len({fmt for _, fmt in hits}) > 1:
        raise ValueError(f"{name} is pinned to two formats ({sorted(hits)}); make the pin regexes disjoint")
    return min(hits) if hits else None


def check_pins_bans(names: Sequence[str], pins: Mapping | None, bans: Mapping | None) -> None:
    """Against the body Linears' names: every pin/ban regex matches one, no Linear is pinned to two
    formats, or pinned to a format a ban takes from it."""
    pins, bans = dict(pins or {}), dict(bans or {})
    for rx in [*pins, *bans]:
        if not any(re.search(rx, n) for n in names):
            raise ValueError(f"pin/ban regex {rx!r} matches no body Linear (e.g. {list(names)[:2]}); fix the regex")
    for name in names:
        pin = pin_of(name, pins)
        for rx, banned in bans.items():
            if pin is not None and pin[1] in banned and re.search(rx, name):
                raise ValueError(f"{name} is pinned to {pin[1]!r} by {pin[0]!r} and banned from it by {rx!r}; "
                                "drop the pin or the ban")


def _check_regex(what: str, rx: Any) -> None:
    try:
        re.compile(rx)
    except (re.error, TypeError) as e:
        raise UserError(f"--{what}: {rx!r} is not a valid regular expression ({e})") from None


def _check_source(source: str) -> None:
    from .data import BUILTIN, GENERATED, HF_PREFIX

    if source in (BUILTIN, GENERATED) or source.startswith(HF_PREFIX):
        return
    path = Path(source)
    if not path.is_file():
        raise UserError(f"--calibration.source {source} is not a file; pass a .txt or .jsonl file, 'builtin', "
                        "'generated' (sampled from the model) or hf:NAME[:CONFIG][:SPLIT]")
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f"--calibration.source {source}: unsupported file type {path.suffix!r}; use .txt or .jsonl")


# ---- the model, before its weights load -----------------------------------------------------------
def check_model_source(model: str | None, gguf_file: str | None, *, seqlens: Mapping[str, int],
                       streamed: bool = False) -> None:
    """From the config and file headers only: a causal LM, with enough positions for ``seqlens``
    (option -> tokens per window), whose safetensors files are whole (and, ``streamed``, not a GGUF)."""
    from .models import resolve_model_source

    if streamed and (model is None or gguf_file is not None or str(model).endswith(".gguf")):
        raise ValueError("--memory_cap_gb streams layers from a Hugging Face folder with safetensors weights, not a "
                         "GGUF (the default model included); save it once with save_pretrained and pass that folder")
    check_model_path(model, "--model")
    source, gguf = resolve_model_source(model, gguf_file)
    folder = Path(source)
    if folder.is_dir() and gguf is None:
        check_weight_files(folder)
    config = _config(source, gguf)
    if config is None:
        return  # a hub id the hub cannot provide here: the loader says so
    problem = causal_problem(config)
    if problem:
        raise UserError(f"{model or source}: {problem}")
    positions = max_positions(config)
    for option, tokens in seqlens.items():
        if positions is not None and tokens > positions:
            raise UserError(f"{option} needs windows of {tokens} tokens, the model takes at most {positions} "
                            f"positions; lower {option} to at most {positions}")


def _config(source: str, gguf: str | None):
    from transformers import AutoConfig

    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        if Path(source).exists():
            raise UserError(f"{source}: cannot read the model's config ({str(e).splitlines()[0]}); "
                            "pass a Hugging Face model folder or a .gguf file") from None
        return None


def causal_problem(config: Any) -> str | None:
    """Why a config is not a decoder-only causal LM (or multimodal model with one) pq-lightning can quantize."""
    from transformers.models.auto import modeling_auto

    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        return (f"{archs[0] if archs else config.model_type} is an encoder-decoder model; pq-lightning quantizes "
                "decoder-only causal LMs")
    causal = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if archs and not any(a.endswith(causal) for a in archs):
        return f"{archs[0]} is not a causal LM (…ForCausalLM, …ForConditionalGeneration); pass a causal LM"
    known = {**modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, **modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}
    if not archs and getattr(config, "model_type", None) not in known:
        return f"model type {config.model_type!r} has no causal-LM class in transformers; pass a causal LM"
    return None


def max_positions(config: Any) -> int | None:
    """The most positions the model's text decoder takes (None when its config does not say)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_weight_files(folder: Path) -> None:
    """Every safetensors file a Hugging Face folder lists is present and whole (its header and length)."""
    from .integrity import safetensors_problem

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{index} is unreadable ({e}); restore the model folder") from None
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    for name in names:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is listed in {index.name} but missing; restore the model folder")
        problem = safetensors_problem(path)
        if problem:
            raise UserError(f"{folder}: {problem}; restore or re-download the model")


# ---- the loaded weights ---------------------------------------------------------------------------
_CHECKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def checked_fingerprint(model: torch.nn.Module) -> str:
    """The model's fingerprint (:mod:`pq_lightning.fingerprint`), refusing NaN / Inf weights on the same read."""
    from .fingerprint import model_fingerprint

    bad: list[str] = []

    def visit(name: str, t: torch.Tensor) -> None:
        if t.dtype not in _CHECKED_DTYPES:
            return
        # a sum is finite exactly when every value is (weights never sum past fp32's range): 30x cheaper
        # than an elementwise test, which runs only on a tensor that fails the sum
        if bool(torch.isfinite(t.sum(dtype=torch.float32 if t.dtype == torch.float16 else None))):
            return
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            nan = int(torch.isnan(t).sum())
            bad.append(f"{name} ({nan:,} NaN, {int((~finite).sum()) - nan:,} Inf)")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small reductions: waking a thread pool costs more than they do
    try:
        fingerprint = model_fingerprint(model, visit=visit)
    finally:
        torch.set_num_threads(threads)
    if bad:
        raise UserError(f"the model's weights hold NaN or Inf values: {'; '.join(bad[:3])}"
                        + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
                        + "; the file is damaged or comes from a diverged run: load a sound copy")
    return fingerprint


# ---- pq-lightning validate ------------------------------------------------------------------------
def check_model_path(model: str | None, role: str) -> None:
    """A model given as a local path exists (a hub id ``org/name`` is left to the loader)."""
    if model is None or Path(model).exists():
        return
    looks_local = model.startswith((".", "/", "~")) or model.count("/") >= 2 or model.endswith(".gguf")
    if looks_local:
        raise FileNotFoundError(f"{role} {model} does not exist; pass a Hugging Face folder, a .gguf file or a hub id")


def candidate_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a quantized checkpoint folder to evaluate (missing, half-written, unquantized), or None."""
    from .export import MANIFEST_NAME, checkpoint_problems

    path = Path(path)
    hint = "pass the checkpoint-<label> folder of a finished quantize run"
    if not path.exists():
        return f"candidate {path} does not exist; {hint}"
    if not path.is_dir():
        return f"candidate {path} is a file, not a checkpoint folder; {hint}"
    if re.search(r"\.tmp-[0-9a-f]{8}$", path.name) or any(path.glob(".shard-*")):
        return f"candidate {path} is a half-written export (its run stopped before the end); {hint}"
    config = path / "config.json"
    if not config.is_file():
        return f"candidate {path} holds no config.json: not a model folder, or a half-written one; {hint}"
    try:
        quant = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError) as e:
        return f"candidate {path}: config.json is unreadable ({e}); {hint}"
    if not quant:
        return (f"candidate {path} is an unquantized Hugging Face model (no quantization_config); pass it as the "
                "reference, and a quantized checkpoint as the candidate")
    if (path / MANIFEST_NAME).is_file():
        problems = checkpoint_problems(path)
        if problems:
            return f"candidate {path} is not what its export wrote ({problems[0]}); export it again"
    try:
        check_weight_files(path)
    except UserError as e:
        return f"candidate {e}"
    return None
