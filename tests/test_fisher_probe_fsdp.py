"""FisherProbe under FSDP2 (Lightning's ModelParallelStrategy, CausalLM.configure_model's fully_shard):
two gloo processes on the CPU give the sums of one process on the same data.

The two-process run is launched with ``torch.distributed.run`` (torchrun) on this file, which then
acts as the worker (``__main__`` below): Lightning sees a TorchElastic environment and joins the
processes torchrun created, with no change to its strategy, launcher or FSDP. (Inside pytest,
ModelParallelStrategy's own launcher would start copies of the whole pytest command instead.)
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from pq_lightning.callbacks import FisherProbe
from torch.utils.data import DataLoader, DistributedSampler

from pq_lightning.causal_lm import CausalLM
from pq_lightning.models import model_fingerprint
from pq_lightning.sensitivity import load_sensitivity

SEQ = 12
N_WINDOWS = 8  # 2 steps: one process with batches of 4, or two processes with batches of 2 each
# (run name, CausalLM arguments): the probe alone (frozen weights), and a fine-tuning run whose second
# step is measured on updated weights
RUNS = {"probe": {"probe_only": True}, "finetune": {"learning_rate": 1e-3}}


def _windows() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(4, 128, (SEQ,), generator=gen)} for _ in range(N_WINDOWS)]


class _ShardingSpy(L.Callback):
    """Records, at the end of training (after the probe's reduction), what the probe saw."""

    def __init__(self, probe: FisherProbe) -> None:
        self.probe = probe
        self.record: dict = {}

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        self.record = {
            "world_size": trainer.world_size,
            "weights_are_dtensors": all(isinstance(m.weight, DTensor) for m in self.probe._linears.values()),
            "sharded": sorted(self.probe._sharded),
            "cached_qweights": len(self.probe._qweights),
        }


def _worker(out_dir: Path) -> None:
    """One rank of the two-process run (started by torchrun)."""
    import warnings

    from conftest import build_tiny_llama  # tests/ is sys.path[0] when this file runs as a script
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for run, kwargs in RUNS.items():
        probe = FisherProbe(output_path=str(out_dir / f"{run}.safetensors"))
        spy = _ShardingSpy(probe)
        module = CausalLM.from_model(build_tiny_llama(initializer_range=0.2), **kwargs)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        # Lightning's own distributed sampler shuffles training data; without shuffling, step k of the
        # two ranks together covers the windows of step k of the one process (batches of 4)
        windows = _windows()
        sampler = DistributedSampler(windows, num_replicas=2, rank=int(os.environ["RANK"]), shuffle=False)
        trainer = quiet_trainer([probe, spy], devices=2, strategy=strategy, use_distributed_sampler=False)
        trainer.fit(module, DataLoader(windows, batch_size=2, sampler=sampler))
        if int(os.environ["RANK"]) == 0:
            (out_dir / f"{run}.json").write_text(json.dumps(spy.record))


def _rel(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.distributed
@pytest.mark.usefixtures("quiet_single_thread")
def test_fsdp2_two_processes_equal_one(make_tiny_llama, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, str(Path(__file__).resolve()), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    hf = make_tiny_llama(initializer_range=0.2)
    for run, kwargs in RUNS.items():
        single = FisherProbe(output_path=str(tmp_path / f"single-{run}.safetensors"))
        quiet_trainer([single]).fit(
            CausalLM.from_model(copy.deepcopy(hf), **kwargs), DataLoader(_windows(), batch_size=4)
        )
        ref = single.sensitivity
        # the file's fingerprint is that of the whole model (taken before sharding)
        fsdp = load_sensitivity(tmp_path / f"{run}.safetensors", model_fingerprint=model_fingerprint(hf))
        record = json.loads((tmp_path / f"{run}.json").read_text())
        # the weights really were sharded, and no Q(W) of a sharded Linear was kept
        assert record["world_size"] == fsdp.meta["world_size"] == 2
        assert record["weights_are_dtensors"]
        assert record["sharded"] == sorted(ref.linears) and len(ref.linears) == 14
        assert record["cached_qweights"] == 0

        assert fsdp.n_tokens == ref.n_tokens == N_WINDOWS * (SEQ - 1), run
        assert fsdp.linears.keys() == ref.linears.keys()
        for name, a in fsdp.linears.items():
            b = ref[name]
            torch.testing.assert_close(a.h_trace, b.h_trace, rtol=1e-5, atol=0, msg=f"{run} {name}")
            torch.testing.assert_close(a.diag_out, b.diag_out, rtol=1e-5, atol=0, msg=f"{run} {name}")
            torch.testing.assert_close(a.diag_in, b.diag_in, rtol=1e-5, atol=0, msg=f"{run} {name}")
            assert a.output_error.keys() == b.output_error.keys() == {"nvfp4", "fp8"}
            for f in a.output_error:
                assert b.output_error[f] > 0
                assert _rel(a.output_error[f], b.output_error[f]) < 1e-5, (run, name, f)


def test_fsdp1_and_tensor_parallel_are_refused():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        FisherProbe._check_strategy(SimpleNamespace(strategy=FSDPStrategy()))

    class _Mesh:  # a stand-in for the device mesh of 2 x 2 processes (data x tensor parallel)
        def __getitem__(self, dim):
            return SimpleNamespace(size=lambda: 2)

        def size(self):
            return 4

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
    strategy._device_mesh = _Mesh()  # what setup_environment sets on a 4-process run
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        FisherProbe._check_strategy(SimpleNamespace(strategy=strategy))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
