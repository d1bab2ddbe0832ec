"""Does Fisher-weighted GPTQ (issue 18, lever 2) lower the loss-weighted output error of NVFP4 Linears?

GPTQ minimises ``Σ_t ‖(W − Ŵ) x̂_t‖²``: every token and every output channel counts the same. The
loss cares about ``Σ_t Σ_o g_{t,o}² ((W x_t − Ŵ x̂_t)_o)²`` (``g``: the gradient of the summed
next-token loss at the Linear's output, the probe's ``output`` estimator). Rows of ``W`` are rounded
independently, so weighting whole rows changes nothing; what can change the rounding is weighting the
tokens differently per row. GuidedQuant's form: split the rows into ``G`` groups and give each its own
Hessian ``H_G = Σ_t s_{t,G} x̂_t x̂_tᵀ / Σ_t s_{t,G}`` with ``s_{t,G} = Σ_{o∈G} g_{t,o}²``.

For some Linears of the model this script captures the inputs and output gradients on calibration
windows, rounds each Linear with RTN, plain GPTQ, and GPTQ under ``H_G`` (and under ``(H + H_G) / 2``)
for each ``--groups`` on the fit windows, and prints, on the held-out windows, the loss-weighted error
and the plain output error of each, as ratios to plain GPTQ's. Inputs are NVFP4-quantized as served
(global scale from the fit windows' amax); act-order GPTQ at damping ``--damp``.

Example::

    python scripts/fisher_gptq_study.py --num-samples 24 --seqlen 256 --holdout 8 --groups 1 4 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import linear_study_inputs  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    linear_study_inputs.add_arguments(p)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--damp", type=float, default=0.03)
    return p.parse_args(argv)


def capture(model, windows: torch.Tensor, names: list[str], batch_size: int = 4) -> dict[str, tuple]:
    """Per Linear: inputs ``[tokens, in]`` and output gradients ``[tokens, out]`` of the summed next-token loss."""
    mods = dict(model.named_modules())
    xs = {n: [] for n in names}
    gs = {n: [] for n in names}

    def hook(name):
        def forward_hook(module, args, out):
            xs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
            out.register_hook(lambda g: gs[name].append(g.detach().reshape(-1, g.shape[-1])))
        return forward_hook

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(windows), batch_size):
            ids = windows[i:i + batch_size]
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            model.zero_grad(set_to_none=True)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {n: (torch.cat(xs[n]), torch.cat(gs[n])) for n in names}


def weighted_hessian(xq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (xq * s[:, None]).T @ xq / s.sum()


def study_linear(W, x, g, n_fit: int, groups: list[int], damp: float) -> dict[str, tuple[float, float]]:
    """``{method: (loss-weighted held-out error, plain held-out error)}`` of one Linear."""
    from pq_lightning.formats.nvfp4 import NVFP4
    from pq_lightning.gptq import gptq_nvfp4

    fmt = NVFP4()
    igs = fmt.calibrate_input_global_scale(x[:n_fit].abs().max())
    xq = fmt.fake_quant_activation(x, igs)
    xqf, gf = xq[:n_fit], g[:n_fit]
    xh, xqh, gh = x[n_fit:], xq[n_fit:], g[n_fit:]
    y = xh @ W.T
    gscale = fmt.global_scale(W)

    def held(w_hat):
        d = y - xqh @ w_hat.T
        return float((gh.pow(2) * d.pow(2)).sum(1).mean()), float(d.pow(2).sum(1).mean())

    def gptq(rows, H):
        return gptq_nvfp4(W[rows], H, global_scale=gscale, damp=damp, act_order=True, return_w_hat=True)[1]

    H = xqf.T @ xqf / len(xqf)
    out = {"rtn": held(fmt.fake_quant(W)), "gptq": held(gptq(slice(None), H))}
    for G in groups:
        fisher, blend = torch.empty_like(W), torch.empty_like(W)
        for rows in torch.arange(W.shape[0]).chunk(G):
            Hg = weighted_hessian(xqf, gf[:, rows].pow(2).sum(1))
            fisher[rows], blend[rows] = gptq(rows, Hg), gptq(rows, (H + Hg) / 2)
        out[f"fisher G={G}"], out[f"blend G={G}"] = held(fisher), held(blend)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    model, windows, names, n_fit = linear_study_inputs.load(args)
    caps = capture(model, windows, names)
    totals: dict[str, list[float]] = {}
    for name in names:
        W = dict(model.named_modules())[name].weight.detach()
        res = study_linear(W, *caps[name], n_fit, args.groups, args.damp)
        base_f, base_p = res["gptq"]
        row = []
        for k, (f, p) in res.items():
            totals.setdefault(k, [0.0, 0.0])
            totals[k][0] += f / base_f / len(names)
            totals[k][1] += p / base_p / len(names)
            row.append(f"{k} {f / base_f:.3f}/{p / base_p:.3f}")
        print(f"{name}: " + " | ".join(row), flush=True)
    print("mean over Linears (loss-weighted / plain held-out error, relative to plain GPTQ):")
    for k, (f, p) in totals.items():
        print(f"  {k:14s} {f:.4f} {p:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
