"""Every YAML in configs/ parses against the entry point it is written for (nothing is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def _lightning_parser():
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--seed_everything", type=bool | int, default=True)
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.add_lightning_class_args(L.LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(L.LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    return parser


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"smollm2-135m.yaml", "probe-smollm2.yaml", "finetune-smollm2-with-probe.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw.get("model"), dict):  # a LightningCLI config (model: class_path): fit/validate/test/predict
        cfg = _lightning_parser().parse_path(str(path))
        model_cls = cfg.model.class_path
        assert model_cls.startswith("pq_lightning."), model_cls
        for cb in cfg.trainer.callbacks or []:
            assert cb.class_path.startswith(("pq_lightning.", "lightning.")), cb.class_path
    else:  # a quantize config
        from pq_lightning.cli import quantize_parser

        cfg = quantize_parser().parse_args(["--config", str(path)])
        assert cfg.output_dir
        assert cfg.estimator in ("trace", "diag", "output")
        for f in cfg.formats or []:
            from pq_lightning.formats import get_format

            get_format(f)
        assert cfg.trainer.devices >= 1 if isinstance(cfg.trainer.devices, int) else cfg.trainer.devices


def test_probe_config_attaches_the_probe():
    cfg = _lightning_parser().parse_path(str(Path(__file__).parent.parent / "configs" / "probe-smollm2.yaml"))
    (probe,) = [c for c in cfg.trainer.callbacks if c.class_path.endswith("FisherProbe")]
    assert probe.class_path == "pq_lightning.callbacks.FisherProbe"
    assert cfg.model.init_args.probe_only is True


def test_quantize_command_line_overrides_config(tmp_path):
    from pq_lightning.cli import quantize_parser

    path = Path(__file__).parent.parent / "configs" / "smollm2-135m.yaml"
    cfg = quantize_parser().parse_args(
        ["--config", str(path), "--target_bits", "[4.5,6.0]", "--calibration.num_samples", "3", "--output_dir", "x"]
    )
    assert cfg.target_bits == [4.5, 6.0]
    assert cfg.calibration.num_samples == 3
    assert cfg.output_dir == "x"
    assert cfg.calibration.seqlen == 256  # from the file


def test_unknown_subcommand_is_refused(capsys):
    from pq_lightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["quantise"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("pq-lightning: error: unknown subcommand 'quantise'; use quantize, fit")
