"""Helpers of benchmarks/gpu.sh (the train stage on one CUDA GPU); each is a subcommand.

    python3 benchmarks/gpu_bench.py gpu                       one line: the GPU, or why there is none
    python3 benchmarks/gpu_bench.py requirements --wheels DIR [--select-out FILE]
        which packages the train stage needs are missing here or outside the versions the
        project needs, and which carried wheels fix that (written to FILE for pip)
    python3 benchmarks/gpu_bench.py closure [--exclude NAME ...]
        name==version of every package the train stage needs, as installed here (gpu_carry.sh)
    python3 benchmarks/gpu_bench.py environment --record FILE  versions in use, image or carried
    python3 benchmarks/gpu_bench.py shapes --config-dir DIR --out DIR
        a model folder with the config and tokenizer of DIR and seeded random weights
    python3 benchmarks/gpu_bench.py train-figures --log LOG --metrics JSON ... --record FILE
        training tokens/s of one `llmops train` run, from its rank-0 "step N/M" log lines
    python3 benchmarks/gpu_bench.py resume-check --log LOG --metrics JSON --checkpoints DIR ...
        whether a run started again after a kill resumed from the last complete checkpoint
    python3 benchmarks/gpu_bench.py generate --model DIR --prompts PARQUET ... --record FILE
        greedy generation tokens/s of a merged model (fixed length: min = max new tokens)
    python3 benchmarks/gpu_bench.py fail --what STEP --detail TEXT --record FILE   a failed step
    python3 benchmarks/gpu_bench.py summary --record FILE     every figure as Markdown tables

Only the standard library at the top: `gpu` and `requirements` run on the machine's own
interpreter before anything is installed (packaging comes from the image, or pip's copy).
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import importlib.metadata
import json
import math
import re
import statistics
import sys
import time
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]

# What the train stage (and this benchmark) import on the GPU machine. torch's own
# requirements (CUDA libraries pinned to its build) are the image's business: not walked.
ROOTS = ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "deepspeed", "mlflow-skinny",
         "pydantic", "pyyaml", "pandas", "pyarrow", "safetensors", "tokenizers", "numpy", "huggingface-hub"]
NO_DESCENT = {"torch"}
_STEP_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*pipelines\.training\.loop: step (\d+)/(\d+) loss=")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging() -> Any:
    """`packaging` (requirements, specifiers, tags): the image's, else the copy inside pip."""
    try:
        import packaging.requirements
        import packaging.specifiers
        import packaging.tags
        import packaging.utils
        import packaging.version

        return packaging
    except ImportError:
        from pip._vendor import packaging  # type: ignore[no-redef]
        from pip._vendor.packaging import requirements, specifiers, tags, utils, version  # noqa: F401

        return packaging


def record(path: str | None, entry: dict[str, Any]) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


# --- gpu -------------------------------------------------------------------------------------

def cmd_gpu(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError as error:
        print(f"no PyTorch in {sys.executable} ({error}); set GPU_PYTHON to the interpreter that has PyTorch "
              "with CUDA")
        return 1
    if torch.version.cuda is None:
        print(f"no CUDA GPU: {sys.executable} has torch {torch.__version__}, a build without CUDA; run on a "
              "machine with one CUDA GPU and PyTorch's CUDA build")
        return 1
    if not torch.cuda.is_available():
        print(f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device "
              "(torch.cuda.is_available() is False); run on a machine with one CUDA GPU")
        return 1
    name = torch.cuda.get_device_name(0)
    if not torch.cuda.is_bf16_supported():
        print(f"no bfloat16 on {name}: the train stage runs here in bf16; use a GPU with bf16 (Ampere or newer)")
        return 1
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"{name}, {memory:.0f} GiB, {torch.cuda.device_count()} device(s); torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, bf16 yes")
    return 0


# --- requirements ----------------------------------------------------------------------------

class Dist(NamedTuple):
    name: str
    version: str
    requires: list[str]
    origin: str  # where it is: a folder on sys.path, or the carried wheel file
    wheel: Path | None = None


