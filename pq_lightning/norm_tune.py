"""Norm tuning: the BF16 norm gains of a quantized model fitted so its logits follow the unquantized model's.

The quantized Linears are fixed (their served weights, activations quantized as served); what stays
BF16 and sits right in front of them are the RMSNorm gains. Each gain channel is multiplied by
``exp(θ)`` (``(c + w) · exp(θ) − c`` for a norm of gain ``c + w``, as Gemma 1-3's ``1 + w``), and the
``θ`` are fitted by gradient descent on ``KL(p_reference ‖ p_quantized)`` over the calibration
windows, with the activation fake-quant passed straight through in the backward pass. The tuned
norms are plain BF16 tensors in the same checkpoint: nothing changes for the server.

A multiplicative parameter moves every channel by the same relative step whatever its size (an
additive one moved small gains by up to 850 % at the step size that served the large ones). About
35 k numbers on SmolLM2-135M (61 norms), so a few thousand calibration positions do not overfit them.

Optionally the NVFP4 codes move too (:class:`CodeShift`, ``tune.codes_lr``): each value of the grid
is a parameter rounded in the forward pass, the group scales stay as refined, and
:func:`tuned_codes` packs what moved as standard NVFP4 tensors. Off by default (measured in the README).

No Lightning here: :class:`pq_lightning.norm_tuner_module.NormTuner` runs the loop.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .formats import CodeGrid, QuantFormat
from .formats.code_grid import grid_weight
from .lm_head import HeadSplit, RunFn, positions_per_chunk, split_head
from .smooth import gain_offset


class GainScale(nn.Module):
    """Parametrization of a norm weight: ``(c + w) · exp(θ) − c``; ``θ`` starts at 0 (the weight as it is)."""

    def __init__(self, channels: int, offset: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(channels))
        self.offset = float(offset)

    def forward(self, weight: Tensor) -> Tensor:
        gain = (self.offset + weight.float()) * torch.exp(self.theta.float())
        return (gain - self.offset).to(weight.dtype)


def tunable_norms(model: nn.Module, layer_prefix: str, final_norm: str | None) -> dict[str, float]:
    """Name -> gain offset of every norm with a weight under ``layer_prefix`` (the decoder layers) and
    of ``final_norm``; a norm whose gain is neither ``w`` nor ``1 + w`` is left out."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        inside = name.startswith(layer_prefix + ".") or name == final_norm
        weight = getattr(module, "weight", None)
        if not inside or "norm" not in type(module).__name__.lower() or not isinstance(weight, Tensor):
            continue
        if weight.dim() != 1:
            continue
        offset = gain_offset(module)
        if offset is not None:
            out[name] = offset
    return out


