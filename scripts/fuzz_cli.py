"""Fuzz ``pq-lightning quantize`` as a careful user would: bad input, foreign files, busy folders, and
SIGKILL / SIGINT in every stage, on tiny models (the builders of ``tests/conftest.py``).

    .venv/bin/python scripts/fuzz_cli.py [--quick] [--exec] [--only NAME] [--keep DIR] [--timeout 240]

Each case runs the command in its own process (forked from this one after the imports, or a fresh
interpreter with ``--exec``), bounded in time, in its own folder. An interruption is sent when the
run's stage trace (``PQ_LIGHTNING_STAGE_TRACE``) shows it entered the stage, then the same command
runs again. The table has one row per case: exit code, the one-line message, and a verdict computed
from what is on disk:

* no silent wrong result: a run that exits 0 built checkpoints byte-identical to a fresh build of
  the same inputs, and no folder looks like a checkpoint without being the one its manifest lists;
* no user file lost: every file the case put in the folder is there, unchanged;
* no traceback for an expected failure: a refusal exits 2 with one line ``pq-lightning: error: ...``
  (an interrupted run says so in one line too); a rerun after an interruption leaves no leftovers.

Exit status 0 when every row passes. ``--quick``: a handful of cases (the test suite runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked children must not inherit a thread pool
os.environ.setdefault("PYTHONWARNINGS", "ignore")

REPO = Path(__file__).resolve().parents[1]
TRACE = "PQ_LIGHTNING_STAGE_TRACE"
BASE = ["--model", "{tiny}", "--dtype", "float32", "--estimator", "trace", "--target_bits", "6.0",
        "--calibration.source", "{text}", "--calibration.seqlen", "32", "--calibration.num_samples", "4",
        "--evaluation.enabled", "false", "--smooth.enabled", "false", "--refine.gptq", "false",
        "--pareto_bits", "[6.0]", "--trainer.accelerator", "cpu", "--output_dir", "out"]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ---- fixtures -------------------------------------------------------------------------------------
def _conftest():
    spec = importlib.util.spec_from_file_location("_pq_conftest", REPO / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


OTHER_TEXT = ("Return the lazy dog to the sequence of items, or raise the number when the fox is empty. "
              "Jumps over the quick brown error. ") * 60


def build_fixtures(root: Path) -> None:
    """Tiny models and texts under ``root`` (run in a child: the parent keeps torch idle for forking)."""
    import torch
    from safetensors.torch import load_file, save_file

    c = _conftest()
    tok = c.build_tiny_tokenizer()

    def llama(name: str, **over) -> Path:
        c.build_tiny_llama(**{"hidden_size": 64, "intermediate_size": 128, "initializer_range": 0.2, **over}
                           ).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        return root / name

    llama("tiny")
    (root / "text.txt").write_text(c.TINY_TEXT)
    (root / "other.txt").write_text(OTHER_TEXT)
    (root / "short.txt").write_text("The quick brown fox.")
    (root / "empty.txt").write_text("")
    (root / "cal.csv").write_text("a,b\n")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    for name, edit in (("nan", lambda t: t.__setitem__((0, 0), float("nan"))),
                       ("edited", lambda t: t.__setitem__(5, 0.0))):
        folder = llama(name)
        state = load_file(folder / "model.safetensors")
        edit(state["model.layers.0.mlp.down_proj.weight"])
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    llama("h40", hidden_size=40, intermediate_size=64, head_dim=10)
    shard = llama("trunc") / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    (root / "noconfig").mkdir()
    shutil.copy(root / "tiny" / "model.safetensors", root / "noconfig")
    from transformers import BertConfig, BertForMaskedLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(root / "bert")
    OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                             max_position_embeddings=64, word_embed_proj_dim=32)).save_pretrained(root / "opt")
    tok.save_pretrained(root / "opt")


# ---- running one command ----------------------------------------------------------------------------
@dataclass
class Outcome:
    rc: int
    stderr: str
    wall_s: float
    signalled: bool = False
    note: str = ""  # said instead of the last stderr line (an interrupted run: what the rerun did)

    @property
    def message(self) -> str:
        if self.note:
            return self.note
        lines = [ANSI.sub("", line).strip() for line in self.stderr.splitlines()]
        errors = [line for line in lines if line.startswith(("pq-lightning:", "error:"))]
        rest = [line for line in lines if line and not line.startswith(("│", "┃", "┏", "┡", "└", "━", "─"))]
        return (errors or rest or [""])[-1]


def run_command(argv: list[str], cwd: Path, *, env: dict[str, str], use_exec: bool, timeout: float,
                interrupt: tuple[str, int, float] | None = None, wait_for: str | None = None) -> Outcome:
    """Run ``pq-lightning <argv>`` in ``cwd``; ``interrupt = (stage, signal, delay)`` signals it in that stage,
    once a path matching the glob ``wait_for`` (e.g. the export's temporary folder) exists."""
    trace = cwd / f".trace-{time.monotonic_ns()}"
    env = {**env, TRACE: str(trace)}
    err_path = cwd / f".stderr-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    pid = _spawn(argv, cwd, env, err_path, use_exec)
    signalled = False
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
            break
        if time.perf_counter() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
        if interrupt and not signalled and _entered(trace, interrupt[0]) and (
                wait_for is None or any(cwd.glob(wait_for))):
            time.sleep(interrupt[2])
            os.kill(pid, interrupt[1])
            signalled = True
        time.sleep(0.005)
    rc = os.waitstatus_to_exitcode(status)
    stderr = err_path.read_text(errors="replace")
    for p in (trace, err_path):
        p.unlink(missing_ok=True)
    return Outcome(rc, stderr, time.perf_counter() - t0, signalled)


def _entered(trace: Path, stage: str) -> bool:
    try:
        return any(line.split()[0] == stage for line in trace.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return False


def _spawn(argv: list[str], cwd: Path, env: dict[str, str], err_path: Path, use_exec: bool) -> int:
    if use_exec:
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "pq_lightning.cli", *argv], cwd=cwd, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)
        return proc.pid
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: the command as the console script runs it, output to files
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from pq_lightning.cli import main

        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ---- what is on disk ---------------------------------------------------------------------------------