def installed_distributions() -> dict[str, Dist]:
    """The distribution Python imports for each name (the first on sys.path)."""
    found: dict[str, Dist] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if not name or norm(name) in found:
            continue
        found[norm(name)] = Dist(norm(name), dist.version, list(dist.requires or []), str(dist.locate_file("")))
    return found


def carried_wheels(folder: Path) -> tuple[dict[str, Dist], list[str]]:
    """The wheels in `folder` that fit this interpreter, and notes on those that do not."""
    pk = _packaging()
    supported = set(pk.tags.sys_tags())
    wheels, notes = {}, []
    for path in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        try:
            name, version, _, tags = pk.utils.parse_wheel_filename(path.name)
        except Exception:  # noqa: BLE001 - an odd file name: say so, use the rest
            notes.append(f"note: {path.name} is not a wheel file name; ignored")
            continue
        if not tags & supported:
            notes.append(f"note: carried {path.name} does not fit this Python "
                         f"({sys.version_info.major}.{sys.version_info.minor}, {sys.platform}); ignored")
            continue
        with zipfile.ZipFile(path) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            message = email.parser.Parser().parsestr(archive.read(meta).decode("utf-8"))
        wheels[norm(name)] = Dist(norm(name), str(version), message.get_all("Requires-Dist") or [], str(path), path)
    return wheels, notes


def pyproject_ranges() -> dict[str, Any]:
    import tomllib

    pk = _packaging()
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    ranges = {}
    for line in data["project"]["dependencies"]:
        req = pk.requirements.Requirement(line)
        ranges[norm(req.name)] = req.specifier
    if "mlflow" in ranges:  # the stage needs only the tracking client: mlflow-skinny, same versions
        ranges.setdefault("mlflow-skinny", ranges["mlflow"])
    return ranges


class Problem(NamedTuple):
    name: str
    spec: Any
    needed_by: str
    have: str | None


def unmet(active: dict[str, Dist], ranges: dict[str, Any]) -> list[Problem]:
    """Every requirement, from ROOTS down, that `active` does not meet."""
    pk = _packaging()
    problems: list[Problem] = []
    stack = [(root, ranges.get(root, pk.specifiers.SpecifierSet()),
              "pyproject.toml" if root in ranges else "the train stage") for root in ROOTS]
    seen: set[str] = set()
    while stack:
        name, spec, by = stack.pop()
        dist = active.get(name)
        if dist is None or not spec.contains(dist.version, prereleases=True):
            problems.append(Problem(name, spec, by, dist.version if dist else None))
        if dist is None or name in seen or name in NO_DESCENT:
            continue
        seen.add(name)
        for line in dist.requires:
            req = pk.requirements.Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            stack.append((norm(req.name), req.specifier, f"{name} {dist.version}"))
    return problems


def cmd_requirements(args: argparse.Namespace) -> int:
    """Pick the carried wheels that make the train stage's requirements hold; report the rest.

    A carried wheel is installed only where the package is missing here, or the version here
    is outside what pyproject.toml or a package in use requires: the image's own packages
    (torch first) stay in use wherever they fit."""
    wheels_dir = Path(args.wheels)
    installed = installed_distributions()
    wheels, notes = carried_wheels(wheels_dir)
    for note in notes:
        print(note)
    ranges = pyproject_ranges()
    active, selected = dict(installed), {}
    while True:
        changed = False
        for problem in unmet(active, ranges):
            wheel = wheels.get(problem.name)
            if problem.name in selected or wheel is None:
                continue
            fits_range = ranges.get(problem.name) is None or ranges[problem.name].contains(wheel.version,
                                                                                           prereleases=True)
            if problem.spec.contains(wheel.version, prereleases=True) and fits_range:
                selected[problem.name] = (wheel, problem)
                active[problem.name] = wheel
                changed = True
        if not changed:
            break
    for name, (wheel, problem) in sorted(selected.items()):
        here = f"here {problem.have}" if problem.have else "missing here"
        spec = f" {problem.spec}" if str(problem.spec) else ""
        print(f"carried: {name} {wheel.version} ({here}; {problem.needed_by} needs {name}{spec})")
    missing, conflicts = [], []
    for problem in unmet(active, ranges):
        spec = f" {problem.spec}" if str(problem.spec) else ""
        if problem.have is None:
            missing.append(f"MISSING: package {problem.name}{spec} (needed by {problem.needed_by}): not installed "
                           f"for {sys.executable} and no fitting wheel in {wheels_dir}; run benchmarks/gpu_carry.sh "
                           "where pip reaches PyPI and carry its folder (or pip install it)")
        else:
            conflicts.append(f"WARNING: {problem.name} {problem.have} is not{spec} (wanted by {problem.needed_by}) "
                             "and no carried wheel fits; continuing: the import check and the runs show whether "
                             "it matters")
    for line in sorted(set(missing)) + sorted(set(conflicts)):
        print(line)
    if args.select_out:
        Path(args.select_out).write_text("".join(f"{wheel.wheel}\n" for wheel, _ in selected.values()),
                                         encoding="utf-8")
    if not missing:
        print(f"requirements: {len(ROOTS)} packages and their requirements are met"
              + (f" once {len(selected)} carried wheel(s) are installed" if selected else "")
              + (f" ({len(set(conflicts))} version warning(s))" if conflicts else ""))
    return 1 if missing else 0


