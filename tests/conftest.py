"""Shared test fixtures: a tiny tokenizer and tiny random models built from configs (no download).

Fixtures (all offline, each builds in well under a second):

* ``tiny_tokenizer`` (session scope): a BPE tokenizer with exactly 128 tokens trained on a few fixed
  sentences (Metaspace pre-tokenizer, ASCII letters/digits/punctuation as alphabet, unknown
  characters map to ``<unk>``). Special tokens: ``<unk>``=0, ``<s>``=1 (BOS), ``</s>``=2 (EOS),
  ``<pad>``=3. Carries a small chat template. It is shared: do not modify it in a test.
* ``tiny_llama`` / ``make_tiny_llama(**config_overrides)``: ``LlamaForCausalLM`` in float32, seeded
  (``torch.manual_seed(0)`` before construction), hidden 32, intermediate 64, 2 layers, 4 heads / 2 KV
  heads (head_dim 8), vocab 128, untied ``lm_head``. Body: 2 x 7 = 14 Linears named
  ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` and ``model.layers.{i}.mlp.{gate,up,down}_proj``.
  A fresh model per test (function scope), so tests may train or modify it.
* ``tiny_gemma4`` / ``make_tiny_gemma4(text_overrides=None, vision_overrides=None)``:
  ``Gemma4ForConditionalGeneration`` in float32, seeded, with a vision tower and no audio tower.
  Text: hidden 32, intermediate 64, 2 layers (sliding then full attention), 4 heads / 2 KV heads,
  head_dim 8, vocab 128, no per-layer embeddings (``hidden_size_per_layer_input=0``). Body: 14
  Linears under ``model.language_model.layers``. The vision tower (``model.vision_tower``: hidden 48,
  2 layers, 7 Linears each wrapped as ``...q_proj.linear`` etc., plus ``patch_embedder.input_proj``)
  is deliberately *larger* than the text decoder, so a heuristic that picks the biggest layer list
  would pick the wrong one. ``model.embed_vision.embedding_projection`` and ``lm_head`` (tied) are
  Linears outside the body. A forward with ``input_ids`` only works (no pixels needed).

* ``make_tiny_gemma3(**config_overrides)``: ``Gemma3ForCausalLM`` (text only) in float32, seeded:
  hidden 32, 2 layers (sliding then full attention), vocab 128, tied ``lm_head``, ``(1 + weight)``
  RMSNorms with non-zero weights, final-logit soft-capping 30. Body: 14 Linears under ``model.layers``.

* ``tiny_model_dir``: a Hugging Face folder with a tiny Llama (hidden 64, intermediate 128) and the
  tiny tokenizer, plus ``text.txt`` (:data:`TINY_TEXT`) beside it, for pipeline-level tests.

Helpers: :func:`quiet_trainer` (a CPU ``lightning.Trainer`` without logger, checkpoints, bars or
sanity steps; keyword overrides win).

The ids produced by ``tiny_tokenizer`` are all below 128, valid for both tiny models.
"""

from __future__ import annotations

import contextlib
import os
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_VOCAB = 128

_TOKENIZER_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in the sequence, or raise an error when it is empty.",
]

_CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """This spawned process joins a local gloo process group of ``world`` ranks (one thread each)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()



def load_script(name: str) -> Any:
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_tiny_tokenizer() -> Any:
    """The ``tiny_tokenizer`` fixture's tokenizer (deterministic; about 20 ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = list(string.ascii_letters + string.digits + string.punctuation)
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet) + 1,
        show_progress=False,
    )
    core.train_from_iterator(_TOKENIZER_TRAINING_TEXT, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = _CHAT_TEMPLATE
    assert len(tok) <= TINY_VOCAB
    return tok


def build_tiny_llama(**overrides: Any) -> Any:
    """The ``tiny_llama`` fixture's model; keyword arguments override ``LlamaConfig`` fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs: dict[str, Any] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).float().eval()


def _tiny_sliding_text() -> dict[str, Any]:
    """Text-decoder fields the tiny Gemma models share: hidden 32, intermediate 64, 2 layers (sliding
    then full attention), 4 heads / 2 KV heads of head_dim 8, vocab ``TINY_VOCAB``."""
    return dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def build_tiny_gemma4(
    text_overrides: dict[str, Any] | None = None, vision_overrides: dict[str, Any] | None = None
) -> Any:
    """The ``tiny_gemma4`` fixture's model; the dicts override text / vision config fields."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text: dict[str, Any] = {
        **_tiny_sliding_text(),
        "vocab_size_per_layer_input": TINY_VOCAB,
        "global_head_dim": 8,
        "hidden_size_per_layer_input": 0,
    }
    text.update(text_overrides or {})
    vision: dict[str, Any] = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=24,
        patch_size=4,
        pooling_kernel_size=2,
        position_embedding_size=64,
    )
    vision.update(vision_overrides or {})
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(config).float().eval()


def build_tiny_gemma3(**overrides: Any) -> Any:
    """The ``make_tiny_gemma3`` fixture's model: ``Gemma3ForCausalLM`` in float32, seeded, hidden 32,
    intermediate 64, 2 layers (sliding then full attention), 4 heads / 2 KV heads (head_dim 8), vocab
    128, tied embeddings, ``(1 + weight)`` RMSNorms, final-logit soft-capping 30; the norms' weights
    drawn from N(0, 0.5) (a fresh model has them all zero, which would hide the ``1 +``)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kwargs: dict[str, Any] = {**_tiny_sliding_text(), "final_logit_softcapping": 30.0, "tie_word_embeddings": True}
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**kwargs)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    return model


@pytest.fixture
def quiet_single_thread():
    """One torch intra-op thread and Lightning's expected warnings silenced, for one test.

    The tiny models run many small ops: on a 2-core machine a second thread per process only
    oversubscribes the cores (10-30x slower when another process is busy).
    """
    import warnings

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=".*(does not have many workers|eval mode|LeafSpec|val_dataloader|litlogger|sync_dist"
            "|builtin corpus).*",
        )
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture
def make_tiny_llama() -> Callable[..., Any]:
    return build_tiny_llama


@pytest.fixture
def tiny_llama() -> Any:
    return build_tiny_llama()


@pytest.fixture
def make_tiny_gemma4() -> Callable[..., Any]:
    return build_tiny_gemma4


@pytest.fixture
def tiny_gemma4() -> Any:
    return build_tiny_gemma4()


@pytest.fixture
def make_tiny_gemma3() -> Callable[..., Any]:
    return build_tiny_gemma3


#: Calibration text for pipeline-level tests (repeated so that a few windows of 32 tokens fit).
TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Return the number of items in the sequence, "
    "or raise an error when it is empty. "
) * 60


@pytest.fixture
def tiny_model_dir(tmp_path, make_tiny_llama, tiny_tokenizer):
    model = make_tiny_llama(hidden_size=64, intermediate_size=128, initializer_range=0.2)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    (tmp_path / "text.txt").write_text(TINY_TEXT)
    return path


def quiet_trainer(callbacks=(), **overrides: Any):
    """A one-epoch CPU ``lightning.Trainer`` with no logger, checkpointing, bars or sanity steps."""
    import lightning

    args: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    args.update(overrides)
    return lightning.Trainer(callbacks=list(callbacks), **args)
