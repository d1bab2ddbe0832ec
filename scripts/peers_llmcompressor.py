"""Run one llm-compressor recipe on prepared calibration windows and save the compressed checkpoint.

A peer runner for ``scripts/bench_vs_peers.py``. It runs under an interpreter that has llm-compressor
(e.g. a separate virtual environment, see the bench's docstring) and needs nothing of the
``pq_lightning`` package (only its standard-library file ``atomic.py``, loaded by path), so the two
projects' dependency pins never meet in one environment.

Inputs are exactly what the bench hands every row:

* ``--model``: a plain Hugging Face folder (the BF16 reference the bench saved);
* ``--tokens``: a safetensors file whose ``input_ids`` tensor ``[N, seqlen]`` (int64) holds the
  calibration windows, each one batch of one sequence, used in file order (no shuffling, no
  truncation, no re-tokenisation);
* ``--recipe``:

  - ``nvfp4_gptq``: ``GPTQModifier`` with the preset scheme ``NVFP4`` (W4A4: FP4 E2M1 weights in
    groups of 16 with FP8 scales and a per-tensor global scale, activations quantised per 16 under
    a calibrated global scale) on every Linear but ``lm_head``;
  - ``nvfp4_fp8_down``: llm-compressor's documented non-uniform recipe (its
    ``examples/quantization_non_uniform``): ``QuantizationModifier`` (round-to-nearest, activation
    scales calibrated) with the preset ``FP8_DYNAMIC`` (FP8 per-channel weights, dynamic per-token
    FP8 activations) on every ``down_proj`` and ``NVFP4`` on the attention projections and
    ``gate_proj`` / ``up_proj``;
  - ``fp8_dynamic``: ``QuantizationModifier`` with ``FP8_DYNAMIC`` on every Linear but ``lm_head``
    (data-free: the windows are not needed and not passed).

Outputs (in ``--output``): the compressed-tensors checkpoint (``save_pretrained(...,
save_compressed=True)`` plus the tokenizer) and ``peer_run.json`` with the wall time of the
``oneshot`` call alone (``oneshot_s``), the model load and save times, the number of calibration
windows and tokens, the recipe as llm-compressor resolved it, and the package versions.

    /work/venvs/peers/bin/python scripts/peers_llmcompressor.py --model out/peers/reference \\
        --tokens out/peers/calibration.safetensors --recipe nvfp4_gptq --output out/peers/llmc-nvfp4_gptq
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RECIPES = ("nvfp4_gptq", "nvfp4_fp8_down", "fp8_dynamic")
RUN_FILE = "peer_run.json"

#: Linears of a Llama-style decoder that the mixed recipe puts in NVFP4 (down_proj goes to FP8).
_NVFP4_TARGETS_MIXED = [
    r"re:.*self_attn\.q_proj$",
    r"re:.*self_attn\.k_proj$",
    r"re:.*self_attn\.v_proj$",
    r"re:.*self_attn\.o_proj$",
    r"re:.*mlp\.gate_proj$",
    r"re:.*mlp\.up_proj$",
]
_FP8_TARGETS_MIXED = [r"re:.*mlp\.down_proj$"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model folder (the BF16 reference)")
    p.add_argument("--tokens", help="safetensors file with input_ids [N, seqlen] int64 (not needed by fp8_dynamic)")
    p.add_argument("--recipe", required=True, choices=RECIPES)
    p.add_argument("--output", required=True, help="folder for the compressed checkpoint and peer_run.json")
    p.add_argument("--dtype", default="auto", help="dtype the model is loaded in (default: as stored)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    args = p.parse_args(argv)
    if args.recipe != "fp8_dynamic" and not args.tokens:
        p.error(f"--recipe {args.recipe} calibrates on data: pass --tokens <file.safetensors>")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def load_windows(path: str) -> Any:
    """The ``input_ids`` tensor ``[N, seqlen]`` (int64) of a safetensors file, checked."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(path)
    if "input_ids" not in tensors:
        raise KeyError(f"{path} holds {sorted(tensors)}, not 'input_ids'; write the windows under that name.")
    ids = tensors["input_ids"]
    if ids.ndim != 2 or ids.dtype != torch.int64 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"{path}: input_ids must be int64 [N >= 1, seqlen >= 2], got {ids.dtype} {tuple(ids.shape)}")
    return ids