def closure(active: dict[str, Dist], roots: list[str], exclude: set[str]) -> tuple[dict[str, str], list[str]]:
    """name -> version of `roots` and everything they require (for this platform, no extras)
    as `active` holds them, minus `exclude` (not walked below either); and names not found."""
    pk = _packaging()
    found: dict[str, str] = {}
    absent: list[str] = []
    stack = [norm(root) for root in reversed(roots)]
    while stack:
        name = stack.pop()
        if name in found or name in exclude or name in absent:
            continue
        dist = active.get(name)
        if dist is None:
            absent.append(name)
            continue
        found[name] = dist.version
        for line in dist.requires:
            req = pk.requirements.Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(norm(req.name))
    return found, absent


def cmd_closure(args: argparse.Namespace) -> int:
    found, absent = closure(installed_distributions(), ROOTS, {norm(n) for n in args.exclude} | NO_DESCENT)
    for name in absent:
        print(f"{name} is required but not installed for {sys.executable}", file=sys.stderr)
    for name, version in sorted(found.items()):
        print(f"{name}=={version}")
    return 1 if absent else 0


def cmd_environment(args: argparse.Namespace) -> int:
    import torch

    versions = {}
    for name in ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "deepspeed", "mlflow-skinny",
                 "pydantic", "pandas", "pyarrow", "tokenizers"]:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
            continue
        where = str(Path(str(dist.locate_file(""))).resolve())
        carried = bool(args.site) and where.startswith(str(Path(args.site).resolve()))
        versions[name] = f"{dist.version} ({'carried' if carried else 'image'})"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU rehearsal)"
    line = ", ".join(f"{k} {v}" for k, v in versions.items())
    print(f"environment: GPU {gpu}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}; {line}")
    record(args.record, {"kind": "environment", "gpu": gpu, "cuda": torch.version.cuda,
                         "python": sys.version.split()[0], "versions": versions})
    return 0


# --- the model -------------------------------------------------------------------------------