@torch.no_grad()
def norms_feeding_linears(model: nn.Module, norms: Iterable[str], input_ids: Tensor) -> set[str]:
    """The names among ``norms`` whose output (or a view of it: the head's slice of the last positions)
    is an ``nn.Linear``'s input in a forward pass of ``input_ids``, found by tensor identity; a
    residual-side norm (Gemma's post-attention and post-feed-forward norms) or a q/k norm is not."""
    outputs: dict[int, tuple[str, Tensor]] = {}  # the tensors are held, so no id is reused during the pass
    fed: set[str] = set()

    def produced(name: str):
        return lambda module, args, out: outputs.__setitem__(id(out), (name, out))

    def consumed(module, args):
        for t in (args[0], args[0]._base) if args and isinstance(args[0], Tensor) else ():
            if t is not None and id(t) in outputs:
                fed.add(outputs[id(t)][0])

    hooks = [model.get_submodule(n).register_forward_hook(produced(n)) for n in norms]
    hooks += [m.register_forward_pre_hook(consumed) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return fed


def served_student(model: nn.Module, plan: Mapping[str, str], quantized: Mapping[str, Mapping[str, Tensor]],
                   input_amax: Mapping[str, float], fused_groups: Sequence[Sequence[str]]) -> nn.Module:
    """A copy of ``model`` whose planned Linears run as served; every other tensor is shared with
    ``model`` (no copy of the embeddings), and nothing of ``model`` changes."""
    from .served import apply_fake_quant

    memo: dict[int, object] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    student = copy.deepcopy(model, memo)
    apply_fake_quant(student, plan, quantized, input_amax, fused_groups=fused_groups)
    for p in student.parameters():
        p.requires_grad_(False)
    return student.eval()


def attach_gains(student: nn.Module, norms: Mapping[str, float]) -> dict[str, GainScale]:
    """Parametrize each norm's weight of ``student`` by a :class:`GainScale`; returns them by norm name."""
    gains: dict[str, GainScale] = {}
    for name, offset in norms.items():
        module = student.get_submodule(name)
        gain = GainScale(module.weight.numel(), offset).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", gain, unsafe=True)
        gains[name] = gain
    return gains


class CodeShift(nn.Module):
    """Parametrization of a served Linear's weight by its grid values (:class:`CodeGrid`), scales fixed.

    The forward rounds the values to the grid (what would be written) with the gradient passed
    straight through, so a value moves to another grid point once the loss has pushed it past the
    midpoint; it starts on its refined code, so nothing changes until then.
    """

    def __init__(self, grid: CodeGrid) -> None:
        super().__init__()
        self.values = nn.Parameter(grid.values.detach().float().clone())
        self.register_buffer("scale", grid.scale.detach().float().clone())
        self._round = grid.round

    def rounded(self) -> Tensor:
        return self._round(self.values.detach())

    def forward(self, weight: Tensor) -> Tensor:
        v = self.values
        on_grid = v + (self._round(v.detach()) - v).detach()
        return grid_weight(on_grid, self.scale).to(weight.dtype)


def attach_code_shifts(student: nn.Module, packed: Mapping[str, Mapping[str, Tensor]],
                       formats: Mapping[str, QuantFormat]) -> dict[str, CodeShift]:
    """Parametrize the weight of each of ``student``'s served Linears whose format has a code grid
    (:meth:`QuantFormat.code_grid`) and whose refined tensors are in ``packed``; returns them by Linear."""
    shifts: dict[str, CodeShift] = {}
    for name, fmt in formats.items():
        tensors = packed.get(name)
        grid = None if tensors is None else fmt.code_grid(tensors)
        if grid is None:  # no refined tensors, or a format without a grid (FP8, BF16)
            continue
        module = student.get_submodule(name)
        shift = CodeShift(grid).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", shift, unsafe=True)
        shifts[name] = shift
    return shifts


@torch.no_grad()
def tuned_codes(shifts: Mapping[str, CodeShift], packed: Mapping[str, Mapping[str, Tensor]],
                formats: Mapping[str, QuantFormat]) -> tuple[dict[str, dict[str, Tensor]], int]:
    """The packed tensors of every Linear whose codes moved (scales as refined), and how many codes moved."""
    out: dict[str, dict[str, Tensor]] = {}
    moved = 0
    for name, shift in shifts.items():
        values = shift.rounded().cpu()
        before = formats[name].code_grid(packed[name]).values
        n = int((values != before).sum())
        if n:
            moved += n
            out[name] = formats[name].pack_grid(packed[name], values)
    return out, moved


@torch.no_grad()
def tuned_weights(student: nn.Module, gains: Mapping[str, GainScale]) -> dict[str, Tensor]:
    """Each tuned norm's weight, in its original dtype (the values the checkpoint will carry)."""
    return {f"{name}.weight": student.get_submodule(name).weight.detach().clone() for name in gains}


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> Iterator[None]:
    """``model`` with the given parameters' values replaced, restored on exit (also on error)."""
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise KeyError(f"swapped_weights: the model has no parameter {missing[:3]}")
    saved = {k: params[k].detach().clone() for k in weights}
    try:
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v.to(params[k].device, params[k].dtype))
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)


def _run(model: nn.Module) -> RunFn:
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask, use_cache=False)


def _kl_rows(log_t: Tensor, z_s: Tensor) -> Tensor:
    """``Σ_positions KL(p_t ‖ softmax(z_s))`` (fp32) from the reference's log-probabilities."""
    return (log_t.exp() * (log_t - F.log_softmax(z_s.float(), -1))).sum()


class _ChunkedKL(torch.autograd.Function):
    """``Σ_t KL(head(teacher_t) ‖ head(student_t)) / count``; each chunk's gradient taken in the forward pass,
    so no ``[positions, vocab]`` tensor outlives its chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, teacher: Tensor, head_s, head_t, count: int, chunk: int) -> Tensor:
        grad = torch.zeros_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_t = F.log_softmax(head_t(teacher[rows]).float(), -1)
            h = hidden[rows].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = _kl_rows(log_t, head_s(h))
                (grad[rows],) = torch.autograd.grad(loss / count, [h])
            total += loss.detach()
        ctx.grad = grad
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad, ctx.grad = ctx.grad, None
        return grad * grad_out, None, None, None, None, None


def kl_to_reference(reference: nn.Module, student: nn.Module, input_ids: Tensor, chunk: int | None = None) -> Tensor:
    """Mean over every position of ``KL(p_reference ‖ p_student)``, full vocabulary; differentiable
    in the student. Logits are made ``chunk`` positions at a time (default: 64 MiB of fp32 logits) when
    both heads can be split."""
    with torch.no_grad():
        ref = split_head(reference, _run(reference), input_ids)
    stu = split_head(student, _run(student), input_ids) if ref is not None else None
    if ref is None or stu is None:
        with torch.no_grad():
            log_t = F.log_softmax(reference(input_ids=input_ids, use_cache=False).logits.float(), -1)
        z_s = student(input_ids=input_ids, use_cache=False).logits
        return _kl_rows(log_t, z_s) / input_ids.numel()
    return _kl_from_splits(ref, stu, chunk or positions_per_chunk(stu.vocab_size))


def _kl_from_splits(ref: HeadSplit, stu: HeadSplit, chunk: int) -> Tensor:
    d = stu.hidden.shape[-1]
    hidden, teacher = stu.hidden.reshape(-1, d), ref.hidden.reshape(-1, d).detach()
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _ChunkedKL.apply(hidden, teacher, stu.head, ref.head, hidden.shape[0], chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        total += _kl_rows(F.log_softmax(ref.head(teacher[rows]).float(), -1), stu.head(hidden[rows]))
    return total / hidden.shape[0]
