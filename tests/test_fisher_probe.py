"""FisherProbe callback on a tiny random Llama, checked against a plain autograd reference."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from pq_lightning.callbacks import FisherProbe
from torch.utils.data import DataLoader

from pq_lightning.causal_lm import CausalLM
from pq_lightning.formats import get_format
from pq_lightning.models import find_body_linears, model_fingerprint
from pq_lightning.sensitivity import load_sensitivity

FORMATS = ("nvfp4", "fp8")
SEQ = 12


pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def _model(make_tiny_llama):
    # a larger init scale than the default 0.02 gives gradients of a realistic spread
    return make_tiny_llama(initializer_range=0.2)


def _windows(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, 128, (SEQ,), generator=gen)} for _ in range(n)]


def _reference(hf_model, batches, formats=FORMATS, draws=None):
    """Per-token sums by explicit outer products in float64, from autograd on the sum-reduced loss.

    ``draws``: per batch ``(positions [batch, k], scale)``: the output-space error then sums only the
    drawn positions, times ``scale``."""
    model = copy.deepcopy(hf_model).float()
    linears = find_body_linears(model)
    sums = {
        n: {
            "h": torch.zeros((), dtype=torch.float64),
            "out": torch.zeros(m.out_features, dtype=torch.float64),
            "in": torch.zeros(m.in_features, dtype=torch.float64),
            "err": dict.fromkeys(formats, 0.0),
        }
        for n, m in linears.items()
    }
    n_tokens = 0
    for i_batch, ids in enumerate(batches):
        captured = {}

        def hook(name, captured=captured):
            def fn(module, args, output):
                output.retain_grad()
                captured[name] = (args[0].detach(), output)

            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
        logits = model(input_ids=ids, use_cache=False).logits
        for h in handles:
            h.remove()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        model.zero_grad()
        loss.backward()
        n_tokens += ids[:, 1:].numel()
        for name, (x, out) in captured.items():
            g = out.grad
            w = linears[name].weight.detach()
            quant = {}
            for f in formats:
                fmt = get_format(f)
                if fmt.supports(tuple(w.shape)):
                    quant[f] = (
                        fmt.fake_quant(w).double(),
                        [fmt.fake_quant_activation(x[b]) for b in range(x.shape[0])],
                    )
            s = sums[name]
            for b in range(x.shape[0]):
                for t in range(x.shape[1]):
                    xt, gt = x[b, t].double(), g[b, t].double()
                    per_token = torch.outer(gt, xt).pow(2)
                    s["h"] += per_token.sum()
                    s["out"] += per_token.sum(1)
                    s["in"] += per_token.sum(0)
                    weight = 1.0
                    if draws is not None:
                        positions, scale = draws[i_batch]
                        weight = scale if t in positions[b].tolist() else 0.0
                    for f, (qw, xq) in quant.items():
                        err = w.double() @ xt - qw @ xq[b][t].double()
                        s["err"][f] += weight * 0.5 * float((gt.pow(2) * err.pow(2)).sum())
    return sums, n_tokens


def _rel(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _assert_close(sens, other, tol):
    """``sens`` (a Sensitivity) against another Sensitivity."""
    assert sens.n_tokens == other.n_tokens
    assert sens.linears.keys() == other.linears.keys()
    for name, a in sens.linears.items():
        b = other[name]
        assert _rel(a.h_trace, b.h_trace) < tol, name
        assert _rel(a.diag_out, b.diag_out) < tol, name
        assert _rel(a.diag_in, b.diag_in) < tol, name
        assert a.output_error.keys() == b.output_error.keys()
        for f in a.output_error:
            assert _rel(a.output_error[f], b.output_error[f]) < tol, (name, f)


def test_probe_matches_per_token_reference(make_tiny_llama, tmp_path):
    hf = _model(make_tiny_llama)
    data = _windows(4)
    probe = FisherProbe(
        output_path=str(tmp_path / "sens.safetensors"), formats=list(FORMATS), output_error_tokens=None
    )
    module = CausalLM.from_model(copy.deepcopy(hf), probe_only=True)
    quiet_trainer([probe]).fit(module, DataLoader(data, batch_size=2))

    batches = [torch.stack([d["input_ids"] for d in data[i : i + 2]]) for i in (0, 2)]
    ref, n_tokens = _reference(hf, batches)
    sens = probe.sensitivity
    assert sens.n_tokens == n_tokens == 4 * (SEQ - 1)
    assert len(sens.linears) == 14
    for name, r in ref.items():
        lin = sens[name]
        assert _rel(lin.h_trace, r["h"] / n_tokens) < 1e-5, name
        assert _rel(lin.diag_out, r["out"] / n_tokens) < 1e-5, name
        assert _rel(lin.diag_in, r["in"] / n_tokens) < 1e-5, name
        assert set(lin.output_error) == set(FORMATS)
        for f in FORMATS:
            assert r["err"][f] > 0
            assert _rel(lin.output_error[f], r["err"][f] / n_tokens) < 1e-5, (name, f)

    # the file on disk holds the same numbers and the model's fingerprint
    on_disk = load_sensitivity(tmp_path / "sens.safetensors", model_fingerprint=model_fingerprint(hf))
    _assert_close(on_disk, sens, 1e-15)
    assert on_disk.meta["formats"] == list(FORMATS)
    assert on_disk.meta["estimator"]["activation_global_scale"] == "per_sequence_amax"


def test_gradient_accumulation_equals_bigger_batch(make_tiny_llama, tmp_path):
    hf = _model(make_tiny_llama)
    data = _windows(4, seed=1)
    results = []
    for batch_size, accumulate in ((2, 1), (1, 2)):
        probe = FisherProbe(
            output_path=str(tmp_path / f"s{batch_size}.safetensors"), output_error_tokens=None
        )
        module = CausalLM.from_model(copy.deepcopy(hf), probe_only=True)
        quiet_trainer([probe], accumulate_grad_batches=accumulate).fit(
            module, DataLoader(data, batch_size=batch_size)
        )
        results.append(probe.sensitivity)
    _assert_close(results[1], results[0], 1e-6)


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_probe_does_not_change_fine_tuning(make_tiny_llama, tmp_path):
    hf = _model(make_tiny_llama)
    data = _windows(6, seed=2)
    runs = []
    for with_probe in (False, True):
        torch.manual_seed(0)
        module = CausalLM.from_model(copy.deepcopy(hf), learning_rate=1e-2)
        rec = _LossRecorder()
        cbs = [rec] + ([FisherProbe(output_path=str(tmp_path / "ft.safetensors"))] if with_probe else [])
        quiet_trainer(cbs, max_epochs=2).fit(module, DataLoader(data, batch_size=2))
        runs.append((rec.losses, {k: v.detach().clone() for k, v in module.model.state_dict().items()}, cbs))
    (loss_a, w_a, _), (loss_b, w_b, cbs) = runs
    assert len(loss_a) == 6 and loss_a == loss_b
    assert loss_a[-1] < loss_a[0]  # the weights did move
    assert w_a.keys() == w_b.keys()
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    sens = cbs[-1].sensitivity
    assert sens.n_tokens == 12 * (SEQ - 1)
    assert all(lin.h_trace > 0 and lin.output_error["nvfp4"] > 0 for lin in sens.linears.values())


def test_resumed_run_continues_the_sums(make_tiny_llama, tmp_path):
    hf = _model(make_tiny_llama)
    data = _windows(4, seed=3)

    def loader():
        return DataLoader(data, batch_size=2)

    whole = FisherProbe(output_path=str(tmp_path / "whole.safetensors"))
    quiet_trainer([whole], max_epochs=2).fit(CausalLM.from_model(copy.deepcopy(hf), learning_rate=1e-2), loader())

    first = FisherProbe(output_path=str(tmp_path / "resumed.safetensors"))
    trainer = quiet_trainer([first], max_epochs=1)
    trainer.fit(CausalLM.from_model(copy.deepcopy(hf), learning_rate=1e-2), loader())
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.sensitivity.n_tokens == 2 * 2 * (SEQ - 1)

    resumed = FisherProbe(output_path=str(tmp_path / "resumed.safetensors"))
    quiet_trainer([resumed], max_epochs=2).fit(
        CausalLM.from_model(copy.deepcopy(hf), learning_rate=1e-2), loader(), ckpt_path=ckpt
    )
    assert resumed.sensitivity.n_tokens == whole.sensitivity.n_tokens == 4 * 2 * (SEQ - 1)
    _assert_close(resumed.sensitivity, whole.sensitivity, 1e-12)
    # the fingerprint is that of the model the probe started on
    assert resumed.sensitivity.meta["model_fingerprint"] == model_fingerprint(hf)


@pytest.mark.distributed
def test_ddp_two_processes_equal_one(make_tiny_llama, tmp_path):
    hf = _model(make_tiny_llama)
    data = _windows(4, seed=4)
    # one optimizer step, so both runs measure the same weights
    single = FisherProbe(output_path=str(tmp_path / "single.safetensors"))
    quiet_trainer([single]).fit(
        CausalLM.from_model(copy.deepcopy(hf), learning_rate=1e-3), DataLoader(data, batch_size=4)
    )

    ddp_path = tmp_path / "ddp.safetensors"
    probe = FisherProbe(output_path=str(ddp_path))
    trainer = quiet_trainer([probe], devices=2, strategy="ddp_spawn")
    trainer.fit(CausalLM.from_model(copy.deepcopy(hf), learning_rate=1e-3), DataLoader(data, batch_size=2))
    ddp = load_sensitivity(ddp_path, model_fingerprint=model_fingerprint(hf))
    assert ddp.meta["world_size"] == 2
    _assert_close(ddp, single.sensitivity, 1e-6)


@pytest.mark.distributed
def test_ddp_resume_counts_every_token_once(make_tiny_llama, tmp_path):
    """A 2-rank run checkpointed after epoch 1 and resumed for epoch 2 equals one process over both
    epochs: the checkpoint holds the totals over ranks, and only rank zero carries them on."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    hf = _model(make_tiny_llama)
    data = _windows(8, seed=6)
    whole = FisherProbe(output_path=str(tmp_path / "whole.safetensors"))
    quiet_trainer([whole], max_epochs=2).fit(
        CausalLM.from_model(copy.deepcopy(hf), probe_only=True), DataLoader(data, batch_size=2)
    )

    ckpt_dir = tmp_path / "ckpt"
    resumed_path = tmp_path / "resumed.safetensors"  # the state key: the same probe on resume
    first = FisherProbe(output_path=str(resumed_path))
    keep = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_on_train_epoch_end=True)
    quiet_trainer([first, keep], devices=2, strategy="ddp_spawn", enable_checkpointing=True).fit(
        CausalLM.from_model(copy.deepcopy(hf), probe_only=True), DataLoader(data, batch_size=1)
    )
    resumed = FisherProbe(output_path=str(resumed_path))
    quiet_trainer([resumed], devices=2, strategy="ddp_spawn", max_epochs=2).fit(
        CausalLM.from_model(copy.deepcopy(hf), probe_only=True), DataLoader(data, batch_size=1),
        ckpt_path=str(ckpt_dir / "last.ckpt"),
    )
    got = load_sensitivity(resumed_path, model_fingerprint=model_fingerprint(hf))
    assert got.n_tokens == whole.sensitivity.n_tokens == 2 * 8 * (SEQ - 1)
    _assert_close(got, whole.sensitivity, 1e-6)