def cmd_shapes(args: argparse.Namespace) -> int:
    """SmolLM2-135M's config and tokenizer with seeded random weights (float32), as a local folder."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, out = Path(args.config_dir), Path(args.out)
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    if (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", out / "generation_config.json")
    upstream = "SmolLM2-135M-Instruct"
    if (source / "upstream-source.json").is_file():
        upstream = json.loads((source / "upstream-source.json").read_text(encoding="utf-8")).get("upstream", upstream)
    (out / "README.md").write_text(
        "---\nlicense: apache-2.0\n---\n"
        f"# {upstream} shapes, random weights\n\nThe config and tokenizer of {upstream}; the weights are "
        f"random (torch seed {args.seed}), made by benchmarks/gpu_bench.py shapes. Throughput on it is that "
        "of the architecture; losses and generations mean nothing.\n", encoding="utf-8")
    params = sum(p.numel() for p in model.parameters())
    # What the train stage reads of a base model folder (pipelines/model/sources.py
    # read_source_record): content_sha256 enters the run's fingerprint (resume).
    hashes = {path.name: file_sha256(path) for path in sorted(out.iterdir()) if path.is_file()}
    (out / "source.json").write_text(json.dumps({
        "source": f"random weights of {upstream}'s shapes (benchmarks/gpu_bench.py shapes, seed {args.seed})",
        "kind": "local", "upstream": upstream, "parameters": params, "dtype": "float32",
        "model_type": config.model_type, "files": hashes,
        "content_sha256": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest(),
    }, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    description = (f"{upstream} shapes ({config.model_type}, {config.num_hidden_layers} layers, hidden "
                   f"{config.hidden_size}, vocab {config.vocab_size}, {params:,} parameters) with RANDOM weights "
                   f"(seed {args.seed}): the bundled GGUF does not fit the 64 MiB carried; throughput is the "
                   "architecture's, losses and generated text mean nothing")
    record(args.record, {"kind": "model", "description": description})
    print(f"shapes: {out}: {description}")
    return 0


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# --- training figures ------------------------------------------------------------------------

def mean_real_tokens(prepared: Path, tokenizer_dir: Path, max_length: int, max_samples: int | None = None,
                     seed: int = 42) -> tuple[float, int]:
    """Mean tokens of a train example as TRL feeds it (prompt + completion, cut at max_length).

    The stage checks that TRL's tokens are exactly those of prompt_text + completion_text
    (training/loop.py check_rendering); examples whose prompt fills max_length are dropped.
    With `max_samples`, the rows the stage samples (training/loop.py sample_rows)."""
    import pandas as pd
    from transformers import AutoTokenizer

    frame = pd.read_parquet(prepared / "train.parquet", columns=["prompt_text", "completion_text"])
    if max_samples is not None and max_samples < len(frame):
        frame = frame.sample(n=max_samples, random_state=seed).sort_index()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    full = tokenizer([p + c for p, c in zip(frame["prompt_text"], frame["completion_text"])],
                     add_special_tokens=False)["input_ids"]
    prompts = tokenizer(list(frame["prompt_text"]), add_special_tokens=False)["input_ids"]
    kept = [min(len(ids), max_length) for ids, prompt in zip(full, prompts) if len(prompt) < max_length]
    return statistics.mean(kept), len(kept)


def step_times(log: Path) -> dict[int, float]:
    """step -> time of its rank-0 progress line (seconds since the epoch, ms resolution)."""
    times = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _STEP_LINE.search(line)
        if match:
            when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            times[int(match.group(2))] = when
    return times


def peak_gpu_memory(mlruns: Path, run_id: str | None, samples: Path | None = None) -> float | None:
    """The largest GPU memory sample (MiB) in `samples` (nvidia-smi's memory.used, one number a
    line) or else in MLflow's system metrics of the run; None when there is none."""
    values = []
    if samples is not None and samples.is_file():
        for line in samples.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                values.append(float(line.strip().split(",")[0]))
            except ValueError:
                continue
        if values:
            return max(values)
    if not run_id:
        return None
    for path in mlruns.glob(f"*/{run_id}/metrics/system/gpu_0_memory_usage_megabytes"):
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) >= 2:
                values.append(float(parts[1]))
    return max(values) if values else None


