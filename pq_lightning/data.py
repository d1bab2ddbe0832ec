"""Calibration and evaluation data: text sources, token windows and their Lightning data modules.

Pure functions first (:func:`load_texts`, :func:`make_windows`, :func:`eval_windows`), then two thin
``LightningDataModule`` adapters:

* :class:`CalibrationData`: ``num_samples`` windows of ``seqlen`` tokens (BOS + ``seqlen - 1`` text
  tokens), non-overlapping chunks of the tokenised corpus drawn deterministically from a seed, plus an
  optional disjoint held-out set for scoring refinements.
* :class:`EvalData`: the evaluation protocol's windows (tokenised without special tokens, consecutive
  windows of 511 tokens, tail dropped, each prefixed with BOS: 512 tokens).

Text sources (``source=``): ``builtin`` (an offline corpus of Python's own docstrings, the default),
a local ``.txt`` file, a local ``.jsonl`` file with ``text`` or ``messages`` rows, or a Hugging Face
dataset ``hf:NAME[:CONFIG][:SPLIT]`` (needs the optional ``datasets`` package and a reachable hub).
``generated`` windows are sampled from the model (:mod:`pq_lightning.self_generated`); they need the
model, so ``quantize`` makes them and hands them over with :meth:`CalibrationData.from_windows`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader, Dataset

from pq_lightning.builtin_corpus import builtin_documents

BUILTIN = "builtin"
GENERATED = "generated"
HF_PREFIX = "hf:"


# --------------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------------


def _render_messages(messages: Any, tokenizer: Any, where: str) -> str:
    if tokenizer is None:
        raise ValueError(f"{where}: 'messages' rows need a tokenizer with a chat template to render them.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{where}: the tokenizer has no chat template, so 'messages' rows cannot be rendered; "
            "use 'text' rows instead."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _row_text(row: Any, text_field: str, tokenizer: Any, where: str) -> str:
    if isinstance(row, dict) and isinstance(row.get(text_field), str):
        return row[text_field]
    if isinstance(row, dict) and "messages" in row:
        return _render_messages(row["messages"], tokenizer, where)
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise ValueError(f"{where}: expected a '{text_field}' string or a 'messages' list, found {keys}.")


def _read_jsonl(path: Path, tokenizer: Any, text_field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON: {err}") from err
            texts.append(_row_text(row, text_field, tokenizer, f"{path}:{lineno}"))
    return texts


def parse_hf_source(source: str, split: str | None = None) -> tuple[str, str | None, str]:
    """Split ``hf:NAME[:CONFIG][:SPLIT]`` into ``(name, config, split)``.

    Two fields mean ``NAME:SPLIT``; the ``split`` argument, when given, overrides the one in the
    string; the default split is ``train``. ``hf:wikitext/wikitext-2-raw-v1:validation`` parses as
    name ``wikitext/wikitext-2-raw-v1``; :func:`load_texts` then also tries it as name ``wikitext``
    with config ``wikitext-2-raw-v1``.
    """
    body = source[len(HF_PREFIX) :] if source.startswith(HF_PREFIX) else source
    parts = body.split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise ValueError(f"Cannot parse dataset source {source!r}; expected hf:NAME[:CONFIG][:SPLIT].")
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    in_string_split = parts[-1] if len(parts) >= 2 else None
    return name, config, split or in_string_split or "train"


def _load_hf_texts(source: str, tokenizer: Any, split: str | None, text_field: str) -> list[str]:
    try:
        import datasets  # optional dependency
    except ImportError as err:
        raise ImportError(
            f"Source {source!r} needs the optional 'datasets' package (`pip install datasets`) and access to "
            "the Hugging Face hub. Offline, pass a local .txt or .jsonl file, or source='builtin'."
        ) from err
    name, config, split_name = parse_hf_source(source, split)
    attempts = [(name, config)]
    if config is None and name.count("/") == 1:
        attempts.append(tuple(name.split("/")))  # NAME/CONFIG shorthand
    errors = []
    for ds_name, ds_config in attempts:
        try:
            dataset = datasets.load_dataset(ds_name, ds_config, split=split_name)
            break
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds; report them all below
            errors.append(
                f"load_dataset({ds_name!r}, {ds_config!r}, split={split_name!r}): {type(err).__name__}: {err}"
            )
    else:
        raise OSError(
            f"Could not load {source!r} from the Hugging Face hub:\n  "
            + "\n  ".join(errors)
            + "\nCheck the name and your network, or pass a local .txt/.jsonl file or source='builtin'."
        )
    texts = []
    for i, row in enumerate(dataset):
        text = _row_text(row, text_field, tokenizer, f"{source} row {i}")
        if text.strip():
            texts.append(text)
    return texts


def load_texts(
    source: str = BUILTIN,
    *,
    tokenizer: Any = None,
    split: str | None = None,
    text_field: str = "text",
) -> list[str]:
    """Documents from a text source.

    Args:
        source: ``"builtin"`` (Python docstrings, offline; see :mod:`pq_lightning.builtin_corpus`);
            a ``.txt`` file (one document: the whole file, unchanged); a ``.jsonl`` file whose rows hold
            ``text_field`` strings or ``messages`` lists (rendered with the tokenizer's chat template);
            or ``hf:NAME[:CONFIG][:SPLIT]`` for a Hugging Face dataset (optional ``datasets`` package).
        tokenizer: needed only to render ``messages`` rows.
        split: dataset split for ``hf:`` sources (overrides the one in the string).
        text_field: name of the text column / key.

    Returns:
        The documents in source order (for ``hf:``, empty rows dropped).
    """
    if source == BUILTIN:
        return list(builtin_documents())
    if source == GENERATED:
        raise ValueError(
            "Calibration source 'generated' is sampled from the model, not read from text: pq-lightning quantize "
            "makes it; elsewhere pass CalibrationData.from_windows(self_generated.sample_windows(model, ...)).")
    if source.startswith(HF_PREFIX):
        return _load_hf_texts(source, tokenizer, split, text_field)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Text source {source!r} is not a file. Use a .txt or .jsonl file, 'builtin', or "
            "hf:NAME[:CONFIG][:SPLIT]."
        )
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        return _read_jsonl(path, tokenizer, text_field)
    raise ValueError(f"Unsupported file type {path.suffix!r} for {path}; use .txt or .jsonl.")


def join_texts(texts: Sequence[str]) -> str:
    """One string from documents: blank-line separated, empty documents skipped; one document unchanged."""
    kept = [t for t in texts if t.strip()]
    return kept[0] if len(kept) == 1 else "\n\n".join(kept)


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, as a 1-D LongTensor."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------


def make_windows(
    token_ids: Sequence[int] | torch.Tensor,
    *,
    seqlen: int,
    num_samples: int | None,
    bos_id: int | None,
    seed: int,
) -> torch.Tensor:
    """Fixed-length training windows from a token stream.

    The stream is cut into consecutive non-overlapping chunks of ``seqlen - 1`` tokens (``seqlen``
    when ``bos_id`` is None); the tail that does not fill a chunk is dropped. ``num_samples`` chunks
    are drawn without replacement in the order of ``torch.randperm(n_chunks)`` under a generator
    seeded with ``seed`` (so the first k windows do not depend on how many are drawn); ``None`` keeps
    every chunk in text order. Each window is prefixed with ``bos_id`` when given.

    Returns:
        LongTensor ``[n, seqlen]``.

    Raises:
        ValueError: ``seqlen`` too small, or too few tokens for ``num_samples`` windows (the message
            says how many were found and how many are needed).
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    body = seqlen - (1 if bos_id is not None else 0)
    if seqlen < 2 or body < 1:
        raise ValueError(f"seqlen must be at least 2 (got {seqlen}).")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be at least 1 or None (got {num_samples}).")
    n_chunks = ids.numel() // body
    wanted = n_chunks if num_samples is None else num_samples
    if n_chunks < max(wanted, 1):
        raise ValueError(
            f"Too little text: found {ids.numel()} tokens, need {max(wanted, 1) * body} "
            f"({max(wanted, 1)} windows of {body} text tokens{' + BOS' if bos_id is not None else ''}). "
            "Use a larger text source, or lower num_samples / seqlen."
        )
    chunks = ids[: n_chunks * body].view(n_chunks, body)
    if num_samples is not None:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n_chunks, generator=generator)[:num_samples]
        chunks = chunks[order]
    if bos_id is not None:
        chunks = torch.cat([torch.full((chunks.shape[0], 1), bos_id, dtype=torch.long), chunks], dim=1)
    return chunks.contiguous()


