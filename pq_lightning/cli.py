"""The ``pq-lightning`` command.

* ``pq-lightning quantize --config configs/smollm2-135m.yaml --target_bits 6.0 --output_dir out/x``:
  the whole pipeline (probe → cost → allocate → refine → export → evaluate → report);
* ``pq-lightning fit|validate|test|predict --config …``: LightningCLI over the project's
  LightningModules (``CausalLM`` for a probe or a fine-tuning run with the ``FisherProbe``
  callback attached; ``QuantEvaluator`` for KL / top-1 evaluation of a checkpoint) and data
  modules (``CalibrationData``, ``EvalData``).

Every config value can be overridden on the command line, and ``--print_config`` shows the
resolved configuration.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def quantize_parser() -> ArgumentParser:
    from .pipeline import quantize

    parser = ArgumentParser(
        prog="pq-lightning quantize",
        description=(quantize.__doc__ or "").split("\n\n")[0],
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (see configs/)")
    parser.add_function_arguments(quantize, as_positional=False)
    return parser


def run_quantize(argv: Sequence[str]) -> dict:
    from .pipeline import quantize

    parser = quantize_parser()
    cfg = parser.parse_args(list(argv))
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in init.items() if k not in ("config", "__path__")}
    return quantize(**kwargs)


def lightning_cli(argv: Sequence[str]):
    from lightning.pytorch.cli import LightningCLI

    from . import causal_lm, data  # noqa: F401  (registers the classes for class_path lookup)

    return LightningCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(argv),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nsubcommands: quantize, " + ", ".join(LIGHTNING_SUBCOMMANDS))
        print("help of one: pq-lightning quantize --help")
        return
    if argv[0] == "quantize":
        run_quantize(argv[1:])
        return
    if argv[0] in LIGHTNING_SUBCOMMANDS:
        lightning_cli(argv)
        return
    raise SystemExit(f"pq-lightning: unknown subcommand {argv[0]!r}; use quantize, {', '.join(LIGHTNING_SUBCOMMANDS)}")


if __name__ == "__main__":
    main()