def cmd_train_figures(args: argparse.Namespace) -> int:
    entry: dict[str, Any] = {"kind": "train", "label": args.label, "config": args.config, "batch": args.batch,
                             "max_length": args.max_length, "wall_s": args.wall, "rc": args.rc}
    metrics_path = Path(args.metrics)
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    times = step_times(Path(args.log))
    last = max(times) if times else 0
    first = args.warmup if args.warmup in times else None
    if args.rc != 0 or not metrics:
        entry["error"] = error_line(Path(args.log)) or f"exit code {args.rc}, no {metrics_path}"
    if first is not None and last > first:
        seconds = times[last] - times[first]
        steps = last - first
        mean_tokens, kept = mean_real_tokens(Path(args.prepared), Path(args.tokenizer), args.max_length,
                                             args.max_train_samples, args.seed)
        examples = steps * args.batch * args.grad_accum
        entry.update(timed_steps=steps, timed_s=round(seconds, 3), s_per_step=seconds / steps,
                     examples_per_s=examples / seconds, mean_tokens=mean_tokens, tokens_per_s=examples * mean_tokens
                     / seconds, train_rows_kept=kept)
    else:
        entry.setdefault("error", f"fewer than {args.warmup + 2} step lines in {args.log}")
    for key in ("steps", "train_loss", "eval_loss", "gate_reference_loss", "gate_reloaded_loss", "runtime_seconds",
                "resumed_from_step", "precision", "world_size", "mlflow_run_id", "trainable_parameters"):
        if key in metrics:
            entry[key] = metrics[key]
    entry["gpu_memory_mib"] = peak_gpu_memory(Path(args.mlruns), metrics.get("mlflow_run_id"),
                                              Path(args.gpu_memory_log) if args.gpu_memory_log else None)
    if "gate_reference_loss" in entry and "gate_reloaded_loss" in entry:
        ref, got = entry["gate_reference_loss"], entry["gate_reloaded_loss"]
        entry["gate_relative_difference"] = abs(got - ref) / max(abs(ref), 1e-8)
    record(args.record, entry)
    print(train_line(entry))
    return 0 if "error" not in entry else 1


def error_line(log: Path) -> str | None:
    if not log.is_file():
        return None
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "Error" in line:
            return line.strip()[:400]
    return lines[-1].strip()[:400] if lines else None


def train_line(e: dict[str, Any]) -> str:
    head = f"train {e['label']}: "
    if "tokens_per_s" in e:
        head += (f"~{e['tokens_per_s']:,.0f} tokens/s, {e['examples_per_s']:.1f} examples/s, "
                 f"{1000 * e['s_per_step']:.1f} ms/step ({e['timed_steps']} steps timed after warm-up, "
                 f"{e['mean_tokens']:.1f} real tokens per example); ")
    if "steps" in e:
        head += (f"{e['steps']} steps, train loss {e['train_loss']:.4f}, eval loss {e['eval_loss']:.4f}, "
                 f"gate {e['gate_reference_loss']:.4f} trained vs {e['gate_reloaded_loss']:.4f} reloaded "
                 f"({100 * e.get('gate_relative_difference', math.nan):.3f}% apart); "
                 f"stage {e.get('runtime_seconds', math.nan):.0f} s, whole command {e['wall_s']:.0f} s")
    if e.get("gpu_memory_mib"):
        head += f"; GPU memory up to {e['gpu_memory_mib']:,.0f} MiB (sampled)"
    if "error" in e:
        head += f" FAILED: {e['error']}"
    return head


# --- resume ----------------------------------------------------------------------------------

MARKER = "checkpoint-complete.json"  # pipelines/training/checkpoints.py: written last, once a save is whole
_RESUMING = re.compile(r"train: resuming from (\S*checkpoint-(\d+))")


def complete_checkpoints(folder: Path) -> list[int]:
    """Steps of the checkpoint-N folders in `folder` whose completion marker exists, ascending."""
    steps = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / MARKER).is_file():
            steps.append(int(suffix))
    return sorted(steps)


def resume_verdict(killed_log: str, resumed_log: str, metrics: dict[str, Any], complete: list[int],
                   max_steps: int, rc: int) -> tuple[bool, str]:
    """Whether the run started again resumed from the last complete checkpoint the killed run
    left (its final-step checkpoint excepted: the stage never resumes there) and finished."""
    killed_steps = [int(m.group(2)) for m in _STEP_LINE.finditer(killed_log)]
    killed_at = max(killed_steps, default=0)
    candidates = [step for step in complete if step < max_steps]
    if not candidates:
        return False, (f"the killed run left no complete checkpoint (last step logged {killed_at}); "
                       "nothing to resume from: kill later or save more often")
    expected = candidates[-1]
    said = _RESUMING.search(resumed_log)
    resumed = metrics.get("resumed_from_step")
    detail = (f"killed after step {killed_at} of {max_steps} with complete checkpoint(s) at {complete}; "
              f"started again: log says {'resuming from checkpoint-' + said.group(2) if said else 'no resume'}, "
              f"metrics resumed_from_step={resumed}, finished at step {metrics.get('steps')}, exit code {rc}")
    ok = (rc == 0 and said is not None and int(said.group(2)) == expected and resumed == expected
          and metrics.get("steps") == max_steps)
    return ok, detail + ("" if ok else f"; expected a resume from checkpoint-{expected} and {max_steps} steps")