def calibration_loader(windows: Any) -> Any:
    """A DataLoader yielding each window as one batch ``{input_ids, attention_mask}`` ``[1, seqlen]``, in order."""
    import torch
    from torch.utils.data import DataLoader

    rows = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
    return DataLoader(rows, batch_size=1, shuffle=False)


def build_recipe(name: str) -> Any:
    """The llm-compressor modifier of a recipe name (see the module docstring)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if name == "nvfp4_gptq":
        return GPTQModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"])
    if name == "nvfp4_fp8_down":
        return QuantizationModifier(
            ignore=["lm_head"],
            config_groups={
                "group_0": preset_name_to_scheme("FP8_DYNAMIC", _FP8_TARGETS_MIXED),
                "group_1": preset_name_to_scheme("NVFP4", _NVFP4_TARGETS_MIXED),
            },
        )
    if name == "fp8_dynamic":
        return QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
    raise ValueError(f"unknown recipe {name!r}; choose one of {RECIPES}")


def versions(
    packages: Sequence[str] = ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate"),
) -> dict[str, str]:
    """Versions of the packages this run depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def load_atomic() -> Any:
    """pq_lightning/atomic.py, loaded by path: it needs only the standard library, so this runner
    writes atomically without importing (or needing) the pq_lightning package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_pq_atomic", Path(__file__).resolve().parents[1] / "pq_lightning" / "atomic.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, run ``oneshot`` (timed alone), save; return the record written to ``peer_run.json``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    atomic = load_atomic()
    atomic.check_out_dir(out, overwrite=args.overwrite)  # refuse before oneshot, not after

    windows = load_windows(args.tokens) if args.recipe != "fp8_dynamic" else None

    t0 = time.perf_counter()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - t0

    from llmcompressor import oneshot

    recipe = build_recipe(args.recipe)
    kwargs: dict[str, Any] = {"model": model, "recipe": recipe, "tokenizer": tokenizer}
    if windows is not None:
        kwargs.update(
            dataset=calibration_loader(windows),
            num_calibration_samples=int(windows.shape[0]),
            max_seq_length=int(windows.shape[1]),
            shuffle_calibration_samples=False,
        )
    t0 = time.perf_counter()
    model = oneshot(**kwargs)
    oneshot_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    with atomic.atomic_dir(out, overwrite=args.overwrite) as tmp:  # the old folder goes only once this is whole
        model.save_pretrained(str(tmp), save_compressed=True)
        tokenizer.save_pretrained(str(tmp))
        save_s = time.perf_counter() - t0

        record: dict[str, Any] = {
            "tool": "llm-compressor",
            "recipe": args.recipe,
            "modifier": json.loads(recipe.model_dump_json()) if hasattr(recipe, "model_dump_json") else repr(recipe),
            "oneshot_s": oneshot_s,
            "load_s": load_s,
            "save_s": save_s,
            "num_windows": int(windows.shape[0]) if windows is not None else 0,
            "seqlen": int(windows.shape[1]) if windows is not None else 0,
            "tokens_file": str(args.tokens) if windows is not None else None,
            "threads": torch.get_num_threads(),
            "versions": versions(),
        }
        (tmp / RUN_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the run record as one JSON line at the end."""
    args = parse_args(argv)
    try:
        import llmcompressor  # noqa: F401
    except ImportError as err:
        print(
            f"llm-compressor is not importable from {sys.executable} ({err}). Install it in a separate "
            "environment (`python3 -m venv /work/venvs/peers && /work/venvs/peers/bin/pip install torch "
            "llmcompressor`) and run this script with that interpreter.",
            file=sys.stderr,
        )
        return 2
    record = run(args)
    print(json.dumps({k: record[k] for k in ("recipe", "oneshot_s", "load_s", "save_s", "num_windows", "seqlen")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