def eval_windows(
    text: str, tokenizer: Any, *, window: int = 511, max_windows: int | None = None
) -> torch.Tensor:
    """The evaluation protocol's windows.

    ``text`` is tokenised without special tokens and cut into consecutive windows of ``window``
    tokens (the tail is dropped), each prefixed with the tokenizer's BOS token: ``[n, window + 1]``
    (512 with the default). A tokenizer without a BOS token gets windows of ``window + 1`` text tokens
    (same shape, same number of predicted positions), with a warning. ``max_windows`` keeps the first ones.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 (got {window}).")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        warnings.warn(
            "The tokenizer has no BOS token; evaluation windows are plain text of window+1 tokens.",
            stacklevel=2,
        )
    ids = tokenize_text(text, tokenizer)
    windows = make_windows(ids, seqlen=window + 1, num_samples=None, bos_id=bos_id, seed=0)
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1 or None (got {max_windows}).")
        windows = windows[:max_windows]
    return windows


def windows_fingerprint(windows: torch.Tensor) -> str:
    """16 hex characters of sha256 over a window tensor's shape and int64 values."""
    h = hashlib.sha256(str(tuple(windows.shape)).encode())
    h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class WindowDataset(Dataset):
    """Rows of a ``[n, seqlen]`` token tensor as ``{"input_ids": LongTensor[seqlen]}`` items."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index]}


# --------------------------------------------------------------------------------------------------
# Lightning data modules
# --------------------------------------------------------------------------------------------------


def _resolve_tokenizer(name: str | None, gguf_file: str | None) -> Any:
    from pq_lightning.models import load_tokenizer

    return load_tokenizer(name, gguf_file=gguf_file)


class CalibrationData(lightning.LightningDataModule):
    """Calibration windows for the Fisher probe, GPTQ and fine-tuning.

    Batches are ``{"input_ids": LongTensor[batch_size, seqlen]}``; every window is full (BOS +
    ``seqlen - 1`` text tokens), so no padding or attention mask is needed. Windows are built once,
    lazily, in :meth:`setup` (or on first use of :attr:`windows`).

    Args:
        tokenizer: model folder, hub id or ``.gguf`` file whose tokenizer to use; ``None`` uses the
            default SmolLM2-135M-Instruct GGUF. Use the same model as the LightningModule.
        gguf_file: GGUF file name inside ``tokenizer`` when it is a folder.
        source: text source (see :func:`load_texts`): ``builtin`` (offline default), a ``.txt`` /
            ``.jsonl`` file, or ``hf:NAME[:CONFIG][:SPLIT]``.
        seqlen: tokens per window, BOS included (>= 2).
        num_samples: number of calibration windows (>= 1).
        seed: seed of the window draw.
        batch_size: windows per batch (>= 1).
        holdout_fraction: in [0, 1); when > 0, ``max(1, round(holdout_fraction * num_samples))`` extra
            windows, disjoint from the calibration windows, are held out (GPTQ / scale-sweep scoring,
            validation). The calibration windows do not depend on this value.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        source: str = BUILTIN,
        seqlen: int = 512,
        num_samples: int = 128,
        seed: int = 0,
        batch_size: int = 4,
        holdout_fraction: float = 0.0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if seqlen < 2:
            raise ValueError(f"seqlen must be at least 2 (BOS + one token), got {seqlen}.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.gguf_file = gguf_file
        self.source = source
        self.seqlen = seqlen
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.holdout_fraction = holdout_fraction
        self.num_workers = num_workers
        self._tokenizer: Any = None
        self._windows: torch.Tensor | None = None
        self._holdout: torch.Tensor | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> CalibrationData:
        """Build with an already-loaded tokenizer object (tests, notebooks); other args as in ``__init__``."""
        data = cls(**kwargs)
        data._tokenizer = tokenizer
        return data

    @classmethod
    def from_windows(cls, windows: torch.Tensor, *, num_samples: int, tokenizer: Any = None, source: str = GENERATED,
                     **kwargs: Any) -> CalibrationData:
        """Windows made elsewhere (:func:`pq_lightning.self_generated.sample_windows`): the first
        ``num_samples`` are the calibration windows, the rest the held-out ones (as many as
        ``holdout_fraction`` asks for). Other args as in ``__init__``."""
        data = cls(source=source, seqlen=int(windows.shape[1]), num_samples=num_samples, **kwargs)
        if windows.dim() != 2 or windows.shape[0] != num_samples + data.num_holdout:
            raise ValueError(f"from_windows: expected [{num_samples + data.num_holdout}, seqlen] windows "
                             f"({num_samples} + {data.num_holdout} held out), got {list(windows.shape)}")
        data._tokenizer = tokenizer
        data._windows, data._holdout = windows[:num_samples].long(), windows[num_samples:].long()
        return data

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = _resolve_tokenizer(self.tokenizer_name, self.gguf_file)
        return self._tokenizer

    @property
    def num_holdout(self) -> int:
        """Number of held-out windows (0 when ``holdout_fraction == 0``)."""
        if self.holdout_fraction <= 0:
            return 0
        return max(1, round(self.holdout_fraction * self.num_samples))

    def _build(self) -> None:
        tok = self.tokenizer
        texts = load_texts(self.source, tokenizer=tok)
        ids = tokenize_text(join_texts(texts), tok)
        bos_id = getattr(tok, "bos_token_id", None)
        all_windows = make_windows(
            ids,
            seqlen=self.seqlen,
            num_samples=self.num_samples + self.num_holdout,
            bos_id=bos_id,
            seed=self.seed,
        )
        self._windows = all_windows[: self.num_samples]
        self._holdout = all_windows[self.num_samples :]

    def head(self, n: int) -> CalibrationData:
        """The first ``n`` calibration windows as a data module of their own (no held-out windows).

        The windows are drawn in random order, so the first ``n`` are a uniform random subset of them
        (the same subset whatever ``num_samples`` is). ``n`` at or above ``num_samples`` returns ``self``.
        """
        if n < 1:
            raise ValueError(f"head needs at least one window, got {n}.")
        if n >= self.num_samples:
            return self
        sub = CalibrationData(self.tokenizer_name, self.gguf_file, self.source, self.seqlen, n, self.seed,
                              self.batch_size, 0.0, self.num_workers)
        sub._tokenizer = self._tokenizer
        sub._windows, sub._holdout = self.windows[:n], self.windows[:0]
        return sub

    def setup(self, stage: str | None = None) -> None:
        """Tokenise the source and draw the windows (once)."""
        if self._windows is None:
            self._build()

    @property
    def windows(self) -> torch.Tensor:
        """Calibration windows, LongTensor ``[num_samples, seqlen]``."""
        self.setup()
        assert self._windows is not None
        return self._windows

    @property
    def holdout_windows(self) -> torch.Tensor:
        """Held-out windows, LongTensor ``[num_holdout, seqlen]`` (possibly empty)."""
        self.setup()
        assert self._holdout is not None
        return self._holdout

    def _loader(self, windows: torch.Tensor) -> DataLoader:
        return DataLoader(
            WindowDataset(windows), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        """Calibration windows in their drawn order."""
        return self._loader(self.windows)

    def val_dataloader(self) -> DataLoader:
        """The held-out windows when there are any, otherwise the calibration windows."""
        return self._loader(self.holdout_windows if self.num_holdout else self.windows)

    def holdout_dataloader(self) -> DataLoader:
        """The held-out windows; raises when ``holdout_fraction`` is 0."""
        if not self.num_holdout:
            raise ValueError("No held-out windows: set holdout_fraction > 0 (e.g. 0.1).")
        return self._loader(self.holdout_windows)

    def fingerprint(self) -> str:
        """Identity of the calibration windows (16 hex characters of sha256 over their token ids)."""
        return windows_fingerprint(self.windows)


class EvalData(lightning.LightningDataModule):
    """Evaluation windows under the project's protocol (WikiText-2 raw test in the benchmarks).

    Batches are ``{"input_ids": LongTensor[batch_size, window + 1]}`` from :func:`eval_windows`.

    Args:
        path: the evaluation text, a ``.txt`` file (e.g. ``wikitext-2-raw-test.txt``) or any source
            :func:`load_texts` accepts. ``None`` falls back to the builtin corpus with a warning (numbers
            then are not comparable with WikiText-2 results).
        tokenizer: model folder, hub id or ``.gguf`` file; ``None`` uses the default SmolLM2 GGUF.
        gguf_file: GGUF file name inside ``tokenizer`` when it is a folder.
        window: text tokens per window (511; BOS makes 512).
        max_windows: keep only the first ones (``None``: all).
        batch_size: windows per batch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        window: int = 511,
        max_windows: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}.")
        if max_windows is not None and max_windows < 1:
            raise ValueError(f"max_windows must be at least 1 or None, got {max_windows}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.save_hyperparameters()
        self.path = path
        self.tokenizer_name = tokenizer
        self.gguf_file = gguf_file
        self.window = window
        self.max_windows = max_windows
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._tokenizer: Any = None
        self._windows: torch.Tensor | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> EvalData:
        """Build with an already-loaded tokenizer object; other args as in ``__init__``."""
        data = cls(**kwargs)
        data._tokenizer = tokenizer
        return data

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = _resolve_tokenizer(self.tokenizer_name, self.gguf_file)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Tokenise the evaluation text and cut the windows (once)."""
        if self._windows is not None:
            return
        source = self.path
        if source is None:
            warnings.warn(
                "EvalData got no path: evaluating on the builtin corpus (Python docstrings), not WikiText-2. "
                "Pass path=<wikitext-2-raw-test.txt> for numbers comparable with the protocol.",
                stacklevel=2,
            )
            source = BUILTIN
        text = join_texts(load_texts(source, tokenizer=self.tokenizer))
        self._windows = eval_windows(text, self.tokenizer, window=self.window, max_windows=self.max_windows)

    @property
    def windows(self) -> torch.Tensor:
        """Evaluation windows, LongTensor ``[n, window + 1]``."""
        self.setup()
        assert self._windows is not None
        return self._windows

    def val_dataloader(self) -> DataLoader:
        """The windows in text order."""
        return DataLoader(
            WindowDataset(self.windows),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader` (for ``trainer.test``)."""
        return self.val_dataloader()

    def fingerprint(self) -> str:
        """Identity of the evaluation windows (16 hex characters)."""
        return windows_fingerprint(self.windows)
