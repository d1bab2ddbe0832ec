"""What the per-Linear lever studies share: their arguments, the model, the calibration windows, the Linears.

Used by ``fisher_gptq_study.py`` and ``activation_scale_study.py``: the last ``--holdout`` of
``--num-samples`` WikiText-2 validation windows are held out; the Linears are ``--linears`` of the
``--layers`` (default: the first, middle and last decoder layer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--calibration", default=str(REPO.parent / "shared" / "data" / "wikitext-2-valid-tokenized.txt"))
    p.add_argument("--num-samples", type=int, default=24, help="windows, the last --holdout of them held out")
    p.add_argument("--holdout", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers (default: first, middle, last)")
    p.add_argument("--linears", nargs="+", default=["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"])
    p.add_argument("--threads", type=int, default=2)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, list[str], int]:
    """``(model, windows, Linear names, fit token count)`` for the parsed ``args``."""
    if not 0 < args.holdout < args.num_samples:
        raise SystemExit(f"--holdout must be between 1 and --num-samples - 1, got {args.holdout}")
    sys.path.insert(0, str(REPO))
    from pq_lightning.data import make_windows, tokenize_text
    from pq_lightning.models import load_causal_lm

    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model, dtype="float32")
    ids = tokenize_text(Path(args.calibration).read_text(), tok)
    windows = make_windows(ids, seqlen=args.seqlen, num_samples=args.num_samples, bos_id=tok.bos_token_id, seed=0)
    cfg = getattr(model.config, "text_config", model.config)
    layers = args.layers or [0, cfg.num_hidden_layers // 2, cfg.num_hidden_layers - 1]
    prefix = next(n for n, _ in model.named_modules() if n.endswith("layers.0"))[: -len("0")]
    names = [f"{prefix}{li}.{lin}" for li in layers for lin in args.linears]
    return model, windows, names, (args.num_samples - args.holdout) * args.seqlen