def test_include_regex_matching_nothing_is_a_clear_error(make_tiny_llama, tmp_path):
    probe = FisherProbe(output_path=str(tmp_path / "s.safetensors"), include=[r"mlp\.nonexistent_proj"])
    module = CausalLM.from_model(_model(make_tiny_llama), probe_only=True)
    with pytest.raises(ValueError, match="matches no Linear"):
        quiet_trainer([probe]).fit(module, DataLoader(_windows(2), batch_size=2))


def test_include_exclude_select_the_tracked_linears(make_tiny_llama, tmp_path):
    probe = FisherProbe(
        output_path=str(tmp_path / "s.safetensors"),
        include=[r"layers\.1\."],
        exclude=[r"down_proj"],
        formats=["fp8"],
        max_tokens=SEQ - 1,
    )
    module = CausalLM.from_model(_model(make_tiny_llama), probe_only=True)
    quiet_trainer([probe]).fit(module, DataLoader(_windows(3), batch_size=1))
    sens = load_sensitivity(tmp_path / "s.safetensors")
    assert sorted(sens.linears) == sorted(
        f"model.layers.1.{p}"
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        )
    )
    assert sens.n_tokens == SEQ - 1  # max_tokens reached after the first batch
    assert all(set(lin.output_error) == {"fp8"} for lin in sens.linears.values())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown format"):
        FisherProbe(formats=["nvfp5"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        FisherProbe(include=["(unclosed"])
    with pytest.raises(ValueError, match="max_tokens"):
        FisherProbe(max_tokens=0)


def test_sensitivity_of_another_model_is_refused(make_tiny_llama, tmp_path):
    hf = _model(make_tiny_llama)
    probe = FisherProbe(output_path=str(tmp_path / "s.safetensors"), output_error=False)
    quiet_trainer([probe]).fit(
        CausalLM.from_model(copy.deepcopy(hf), probe_only=True), DataLoader(_windows(2), batch_size=2)
    )
    other = make_tiny_llama(initializer_range=0.2, intermediate_size=48)
    with pytest.raises(ValueError, match="measured on another model"):
        load_sensitivity(tmp_path / "s.safetensors", model_fingerprint=model_fingerprint(other))
    assert all(lin.output_error == {} for lin in probe.sensitivity.linears.values())


# ---- subsampled output-space error ---------------------------------------------------------------


def test_subsampled_probe_matches_reference_on_its_drawn_positions(make_tiny_llama, tmp_path):
    from pq_lightning.fisher import token_subset

    hf = _model(make_tiny_llama)
    data = _windows(4, seed=5)
    probe = FisherProbe(
        output_path=str(tmp_path / "s.safetensors"), output_error_tokens=0.25, output_error_seed=3
    )
    quiet_trainer([probe]).fit(
        CausalLM.from_model(copy.deepcopy(hf), probe_only=True), DataLoader(data, batch_size=2)
    )
    batches = [torch.stack([d["input_ids"] for d in data[i : i + 2]]) for i in (0, 2)]
    k = 3  # ceil(0.25 * 12)
    draws = [
        (torch.stack([token_subset(SEQ, k, s) for s in probe._sequence_seeds({"input_ids": ids})]), SEQ / k)
        for ids in batches
    ]
    ref, n_tokens = _reference(hf, batches, draws=draws)
    sens = probe.sensitivity
    assert sens.meta["estimator"]["output_error_tokens"] == 0.25
    for name, r in ref.items():
        lin = sens[name]
        assert _rel(lin.h_trace, r["h"] / n_tokens) < 1e-5, name  # trace and diagonals: every token
        assert _rel(lin.diag_in, r["in"] / n_tokens) < 1e-5, name
        for f in FORMATS:
            assert r["err"][f] > 0
            assert _rel(lin.output_error[f], r["err"][f] / n_tokens) < 1e-5, (name, f)


def _fit(hf, tmp_path, tag, batch_size=2, accumulate=1, **kw):
    probe = FisherProbe(output_path=str(tmp_path / f"{tag}.safetensors"), **kw)
    quiet_trainer([probe], accumulate_grad_batches=accumulate).fit(
        CausalLM.from_model(copy.deepcopy(hf), probe_only=True),
        DataLoader(_windows(4, seed=6), batch_size=batch_size),
    )
    return probe.sensitivity


def test_subsampled_probe_is_deterministic_and_independent_of_batching(make_tiny_llama, tmp_path):
    hf = _model(make_tiny_llama)
    a = _fit(hf, tmp_path, "a", output_error_tokens=4)
    _assert_close(_fit(hf, tmp_path, "b", output_error_tokens=4), a, 1e-15)  # same seed: same numbers
    # the draw depends on the sequence, not on the batch layout
    _assert_close(_fit(hf, tmp_path, "c", batch_size=1, accumulate=2, output_error_tokens=4), a, 1e-5)
    other = _fit(hf, tmp_path, "d", output_error_tokens=4, output_error_seed=1)
    assert any(_rel(other[n].output_error["nvfp4"], a[n].output_error["nvfp4"]) > 1e-3 for n in a.linears)


def test_all_positions_and_compact_weights_give_the_exact_numbers(make_tiny_llama, tmp_path):
    hf = _model(make_tiny_llama)
    exact = _fit(hf, tmp_path, "exact", output_error_tokens=None, quantized_weights="float32")
    _assert_close(
        _fit(hf, tmp_path, "one", output_error_tokens=1.0, quantized_weights="float32"), exact, 1e-15
    )
    _assert_close(_fit(hf, tmp_path, "seq", output_error_tokens=SEQ), exact, 1e-15)
    with pytest.raises(ValueError, match="output_error_tokens"):
        FisherProbe(output_error_tokens=0.0)
    with pytest.raises(ValueError, match="quantized_weights"):
        FisherProbe(quantized_weights="bf16")


def test_compact_quantized_weights_decode_exactly():
    from pq_lightning.callbacks.fisher_probe import _QuantizedWeight

    torch.manual_seed(9)
    w = torch.randn(48, 64) * torch.logspace(-3, 0, 64)
    for name in ("nvfp4", "fp8", "nvfp4a16", "fp8_w8a16", "bf16"):
        fmt = get_format(name)
        cached = _QuantizedWeight.build(fmt, w)
        assert torch.equal(cached.decode(), fmt.fake_quant(w)), name
        if name != "bf16":
            assert cached.nbytes() <= w.numel() * 1.1, name  # about a byte per weight or less