def build_digest(out: Path) -> dict[str, str]:
    """sha256 of every checkpoint shard and the formats of every plan: what must equal a fresh build."""
    digest = {}
    for p in sorted(out.glob("checkpoint-*/*.safetensors")):
        digest[p.relative_to(out).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(out.glob("plan-*.json")):
        linears = json.loads(p.read_text())["linears"]
        digest[p.name] = hashlib.sha256(json.dumps({n: v["format"] for n, v in linears.items()}).encode()).hexdigest()
    return digest


def leftovers(out: Path, keep: tuple[Path, ...] = ()) -> list[str]:
    """Temporary files and staged checkpoints a finished run should not leave (``keep``: the user's)."""
    found = [p for d in (out, out / "work") if d.is_dir() for p in d.iterdir()
             if re.search(r"\.(tmp-[0-9a-f]{8}|old-[0-9a-f]{8})$|\.tmp$", p.name) and p not in keep]
    found += [p for p in (out / "work").glob("checkpoint-*")] if (out / "pq_outputs.json").exists() else []
    return [p.name for p in found]


def unsound_checkpoints(out: Path) -> list[str]:
    """Checkpoint folders that look finished but are not what their manifest lists."""
    from pq_lightning.export import checkpoint_problems

    return [f"{p.name}: {checkpoint_problems(p)[0]}" for p in sorted(out.glob("checkpoint-*"))
            if p.is_dir() and checkpoint_problems(p)]


def mixed_outputs(out: Path) -> list[str]:
    """Published outputs that do not all come from the last run (``pq_outputs.json``)."""
    path = out / "pq_outputs.json"
    if not path.is_file():
        return ["no pq_outputs.json"]
    record = json.loads(path.read_text())
    runs = {e["run"] for e in record["entries"].values()}
    problems = ["still marked publishing"] if record.get("publishing") else []
    problems += [f"outputs of {len(runs)} runs"] if len(runs) > 1 else []
    return problems + [f"mixed: {n}" for n in record.get("mixed", [])]


def files_of(folder: Path, names) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names}


