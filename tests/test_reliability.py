"""Issue 17, one test per numbered item: no stale or corrupt result is reused, the output folder belongs to
one run and never loses what it did not write, bad input is refused before the work, in one line.

Every test reproduces the reported case on a tiny Llama saved as a Hugging Face folder and checks the
new behaviour against a reference (a fresh build, the bytes on disk, the files the user left).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pq_lightning.cli import main, quantize_parser, run_quantize
from pq_lightning.config import CalibrationConfig, EvalConfig, RefineConfig, TrainerConfig
from pq_lightning.errors import UserError
from pq_lightning.export import checkpoint_problems, read_manifest
from pq_lightning.models import model_fingerprint
from pq_lightning.output_dir import LOCK_NAME, OUTPUTS_NAME
from pq_lightning.pipeline import quantize
from pq_lightning.smooth import SmoothConfig

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

OTHER_TEXT = ("Return the lazy dog to the sequence of items, or raise the number when the fox is empty. "
              "Jumps over the quick brown error. ") * 60


def _fast(tmp_path, **over):
    """The cheapest full chain: trace probe, RTN, no smoothing, no evaluation (a few seconds)."""
    kw = dict(dtype="float32", estimator="trace", target_bits=6.0, pareto_bits=[6.0],
              calibration=CalibrationConfig(source=str(tmp_path / "text.txt"), seqlen=32, num_samples=4, batch_size=4,
                                            holdout_fraction=0.25),
              evaluation=EvalConfig(enabled=False), smooth=SmoothConfig(enabled=False), refine=RefineConfig(gptq=False),
              trainer=TrainerConfig(accelerator="cpu"))
    kw.update(over)
    return kw


def _tensors(ckpt):
    u8 = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    return {k: u8(v) for k, v in load_file(ckpt / "model-00001-of-00001.safetensors").items()}


def _same_tensors(a, b) -> bool:
    A, B = _tensors(a), _tensors(b)
    return A.keys() == B.keys() and all(torch.equal(A[k], B[k]) for k in A)


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "work" not in p.relative_to(folder).parts}


# ---- 1: a changed calibration file is not a cached one -------------------------------------------
def test_1_rewritten_calibration_file_recomputes_every_stage(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    (tmp_path / "text.txt").write_text(OTHER_TEXT)  # same name, other text
    with pytest.raises(UserError, match="built from other inputs"):  # not "up to date": its inputs changed
        quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    report = quantize(model=str(tiny_model_dir), output_dir=str(out), overwrite=True, **_fast(tmp_path))
    assert report["stages"]["probe"]["cached"] == 0 and report["stages"]["refine"]["cached"] == 0
    assert report["stages"]["export"]["cached"] == 0
    assert len(list((out / "work").glob("sensitivity-*.safetensors"))) == 2
    fresh = tmp_path / "fresh"
    quantize(model=str(tiny_model_dir), output_dir=str(fresh), **_fast(tmp_path))
    assert _same_tensors(out / "checkpoint-6bpp", fresh / "checkpoint-6bpp")


# ---- 2: one edited weight is another model --------------------------------------------------------
def test_2_edited_weight_changes_the_fingerprint_and_the_build(tmp_path, tiny_model_dir):
    from pq_lightning.served import load_quantized_checkpoint

    out = tmp_path / "out"
    first = quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    shard = tiny_model_dir / "model.safetensors"
    state = load_file(shard)
    key = "model.layers.0.mlp.down_proj.weight"
    state[key][5] = 0.0  # one row, not at a position a sampled fingerprint would read
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match="built from other inputs"):
        quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    second = quantize(model=str(tiny_model_dir), output_dir=str(out), overwrite=True, **_fast(tmp_path))
    assert second["stages"]["probe"]["cached"] == 0 and second["stages"]["export"]["cached"] == 0
    model, _ = load_quantized_checkpoint(out / "checkpoint-6bpp", dtype=torch.float32)
    row = model.get_submodule("model.layers.0.mlp.down_proj").weight[5]
    assert torch.count_nonzero(row) == 0  # the new checkpoint holds the edited row
    assert first["stages"]["probe"]["cached"] == 0


def test_2_fingerprint_reads_every_byte_in_memory_and_streamed(tmp_path, make_tiny_llama):
    from pq_lightning.streaming import load_streamed_model

    a, b = make_tiny_llama(), make_tiny_llama()
    with torch.no_grad():
        b.model.layers[1].self_attn.o_proj.weight[17, 9] += 2.0**-20  # one value, one ulp-scale change
    assert model_fingerprint(a) != model_fingerprint(b)
    b.save_pretrained(tmp_path / "b")
    streamed = load_streamed_model(tmp_path / "b", dtype="float32", memory_cap_gb=None)
    assert model_fingerprint(streamed) == model_fingerprint(b)  # read from disk, not loaded


# ---- 3: a corrupt checkpoint is not "up to date" -------------------------------------------------
def test_3_truncated_shard_is_exported_again_and_evaluated_on_the_sound_files(tmp_path, tiny_model_dir):
    from pq_lightning.evaluate import evaluate_checkpoint
    from pq_lightning.models import load_causal_lm

    out = tmp_path / "out"
    ev = EvalConfig(path=str(tmp_path / "text.txt"), window=31, max_windows=2, batch_size=2)
    quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path, evaluation=ev))
    ckpt = out / "checkpoint-6bpp"
    shard = ckpt / "model-00001-of-00001.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    assert checkpoint_problems(ckpt) == [f"{shard.name} is {len(whole) // 2:,} B, {len(whole):,} B were written"]
    report = quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path, evaluation=ev))
    assert report["stages"]["export"]["cached"] == 0
    assert shard.read_bytes() == whole and checkpoint_problems(ckpt) == []
    model, tok = load_causal_lm(str(tiny_model_dir), dtype="float32")
    from pq_lightning.data import EvalData

    windows = EvalData.from_tokenizer(tok, path=ev.path, window=31, max_windows=2).windows
    assert report["eval"] == evaluate_checkpoint(model, ckpt, windows, batch_size=2, top_k=ev.top_k)
    # the checkpoint's files replaced (its manifest along): the cached KL of the old files is not reused
    from pq_lightning.integrity import file_sha256

    data = bytearray(whole)
    data[-1] ^= 0x01  # the last tensor's last value (model.norm.weight, bf16) halved or doubled
    shard.write_bytes(bytes(data))
    manifest = read_manifest(ckpt)
    manifest["files"][shard.name]["sha256"] = file_sha256(shard)
    (ckpt / "pq_manifest.json").write_text(json.dumps(manifest))
    again = quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path, evaluation=ev))
    assert again["stages"]["export"]["cached"] == 1 and again["stages"]["evaluate"]["cached"] == 0
    fresh = evaluate_checkpoint(model, ckpt, windows, batch_size=2, top_k=ev.top_k)
    assert again["eval"] == fresh and fresh["kl_all"] != report["eval"]["kl_all"]


# ---- 4: unknown format names and pin/ban conflicts are errors ------------------------------------
def _costs():
    from pq_lightning.cost import LinearCost
    from pq_lightning.formats import get_format

    costs = {}
    for i in range(2):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"):
            name, shape = f"model.layers.{i}.{p}", (32, 32)
            costs[name] = LinearCost(name, shape, bits={f: get_format(f).bits(shape) for f in ("nvfp4", "fp8", "bf16")},
                                     dloss={"nvfp4": 1.0, "fp8": 0.1, "bf16": 0.0})
    return costs


@pytest.mark.parametrize("bans,message", [
    ({"q_proj": ["NVFP4"]}, "unknown format 'NVFP4'; registered formats: bf16, fp8, fp8_w8a16, nvfp4, nvfp4a16"),
    ({"q_proj": ["int4"]}, "unknown format 'int4'"),
])
def test_4_unknown_ban_names_are_errors(bans, message):
    from pq_lightning.plan import build_groups

    with pytest.raises(UserError, match=message):
        build_groups(_costs(), model_type="llama", formats=["nvfp4", "fp8"], bans=bans)


def test_4_pin_and_ban_on_one_linear_is_an_error_naming_it():
    from pq_lightning.plan import build_groups

    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj is pinned to 'fp8' by 'down_proj' and banned "
                                         r"from it by 'layers.0.mlp'"):
        build_groups(_costs(), model_type="llama", formats=["nvfp4", "fp8"], pins={"down_proj": "fp8"},
                     bans={"layers.0.mlp": ["fp8"]})
    with pytest.raises(ValueError, match="pinned to two formats"):
        build_groups(_costs(), model_type="llama", formats=["nvfp4", "fp8"], pins={"down_proj": "fp8", "0.mlp": "bf16"})
    # a ban in the right case does ban: no q/k/v takes nvfp4
    groups = build_groups(_costs(), model_type="llama", formats=["nvfp4", "fp8"], bans={"q_proj": ["nvfp4"]})
    qkv = [g for g in groups if any("q_proj" in m for m in g.members)]
    assert qkv and all("nvfp4" not in {o.format for o in g.options} for g in qkv)


def test_4_pin_ban_conflict_is_refused_before_the_probe(tmp_path, tiny_model_dir, monkeypatch):
    import pq_lightning.stages as stages

    monkeypatch.setattr(stages, "probe", lambda *a, **k: pytest.fail("probed before refusing"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj is pinned to 'fp8' by 'down_proj' and banned"):
        quantize(model=str(tiny_model_dir), output_dir=str(tmp_path / "o"),
                 **_fast(tmp_path, pins={"down_proj": "fp8"}, bans={"layers.1": ["fp8"]}))
    assert not (tmp_path / "o").exists()


# ---- 5: one run per folder -----------------------------------------------------------------------
def test_5_second_run_into_a_busy_folder_names_the_first(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pq_lightning.output_dir import FolderLock
        FolderLock(Path({str(out)!r})).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by another pq-lightning run \(pid {holder.pid},"):
            quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "work").exists()
    quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))  # the lock died with its holder
    assert not (out / LOCK_NAME).exists()


# ---- 6: a run's outputs appear together ----------------------------------------------------------
def test_6_crash_while_exporting_a_rerun_leaves_the_previous_outputs_together(tmp_path, tiny_model_dir, monkeypatch):
    import pq_lightning.export as export

    out = tmp_path / "out"
    quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    before = _snapshot(out)
    (tmp_path / "text.txt").write_text(OTHER_TEXT)

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write_config", crash)
    with pytest.raises(OSError, match="No space left"):
        quantize(model=str(tiny_model_dir), output_dir=str(out), overwrite=True, **_fast(tmp_path))
    assert _snapshot(out) == before  # plan, checkpoint, report, pareto.csv: all of the first run
    monkeypatch.undo()
    quantize(model=str(tiny_model_dir), output_dir=str(out), overwrite=True, **_fast(tmp_path))
    record = json.loads((out / OUTPUTS_NAME).read_text())
    runs = {e["run"] for e in record["entries"].values()}
    assert len(runs) == 1 and "plan-6bpp.json" in record["entries"] and "checkpoint-6bpp" in record["entries"]
    plan = json.loads((out / "plan-6bpp.json").read_text())
    counts = read_manifest(out / "checkpoint-6bpp")["plan_summary"]["format_counts"]
    assert {f: n for f, n in plan["formats"].items() if f != "bf16"} == {f: n for f, n in counts.items() if f != "bf16"}


def test_6_crash_while_publishing_is_detected_and_redone(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import pq_lightning.report as report_module

    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "plot_pareto", crash)
    with pytest.raises(KeyboardInterrupt):
        quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    assert json.loads((out / OUTPUTS_NAME).read_text())["publishing"]["names"][0] == "plan-6bpp.json"
    monkeypatch.undo()
    capsys.readouterr()
    quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    assert "stopped while publishing" in capsys.readouterr().err
    record = json.loads((out / OUTPUTS_NAME).read_text())
    assert "publishing" not in record and record["mixed"] == []
    assert len({e["run"] for e in record["entries"].values()}) == 1


# ---- 7: only files this tool wrote are replaced --------------------------------------------------
def test_7_user_files_are_never_replaced(tmp_path, tiny_model_dir, monkeypatch):
    import pq_lightning.stages as stages

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    (out / "pareto.csv").write_text("a,b\n1,2\n")
    monkeypatch.setattr(stages, "load", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    with pytest.raises(UserError, match="pq-lightning did not write it; move it away"):
        quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    assert (out / "report.md").read_text() == "my notes\n" and (out / "pareto.csv").read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in out.iterdir()) == ["pareto.csv", "report.md"]


def test_7_a_checkpoint_of_other_inputs_needs_overwrite_before_the_probe(tmp_path, tiny_model_dir, monkeypatch):
    import pq_lightning.stages as stages

    out = tmp_path / "out"
    quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    old = _snapshot(out)
    (tmp_path / "text.txt").write_text(OTHER_TEXT)
    probe = stages.probe
    monkeypatch.setattr(stages, "probe", lambda *a, **k: pytest.fail("probed before refusing"))
    with pytest.raises(UserError, match="checkpoint-6bpp was built from other inputs .* pass --overwrite"):
        quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    assert _snapshot(out) == old
    monkeypatch.setattr(stages, "probe", probe)
    quantize(model=str(tiny_model_dir), output_dir=str(out), overwrite=True, **_fast(tmp_path))
    shard = "checkpoint-6bpp/model-00001-of-00001.safetensors"
    assert (out / shard).read_bytes() != old[shard]
    # an output pq-lightning wrote and the user then edited is theirs, unless --overwrite
    (out / "report.md").write_text("edited\n")
    with pytest.raises(UserError, match="report.md was changed after pq-lightning wrote it"):
        quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    assert (out / "report.md").read_text() == "edited\n"


# ---- 8: leftovers of killed runs are removed; a failed run leaves nothing empty ------------------
def test_8_next_run_removes_leftovers_of_a_killed_export(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    junk = [out / ".checkpoint-6bpp.tmp-0123abcd", out / "work" / ".checkpoint-6bpp-0011223344556677.tmp-89abcdef",
            out / ".checkpoint-6bpp.old-deadbeef"]
    for d in junk:
        d.mkdir()
        (d / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 4096)
    stray = [out / ".plan-6bpp.json.x1y2z3w4.tmp", out / "work" / "sensitivity-0011.safetensors.a1b2c3d4.tmp"]
    for f in stray:
        f.write_bytes(b"partial")
    mine = [out / ".notes.tmp-12345678", out / "notes.txt", out / "report.md.old"]  # the user's, whatever they look like
    for f in mine:
        f.write_text("keep")
    quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    assert not any(p.exists() for p in junk + stray)
    assert all(f.read_text() == "keep" for f in mine)


def test_8_failed_run_leaves_no_empty_work_folder(tmp_path, tiny_model_dir):
    state = load_file(tiny_model_dir / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, tiny_model_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "new" / "out"
    with pytest.raises(UserError):
        quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path))
    assert not (tmp_path / "new").exists()


# ---- 9: ~ and $VARS in paths ---------------------------------------------------------------------
def test_9_tilde_and_variables_in_a_yaml_output_dir_are_expanded(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PQ_RUN", "run1")
    monkeypatch.chdir(tmp_path)
    cfg = {"model": str(tiny_model_dir), "output_dir": "~/x/$PQ_RUN", "dtype": "float32", "estimator": "trace",
           "pareto_bits": [6.0], "calibration": {"source": "~/../text.txt", "seqlen": 32, "num_samples": 4},
           "evaluation": {"enabled": False}, "smooth": {"enabled": False}, "refine": {"gptq": False},
           "trainer": {"accelerator": "cpu"}}
    (tmp_path / "home").mkdir()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    main(["quantize", "--config", str(tmp_path / "cfg.yaml")])
    assert (tmp_path / "home" / "x" / "run1" / "checkpoint-6bpp" / "pq_manifest.json").is_file()
    assert not (tmp_path / "~").exists() and not any(tmp_path.glob("$*"))


# ---- 10: settings refused before the model loads -------------------------------------------------
@pytest.mark.parametrize("change,message", [
    ({"target_bits": 0.0}, "--target_bits must be a positive number, got 0.0"),
    ({"target_bits": -4.5}, "--target_bits must be a positive number"),
    ({"target_bits": float("nan")}, "--target_bits must be a positive number"),
    ({"target_bits": None, "target_size_gb": 0.0}, "--target_size_gb must be a positive number"),
    ({"target_bits": [6.0, 6.0]}, "a budget is given twice"),
    ({"estimator": "fisher"}, "--estimator 'fisher' is unknown; choose one of trace, diag, output"),
    ({"evaluation": EvalConfig(path="missing.txt")}, "--evaluation.path missing.txt is not a file"),
    ({"formats": ["nvfp5"]}, "--formats: unknown format 'nvfp5'; registered formats"),
    ({"pins": {"down_proj": "FP8"}}, "--pins 'down_proj': unknown format 'FP8'"),
    ({"pins": {"down_proj": "nvfp4a16"}}, "is not in the format menu"),
    ({"bans": {"q_proj": ["NVFP4"]}}, "--bans 'q_proj': unknown format 'NVFP4'"),
    ({"pins": {"(": "fp8"}}, "is not a valid regular expression"),
    ({"calibration": CalibrationConfig(source="nope.txt")}, "--calibration.source nope.txt is not a file"),
    ({"calibration": CalibrationConfig(source="text.txt", seqlen=300)},
     "--calibration.seqlen needs windows of 300 tokens, the model takes at most 256 positions"),
    ({"evaluation": EvalConfig(window=511)}, "--evaluation.window needs windows of 512 tokens"),
    ({"memory_cap_gb": 0.0}, "--memory_cap_gb must be a positive number"),
])
def test_10_bad_settings_are_refused_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, change, message):
    import pq_lightning.stages as stages

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stages, "load", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        quantize(model=str(tiny_model_dir), output_dir=str(out), **_fast(tmp_path, **change))
    assert not out.exists()


def test_10_opt_with_too_few_positions_is_refused_from_its_config(tmp_path, tiny_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32))
    opt.save_pretrained(tmp_path / "opt")
    (tmp_path / "text.txt").write_text(OTHER_TEXT)
    with pytest.raises(UserError, match="needs windows of 128 tokens, the model takes at most 64 positions; lower "
                                        "--calibration.seqlen to at most 64"):
        quantize(model=str(tmp_path / "opt"), output_dir=str(tmp_path / "o"),
                 **_fast(tmp_path, calibration=CalibrationConfig(source=str(tmp_path / "text.txt"), seqlen=128)))


def test_10_overwrite_is_a_plain_flag():
    from pq_lightning.cli import bare_flags

    parser = quantize_parser()
    for argv, want in ((["--overwrite"], True), (["--overwrite", "--target_bits", "5"], True),
                       (["--overwrite", "false"], False), ([], False)):
        assert parser.parse_args(bare_flags(parser, argv)).overwrite is want
    assert parser.parse_args(bare_flags(parser, ["--smooth.enabled", "false"])).smooth.enabled is False


# ---- 11: bad models are named at load ------------------------------------------------------------
def test_11_nan_and_inf_weights_name_the_linear(tmp_path, tiny_model_dir):
    state = load_file(tiny_model_dir / "model.safetensors")
    state["model.layers.0.mlp.down_proj.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), float("nan")])
    save_file(state, tiny_model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"NaN or Inf values: model.layers.0.mlp.down_proj.weight \(2 NaN, 1 Inf\)"):
        quantize(model=str(tiny_model_dir), output_dir=str(tmp_path / "o"), **_fast(tmp_path))


def test_11_hidden_size_not_a_multiple_of_16_says_nvfp4_cannot_take_it(tmp_path, make_tiny_llama, tiny_tokenizer):
    make_tiny_llama(hidden_size=40, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=10).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "text.txt").write_text(OTHER_TEXT)
    with pytest.raises(ValueError, match=r"Note: nvfp4 cannot take 12 of 14 body Linears \(nvfp4 needs in_features "
                                         r"divisible by 16, got 40"):
        quantize(model=str(tmp_path / "m"), output_dir=str(tmp_path / "o"), **_fast(tmp_path, target_bits=4.5))


def test_11_masked_lm_and_truncated_files_are_refused_before_loading(tmp_path, tiny_model_dir):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match="BertForMaskedLM is not a causal LM"):
        quantize(model=str(tmp_path / "bert"), output_dir=str(tmp_path / "o"), **_fast(tmp_path))
    shard = tiny_model_dir / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(UserError, match="model.safetensors is truncated: .* restore or re-download the model"):
        quantize(model=str(tiny_model_dir), output_dir=str(tmp_path / "o"), **_fast(tmp_path))
    assert not (tmp_path / "o").exists()


# ---- 12: a command-line budget replaces the config's; sizes say what they count -----------------
def test_12_target_size_on_the_command_line_replaces_the_configs_bits(tmp_path, tiny_model_dir):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"target_bits": 6.0, "output_dir": str(tmp_path / "o")}))
    parser = quantize_parser()
    from pq_lightning.cli import budgets_from_command_line

    for argv, bits, size in (([], 6.0, None), (["--target_size_gb", "0.0001"], None, 0.0001),
                             (["--target_size_gb=0.0001"], None, 0.0001),
                             (["--target_size_gb", "0.0001", "--target_bits", "5"], 5.0, 0.0001)):
        args = ["--config", str(cfg), *argv]
        parsed = parser.parse_args(args)
        budgets_from_command_line(parsed, args)
        assert (parsed.target_bits, parsed.target_size_gb) == (bits, size), argv
    budget = 100_000
    report = run_quantize(["--config", str(cfg), "--model", str(tiny_model_dir), "--target_size_gb", str(budget / 1e9),
                           "--calibration.source", str(tmp_path / "text.txt"), "--calibration.seqlen", "32",
                           "--calibration.num_samples", "4", "--dtype", "float32", "--estimator", "trace",
                           "--evaluation.enabled", "false", "--smooth.enabled", "false", "--refine.gptq", "false",
                           "--pareto_bits", "[6.0]", "--trainer.accelerator", "cpu"])
    assert sorted(p.name for p in (tmp_path / "o").glob("checkpoint-*")) == ["checkpoint-0.0001GB"]
    ckpt = tmp_path / "o" / "checkpoint-0.0001GB"
    assert report["tensor_bytes"] <= budget  # what the budget counts: the tensors
    assert report["folder_bytes"] == sum(p.stat().st_size for p in ckpt.iterdir())  # what the disk holds, said


def test_12_size_messages_have_enough_digits():
    from pq_lightning.plan import budget_bits, build_groups

    groups = build_groups(_costs(), model_type="llama", formats=["nvfp4", "fp8"])
    with pytest.raises(ValueError, match=r"target_size_gb=1e-06 \(1,000 B\) leaves no room for the body: the tensors "
                                         r"outside it already take 103,496 B; raise it to at least 0\.000\d{4,} "
                                         r"\(1\d\d,\d\d\d B\)"):
        budget_bits(groups, target_size_gb=1e-6, non_body=103_496)


# ---- 13: pq-lightning validate -------------------------------------------------------------------
def test_13_validate_uses_the_references_tokenizer(tmp_path, tiny_model_dir, monkeypatch):
    from pq_lightning.export import export_checkpoint
    from pq_lightning.models import load_causal_lm

    model, tok = load_causal_lm(str(tiny_model_dir), dtype="float32")
    ckpt = tmp_path / "ckpt"
    export_checkpoint(model, {f"model.layers.{i}.mlp.down_proj": "fp8" for i in range(2)}, ckpt, tokenizer=tok)
    out = tmp_path / "eval"
    monkeypatch.chdir(tmp_path)
    main(["validate", "--model", "pq_lightning.evaluate.QuantEvaluator",
          "--model.init_args.reference", str(tiny_model_dir), "--model.init_args.candidate", str(ckpt),
          "--model.init_args.output_dir", str(out), "--data", "pq_lightning.data.EvalData",
          "--data.init_args.path", str(tmp_path / "text.txt"), "--data.init_args.window", "31",
          "--data.init_args.max_windows", "2", "--data.init_args.batch_size", "2", "--trainer.accelerator", "cpu",
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    result = json.loads((out / "eval.json").read_text())
    assert result["n_positions"] == 2 * 31 and 0 < result["kl_all"] < 1


def test_13_validate_says_what_a_wrong_candidate_is(tmp_path, tiny_model_dir):
    from pq_lightning.checks import candidate_problem

    assert "does not exist" in candidate_problem(tmp_path / "nothing")
    half = tmp_path / ".checkpoint-6bpp.tmp-0123abcd"
    half.mkdir()
    (half / ".shard-00001.safetensors").write_bytes(b"\0" * 64)
    assert "half-written export" in candidate_problem(half)
    assert "unquantized Hugging Face model (no quantization_config); pass it as the reference" in candidate_problem(
        tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="reference out/a/b does not exist"):
        from pq_lightning.checks import check_model_path

        check_model_path("out/a/b", "reference")


# ---- 14: an expected failure is one line, a bug a traceback --------------------------------------
def test_14_expected_failures_print_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    args = ["quantize", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"), "--target_bits", "0"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "pq-lightning: error: --target_bits must be a positive number, got 0.0\n"
    with pytest.raises(UserError):  # the traceback on request
        main([*args, "--verbose"])
    import pq_lightning.stages as stages

    def bug(*a, **k):
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(stages, "load", bug)
    with pytest.raises(IndexError):  # a bug is not dressed up as a user error
        main(["quantize", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"), "--dtype", "float32",
              "--calibration.source", str(tmp_path / "text.txt"), "--calibration.seqlen", "32",
              "--evaluation.enabled", "false"])
    assert not (tmp_path / "o").exists()


def test_14_cli_subprocess_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pq_lightning.cli", "quantize", "--output_dir", str(tmp_path / "o"),
                        "--estimator", "fisher"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("pq-lightning: error: --estimator 'fisher' is unknown")
    assert "Traceback" not in r.stderr


def test_ctrl_c_inside_a_finalizer_still_interrupts(tmp_path):
    """Python drops an exception raised in ``__del__``: the Ctrl-C is delivered again and the run ends 130."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell starts it (pytest may ignore it)\n"
        "from pq_lightning import cli\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.001)\n"
        "def work(argv):\n"
        "    Finalized()\n"
        "    time.sleep(2)\n"
        "    print('finished', file=sys.stderr)\n"
        "cli._dispatch = work\n"
        "cli.main([])\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130
    assert "finished" not in done.stderr and "Traceback" not in done.stderr
    assert "interrupted; run the same command again" in done.stderr
