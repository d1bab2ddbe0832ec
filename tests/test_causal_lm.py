"""Tests for pq_lightning.causal_lm.CausalLM (tiny models from configs, CPU Trainer runs)."""

from __future__ import annotations

import math

import lightning
import pytest
import torch
from conftest import quiet_trainer

from pq_lightning.causal_lm import CausalLM
from pq_lightning.data import CalibrationData
from pq_lightning.models import save_reference


def _trainer(max_steps: int) -> lightning.Trainer:
    return quiet_trainer(max_steps=max_steps, max_epochs=None, limit_val_batches=0)


def _data(tokenizer, **kw) -> CalibrationData:
    kw = {"seqlen": 16, "num_samples": 4, "batch_size": 2, **kw}
    return CalibrationData.from_tokenizer(tokenizer, **kw)


def _hand_loss(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """Mean next-token cross-entropy by a plain loop over positions (float64)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask is not None and mask[b, t + 1] == 0:
                continue
            row = logits[b, t]
            log_z = math.log(sum(math.exp(v) for v in row.tolist()))
            total += log_z - row[ids[b, t + 1]].item()
            count += 1
    return total / count, count


def test_training_step_loss_equals_hand_computed_cross_entropy(tiny_llama):
    lm = CausalLM.from_model(tiny_llama)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (3, 9))
    loss = lm.training_step({"input_ids": ids}, 0)
    expected, count = _hand_loss(tiny_llama, ids)
    assert lm.last_token_count == count == 3 * 8
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    masked = lm.next_token_loss({"input_ids": ids, "attention_mask": mask})
    # the model sees the mask too, so the reference runs the model with it
    with torch.no_grad():
        logits = tiny_llama(input_ids=ids, attention_mask=mask).logits.double()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = mask[:, 1:].bool()
    assert lm.last_token_count == int(keep.sum()) == 24 - 4
    assert masked.item() == pytest.approx(nll[keep].mean().item(), rel=1e-5)


def test_probe_only_fit_keeps_weights_bit_identical_and_gradients_reach_every_linear(
    tiny_llama, tiny_tokenizer
):
    lm = CausalLM.from_model(tiny_llama, probe_only=True)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    fired: dict[str, int] = {}
    grad_sq: dict[str, float] = {}
    in_eval: list[bool] = []

    def attach(name):
        def forward_hook(module, args, output):
            in_eval.append(not module.training)

            def tensor_hook(grad):
                fired[name] = fired.get(name, 0) + 1
                grad_sq[name] = grad_sq.get(name, 0.0) + float(grad.double().pow(2).sum())

            output.register_hook(tensor_hook)

        return forward_hook

    watched = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    modules = dict(tiny_llama.named_modules())
    for name in watched:
        modules[name].register_forward_hook(attach(name))
    trainer = _trainer(max_steps=2)
    trainer.fit(lm, datamodule=_data(tiny_tokenizer))
    assert trainer.global_step == 2
    assert fired == {name: 2 for name in watched}  # one backward per step reaches the first Linear too
    assert all(v > 0 for v in grad_sq.values())
    assert all(in_eval)  # no dropout while probing
    assert lm.last_token_count == 2 * 15
    for name, param in tiny_llama.named_parameters():
        assert param.grad is None, name
        assert not param.requires_grad, name
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_probe_only_gradients_match_a_plain_backward(tiny_llama, make_tiny_llama, tiny_tokenizer):
    """The activation gradient seen during fit equals autograd on an unfrozen copy of the model."""
    data = _data(tiny_tokenizer, num_samples=2, batch_size=2)
    batch = data.windows
    captured = {}
    lm = CausalLM.from_model(tiny_llama, probe_only=True)

    def capture(module, args, out):
        out.register_hook(lambda g: captured.__setitem__("probe", g.clone()))

    tiny_llama.model.layers[0].mlp.up_proj.register_forward_hook(capture)
    _trainer(max_steps=1).fit(lm, datamodule=data)
    reference = make_tiny_llama()
    outputs = {}
    reference.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda m, a, out: outputs.__setitem__("y", out)
    )
    logits = reference(input_ids=batch).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), batch[:, 1:].reshape(-1))
    (grad,) = torch.autograd.grad(loss, outputs["y"])
    torch.testing.assert_close(captured["probe"], grad, rtol=1e-5, atol=1e-8)


def test_fine_tune_changes_weights_with_linear_warmup(tiny_llama, tiny_tokenizer):
    lm = CausalLM.from_model(tiny_llama, learning_rate=1e-3, weight_decay=0.1, warmup_steps=4)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    modes = []
    tiny_llama.model.layers[0].mlp.register_forward_hook(lambda m, a, out: modes.append(m.training))
    trainer = _trainer(max_steps=2)
    trainer.fit(lm, datamodule=_data(tiny_tokenizer))
    after = tiny_llama.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert "lm_head.weight" in changed
    optimizer = trainer.optimizers[0]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["lr"] == pytest.approx(1e-3 * 3 / 4)  # after 2 steps of a 4-step linear warmup
    assert modes == [True, True] and not tiny_llama.training  # trained in train mode, left in eval mode


def test_validation_logs_mean_loss(tiny_llama, tiny_tokenizer):
    data = _data(tiny_tokenizer)
    lm = CausalLM.from_model(tiny_llama)
    trainer = lightning.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.validate(lm, datamodule=data)
    expected = sum(_hand_loss(tiny_llama, data.windows[i : i + 2])[0] for i in (0, 2)) / 2
    assert metrics["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_gemma4_multimodal_probe_only_fit(tiny_gemma4, tiny_tokenizer):
    lm = CausalLM.from_model(tiny_gemma4, probe_only=True)
    before = {k: v.clone() for k, v in tiny_gemma4.state_dict().items()}
    fired = []
    first = tiny_gemma4.model.language_model.layers[0].self_attn.q_proj

    def watch(module, args, out):
        out.register_hook(lambda g: fired.append(float(g.abs().sum())))

    first.register_forward_hook(watch)
    _trainer(max_steps=1).fit(lm, datamodule=_data(tiny_tokenizer))
    assert len(fired) == 1 and fired[0] > 0
    after = tiny_gemma4.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_gemma4.parameters())


def test_causal_lm_loads_a_model_folder(tiny_llama, tiny_tokenizer, tmp_path):
    folder = save_reference(tiny_llama, tiny_tokenizer, tmp_path / "tiny")
    lm = CausalLM(model=str(folder), dtype="float32", probe_only=True)
    assert lm.hparams.model == str(folder) and lm.hparams.probe_only is True
    assert lm.model.dtype == torch.float32
    ids = torch.randint(0, 128, (1, 6))
    expected = tiny_llama.to(torch.bfloat16).float()(input_ids=ids).logits
    torch.testing.assert_close(lm(ids), expected)


def test_invalid_arguments(tiny_llama):
    with pytest.raises(ValueError, match="learning_rate"):
        CausalLM.from_model(tiny_llama, learning_rate=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        CausalLM.from_model(tiny_llama, warmup_steps=-1)


class _ProbeChecks(lightning.Callback):
    """Runs inside each DDP rank: activation gradients arrive, weights stay bit-identical, no .grad."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def setup(self, trainer, pl_module, stage):
        self.fired = 0
        self.before = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

        def forward_hook(module, args, out):
            def count(grad):
                self.fired += 1

            out.register_hook(count)

        pl_module.model.model.layers[0].self_attn.q_proj.register_forward_hook(forward_hook)

    def on_train_end(self, trainer, pl_module):
        assert self.fired == trainer.global_step == 2, (self.fired, trainer.global_step)
        after = pl_module.model.state_dict()
        assert all(torch.equal(self.before[k], after[k]) for k in self.before)
        assert all(p.grad is None for p in pl_module.model.parameters())
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(f"{self.fired} {trainer.world_size}")


@pytest.mark.distributed
def test_probe_only_runs_under_ddp(tiny_llama, tiny_tokenizer, tmp_path):
    lm = CausalLM.from_model(tiny_llama, probe_only=True)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    trainer = lightning.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[_ProbeChecks(tmp_path)],
    )
    trainer.fit(lm, datamodule=_data(tiny_tokenizer, num_samples=8))
    # both ranks ran two probe steps with activation gradients and unchanged weights
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.txt")) == ["2 2", "2 2"]
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