# ---- cases -----------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    args: list[str]  # after "quantize" ("{tiny}"-style placeholders are filled in); a full argv with cmd=""
    expect: str  # "refuse" | "ok" | "interrupt" | "concurrent"
    match: str = ""  # in the one-line message of a refusal
    setup: Callable[[Path, Path], None] | None = None  # (case folder, fixtures)
    interrupt: tuple[str, int, float] | None = None
    reference: str | None = "base"  # the fresh build an exit-0 run must equal
    env: dict[str, str] = field(default_factory=dict)
    cmd: str = "quantize"
    check: Callable[[Path], list[str]] | None = None  # extra problems, after the (last) run
    after_first: Callable[[Path, Path], list[str]] | None = None  # problems right after an interrupted run
    wait_for: str | None = None  # interrupt only once this glob (relative to the case folder) matches
    user_files: tuple[str, ...] = ()  # files the setup left that must survive unchanged


def base(**replace: str) -> list[str]:
    """The base arguments with some options replaced (``None`` drops one) or added."""
    args, out, i = list(BASE), [], 0
    while i < len(args):
        opt, val = args[i], args[i + 1]
        key = opt[2:]
        if key in replace:
            if replace[key] is not None:
                out += [opt, replace.pop(key)]
            else:
                replace.pop(key)
        else:
            out += [opt, val]
        i += 2
    for key, val in replace.items():
        out += [f"--{key}", val]
    return out


def validate(candidate: str) -> list[str]:
    """``pq-lightning validate`` of ``candidate`` against the tiny reference, its tokenizer unnamed (null)."""
    return ["validate", "--model", "pq_lightning.evaluate.QuantEvaluator", "--model.init_args.reference", "{tiny}",
            "--model.init_args.candidate", candidate, "--model.init_args.output_dir", "eval",
            "--data", "pq_lightning.data.EvalData", "--data.init_args.path", "{text}", "--data.init_args.window", "31",
            "--data.init_args.max_windows", "2", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "."]


def _finished(ref: str = "base"):
    """Setup: a finished run in ``out`` (a copy of the reference build ``ref``)."""
    def setup(case_dir: Path, fx: Path) -> None:
        shutil.copytree(fx / "refs" / ref, case_dir / "out")
    setup.needs = (ref,)
    return setup