def cmd_resume_check(args: argparse.Namespace) -> int:
    read = lambda path: Path(path).read_text(encoding="utf-8", errors="replace") if Path(path).is_file() else ""  # noqa: E731
    metrics_text = read(args.metrics)
    metrics = json.loads(metrics_text) if metrics_text else {}
    complete = [int(step) for step in args.complete.split()] if args.complete is not None \
        else complete_checkpoints(Path(args.checkpoints))
    ok, detail = resume_verdict(read(args.killed_log), read(args.log), metrics, complete, args.max_steps, args.rc)
    record(args.record, {"kind": "resume", "config": args.config, "ok": ok, "detail": detail})
    print(f"resume ({args.config}): {'PASSED' if ok else 'FAILED'}: {detail}")
    return 0 if ok else 1


def cmd_fail(args: argparse.Namespace) -> int:
    record(args.record, {"kind": "failure", "what": args.what, "detail": args.detail})
    return 0


# --- generation ------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    load_s = time.perf_counter() - started
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    prompts = list(pd.read_parquet(args.prompts, columns=["prompt_text"])["prompt_text"])
    n = args.new_tokens
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    print(f"generate: {args.model} in {dtype} on {where} (loaded in {load_s:.1f} s); "
          f"greedy, exactly {n} new tokens per prompt (min_new_tokens = max_new_tokens), prompts from {args.prompts}")
    status = 0
    for batch_size in [int(b) for b in args.batches.split()]:
        batch = (prompts * math.ceil(batch_size / len(prompts)))[:batch_size]
        inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            model.generate(**inputs, generation_config=config)  # warm-up
            times = []
            for _ in range(args.repeats):
                sync()
                start = time.perf_counter()
                out = model.generate(**inputs, generation_config=config)
                sync()
                times.append(time.perf_counter() - start)
        new = out.shape[1] - inputs["input_ids"].shape[1]
        seconds = statistics.median(times)
        entry = {"kind": "generate", "device": where, "dtype": args.dtype, "batch": batch_size, "new_tokens": new,
                 "prompt_tokens_max": int(inputs["input_ids"].shape[1]), "median_s": seconds,
                 "runs_s": [round(t, 4) for t in times],
                 "tokens_per_s": batch_size * new / seconds, "per_sequence_tokens_per_s": new / seconds,
                 "sample": tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[:120]}
        if new != n:
            entry["error"] = f"generated {new} tokens, asked for exactly {n}"
            status = 1
        record(args.record, entry)
        print(f"generate batch {batch_size}: {entry['tokens_per_s']:,.0f} tokens/s "
              f"({entry['per_sequence_tokens_per_s']:.0f} per sequence), {seconds:.3f} s for {batch_size} x {new} "
              f"tokens (median of {args.repeats}: {', '.join(f'{t:.3f}' for t in times)}); first answer: "
              f"{entry['sample']!r}")
    return status


# --- summary ---------------------------------------------------------------------------------

