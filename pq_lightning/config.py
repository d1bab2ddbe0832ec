"""Settings of the ``quantize`` stages: explicit, frozen, validated on construction.

Each maps to a block of the YAML configs (``calibration:``, ``probe:``, ``refine:``, ``evaluation:``,
``tune:``, ``trainer:``; ``smooth:`` is :class:`pq_lightning.smooth.SmoothConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration windows (probe, GPTQ Hessians and held-out scoring).

    ``source``: ``builtin`` (Python's docstrings, offline), a ``.txt`` / ``.jsonl`` file,
    ``hf:NAME[:CONFIG][:SPLIT]``, or ``generated`` (sampled from the model itself:
    :mod:`pq_lightning.self_generated`).
    """

    source: str = "builtin"
    seqlen: int = 512
    num_samples: int = 64
    seed: int = 0
    batch_size: int = 4
    holdout_fraction: float = 0.125

    def __post_init__(self) -> None:
        if self.seqlen < 2:
            raise ValueError(f"calibration.seqlen must be >= 2 (BOS + one token), got {self.seqlen}")
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("calibration.num_samples and calibration.batch_size must be >= 1, got "
                             f"{self.num_samples} and {self.batch_size}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"calibration.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")


@dataclass(frozen=True)
class ProbeConfig:
    """The Fisher probe (:class:`pq_lightning.callbacks.FisherProbe`) as the pipeline runs it.

    ``output_error_tokens``: positions per window on which the output-space error (the ``output``
    estimator) is measured: a fraction in ``(0, 1]``, a count, or ``None`` for all (exact). A subset is
    an unbiased estimate at that fraction of the error's cost; the Fisher trace and diagonals always
    use every token. The default, a quarter, kept the allocator's decisions on SmolLM2-135M
    (``scripts/probe_subsample_study.py``, 16 x 512 WikiText-2 tokens: Spearman 0.99 per format
    against the exact errors, the plans' exact predicted Δloss within 0.34 % of the exact plans' at
    4.5-7 bpp) at 2.5 instead of 3.6 forward-equivalents per token.

    ``num_samples``: the probe reads only the first this many calibration windows (a uniform random
    subset: windows are drawn in random order); ``None`` reads them all. GPTQ still uses every window.
    The Fisher statistics are heavy-tailed (a few rare tokens carry much of some early Linears' trace), so
    any subsample moves some decisions: on SmolLM2-135M at 64 x 512 (``scripts/probe_subsample_study.py``)
    the plans of a 16-window probe differ from an exact 64-window probe's in 15-21 of 210 Linears at
    5.5-6 bpp, those of the former default (64 windows, a quarter of the positions) in 15-18; the README
    has the KL of both.
    """

    output_error_tokens: int | float | None = 0.25
    num_samples: int | None = 16

    def __post_init__(self) -> None:
        from .fisher import check_error_tokens

        check_error_tokens(self.output_error_tokens)
        if self.num_samples is not None and (isinstance(self.num_samples, bool) or self.num_samples < 1):
            raise ValueError(f"probe.num_samples must be a window count >= 1 or null (every window), "
                             f"got {self.num_samples!r}")


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol: KL and top-1 agreement against the unquantized model."""

    enabled: bool = True
    path: str | None = None
    window: int = 511
    max_windows: int | None = 16
    batch_size: int = 2
    top_k: int = 20


@dataclass(frozen=True)
class RefineConfig:
    """GPTQ and the scale sweep on NVFP4 Linears, each kept only when it beats RTN on held-out data;
    with ``refit`` the chosen recipe is then solved again on all calibration tokens.

    ``dampening``: GPTQ dampings (under the swept scales when ``sweep`` is on);
    ``own_scale_dampening``: with the sweep, the dampings also tried under GPTQ's own group scales
    (``null``: the smallest of ``dampening``); see :class:`pq_lightning.gptq.GPTQConfig`.
    ``rtn_errors``: also measure the held-out output error of the Linears packed by RTN by rule
    (FP8 unless ``fp8_gptq``), for the report; costs their Hessians and layer passes, which no
    decision needs (off: their groups are only packed and put in their served state).
    ``activation_memory_gb``: the most stored hidden states and kept inputs the layer walk holds in
    memory; beyond it they go to a scratch file under the output's ``work/`` (``None``: no limit).
    ``walk``: ``sequential`` refines each budget in its own walk, every layer seeing the layers above
    quantized as that budget serves them (:mod:`pq_lightning.refine`); ``shared`` refines every budget
    in one walk on the unquantized stream, each distinct (Linear, format, fold) decided once
    (:mod:`pq_lightning.shared_walk`): a sweep of budgets costs about one walk.
    ``compensate_inputs``: GPTQ and the sweep of a W4A4 Linear fit the weight that compensates for
    its quantized input, ``E‖W x − Ŵ x̂‖²`` instead of ``E‖(W − Ŵ) x̂‖²``, at the ``compensate_damp``
    damping (relative, of the regression) with the least held-out error, or not where none beats
    the weight itself (:mod:`pq_lightning.input_error`); costs two more ``[in, in]`` sums per group.
    ``sweep_grid``: the multipliers of each 16-group's amax the NVFP4 scale sweep tries;
    ``scale_headroom``: NVFP4 weight global scale ``448·6 / (headroom · amax)`` (a power of two: RTN
    unchanged), which lets the largest groups take multipliers above 1 too.
    ``fp8_gptq``: GPTQ on the FP8 per-channel Linears too (gated against RTN like NVFP4's); on by
    default: ``kl_conf`` at 6.0 bpp fell on SmolLM2-135M and Gemma-3-270M at 16 x 256 and 64 x 512
    calibration tokens (-2.9 % to -8.9 %, README "FP8 GPTQ"), for a refine stage that sums every FP8
    Linear's Hessian too (1.5x the forward-equivalents per token).
    ``reprice``: before the budgets' plans are final, refine the plan of the fewest bits (every
    Linear in its smallest format: all NVFP4) once, scale each Linear's predicted Δloss under the
    formats refine improves by what refine delivered on it (held-out output error after refine over
    RTN's, weight and input error together: :func:`pq_lightning.cost.price_refined`), and plan every
    budget again on those prices. Costs that one walk (shared with a 4.5-bpp budget, whose plan it
    is) and two ``[in, in]`` sums per W4A4 group in every walk; needs ``gptq`` and the ``output``
    estimator.
    """

    gptq: bool = True
    fp8_gptq: bool = True
    rtn_errors: bool = False
    dampening: list[float] = field(default_factory=lambda: [0.03, 0.1])
    own_scale_dampening: list[float] | None = None
    block_size: int = 128
    act_order: bool = True
    sweep: bool = True
    refit: bool = True
    activation_memory_gb: float | None = 4.0
    walk: Literal["sequential", "shared"] = "sequential"
    compensate_inputs: bool = False
    compensate_damp: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    sweep_grid: list[float] = field(default_factory=lambda: [0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2])
    scale_headroom: float = 1.0
    reprice: bool = False

    def __post_init__(self) -> None:
        if self.reprice and not self.gptq:
            raise ValueError("refine.reprice prices what GPTQ and the sweep deliver: it needs refine.gptq true")
        if self.walk not in ("sequential", "shared"):
            raise ValueError(f"refine.walk must be 'sequential' or 'shared', got {self.walk!r}")
        if self.compensate_inputs and (not self.compensate_damp or any(
                not (d >= 0 and math.isfinite(d)) for d in self.compensate_damp)):
            raise ValueError("refine.compensate_damp needs at least one finite damping >= 0 "
                             f"(e.g. [0.01, 0.1, 1.0]), got {self.compensate_damp}")
        if not self.sweep_grid or any(not (m > 0 and math.isfinite(m)) for m in self.sweep_grid):
            raise ValueError(f"refine.sweep_grid needs finite multipliers > 0, got {self.sweep_grid}")
        h = float(self.scale_headroom)
        if not (h >= 1 and math.isfinite(h) and math.frexp(h)[0] == 0.5):
            raise ValueError(f"refine.scale_headroom must be a power of two >= 1 (1, 2, 4), got {self.scale_headroom}")


@dataclass(frozen=True)
class TuneConfig:
    """Norm tuning after refine (:mod:`pq_lightning.norm_tune`): the BF16 norm gains in front of the
    quantized Linears fitted to the unquantized model's logits (KL, full vocabulary) over the
    calibration windows, by ``epochs`` passes of Adam at ``lr`` (a relative step per gain, cosine to
    zero) over batches of ``batch_size`` windows. ``keep``: ``better`` keeps the tuned gains only when the KL on the held-out windows fell
    (else the checkpoint carries the refined model's norms); ``always`` keeps them. ``norms``:
    ``inputs`` tunes the norms whose output is a Linear's input (every norm of a Llama; on Gemma-3 not
    the post-attention / post-feed-forward norms on the residual side, nor the q/k norms), ``all``
    every norm of the decoder layers and the final norm. ``codes_lr`` > 0 also moves the NVFP4 codes
    with their scales held (:class:`~pq_lightning.norm_tune.CodeShift`; Adam's step in units of each
    group's scale): the checkpoint is the same format with other codes. Off by default: on SmolLM2-135M
    at 4.5 bpp it moved no code, a few thousand for no test gain (64 x 512), or millions that wrecked
    the held-out KL (16 x 256), depending on the step (README, "Code tuning").

    On by default: KL on WikiText-2 test fell on SmolLM2-135M and Gemma-3-270M at 4.5 and 6.0 bpp, at
    16 x 256 and at 64 x 512 calibration tokens (at 64 x 512 ``kl_conf`` -9.5 % / -1.4 % on SmolLM2,
    -16 % / -6 % on Gemma-3; ``norms: all`` raised Gemma's 6.0-bpp KL 7 %; the README has the figures).
    ``enabled: false`` writes the refined model's norms as they are.
    """

    enabled: bool = True
    epochs: int = 2
    lr: float = 5e-3
    batch_size: int = 2
    keep: Literal["better", "always"] = "better"
    norms: Literal["inputs", "all"] = "inputs"
    codes_lr: float = 0.0

    def __post_init__(self) -> None:
        if not (self.codes_lr >= 0 and math.isfinite(self.codes_lr)):
            raise ValueError(f"tune.codes_lr must be a finite step >= 0 (0: codes fixed; e.g. 0.02), got {self.codes_lr}")
        if self.norms not in ("inputs", "all"):
            raise ValueError(f"tune.norms must be 'inputs' or 'all', got {self.norms!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"tune.epochs and tune.batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"tune.lr must be a finite step > 0 (e.g. 5e-3), got {self.lr}")
        if self.keep not in ("better", "always"):
            raise ValueError(f"tune.keep must be 'better' or 'always', got {self.keep!r}")


@dataclass(frozen=True)
class TrainerConfig:
    """The Lightning ``Trainer`` that runs the heavy stages (probe, refine, evaluation).

    ``strategy: ddp`` with ``devices: N`` runs them in N processes (Lightning launches them); every
    process runs the whole chain, rank zero writes the files.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1

    def kwargs(self) -> dict:
        return {"accelerator": self.accelerator, "devices": self.devices, "strategy": self.strategy,
                "num_nodes": self.num_nodes}
