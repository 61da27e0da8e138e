"""benchmarks/gpu_bench.py: the pure-Python helpers of benchmarks/gpu.sh (no GPU, no torch)."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gb():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_bench", None)


def test_importing_it_needs_no_heavy_package(gb):
    # `gpu` and `requirements` run on a bare interpreter before anything is installed
    source = (ROOT / "benchmarks" / "gpu_bench.py").read_text(encoding="utf-8")
    top = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top if any(h in line for h in ("torch", "transformers", "pandas", "packaging"))]


# --- training figures ----------------------------------------------------------------------

LOG = """\
2026-12-07 00:40:01,000 INFO [rank 0] pipelines.training.loop: train: 64 train / 8 validation examples
2026-12-07 00:40:02,000 INFO [rank 0] pipelines.training.loop: step 1/6 loss=10.8000 lr=0.0002
2026-12-07 00:40:02,500 INFO [rank 0] pipelines.training.loop: step 2/6 loss=10.7000 lr=0.00019
2026-12-07 00:40:03,000 INFO [rank 0] pipelines.training.loop: step 3/6 loss=10.6000 lr=0.00018
2026-12-07 00:40:03,000 INFO [rank 0] pipelines.training.loop: step 3/6 eval_loss=10.6500
2026-12-07 00:40:03,250 INFO [rank 0] some.other.logger: step 9/6 loss=1.0
2026-12-07 00:40:03,500 INFO [rank 0] pipelines.training.loop: step 4/6 loss=10.5000 lr=0.00017
2026-12-07 00:40:04,000 INFO [rank 0] pipelines.training.loop: step 5/6 loss=10.4000 lr=0.00016
2026-12-07 00:40:04,500 INFO [rank 0] pipelines.training.loop: step 6/6 loss=10.3000 lr=0.00015
"""


def test_step_times_reads_only_the_stages_train_step_lines(gb, tmp_path):
    log = tmp_path / "train.log"
    log.write_text(LOG, encoding="utf-8")
    times = gb.step_times(log)
    assert sorted(times) == [1, 2, 3, 4, 5, 6]  # the other logger's "step 9" is not the stage's
    assert times[6] - times[1] == pytest.approx(2.5)
    assert times[4] - times[3] == pytest.approx(0.5)  # step 3's loss line, not its eval line


def test_train_figures_from_a_log_and_metrics(gb, tmp_path, monkeypatch, capsys):
    log = tmp_path / "train.log"
    log.write_text(LOG, encoding="utf-8")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"steps": 6, "train_loss": 10.3, "eval_loss": 10.35, "gate_reference_loss": 10.0,
                                   "gate_reloaded_loss": 10.05, "runtime_seconds": 30.0, "mlflow_run_id": None}))
    memory = tmp_path / "gpu-memory.txt"
    memory.write_text("1200\n3400\nnot a number\n2100\n", encoding="utf-8")
    calls = []

    def fake_tokens(prepared, tokenizer, max_length, max_samples=None, seed=42):
        calls.append((max_length, max_samples, seed))
        return 50.0, 64

    monkeypatch.setattr(gb, "mean_real_tokens", fake_tokens)
    record = tmp_path / "record.jsonl"
    rc = gb.main(["train-figures", "--log", str(log), "--metrics", str(metrics), "--prepared", str(tmp_path),
                  "--tokenizer", str(tmp_path), "--mlruns", str(tmp_path / "mlruns"), "--label", "zero2",
                  "--config", "zero2", "--record", str(record), "--batch", "4", "--max-length", "128",
                  "--warmup", "2", "--max-train-samples", "24", "--gpu-memory-log", str(memory), "--wall", "40"])
    assert rc == 0
    entry = json.loads(record.read_text().splitlines()[0])
    # steps 2 -> 6: 4 steps of 4 examples in 2.0 s
    assert entry["timed_steps"] == 4
    assert entry["examples_per_s"] == pytest.approx(8.0)
    assert entry["tokens_per_s"] == pytest.approx(400.0)
    assert entry["s_per_step"] == pytest.approx(0.5)
    assert entry["gate_relative_difference"] == pytest.approx(0.005)
    assert entry["gpu_memory_mib"] == 3400.0
    assert calls == [(128, 24, 42)]
    assert "error" not in entry
    assert "train zero2: ~400 tokens/s" in capsys.readouterr().out


def test_train_figures_fail_on_a_failed_run_with_its_error_line(gb, tmp_path, monkeypatch, capsys):
    log = tmp_path / "train.log"
    log.write_text(LOG.splitlines()[1] + "\nllmops train: error: train.deepspeed.config: DeepSpeed rejects x\n")
    monkeypatch.setattr(gb, "mean_real_tokens", lambda *a, **k: pytest.fail("no timing without steps"))
    record = tmp_path / "record.jsonl"
    rc = gb.main(["train-figures", "--log", str(log), "--metrics", str(tmp_path / "none.json"), "--prepared", ".",
                  "--tokenizer", ".", "--mlruns", ".", "--label", "zero3", "--config", "zero3", "--record",
                  str(record), "--batch", "4", "--max-length", "128", "--warmup", "1", "--rc", "2"])
    assert rc == 1
    entry = json.loads(record.read_text())
    assert entry["error"] == "llmops train: error: train.deepspeed.config: DeepSpeed rejects x"
    assert "FAILED: llmops train: error" in capsys.readouterr().out


# --- requirements: which carried wheels to install -------------------------------------------

def make_wheel(folder: Path, name: str, version: str, requires: list[str] = (), tag: str = "py3-none-any") -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {line}\n" for line in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def installed(gb, **packages):
    return {gb.norm(name): gb.Dist(gb.norm(name), version, list(requires), "/image/site-packages")
            for name, (version, requires) in packages.items()}


@pytest.fixture
def fake_machine(gb, tmp_path, monkeypatch):
    """An image with torch, an old transformers and no trl; wheels for what the stage needs."""
    from packaging.specifiers import SpecifierSet

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "transformers", "5.25.0", ["huggingface-hub>=2.4", "tokenizers>=0.23"])
    make_wheel(wheels, "huggingface-hub", "2.4.0")
    make_wheel(wheels, "trl", "1.16.0", ["transformers>=4.56", "accelerate>=1.10"])
    make_wheel(wheels, "accelerate", "1.16.0")  # the image's fits: not installed
    make_wheel(wheels, "pydantic", "2.14.4", ['tomli>=1; python_version < "3.0"'])
    make_wheel(wheels, "numpy", "2.4.6", tag="cp27-cp27m-win32")  # fits no machine here: ignored
    image = installed(gb, torch=("2.9.0", ["nvidia-cudnn-cu12==9.1"]), transformers=("5.17.0", ["tokenizers>=0.22"]),
                      tokenizers=("0.23.1", []), accelerate=("1.12.0", []), numpy=("1.26.0", []))
    monkeypatch.setattr(gb, "ROOTS", ["torch", "transformers", "trl", "pydantic", "accelerate", "numpy"])
    monkeypatch.setattr(gb, "installed_distributions", lambda: image)
    monkeypatch.setattr(gb, "pyproject_ranges", lambda: {"transformers": SpecifierSet(">=5.23"),
                                                         "numpy": SpecifierSet(">=1.26")})
    return wheels


def test_requirements_selects_only_the_wheels_that_fix_something(gb, fake_machine, tmp_path, capsys):
    selected = tmp_path / "selected.txt"
    rc = gb.main(["requirements", "--wheels", str(fake_machine), "--select-out", str(selected)])
    out = capsys.readouterr().out
    names = sorted(Path(line).name.split("-")[0] for line in selected.read_text().splitlines())
    # transformers is too old, huggingface-hub is needed by the carried transformers, trl and
    # pydantic are missing; accelerate and torch (never walked: its CUDA pins) stay the image's
    assert names == ["huggingface_hub", "pydantic", "transformers", "trl"]
    assert rc == 0, out
    assert "carried: transformers 5.25.0 (here 5.17.0; pyproject.toml needs transformers >=5.23)" in out
    assert "numpy-2.4.6-cp27-cp27m-win32.whl does not fit this Python" in out
    assert "MISSING" not in out


def test_requirements_names_what_is_missing_and_the_fix(gb, fake_machine, tmp_path, capsys):
    (fake_machine / "pydantic-2.14.4-py3-none-any.whl").unlink()
    rc = gb.main(["requirements", "--wheels", str(fake_machine)])
    out = capsys.readouterr().out
    assert rc == 1
    missing = [line for line in out.splitlines() if line.startswith("MISSING")]
    assert len(missing) == 1
    assert "package pydantic" in missing[0] and "run benchmarks/gpu_carry.sh" in missing[0]


def test_requirements_warns_on_a_conflict_no_wheel_fixes(gb, fake_machine, capsys):
    for path in fake_machine.glob("transformers-*.whl"):
        path.unlink()
    rc = gb.main(["requirements", "--wheels", str(fake_machine)])
    out = capsys.readouterr().out
    assert rc == 0  # a version warning, not a stop
    assert "WARNING: transformers 5.17.0 is not >=5.23" in out


def test_closure_walks_requirements_for_this_platform_minus_excluded(gb):
    active = installed(gb, trl=("1.16.0", ["transformers>=4.56", "datasets[audio]>=4"]),
                       transformers=("5.25.0", ["huggingface-hub>=2.4", 'tomli; python_version < "3.0"',
                                                "kernels; extra == 'hub-kernels'"]),
                       datasets=("5.2.0", ["pyarrow>=24", "dill"]), dill=("0.4.1", []),
                       **{"huggingface-hub": ("2.4.0", ["torch"])}, torch=("2.9.0", []))
    found, absent = gb.closure(active, ["trl"], {"pyarrow", "torch"})
    assert found == {"trl": "1.16.0", "transformers": "5.25.0", "datasets": "5.2.0", "dill": "0.4.1",
                     "huggingface-hub": "2.4.0"}
    assert absent == []
    found, absent = gb.closure(active, ["trl"], {"torch"})
    assert absent == ["pyarrow"]


# --- resume ---------------------------------------------------------------------------------

KILLED = "".join(f"2026-12-07 00:40:0{s},000 INFO [rank 0] pipelines.training.loop: step {s}/6 loss=10.0 lr=1\n"
                 for s in range(1, 4))
RESUMED = ("2026-12-07 00:41:00,000 INFO pipelines.training.checkpoints: train: resuming from "
           "/w/resume/checkpoints/checkpoint-2\n")


def test_resume_verdict_passes_when_it_resumed_from_the_last_complete_checkpoint(gb):
    ok, detail = gb.resume_verdict(KILLED, RESUMED, {"resumed_from_step": 2, "steps": 6}, [2], 6, 0)
    assert ok, detail
    assert "killed after step 3 of 6" in detail


@pytest.mark.parametrize(("resumed_log", "metrics", "complete", "rc"), [
    ("", {"resumed_from_step": 0, "steps": 6}, [2], 0),  # started afresh
    (RESUMED, {"resumed_from_step": 2, "steps": 6}, [2, 4], 0),  # checkpoint-4 was the last complete one
    (RESUMED, {"resumed_from_step": 2, "steps": 5}, [2], 0),  # did not finish
    (RESUMED, {"resumed_from_step": 2, "steps": 6}, [2], 1),  # failed
    (RESUMED, {}, [], 0),  # nothing to resume from
])
def test_resume_verdict_fails(gb, resumed_log, metrics, complete, rc):
    ok, detail = gb.resume_verdict(KILLED, resumed_log, metrics, complete, 6, rc)
    assert not ok, detail


def test_resume_verdict_skips_the_final_step_checkpoint(gb):
    # the stage never resumes from a checkpoint of the last step (it would step past max_steps)
    ok, detail = gb.resume_verdict(KILLED, RESUMED, {"resumed_from_step": 2, "steps": 6}, [2, 6], 6, 0)
    assert ok, detail


def test_complete_checkpoints_needs_the_marker(gb, tmp_path):
    for step, marked in ((2, True), (4, False), (10, True)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if marked:
            (tmp_path / f"checkpoint-{step}" / gb.MARKER).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert gb.complete_checkpoints(tmp_path) == [2, 10]
    assert gb.complete_checkpoints(tmp_path / "absent") == []


# --- summary --------------------------------------------------------------------------------

def write_record(path: Path, *entries: dict) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")


TRAIN = {"kind": "train", "label": "zero2", "config": "zero2", "batch": 16, "max_length": 128, "wall_s": 61.0,
         "rc": 0, "timed_steps": 35, "timed_s": 3.5, "s_per_step": 0.1, "examples_per_s": 160.0,
         "mean_tokens": 40.0, "tokens_per_s": 6400.0, "steps": 40, "train_loss": 9.1, "eval_loss": 9.2,
         "gate_reference_loss": 9.2, "gate_reloaded_loss": 9.21, "gate_relative_difference": 0.001,
         "runtime_seconds": 50.0, "gpu_memory_mib": 2048.0}
GENERATE = {"kind": "generate", "device": "NVIDIA H100", "dtype": "bf16", "batch": 32, "new_tokens": 64,
            "median_s": 1.6, "tokens_per_s": 1280.0, "per_sequence_tokens_per_s": 40.0}


def test_summary_prints_every_figure(gb, tmp_path, capsys):
    record = tmp_path / "record.jsonl"
    write_record(record, {"kind": "model", "description": "shapes, RANDOM weights"}, TRAIN,
                 {"kind": "resume", "config": "zero3", "ok": True, "detail": "from checkpoint-10"}, GENERATE)
    assert gb.main(["summary", "--record", str(record)]) == 0
    out = capsys.readouterr().out
    assert "model: shapes, RANDOM weights" in out
    assert "| zero2 | zero2 | 16 | 6,400 | 160.0 | 100.0 | 35 | 9.1000 | 9.2000 | 9.2000 / 9.2100 (0.100%) | 2,048 |" \
        in out
    assert "resume (zero3): PASSED: from checkpoint-10" in out
    assert "| batch 32 | NVIDIA H100 bf16 | 64 | 1,280 | 40 | 1.600 |" in out


def test_summary_fails_on_any_failure_and_still_prints_the_rest(gb, tmp_path, capsys):
    record = tmp_path / "record.jsonl"
    write_record(record, TRAIN, {**TRAIN, "label": "zero3", "config": "zero3", "error": "exit code 1"},
                 {"kind": "resume", "config": "zero3", "ok": False, "detail": "started afresh"},
                 {"kind": "failure", "what": "generate", "detail": "no merged model"})
    assert gb.main(["summary", "--record", str(record)]) == 1
    out = capsys.readouterr().out
    assert "| zero2 |" in out and "FAILED: exit code 1 |" in out
    assert "resume (zero3): FAILED: started afresh" in out
    assert "FAILED: generate: no merged model" in out


def test_summary_without_a_record(gb, tmp_path, capsys):
    assert gb.main(["summary", "--record", str(tmp_path / "none.jsonl")]) == 1
    assert "no figures" in capsys.readouterr().out


def test_fail_records_a_failure(gb, tmp_path):
    record = tmp_path / "record.jsonl"
    gb.main(["fail", "--what", "train zero3", "--detail", "timed out after 180s", "--record", str(record)])
    assert json.loads(record.read_text()) == {"kind": "failure", "what": "train zero3",
                                              "detail": "timed out after 180s"}