def _f(value: Any, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def cmd_summary(args: argparse.Namespace) -> int:
    path = Path(args.record)
    if not path.is_file():
        print(f"no figures: {path} was not written (the run stopped before its first step)")
        return 1
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    failed = 0
    for e in entries:
        if e["kind"] == "model":
            print(f"model: {e['description']}\n")
        if e["kind"] == "environment":
            print(f"GPU {e['gpu']}, CUDA {e['cuda']}, Python {e['python']}; "
                  + ", ".join(f"{k} {v}" for k, v in e["versions"].items()) + "\n")
    trains = [e for e in entries if e["kind"] == "train"]
    if trains:
        print("| run | ZeRO config | batch | ~tokens/s | examples/s | ms/step | steps timed | train loss | eval loss "
              "| gate trained / reloaded (diff) | GPU MiB | stage s | command s | outcome |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
        for e in trains:
            gate = ""
            if "gate_reloaded_loss" in e:
                gate = (f"{e['gate_reference_loss']:.4f} / {e['gate_reloaded_loss']:.4f} "
                        f"({100 * e['gate_relative_difference']:.3f}%)")
            outcome = "FAILED: " + e["error"][:120] if "error" in e else "ok"
            failed += "error" in e
            ms_per_step = 1000 * e["s_per_step"] if "s_per_step" in e else None
            print(f"| {e['label']} | {e['config']} | {e['batch']} | {_f(e.get('tokens_per_s'), ',.0f')} | "
                  f"{_f(e.get('examples_per_s'), '.1f')} | {_f(ms_per_step, '.1f')} | "
                  f"{e.get('timed_steps', '')} | {_f(e.get('train_loss'), '.4f')} | {_f(e.get('eval_loss'), '.4f')} | "
                  f"{gate} | {_f(e.get('gpu_memory_mib'), ',.0f')} | {_f(e.get('runtime_seconds'), '.0f')} | "
                  f"{_f(e.get('wall_s'), '.0f')} | {outcome} |")
        print("\n~tokens/s = examples/s x the mean real (attention-mask) tokens of a train example; timed from "
              "the rank-0 'step N/M' log lines after the warm-up steps.\n")
    for e in entries:
        if e["kind"] == "resume":
            failed += not e["ok"]
            print(f"resume ({e['config']}): {'PASSED' if e['ok'] else 'FAILED'}: {e['detail']}\n")
    gens = [e for e in entries if e["kind"] == "generate"]
    if gens:
        print("| merged model, greedy | on | new tokens per prompt | tokens/s | per sequence tokens/s | median s |")
        print("|---|---|---:|---:|---:|---:|")
        for e in gens:
            failed += "error" in e
            print(f"| batch {e['batch']} | {e.get('device', '')} {e.get('dtype', '')} | {e['new_tokens']} | "
                  f"{e['tokens_per_s']:,.0f} | {e['per_sequence_tokens_per_s']:.0f} | {e['median_s']:.3f} |")
        print()
    for e in entries:
        if e["kind"] == "failure":
            failed += 1
            print(f"FAILED: {e['what']}: {e['detail']}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gpu")
    p = sub.add_parser("requirements")
    p.add_argument("--wheels", required=True)
    p.add_argument("--select-out")
    p = sub.add_parser("environment")
    p.add_argument("--site")
    p.add_argument("--record")
    p = sub.add_parser("shapes")
    p.add_argument("--config-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record")
    p = sub.add_parser("train-figures")
    for name in ("--log", "--metrics", "--prepared", "--tokenizer", "--mlruns", "--label", "--config", "--record"):
        p.add_argument(name, required=True)
    for name in ("--batch", "--max-length", "--warmup"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gpu-memory-log")
    p.add_argument("--wall", type=float, default=math.nan)
    p.add_argument("--rc", type=int, default=0)
    p = sub.add_parser("generate")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--batches", default="1 32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--record")
    p = sub.add_parser("closure")
    p.add_argument("--exclude", nargs="*", default=[])
    p = sub.add_parser("resume-check")
    for name in ("--log", "--killed-log", "--metrics", "--checkpoints", "--config", "--record"):
        p.add_argument(name, required=True)
    p.add_argument("--complete", help="the complete checkpoints' steps, space-separated, as found after the kill")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--rc", type=int, default=0)
    p = sub.add_parser("fail")
    for name in ("--what", "--detail", "--record"):
        p.add_argument(name, required=True)
    p = sub.add_parser("summary")
    p.add_argument("--record", required=True)
    args = parser.parse_args(argv)
    return {"gpu": cmd_gpu, "requirements": cmd_requirements, "closure": cmd_closure, "environment": cmd_environment,
            "shapes": cmd_shapes, "train-figures": cmd_train_figures, "resume-check": cmd_resume_check,
            "fail": cmd_fail, "generate": cmd_generate, "summary": cmd_summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
