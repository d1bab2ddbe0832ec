"""The ``pq-lightning`` command.

* ``pq-lightning quantize --config configs/smollm2-135m.yaml --target_bits 6.0 --output_dir out/x``:
  the whole pipeline (probe → cost → allocate → refine → export → evaluate → report);
* ``pq-lightning fit|validate|test|predict --config …``: LightningCLI over the project's
  LightningModules (``CausalLM`` for a probe or a fine-tuning run with the ``FisherProbe``
  callback attached; ``QuantEvaluator`` for KL / top-1 evaluation of a checkpoint) and data
  modules (``CalibrationData``, ``EvalData``).

Every config value can be overridden on the command line, and ``--print_config`` shows the
resolved configuration. A boolean option given alone is true (``--overwrite``). A budget given on
the command line replaces the config's (``--target_size_gb`` drops the config's ``target_bits``).

An expected failure (bad input, a busy or foreign output folder) prints one line that says what to
do and exits with 2; a bug prints its traceback. ``--verbose`` prints the traceback for both.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
BUDGET_OPTIONS = ("--target_bits", "--target_size_gb")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


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


def bare_flags(parser: ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with ``true`` after each boolean option given without a value (``--overwrite``)."""
    flags = {o for a in parser._actions if getattr(a, "_typehint", None) is bool for o in a.option_strings}
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in flags and (following is None or following.startswith("--")):
            out.append("true")
    return out


def _given(argv: Sequence[str], option: str) -> bool:
    return any(a == option or a.startswith((option + "=", option + "+")) for a in argv)


def budgets_from_command_line(cfg, argv: Sequence[str]) -> None:
    """A budget on the command line replaces the config's other budget (not an extra build)."""
    bits, size = (_given(argv, o) for o in BUDGET_OPTIONS)
    if size and not bits:
        cfg.target_bits = None
    if bits and not size:
        cfg.target_size_gb = None


def run_quantize(argv: Sequence[str]) -> dict:
    from .pipeline import quantize

    parser = quantize_parser()
    argv = bare_flags(parser, list(argv))
    cfg = parser.parse_args(argv)
    budgets_from_command_line(cfg, argv)
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in init.items() if k not in ("config", "__path__")}
    return quantize(**kwargs)


def lightning_cli(argv: Sequence[str]):
    from . import causal_lm, data  # noqa: F401  (registers the classes for class_path lookup)
    from .validate_cli import PQLightningCLI

    return PQLightningCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(argv),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


class _CtrlC:
    """Remembers a Ctrl-C while raising ``KeyboardInterrupt`` as usual: whatever it surfaces as (Lightning's
    ``SystemExit(1)``, an ``ImportError`` from an extension interrupted while it loaded) is an interruption."""

    def __init__(self) -> None:
        self.seen = False
        self.previous = None

    def __call__(self, signum, frame) -> None:
        self.seen = True
        if _in_finalizer(frame):  # Python prints and drops an exception raised there: deliver it again after
            threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
            return
        raise KeyboardInterrupt

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _in_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def main(argv: Sequence[str] | None = None) -> None:
    """Run a subcommand; expected failures end in one line on stderr and exit status 2."""
    from .errors import is_expected, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    with _CtrlC() as ctrl_c:
        try:
            _dispatch(argv)
        except KeyboardInterrupt:
            _interrupted(verbose)
        except SystemExit as e:
            if ctrl_c.seen and e.code not in (0, None):
                _interrupted(verbose)
            raise
        except Exception as e:
            if ctrl_c.seen:
                _interrupted(verbose)
            if verbose or not is_expected(e):
                raise
            print(f"pq-lightning: error: {one_line(e)}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None


def _interrupted(verbose: bool) -> None:
    if verbose:
        raise
    print("pq-lightning: interrupted; run the same command again to resume from the stage caches", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED) from None


def _dispatch(argv: list[str]) -> None:
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
    from .errors import UserError

    raise UserError(f"unknown subcommand {argv[0]!r}; use quantize, {', '.join(LIGHTNING_SUBCOMMANDS)}")


if __name__ == "__main__":
    main()