def _write(name: str, text: str):
    def setup(case_dir: Path, fx: Path) -> None:
        (case_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (case_dir / name).write_text(text)
    return setup


def _chain(*setups):
    def setup(case_dir: Path, fx: Path) -> None:
        for s in setups:
            s(case_dir, fx)
    setup.needs = tuple(n for s in setups for n in getattr(s, "needs", ()))
    return setup


def _copy_text(src: str = "text.txt"):
    return lambda case_dir, fx: shutil.copy(fx / src, case_dir / "cal.txt")


def refusal_cases() -> list[Case]:
    R = "refuse"
    return [
        Case("target_bits zero", base(target_bits="0"), R, "--target_bits must be a positive number"),
        Case("target_bits negative", base(target_bits="-4.5"), R, "--target_bits must be a positive number"),
        Case("target_bits nan", base(target_bits="nan"), R, 'Parser key "target_bits"'),
        Case("target_size_gb zero", base(target_bits=None, target_size_gb="0"), R, "--target_size_gb must be"),
        Case("budget given twice", base(target_bits="[6.0,6.0]"), R, "a budget is given twice"),
        Case("unknown estimator", base(estimator="fisher"), R, "--estimator 'fisher' is unknown"),
        Case("unknown format", base(formats="[nvfp5]"), R, "unknown format 'nvfp5'"),
        Case("ban in wrong case", base(bans='{"q_proj": ["NVFP4"]}'), R, "unknown format 'NVFP4'"),
        Case("pin unknown format", base(pins='{"down_proj": "FP8"}'), R, "unknown format 'FP8'"),
        Case("pin off the menu", base(pins='{"down_proj": "nvfp4a16"}'), R, "is not in the format menu"),
        Case("pin bad regex", base(pins='{"(": "fp8"}'), R, "not a valid regular expression"),
        Case("evaluation path missing", base(**{"evaluation.enabled": "true", "evaluation.path": "missing.txt"}), R,
             "--evaluation.path missing.txt is not a file"),
        Case("calibration missing", base(**{"calibration.source": "nope.txt"}), R, "is not a file"),
        Case("calibration .csv", base(**{"calibration.source": "{fx}/cal.csv"}), R, "unsupported file type '.csv'"),
        Case("model path missing", base(model="./nope"), R, "--model ./nope does not exist"),
        Case("model folder without config", base(model="{fx}/noconfig"), R, "neither a Hugging Face model folder"),
        Case("masked LM (BERT)", base(model="{fx}/bert"), R, "BertForMaskedLM is not a causal LM"),
        Case("OPT seqlen 128 > 64 positions", base(model="{fx}/opt", **{"calibration.seqlen": "128"}), R,
             "the model takes at most 64 positions"),
        Case("Llama seqlen 300 > 256 positions", base(**{"calibration.seqlen": "300"}), R, "at most 256 positions"),
        Case("eval window > positions", base(**{"evaluation.enabled": "true", "evaluation.window": "511"}), R,
             "--evaluation.window needs windows of 512 tokens"),
        Case("truncated safetensors", base(model="{fx}/trunc"), R, "model.safetensors is truncated"),
        Case("memory cap zero", base(memory_cap_gb="0"), R, "--memory_cap_gb must be a positive number"),
        Case("offload unknown", base(offload="cloud"), R, "--offload must be 'disk' or 'host'"),
        Case("memory cap on a GGUF", base(model="m.gguf", memory_cap_gb="1"), R, "not a GGUF"),
        Case("output_dir is a file", base(), R, "exists and is not a folder", setup=_write("out", "x\n"),
             user_files=("out",)),
        Case("user's report.md in the folder", base(), R, "report.md exists and pq-lightning did not write it",
             setup=_write("out/report.md", "my notes\n"), user_files=("out/report.md",)),
        Case("user's checkpoint folder", base(), R, "is not a checkpoint pq-lightning wrote",
             setup=_write("out/checkpoint-6bpp/weights.bin", "mine\n"), user_files=("out/checkpoint-6bpp/weights.bin",)),
        Case("edited report of an earlier run", base(), R, "report.md was changed after pq-lightning wrote it",
             setup=_chain(_finished(), _write("out/report.md", "edited\n")), user_files=("out/report.md",)),
        Case("unknown subcommand", ["quantise"], R, "unknown subcommand 'quantise'", cmd=""),
        Case("misspelt option", base(target_bitz="6"), R, "unrecognized arguments"),
        Case("missing config file", ["--config", "nope.yaml", *base()], R, "nope.yaml"),
        Case("invalid YAML config", ["--config", "c.yaml", *base()], R, "Problems parsing config",
             setup=_write("c.yaml", "a: [\n")),
        Case("seqlen 1", base(**{"calibration.seqlen": "1"}), R, "calibration.seqlen must be >= 2"),
        Case("validate: missing candidate", validate("out/checkpoint-6bpp"), R, "does not exist", cmd=""),
        Case("validate: half-written export", validate("out/.checkpoint-6bpp.tmp-0123abcd"), R,
             "is a half-written export", cmd="",
             setup=_write("out/.checkpoint-6bpp.tmp-0123abcd/.shard-00001.safetensors", "x" * 64)),
        Case("validate: unquantized HF folder", validate("{tiny}"), R, "is an unquantized Hugging Face model",
             cmd=""),
        # failures found only once the model or the data is read: still one line
        Case("NaN weight", base(model="{fx}/nan"), R, "model.layers.0.mlp.down_proj.weight (1 NaN, 0 Inf)"),
        Case("hidden 40, all-NVFP4 budget", base(model="{fx}/h40", target_bits="4.5"), R,
             "nvfp4 cannot take 12 of 14 body Linears"),
        Case("infeasible budget", base(target_bits="3.0"), R, "smallest feasible budget"),
        Case("too little calibration text", base(**{"calibration.source": "{fx}/short.txt"}), R, "Too little text"),
        Case("empty calibration text", base(**{"calibration.source": "{fx}/empty.txt"}), R, "Too little text"),
        Case("bad JSONL row", base(**{"calibration.source": "{fx}/bad.jsonl"}), R, "bad.jsonl:2"),
        Case("pin regex matches nothing", base(pins='{"nothing_here": "fp8"}'), R, "matches no body Linear"),
        Case("pin and ban on one Linear", base(pins='{"down_proj": "fp8"}', bans='{"layers.0.mlp": ["fp8"]}'), R,
             "model.layers.0.mlp.down_proj is pinned to 'fp8'"),
        Case("include matches nothing", base(include='["nothing_here"]'), R, "nothing_here"),
        Case("changed calibration, no --overwrite", base(**{"calibration.source": "cal.txt"}), R,
             "built from other inputs", setup=_chain(_finished(), _copy_text("other.txt"))),
        Case("edited model, no --overwrite", base(model="{fx}/edited"), R, "built from other inputs",
             setup=_finished()),
    ]


def ok_cases() -> list[Case]:
    K = "ok"
    return [
        Case("rerun into a finished folder", base(), K, setup=_finished(),
             check=lambda d: [] if "export: up to date" in (d / ".last_stderr").read_text() else ["export redone"]),
        Case("changed calibration with --overwrite", [*base(**{"calibration.source": "cal.txt"}), "--overwrite"], K,
             setup=_chain(_finished(), _copy_text("other.txt")), reference="other"),
        Case("edited model with --overwrite", [*base(model="{fx}/edited"), "--overwrite"], K,
             setup=_finished(), reference="edited"),
        Case("truncated checkpoint shard is rebuilt", base(), K,
             setup=_chain(_finished(), lambda d, fx: _truncate(d / "out" / "checkpoint-6bpp"))),
        Case("leftovers removed, user files kept", base(), K,
             setup=_chain(_finished(), _write("out/notes.txt", "keep\n"), _write("out/.notes.tmp-12345678", "keep\n"),
                          _write("out/.checkpoint-6bpp.tmp-0123abcd/model-00001-of-00001.safetensors", "x" * 999),
                          _write("out/work/sensitivity-00.safetensors.a1b2c3d4.tmp", "partial")),
             user_files=("out/notes.txt", "out/.notes.tmp-12345678")),
        Case("~ and $VAR in output_dir", base(output_dir="~/runs/$PQ_RUN"), K, env={"HOME": "{case}/home",
             "PQ_RUN": "r1"}, setup=_write("home/.keep", ""),
             check=lambda d: [] if (d / "home/runs/r1/checkpoint-6bpp").is_dir() and not (d / "~").exists()
             else ["output_dir not expanded"]),
        Case("two runs into one folder at once", base(), "concurrent"),
        Case("validate with the reference's tokenizer", validate("out/checkpoint-6bpp"), K, cmd="", setup=_finished(),
             reference=None, check=lambda d: [] if json.loads((d / "eval" / "eval.json").read_text())["n_positions"]
             == 62 else ["eval.json is not of 2 windows x 31 positions"]),
        Case("--target_size_gb replaces the config's bits", ["--config", "c.yaml", *base(target_bits=None),
                                                            "--target_size_gb", "0.0001"], K,
             setup=_write("c.yaml", "target_bits: 6.0\n"), reference=None,
             check=lambda d: [] if [p.name for p in (d / "out").glob("checkpoint-*")] == ["checkpoint-0.0001GB"]
             else ["a 6bpp build was added"]),
    ]


def _said(text: str):
    """Check: the last run said ``text`` (e.g. that it removed the killed run's temporary folder)."""
    return lambda case_dir: [] if text in (case_dir / ".last_stderr").read_text() else [f"never said {text!r}"]


def _still(ref: str):
    """After an interrupted rerun: the folder still shows the earlier run ``ref``, whole (plans and checkpoints)."""
    def check(case_dir: Path, fx: Path) -> list[str]:
        same = build_digest(case_dir / "out") == build_digest(fx / "refs" / ref)
        return ([] if same else ["the interrupted run changed the published outputs"]) + mixed_outputs(case_dir / "out")
    return check


def _truncate(ckpt: Path) -> None:
    shard = ckpt / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def interruption_cases() -> list[Case]:
    cases = []
    kill, intr = signal.SIGKILL, signal.SIGINT
    writing = "out/work/.checkpoint-*.tmp-*"  # the export's temporary folder: the kill lands mid-write
    for stage, sig, delay in (("load", kill, 0.0), ("calibration", kill, 0.0), ("probe", kill, 0.05),
                              ("plan", kill, 0.0), ("refine", kill, 0.05), ("export", kill, 0.0),
                              ("report", kill, 0.02), ("probe", intr, 0.05), ("refine", intr, 0.05),
                              ("export", intr, 0.0), ("report", intr, 0.02)):
        name = f"{signal.Signals(sig).name} in {stage}"
        cases.append(Case(name, base(), "interrupt", interrupt=(stage, sig, delay),
                          wait_for=writing if stage == "export" else None,
                          check=_said("removed 1 leftover") if (stage, sig) == ("export", kill) else None))
    cases.append(Case("SIGKILL exporting an --overwrite rerun", [*base(**{"calibration.source": "cal.txt"}),
                                                                "--overwrite"], "interrupt",
                      interrupt=("export", kill, 0.0), wait_for=writing,
                      setup=_chain(_finished(), _copy_text("other.txt")), reference="other",
                      after_first=_still("base")))
    return cases


# ---- verdicts --------------------------------------------------------------------------------------
@dataclass
class Fuzzer:
    fx: Path
    root: Path
    use_exec: bool
    timeout: float

    def fill(self, text: str, case_dir: Path) -> str:
        for key, value in (("{tiny}", self.fx / "tiny"), ("{text}", self.fx / "text.txt"), ("{fx}", self.fx),
                           ("{case}", case_dir)):
            text = text.replace(key, str(value))
        return text

    def env(self, case: Case, case_dir: Path) -> dict[str, str]:
        extra = {k: self.fill(v, case_dir) for k, v in case.env.items()}
        return {**os.environ, "PYTHONPATH": str(REPO), **extra}

    def run(self, case: Case, case_dir: Path, *, interrupt=None) -> Outcome:
        argv = ([case.cmd] if case.cmd else []) + [self.fill(a, case_dir) for a in case.args]
        outcome = run_command(argv, case_dir, env=self.env(case, case_dir), use_exec=self.use_exec,
                              timeout=self.timeout, interrupt=interrupt, wait_for=case.wait_for if interrupt else None)
        (case_dir / ".last_stderr").write_text(outcome.stderr)
        runs = len(list(case_dir.glob(".stderr-*")))
        (case_dir / f".stderr-{runs + 1}").write_text(outcome.stderr)  # kept for a look at a failed row
        return outcome

    def reference(self, name: str, args: list[str]) -> None:
        """A fresh build of ``args`` in ``refs/<name>``: what a run of the same inputs must equal."""
        d = self.fx / "refs" / f"{name}-run"
        d.mkdir(parents=True)
        o = run_command(["quantize", *[self.fill(a, d) for a in args]], d, env={**os.environ, "PYTHONPATH": str(REPO)},
                        use_exec=self.use_exec, timeout=self.timeout)
        if o.rc != 0:
            raise RuntimeError(f"reference build {name} failed ({o.rc}): {o.message}\n{o.stderr[-3000:]}")
        shutil.copytree(d / "out", self.fx / "refs" / name)

    def concurrent(self, case: Case, d: Path) -> tuple[Outcome, list[str]]:
        """Run A; once it is probing, run B into the same folder: B refuses naming A, A finishes sound."""
        argv = ["quantize", *[self.fill(a, d) for a in case.args]]
        trace, err = d / ".trace-a", d / ".stderr-a"
        pid = _spawn(argv, d, {**self.env(case, d), TRACE: str(trace)}, err, self.use_exec)
        t0 = time.perf_counter()
        while not _entered(trace, "probe") and time.perf_counter() - t0 < self.timeout:
            time.sleep(0.005)
        second = self.run(case, d)
        first = Outcome(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err.read_text(), time.perf_counter() - t0)
        problems = [] if f"(pid {pid}," in second.message else [f"second run said {second.message!r}"]
        problems += [] if second.rc == 2 else [f"second run exit {second.rc}"]
        second.note = f"second run: {second.message.removeprefix('pq-lightning: error: ')}"
        return second, problems + [f"first run: {p}" for p in self._sound_success(case, d, first)]

    def verdict(self, case: Case, case_dir: Path) -> tuple[Outcome, list[str]]:
        if case.expect == "concurrent":
            return self.concurrent(case, case_dir)
        if case.setup:
            case.setup(case_dir, self.fx)
        kept = files_of(case_dir, case.user_files)
        first = self.run(case, case_dir, interrupt=case.interrupt)
        problems = self._judge(case, case_dir, first)
        if case.expect == "interrupt":
            problems += self._after_interrupt(case, case_dir, first)
        problems += [f"user file {n} lost or changed" for n, b in kept.items()
                     if not (case_dir / n).is_file() or (case_dir / n).read_bytes() != b]
        if case.check and not problems:
            problems += case.check(case_dir)
        return first, problems

    def _judge(self, case: Case, d: Path, o: Outcome) -> list[str]:
        problems = []
        traceback_ = "Traceback (most recent call last)" in o.stderr
        if case.expect == "refuse":
            if o.rc != 2:
                problems.append(f"exit {o.rc}, expected 2")
            if traceback_:
                problems.append("traceback for an expected failure")
            if case.match and case.match not in o.message:
                problems.append(f"message lacks {case.match!r}")
        elif case.expect == "ok":
            problems += self._sound_success(case, d, o)
        else:
            if not o.signalled:
                problems.append(f"never reached {case.interrupt[0]}")
            if case.interrupt[1] == signal.SIGINT and (traceback_ or o.rc != 130):
                problems.append(f"Ctrl-C ended in exit {o.rc}" + (" with a traceback" if traceback_ else ""))
            out = d / "out"
            problems += [f"unsound {u}" for u in unsound_checkpoints(out)] if out.is_dir() else []
        return problems

    def _sound_success(self, case: Case, d: Path, o: Outcome) -> list[str]:
        if o.rc != 0:
            return [f"exit {o.rc}: {o.message}"]
        out = self._out(d)
        mine = tuple(d / n for n in case.user_files)
        problems = [f"leftover {x}" for x in leftovers(out, mine)] + [f"unsound {u}" for u in unsound_checkpoints(out)]
        problems += mixed_outputs(out)
        if case.reference and build_digest(out) != build_digest(self.fx / "refs" / case.reference):
            problems.append(f"result differs from a fresh build ({case.reference})")
        return problems

    def _out(self, d: Path) -> Path:
        expanded = d / "home" / "runs" / "r1"
        return expanded if expanded.is_dir() else d / "out"

    def _after_interrupt(self, case: Case, d: Path, first: Outcome) -> list[str]:
        if first.rc == 0:
            return ["finished before the signal took effect"]
        early = case.after_first(d, self.fx) if case.after_first else []
        said = "" if first.rc < 0 else f"said {first.message!r}; "
        again = self.run(case, d)
        first.note = f"stopped in {case.interrupt[0]}; {said}rerun exit {again.rc}"
        return early + [f"rerun: {p}" for p in self._sound_success(case, d, again)]


def run_cases(fuzzer: Fuzzer, cases: list[Case]) -> list[tuple[Case, Outcome, list[str]]]:
    rows = []
    for i, case in enumerate(cases):
        case_dir = fuzzer.root / f"{i:02d}"
        case_dir.mkdir()
        try:
            outcome, problems = fuzzer.verdict(case, case_dir)
        except Exception as e:  # noqa: BLE001 - a broken case is a failed row, not a crashed table
            outcome, problems = Outcome(-1, "", 0.0), [f"fuzzer: {type(e).__name__}: {e}"]
        rows.append((case, outcome, problems))
        print(f"  {'PASS' if not problems else 'FAIL'} {case.name} ({outcome.wall_s:.1f} s)", file=sys.stderr,
              flush=True)
    return rows


def print_table(rows, wall: float) -> None:
    w = max(len(c.name) for c, _, _ in rows)
    print(f"{'case':<{w}}  {'rc':>4}  {'message':<72}  verdict")
    for case, o, problems in rows:
        msg = o.message if len(o.message) <= 72 else o.message[:69] + "..."
        print(f"{case.name:<{w}}  {o.rc:>4}  {msg:<72}  {'pass' if not problems else 'FAIL: ' + '; '.join(problems)}")
    passed = sum(not p for _, _, p in rows)
    print(f"\n{len(rows)} cases, {passed} pass, {len(rows) - passed} fail, {wall:.0f} s")


QUICK = ("target_bits zero", "ban in wrong case", "user's report.md in the folder", "SIGKILL in export",
         "SIGINT in refine")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--exec", dest="use_exec", action="store_true", help="a fresh interpreter per run (slower)")
    p.add_argument("--only", action="append", default=[], help="run the cases whose name contains this")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder, removed)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per run before it is killed")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cases = refusal_cases() + ok_cases() + interruption_cases()
    if args.quick:
        cases = [c for c in cases if c.name in QUICK]
    if args.only:
        cases = [c for c in cases if any(o in c.name for o in args.only)]
    root = Path(args.keep or tempfile.mkdtemp(prefix="pq-fuzz-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        fuzzer = prepare(root, args, cases)
        rows = run_cases(fuzzer, cases)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_table(rows, time.perf_counter() - t0)
    return 0 if all(not p for _, _, p in rows) else 1


#: What a run imports, loaded once in this process so that every forked run starts warm.
PRELOAD = ("lightning", "matplotlib.pyplot", "transformers.models.llama.modeling_llama", "pq_lightning.callbacks",
           "pq_lightning.cli", "pq_lightning.evaluate", "pq_lightning.pipeline", "pq_lightning.refiner_module",
           "pq_lightning.report", "pq_lightning.served")


def preload() -> None:
    """Import :data:`PRELOAD` (no torch op runs here: forked children must not inherit a thread pool)."""
    import matplotlib

    matplotlib.use("Agg")
    for name in PRELOAD:
        importlib.import_module(name)


def prepare(root: Path, args, cases: list[Case]) -> Fuzzer:
    """Fixtures (in a child process) and the reference builds the cases compare with."""
    if not args.use_exec:
        preload()

    fx = root / "fixtures"
    fx.mkdir(exist_ok=True)
    pid = os.fork()
    if pid == 0:
        try:
            build_fixtures(fx)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        raise RuntimeError("building the tiny fixtures failed")
    fuzzer = Fuzzer(fx, root / "cases", args.use_exec, args.timeout)
    fuzzer.root.mkdir(exist_ok=True)
    builds = {"base": base(), "other": base(**{"calibration.source": "{fx}/other.txt"}),
              "edited": base(model="{fx}/edited")}
    wanted = {c.reference for c in cases if c.expect != "refuse" and c.reference}
    wanted |= {n for c in cases for n in getattr(c.setup, "needs", ())}
    for name in sorted(wanted):
        fuzzer.reference(name, builds[name])
    return fuzzer


if __name__ == "__main__":
    sys.exit(main())
