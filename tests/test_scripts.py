"""The device scripts: scripts/gpu_check.py (CPU dry run), scripts/gpu_check.sh, scripts/vllm_smoke.py.

The GPU parts cannot run here; what can is checked: argument parsing, the "vllm missing" error, the
prompt log-prob bookkeeping, the byte counts, the bit comparison, the pytest runner, and the whole
gpu_check.py dry run (Triton interpreter vs torch reference, bandwidth code path, every pipeline
stage on a tiny random Llama).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    return load_script(name)


@pytest.fixture(scope="module")
def smoke():
    return _load("vllm_smoke")


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


def _fake_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {}},
    }))
    return folder


# ---- vllm_smoke.py ----------------------------------------------------------------------------


def test_vllm_smoke_imports_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # any top-level `import vllm` would raise
    mod = _load("vllm_smoke")
    assert len(mod.DEFAULT_PROMPTS) == 2 and callable(mod.main)


def test_vllm_smoke_arguments(smoke, monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    a = smoke.parse_args(["--checkpoint", "ck"])
    assert (a.checkpoint, a.out, a.prompts) == ("ck", "vllm_smoke.json", list(smoke.DEFAULT_PROMPTS))
    assert (a.max_tokens, a.top_logprobs, a.max_model_len, a.compare_emulation) == (24, 20, 1024, False)
    monkeypatch.setenv("OUT", str(tmp_path))
    a = smoke.parse_args(["--checkpoint", "ck", "--prompt", "a", "--prompt", "b c", "--max-tokens", "3",
                          "--top-logprobs", "5", "--compare-emulation"])
    assert a.out == str(tmp_path / "vllm_smoke.json")
    assert a.prompts == ["a", "b c"] and a.max_tokens == 3 and a.top_logprobs == 5 and a.compare_emulation
    for bad in (["--top-logprobs", "21"], ["--max-tokens", "0"], ["--gpu-memory-utilization", "1.5"], []):
        with pytest.raises(SystemExit):
            smoke.parse_args((["--checkpoint", "ck"] if bad else []) + bad)


def test_vllm_smoke_says_how_to_get_vllm(smoke, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    ck = _fake_checkpoint(tmp_path / "checkpoint-6bpp")
    out = tmp_path / "smoke.json"
    assert smoke.main(["--checkpoint", str(ck), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "vllm is not importable" in err and "pip install vllm; needs a CUDA GPU" in err
    assert not out.exists()


def test_vllm_smoke_rejects_a_folder_that_is_not_a_checkpoint(smoke, tmp_path, capsys):
    assert smoke.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert smoke.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err


def test_prompt_logprob_rows(smoke):
    lp = lambda v, r, s: SimpleNamespace(logprob=v, rank=r, decoded_token=s)  # noqa: E731
    prompt_ids = [1, 7, 9]
    # vLLM's layout: None for the first token; top-k plus the actual token (which may be outside it)
    plp = [None, {5: lp(-0.1, 1, "a"), 7: lp(-2.5, 2, "b")}, {3: lp(-0.2, 1, "c"), 4: lp(-1.9, 2, "d"),
                                                              9: lp(-6.0, 17, "e")}]
    rows = smoke.prompt_logprob_rows(prompt_ids, plp, k=2)
    assert [r["position"] for r in rows] == [1, 2]
    assert (rows[0]["token_id"], rows[0]["logprob"], rows[0]["rank"]) == (7, -2.5, 2)
    assert [t["token_id"] for t in rows[0]["top"]] == [5, 7]
    assert (rows[1]["token_id"], rows[1]["logprob"], rows[1]["rank"]) == (9, -6.0, 17)
    assert [(t["token_id"], t["logprob"], t["text"]) for t in rows[1]["top"]] == [(3, -0.2, "c"), (4, -1.9, "d")]


# ---- gpu_check.py -------------------------------------------------------------------------------


def test_gpu_check_arguments(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    a = gpu_check.parse_args([])
    assert a.out == str(tmp_path / "gpu_check.json")
    assert (tuple(a.bits_shape), a.copy_mib, tuple(a.quant_shape)) == ((4096, 4096), 1024, (16384, 16384))
    assert (a.seqlen, a.num_samples, a.eval_windows, a.batch_size, a.target_bits) == (512, 32, 16, 4, 6.0)
    d = gpu_check.parse_args(["--cpu-dry-run", "--skip", "pytest", "--out", "x.json", "--seqlen", "24"])
    assert d.cpu_dry_run and d.skip == ["pytest"] and d.out == "x.json" and d.seqlen == 24
    assert (tuple(d.bits_shape), tuple(d.quant_shape), d.repeats) == ((16, 256), (16, 256), 2)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--skip", "everything"])


def test_nvfp4_kernel_bytes(gpu_check):
    # 16384^2 bf16 weights: read 2 B each; write 0.5 B codes + 1/16 B scales (+ 4 B fp32 values)
    n = 16384 * 16384
    assert gpu_check.nvfp4_kernel_bytes(n, 2, False) == 2 * n + n // 2 + n // 16 == 687_865_856
    assert gpu_check.nvfp4_kernel_bytes(n, 2, True) == 687_865_856 + 4 * n


def test_bit_comparison_is_bitwise(gpu_check):
    a = torch.tensor([0.0, 1.5, float("nan"), -2.0])
    b = torch.tensor([-0.0, 1.5, float("nan"), -2.0])
    assert gpu_check._mismatches(a, b) == 1  # -0.0 != 0.0 in bits; NaN == NaN in bits
    s = torch.tensor([0.5, 448.0]).to(torch.float8_e4m3fn)
    assert gpu_check._mismatches(s, s.clone()) == 0
    assert gpu_check._mismatches(s, torch.tensor([0.5, 416.0]).to(torch.float8_e4m3fn)) == 1
    assert gpu_check._mismatches(a, a[:2]) == -1  # shapes differ


def test_bit_check_weights_are_the_intended_kinds(gpu_check):
    w = gpu_check.bit_check_weights(16, 256, seed=0)
    assert set(w) >= {"normal", "normal_bf16", "student_t_df2", "cauchy", "sparse_outliers", "zero_groups_tiny_rows"}
    assert w["normal_bf16"].dtype == torch.bfloat16 and w["normal"].shape == (16, 256)
    zg = w["zero_groups_tiny_rows"].view(16, -1, 16)
    assert bool((zg[:, ::7] == 0).all())
    # heavy tails: the Student-t(2) and Cauchy draws reach far beyond a normal's ~4.5 sigma
    for k in ("student_t_df2", "cauchy", "sparse_outliers"):
        x = w[k]
        assert float(x.abs().max() / x.abs().median()) > 20, k
    shared_w, gs = w["shared_global_scale"]
    assert float(gs) == pytest.approx(448 * 6 / (4 * float(w["normal"].abs().amax())), rel=1e-6)


def test_run_pytest_reports_failures(gpu_check, tmp_path):
    f = tmp_path / "test_tiny.py"
    f.write_text("def test_ok():\n    assert 1 + 1 == 2\n\ndef test_bad():\n    assert 1 + 1 == 3\n")
    r = gpu_check.run_pytest(str(f), timeout=120, collect_only=False)
    assert r["returncode"] == 1 and r["ok"] is False
    assert "1 failed, 1 passed" in r["summary"]


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_quantize.sh", "device_install.sh", "setup.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / script)]).returncode == 0


def test_gpu_quantize_refuses_a_missing_half(tmp_path):
    """Without the first half of the GGUF (the machine went back between the two calls) it says so."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"OUT": str(tmp_path)}
    work = tmp_path / "tree"
    (work / "scripts").mkdir(parents=True)
    for f in ("gpu_quantize.sh", "device_install.sh"):
        (work / "scripts" / f).write_text((REPO / "scripts" / f).read_text())
    (work / ".carry" / "gguf2").mkdir(parents=True)
    (work / ".carry" / "gguf2" / "part").write_bytes(b"x")
    r = subprocess.run(["bash", str(work / "scripts" / "gpu_quantize.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3 and "a half of the GGUF is missing" in r.stdout


def test_gpu_check_cpu_dry_run(tmp_path):
    """The whole script on the CPU: interpreter kernel == torch reference, bandwidth path, every stage."""
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PQ_TRITON", "TRITON_INTERPRET", "OUT")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu-dry-run", "--skip", "pytest",
         "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["ok"] is True and d["failed_sections"] == [] and d["meta"]["cpu_dry_run"] is True
    s = d["sections"]
    assert set(s) == {"nvfp4_bits", "bandwidth", "pipeline"}

    bits = s["nvfp4_bits"]
    assert bits["interpreter"] is True and bits["shape"] == [16, 256] and bits["total_mismatches"] == 0
    assert len(bits["cases"]) == 7
    for case in bits["cases"].values():
        assert case["kernel_used"] is True and case["ok"] is True
        assert case["mismatches"] == {"weight_packed": 0, "weight_scale": 0, "weight_global_scale": 0, "fake_quant": 0}

    bw = s["bandwidth"]
    copy = bw["copy"]
    assert copy["bytes_moved"] == 2 * 8 * 2**20 and copy["GB_per_s"] == pytest.approx(copy["bytes_moved"] / copy["seconds"] / 1e9)
    fq = bw["nvfp4_fake_quant"]
    assert fq["bytes_moved"] == 16 * 256 * (2 + 4) + 16 * 256 // 2 + 16 * 256 // 16
    assert fq["share_of_copy"] == pytest.approx(fq["GB_per_s"] / copy["GB_per_s"])
    assert bw["target_share"] == 0.6 and isinstance(bw["meets_target"], bool)

    pipe = s["pipeline"]
    assert pipe["ok"] is True and pipe["weights"] == "random" and pipe["accelerator"] == "cpu"
    assert list(pipe["stage_seconds"]) == [
        "load", "to_device", "probe", "probe_streamed", "cost", "allocate", "refine", "export", "evaluate"
    ]
    streamed = pipe["probe_streamed"]
    assert streamed["resident_layers"] == 1 < streamed["n_layers"] == 2 and streamed["layer_loads"] >= 3
    # random weights: the in-memory model's rotary tables were cast to bf16, the streamed one's not
    assert 0 <= streamed["max_rel_dev_h_trace"] < 1e-2
    assert streamed["peak_resident_GiB"] <= streamed["cap_GiB"] < streamed["weights_GiB"]
    assert all(t >= 0 for t in pipe["stage_seconds"].values())
    assert pipe["plan"]["n_linears"] == 14 and pipe["plan"]["bpp_body"] <= 6.0
    assert pipe["bpp_body_on_disk"] == pytest.approx(pipe["plan"]["bpp_body"])
    assert sum(pipe["refine"]["methods"].values()) == 14
    n, t = pipe["eval_windows_shape"]
    assert pipe["eval"]["n_positions"] == n * (t - 1)
    assert 0.0 <= pipe["eval"]["kl_all"] < 1.0 and 0.0 <= pipe["eval"]["top1_all"] <= 1.0


# ---- bench_vs_peers.py / peers_llmcompressor.py ------------------------------------------------


@pytest.fixture(scope="module")
def peers_bench():
    # registered in sys.modules: its dataclasses resolve their annotations through it
    name = "_script_bench_vs_peers"
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "bench_vs_peers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def peer_runner():
    return _load("peers_llmcompressor")


def test_peer_runner_imports_without_pq_lightning_or_llmcompressor(monkeypatch):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)
    monkeypatch.setitem(sys.modules, "pq_lightning", None)
    mod = _load("peers_llmcompressor")
    assert mod.RECIPES == ("nvfp4_gptq", "nvfp4_fp8_down", "fp8_dynamic")


def test_peer_runner_arguments_and_windows(peer_runner, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(SystemExit):  # a calibrated recipe without tokens
        peer_runner.parse_args(["--model", "m", "--recipe", "nvfp4_gptq", "--output", "o"])
    a = peer_runner.parse_args(["--model", "m", "--recipe", "fp8_dynamic", "--output", "o"])
    assert (a.tokens, a.dtype, a.threads) == (None, "auto", None)
    ids = torch.arange(12, dtype=torch.int64).view(3, 4)
    save_file({"input_ids": ids}, str(tmp_path / "t.safetensors"))
    save_file({"input_ids": ids.int()}, str(tmp_path / "bad.safetensors"))
    save_file({"ids": ids}, str(tmp_path / "other.safetensors"))
    got = peer_runner.load_windows(str(tmp_path / "t.safetensors"))
    assert torch.equal(got, ids)
    with pytest.raises(ValueError, match="int64"):
        peer_runner.load_windows(str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="input_ids"):
        peer_runner.load_windows(str(tmp_path / "other.safetensors"))
    batches = list(peer_runner.calibration_loader(ids))
    assert len(batches) == 3
    for i, b in enumerate(batches):  # one window per batch, file order, full attention mask
        assert torch.equal(b["input_ids"], ids[i : i + 1]) and torch.equal(b["attention_mask"], torch.ones(1, 4).long())


def test_bench_vs_peers_arguments(peers_bench):
    a = peers_bench.parse_args([])
    assert a.recipes == ["nvfp4_gptq", "nvfp4_fp8_down", "fp8_dynamic"]
    assert a.ours_bits == [4.5, "mixed", 6.0, 7.0]
    assert (a.dtype, a.peers_dtype, a.peer_windows, a.max_eval_windows) == ("float32", "auto", "all", None)
    assert a.calibration.endswith("wikitext-2-valid-tokenized.txt") and a.eval_path.endswith("wikitext-2-raw-test.txt")
    a = peers_bench.parse_args(["--recipes", "none", "--ours-bits", "4.5, mixed"])
    assert a.recipes == [] and a.ours_bits == [4.5, "mixed"]
    for bad in (["--recipes", "awq"], ["--ours-bits", "4.5,six"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            peers_bench.parse_args(bad)


def test_bench_vs_peers_find_peers_python_reports_a_missing_interpreter(peers_bench, tmp_path):
    python, reason = peers_bench.find_peers_python(str(tmp_path / "no-python"))
    assert python is None and "did not run" in reason


def test_bench_vs_peers_target_checks_and_speed(peers_bench):
    Row = peers_bench.Row

    def row(name, recipe, bpp, kl, wall=None, tool="llm-compressor"):
        return Row(name=name, tool=tool, bpp_body=bpp, eval={"kl_conf": kl}, wall_s=wall, detail={"recipe": recipe})

    peers = [row("gptq", "nvfp4_gptq", 4.500127, 0.40, wall=100.0), row("mixed", "nvfp4_fp8_down", 5.3777, 0.25),
             row("fp8", "fp8_dynamic", 8.0234, 0.02), Row(name="mo", tool="modelopt", status="not run: x")]
    ours = {"4.5bpp": row("o45", None, 4.500127, 0.30, tool="pq-lightning"),
            "5.3777bpp": row("omix", None, 5.3770, 0.16, tool="pq-lightning"),
            "6bpp": row("o6", None, 5.99, 0.05, tool="pq-lightning")}
    c45, cmix, c6 = peers_bench.target_checks(peers, ours, 5.3777)
    assert c45["verdict"] == "PASS" and c45["peer"] == "gptq" and c45["ratio"] == pytest.approx(0.75)
    assert cmix["verdict"] == "FAIL" and cmix["ratio"] == pytest.approx(0.64)  # limit 0.6
    assert c6["verdict"] == "NOT CHECKED" and "ModelOpt" in c6["reason"]
    ours["4.5bpp"].bpp_body = 4.6  # over the peer's size: a failure whatever the KL
    assert peers_bench.target_checks(peers, ours, 5.3777)[0]["verdict"] == "FAIL"
    s = peers_bench.speed_check(peers, 80.0, None, 4)
    assert s["verdict"] == "PASS" and s["ratio"] == pytest.approx(0.8) and "4 budgets" in s["ours_measured"]
    s = peers_bench.speed_check(peers, 180.0, 120.0, 4)  # the separate single-budget run decides
    assert s["verdict"] == "FAIL" and s["ratio"] == pytest.approx(1.2)
    assert peers_bench.speed_check(peers[1:], 80.0, None, 4)["verdict"] == "NOT CHECKED"
    lines = peers_bench.table_lines(peers + list(ours.values()))
    assert len(lines) == 2 + 7 and "not run: x" in lines[5] and lines[6].endswith("|")


# ---- peers_modelopt.py / the ModelOpt row of bench_vs_peers.py ---------------------------------

#: SmolLM2-135M: 30 decoder layers of q,o 576x576, k,v 192x576, gate,up 1536x576, down 576x1536;
#: lm_head 49152x576 (tied to the embeddings)
SMOL_N_BODY = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
SMOL_N_LM_HEAD = 49152 * 576


@pytest.fixture(scope="module")
def modelopt_runner():
    return _load("peers_modelopt")


def test_modelopt_runner_imports_without_modelopt_or_pq_lightning(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt", None)
    monkeypatch.setitem(sys.modules, "pq_lightning", None)
    mod = _load("peers_modelopt")
    assert mod.MENU == {"NVFP4_DEFAULT_CFG": "nvfp4", "FP8_DEFAULT_CFG": "fp8"}
    assert mod.effective_bits_for_body_bpp(6.0, 3, 1) == pytest.approx(8.5)
    out = Path(os.devnull)
    assert mod.main(["--model", "m", "--tokens", "t", "--target-bpp", "6", "--output", str(out)]) == 2


def test_modelopt_effective_bits_conversion_by_hand(modelopt_runner):
    assert (SMOL_N_BODY, SMOL_N_LM_HEAD) == (106_168_320, 28_311_552)
    # lm_head is 4/19 of the weights ModelOpt counts: E = 6 * 15/19 + 16 * 4/19 = 154/19
    e = modelopt_runner.effective_bits_for_body_bpp(6.0, SMOL_N_BODY, SMOL_N_LM_HEAD)
    assert e == pytest.approx(154 / 19, rel=1e-12)
    assert modelopt_runner.body_bpp_for_effective_bits(154 / 19, SMOL_N_BODY, SMOL_N_LM_HEAD) == pytest.approx(6.0)
    assert modelopt_runner.effective_bits_for_body_bpp(4.5, 10, 0) == 4.5  # nothing outside the body
    with pytest.raises(ValueError):
        modelopt_runner.effective_bits_for_body_bpp(6.0, 0, 5)


def test_modelopt_bits_accounting(modelopt_runner):
    from pq_lightning.formats import get_format

    for shape in ((576, 576), (192, 576), (576, 1536), (48, 32)):
        for fmt in ("nvfp4", "fp8", "bf16"):
            assert modelopt_runner.exact_bits(fmt, shape) == get_format(fmt).bits(shape), (fmt, shape)
    shapes = {"a": (32, 64), "b": (16, 32), "lm_head": (100, 32)}
    choice = {"a": "nvfp4", "b": "fp8", "lm_head": "bf16"}
    # nominal: (4.5 * 2048 + 8 * 512) / 2560; exact: nvfp4 4 bits + 8 per 16 + 64 per Linear, fp8 + 32 per row
    assert modelopt_runner.body_bpp(choice, shapes, ["a", "b"], exact=False) == pytest.approx(13312 / 2560)
    exact = (2048 * 4 + 32 * 4 * 8 + 64) + (512 * 8 + 16 * 32)
    assert modelopt_runner.body_bpp(choice, shapes, ["a", "b"]) == pytest.approx(exact / 2560)
    with pytest.raises(KeyError):
        modelopt_runner.body_bpp({"a": "nvfp4"}, shapes, ["a", "b"])
    assert [modelopt_runner.format_of_bits(b) for b in (4.5, 8.0, 16.0)] == ["nvfp4", "fp8", "bf16"]
    with pytest.raises(ValueError):
        modelopt_runner.format_of_bits(6.0)
    assert modelopt_runner.format_of_quantizer(True, (2, 1)) == "nvfp4"
    assert modelopt_runner.format_of_quantizer(True, [4, 3]) == "fp8"
    assert modelopt_runner.format_of_quantizer(False, (2, 1)) == "bf16"
    with pytest.raises(ValueError):
        modelopt_runner.format_of_quantizer(True, 8)


def test_modelopt_runner_arguments(modelopt_runner):
    a = modelopt_runner.parse_args(["--model", "m", "--tokens", "t.safetensors", "--target-bpp", "6", "--output", "o"])
    assert (a.target_bpp, a.dtype, a.exact_bpp, a.body_names, a.num_score_steps, a.gguf_file) == (
        6.0, "auto", True, None, None, None)
    a = modelopt_runner.parse_args(["--model", "m.gguf", "--tokens", "t", "--target-bpp", "5.5", "--output", "o",
                                    "--no-exact-bpp", "--num-score-steps", "3", "--threads", "1"])
    assert (a.exact_bpp, a.num_score_steps, a.threads) == (False, 3, 1)
    base = ["--model", "m", "--tokens", "t", "--output", "o"]
    for bad in (["--target-bpp", "4"], ["--target-bpp", "17"], ["--target-bpp", "6", "--threads", "0"],
                ["--target-bpp", "6", "--num-calib-steps", "0"], []):
        with pytest.raises(SystemExit):
            modelopt_runner.parse_args(base + bad)
    assert modelopt_runner.BODY_RE.search("model.layers.3.mlp.down_proj")
    assert not modelopt_runner.BODY_RE.search("lm_head")


def test_bench_vs_peers_modelopt_arguments(peers_bench):
    a = peers_bench.parse_args([])
    assert (a.modelopt_bits, a.modelopt_python, a.modelopt_score_steps) == ([6.0], None, None)
    a = peers_bench.parse_args(["--modelopt-bits", "none", "--recipes", "none", "--ours-bits", "6.0"])
    assert a.modelopt_bits == [] and a.recipes == [] and a.ours_bits == [6.0]
    assert peers_bench.parse_args(["--modelopt-bits", "5.5, 6"]).modelopt_bits == [5.5, 6.0]
    for bad in (["--modelopt-bits", "six"], ["--modelopt-bits", "3"], ["--modelopt-score-steps", "0"]):
        with pytest.raises(SystemExit):
            peers_bench.parse_args(bad)
    assert peers_bench.modelopt_recipe(6.0) == "modelopt" and peers_bench.modelopt_recipe(5.5) == "modelopt@5.5"


def test_bench_vs_peers_find_modelopt_python_reports_a_missing_interpreter(peers_bench, tmp_path):
    python, reason = peers_bench.find_modelopt_python(str(tmp_path / "no-python"), None)
    assert python is None and "did not run" in reason and "--modelopt-python" in reason


def test_bench_vs_peers_modelopt_plan(peers_bench):
    body = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    choice = {body[0]: "nvfp4", body[1]: "fp8", "lm_head": "bf16"}
    assert peers_bench.modelopt_plan(choice, body) == {body[0]: "nvfp4", body[1]: "fp8"}
    assert peers_bench.modelopt_plan({**choice, body[1]: "bf16"}, body)[body[1]] == "bf16"
    with pytest.raises(ValueError, match="no format"):
        peers_bench.modelopt_plan({body[0]: "nvfp4"}, body)
    with pytest.raises(ValueError, match="outside"):
        peers_bench.modelopt_plan({**choice, body[0]: "int4"}, body)
    with pytest.raises(ValueError, match="outside the body"):
        peers_bench.modelopt_plan({**choice, "lm_head": "fp8"}, body)


def test_bench_vs_peers_modelopt_target_checks_both_metrics(peers_bench):
    Row = peers_bench.Row
    mo = Row(name="mo", tool="modelopt", bpp_body=5.997, eval={"kl_conf": 0.10, "kl_all": 0.020},
             detail={"recipe": "modelopt"})
    o6 = Row(name="o6", tool="pq-lightning", bpp_body=5.9999, eval={"kl_conf": 0.08, "kl_all": 0.017})
    c6 = peers_bench.target_checks([mo], {"6bpp": o6}, None)[2]
    assert c6["verdict"] == "PASS" and c6["peer"] == "mo"
    assert c6["ratios"] == pytest.approx({"kl_conf": 0.8, "kl_all": 0.85})
    assert c6["ratio"] == pytest.approx(0.8)
    o6.eval["kl_all"] = 0.0185  # 0.925x on kl_all: the kl_conf pass alone is not enough
    c6 = peers_bench.target_checks([mo], {"6bpp": o6}, None)[2]
    assert c6["verdict"] == "FAIL" and c6["ratios"]["kl_all"] == pytest.approx(0.925)
    line = peers_bench.check_lines([c6], {"target": "speed", "verdict": "NOT CHECKED", "reason": "r"})[0]
    assert "kl_all 0.925" in line and "kl_conf 0.800" in line and "FAIL" in line
    del o6.eval["kl_all"]
    assert peers_bench.target_checks([mo], {"6bpp": o6}, None)[2]["verdict"] == "NOT CHECKED"
    # a ModelOpt row at 4.5 bpp is not the llm-compressor peer of the 4.5 target
    mo45 = Row(name="mo45", tool="modelopt", bpp_body=4.5, eval={"kl_conf": 0.3}, detail={"recipe": "modelopt@4.5"})
    assert peers_bench.target_checks([mo45], {"4.5bpp": o6}, None)[0]["verdict"] == "NOT CHECKED"


def test_bench_vs_peers_times_the_default_configs_settings(peers_bench):
    import yaml

    from pq_lightning.pipeline import RefineConfig
    from pq_lightning.smooth import SmoothConfig

    got = peers_bench.default_config_settings()
    cfg = yaml.safe_load((REPO / "configs" / "smollm2-135m.yaml").read_text())
    assert got["formats"] == cfg["formats"] == ["nvfp4", "fp8"] and got["estimator"] == cfg["estimator"] == "output"
    assert got["refine"] == RefineConfig(**cfg["refine"]) == RefineConfig()  # the demo refines as the default does
    assert got["smooth"] == SmoothConfig(**cfg["smooth"]) and got["smooth"].enabled and got["smooth"].search
    assert got["probe"].output_error_tokens == cfg["probe"]["output_error_tokens"] == 0.25
    assert got["probe"].num_samples == 16  # the default: the demo's 16 windows are all probed


# ---- bench_scaling.py --------------------------------------------------------------------------


def test_bench_scaling_fits_and_runs_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    import yaml

    mod = _load("bench_scaling")
    a, b = mod.fit_line([4.0, 16.0, 32.0], [5.0 + 2 * 4, 5.0 + 2 * 16, 5.0 + 2 * 32])
    assert a == pytest.approx(5.0) and b == pytest.approx(2.0)
    assert mod.fit_line([8.0], [4.0]) == (0.0, 0.5)
    cfg = {"model": str(tiny_model_dir), "dtype": "float32", "formats": ["nvfp4", "fp8"], "estimator": "output",
           "calibration": {"source": str(tmp_path / "text.txt"), "batch_size": 2, "holdout_fraction": 0.25},
           "refine": {"dampening": [0.01]}, "trainer": {"accelerator": "cpu"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench"
    rc = mod.main(["--config", str(tmp_path / "cfg.yaml"), "--tokens", "128", "256", "--seqlen", "32",
                   "--threads", "1", "--output", str(out)])
    assert rc == 0
    res = json.loads((out / "bench_scaling.json").read_text())["smollm2-135m"]
    assert [r["windows"] for r in res["runs"]] == [4, 8]
    fits = res["fits"]
    assert {"load", "probe", "refine", "export"} <= set(fits)
    # counted work per calibration token: the probe is at least a forward and a backward pass
    assert fits["probe"]["fe_per_token"] >= 2.0 and fits["refine"]["fe_per_token"] > 1.0
    assert res["peak_ratio_last_over_first"] > 0
    assert "peak RSS 256 / 128 tokens" in capsys.readouterr().out


def test_candidate_regret_by_hand(tmp_path, capsys):
    """Wins and regrets of dropped candidates on three hand-made Linears, read back from a saved file."""
    from pq_lightning.refine import LinearDecision, RefineOutput

    mod = _load("candidate_regret")

    def dec(name, fmt, errs):
        errors = {k: {"fit": 0.0, "heldout": v} for k, v in errs.items()}
        return LinearDecision(name, fmt, "rtn", None, errors, errs.get("rtn"), min(errs.values(), default=None))

    decisions = {
        "a": dec("a", "nvfp4", {"rtn": 10.0, "sweep": 8.0, "gptq@0.03": 5.0, "refit": 1.0}),
        "b": dec("b", "nvfp4", {"rtn": 4.0, "sweep": 3.0, "gptq@0.03": 3.5}),
        "c": dec("c", "nvfp4", {"rtn": 2.0, "sweep": 2.0, "gptq@0.03": 2.5}),
        "d": dec("d", "fp8", {"rtn": 7.0}),  # another format: not read
        "e": LinearDecision("e", "nvfp4", "rtn", None, {}, None, None),  # packed by rule: not measured
    }
    rows = mod.heldout_rows(decisions)
    assert len(rows) == 3 and all("refit" not in r for r in rows)
    assert mod.wins(rows) == {"gptq@0.03": 1, "sweep": 1, "rtn": 1}  # c: rtn listed first wins the tie
    best = 5.0 + 3.0 + 2.0
    assert mod.regret(rows, ["gptq@0.03"]) == pytest.approx((8.0 + 3.0 + 2.0) / best - 1)
    assert mod.regret(rows, ["sweep"]) == pytest.approx((5.0 + 3.5 + 2.0) / best - 1)
    assert mod.regret(rows, ["sweep", "gptq@0.03"]) == pytest.approx((10.0 + 4.0 + 2.0) / best - 1)
    with pytest.raises(ValueError, match="leaves no candidate"):
        mod.regret(rows, ["rtn", "sweep", "gptq@0.03"])

    path = tmp_path / "work" / "refine-x.safetensors"
    path.parent.mkdir()
    # a tensor in the file: the lower-bound safetensors cannot read back a file without one
    RefineOutput(packed={"a": {"weight": torch.zeros(2)}}, input_amax={}, decisions=decisions, totals={}).save(path)
    assert mod.main([str(tmp_path), "--drop", "gptq@0.03"]) == 0
    out = capsys.readouterr().out
    assert "3 measured nvfp4 Linears" in out and f"{100 * (13 / best - 1):8.4f} %" in out
