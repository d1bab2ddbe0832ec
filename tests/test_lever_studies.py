"""The lever studies of issue 18: scripts/fisher_gptq_study.py and scripts/activation_scale_study.py.

Checked against references: the captured inputs and output gradients rebuild each Linear's weight
gradient (``Σ_t g_t x_tᵀ``); the weighted Hessian against a per-token loop; with equal weights the
row-grouped GPTQ is plain GPTQ (to float rounding); a power-of-two headroom on the activation global scale
leaves the quantized input unchanged, while clipping raises the error.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def fisher_study():
    return load_script("fisher_gptq_study")


@pytest.fixture(scope="module")
def scale_study():
    return load_script("activation_scale_study")


def test_captured_gradients_rebuild_the_weight_gradient(fisher_study, tiny_llama):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    windows = torch.randint(4, 60, (3, 12), generator=torch.Generator().manual_seed(0))
    caps = fisher_study.capture(tiny_llama, windows, names, batch_size=2)
    grads = {n: torch.zeros_like(dict(tiny_llama.named_modules())[n].weight) for n in names}
    for i in range(0, 3, 2):  # the same batches, summed by hand
        ids = windows[i:i + 2]
        logits = tiny_llama(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        tiny_llama.zero_grad(set_to_none=True)
        loss.backward()
        for n in names:
            grads[n] += dict(tiny_llama.named_modules())[n].weight.grad
    for n in names:
        x, g = caps[n]
        assert x.shape[0] == g.shape[0] == 36
        torch.testing.assert_close(g.T @ x, grads[n], rtol=1e-4, atol=1e-5)


def test_weighted_hessian_against_a_token_loop(fisher_study):
    gen = torch.Generator().manual_seed(1)
    x, s = torch.randn(20, 8, generator=gen, dtype=torch.float64), torch.rand(20, generator=gen, dtype=torch.float64)
    ref = sum(s[t] * torch.outer(x[t], x[t]) for t in range(20)) / s.sum()
    torch.testing.assert_close(fisher_study.weighted_hessian(x, s), ref)


def test_equal_gradient_weights_make_grouped_gptq_plain_gptq(fisher_study):
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(32, 64, generator=gen)
    x = torch.randn(300, 64, generator=gen) * torch.linspace(0.2, 3.0, 64)
    g = torch.full((300, 32), 0.5)  # every token and row weighs the same: H_G == H
    res = fisher_study.study_linear(W, x, g, n_fit=200, groups=[1, 4], damp=0.03)
    for k in ("fisher G=1", "fisher G=4", "blend G=4"):
        assert res[k] == pytest.approx(res["gptq"], rel=1e-5), k
    # the loss-weighted error is the plain one times g² when g is constant
    assert res["gptq"][0] == pytest.approx(0.25 * res["gptq"][1], rel=1e-5)


def test_activation_headroom_is_free_and_clipping_costs(scale_study):
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(16, 64, generator=gen)
    x = torch.randn(400, 64, generator=gen)
    errs = scale_study.held_out_errors(W, x, n_fit=300, multipliers=[0.25, 0.5, 1.0, 2.0])
    assert errs[0] == errs[1] == errs[2]  # power-of-two headroom: the same E4M3 codes, scaled
    assert errs[3] > errs[2] * 1.05


def test_study_scripts_parse_their_arguments(fisher_study, scale_study):
    a = fisher_study.parse_args(["--groups", "2", "8", "--layers", "0"])
    assert a.groups == [2, 8] and a.layers == [0] and a.holdout == 8
    b = scale_study.parse_args(["--multipliers", "0.5", "1"])
    assert b.multipliers == [0.5, 1.0]
    with pytest.raises(SystemExit, match="must include 1.0"):
        scale_study.main(["--multipliers", "0.5", "2"])


def test_both_studies_run_end_to_end_on_a_tiny_llama(fisher_study, scale_study, tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(800)))
    common = ["--model", str(tiny_model_dir), "--calibration", str(text), "--num-samples", "6", "--holdout", "2",
              "--seqlen", "32", "--layers", "1", "--threads", "1"]
    assert fisher_study.main(common + ["--groups", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj: rtn" in out and "fisher G=2" in out
    assert scale_study.main(common) == 0
    assert "mean held-out error relative to the amax rule: " in capsys.readouterr().out
