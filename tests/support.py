"""Helpers shared by the test tiers (fixtures live in the conftest.py files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
BIN = Path(sys.executable).parent

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def require(condition: bool, reason: str) -> None:
    """Skip when a system dependency is missing, except in CI, where that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing dependency under CI=true: {reason}")
    pytest.skip(reason)


def sample_texts(limit: int = 3000) -> list[str]:
    texts = []
    for name in ("wordnet", "foldoc"):
        with open(REPO / "data" / "sample" / f"{name}.jsonl", encoding="utf-8") as handle:
            for line, _ in zip(handle, range(limit)):
                row = json.loads(line)
                texts += [row["prompt"], row["response"]]
    return texts


def build_tiny_tokenizer(directory: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer trained on the sample, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sample_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(directory)
    return directory


# What a fresh clone holds that the pipeline needs (outputs, venv and caches are not copied).
PROJECT_FILES = ["pipelines", "scripts", "configs", "dags", "data/sample", "params.yaml", "dvc.yaml", ".dvcignore",
                 "pyproject.toml", ".gitignore"]


class Project:
    """A throw-away copy of the project (what a fresh clone holds), to run DVC and the CLI in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # MLflow exports the tracking URI of this test process (a test server's) to os.environ;
        # the project's stages must use their own default instead.
        inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.env = {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def run(self, *cmd: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "dvc"), *args, check=check)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, **sections: dict) -> None:
        data = self.params()
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        (self.root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def make_project(root: Path) -> Project:
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, root / name)
    for folder in ("raw", "feedback"):  # kept in git by a .gitkeep; feedback is a dep of `ingest`
        (root / "data" / folder).mkdir(parents=True, exist_ok=True)
        (root / "data" / folder / ".gitkeep").touch()
    project = Project(root)
    project.run("git", "init", "-q")
    project.dvc("init", "-q")
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    return project


def tiny_pipeline_project(root: Path, tokenizer_dir: Path, tracking_uri: str) -> Project:
    """A project whose whole pipeline runs in about a minute: a tiny Llama (built from config with
    the locally trained tokenizer) as the base model, 1,500 WordNet rows, a few training steps,
    a real MLflow tracking server; params committed to git as a user's checkout would have them."""
    from tests.tiny_model import build_tiny_model

    project = make_project(root)
    raw = build_tiny_model(root.parent / f"{root.name}-tiny-base", tokenizer_dir)
    project.set_params(
        base_model={"source": str(raw)},
        ingest={"sources": [{"kind": "bundled", "name": "wordnet", "max_rows": 1500}]},
        train={"max_steps": 4, "eval_steps": 2, "save_steps": 2, "max_eval_samples": 8,
               "per_device_train_batch_size": 4, "learning_rate": 2e-3},
        tracking={"uri": tracking_uri, "system_metrics": False},
        # no semantic metrics nor forgetting check: ~10-20 s per evaluate run here;
        # tests/integration/test_registry.py and tests/model run them
        evaluate={"max_examples": 16, "bootstrap_samples": 50, "decoding": {"max_new_tokens": 8},
                  "semantic_metrics": [], "forgetting": {"task": None}},
        deploy={"service_url": None},
        # no quantized variants: the stage is a no-op here (two vLLM engines and llm-compressor would add
        # ~2 min per run); tests/integration/test_quantize.py runs it on the tiny model
        quantize={"variants": []},
        monitor={"min_rows": 20, "retrain": {"k": 1, "n": 1, "require_new_data": False, "cooldown_hours": 0}},
    )
    commit(project, "a tiny pipeline")
    return project


def dvc_experiments(project: Project) -> dict[str, dict]:
    """`dvc exp show --json` by experiment name: each experiment's data (params, metrics, deps)."""
    shown = json.loads(project.dvc("exp", "show", "--json").stdout)
    out = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    out[rev["name"]] = rev.get("data") or {}
    return out


def commit(project: Project, message: str) -> None:
    project.run("git", "add", "-A")
    project.run("git", "-c", "user.name=tests", "-c", "user.email=tests@localhost", "commit", "-q", "-m", message)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200 (fail early if `process` dies)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class MlflowServer:
    """A real `mlflow server` on a free loopback port: SQLite backend, temporary artifact root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.root / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
            # no MLflow job runner: 8 more processes (~2 GiB, ~30 s of CPU to start) per server, for
            # MLflow's GenAI jobs, which the pipeline does not use
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        try:
            wait_http(f"{self.uri}/health", timeout, self.process)
        except Exception:
            self.stop()
            log = (self.root / "server.log").read_text()[-3000:]
            raise RuntimeError(f"mlflow server did not start:\n{log}") from None
        return self

    def stop(self) -> None:
        stop_process_group(self.process, 20)
        if getattr(self, "log", None):
            self.log.close()


def stop_process_group(process: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM the process group of a server started with start_new_session; SIGKILL if it lingers."""
    import signal

    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def build_tiny_base(directory: Path, tokenizer_dir: Path, **kwargs) -> Path:
    """A tiny Llama folder as the `base_model` stage would leave it (with source.json)."""
    from pipelines.model.materialise import content_hash, folder_hashes
    from pipelines.model.sources import SOURCE_FILE
    from tests.tiny_model import build_tiny_model

    build_tiny_model(directory, tokenizer_dir, **kwargs)
    hashes = folder_hashes(directory)
    (directory / SOURCE_FILE).write_text(json.dumps({
        "source": str(directory), "kind": "local", "licence": "Apache-2.0",
        "content_sha256": content_hash(hashes), "files": hashes,
    }))
    return directory


def build_adapter(directory: Path, base_dir: Path, r: int = 4, seed: int = 0, noise: float = 0.02) -> Path:
    """An untrained-but-nonzero LoRA adapter for `base_dir` (lora_B perturbed so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, noise)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(directory)
    return directory


def evaluation(improvement_low: float, champion_version: str | None = None) -> dict:
    """evaluate's results.json shape with a chosen gate outcome (the gate itself is unit-tested)."""
    def diff(low):
        return {"improvement": low + 0.05, "low": low, "high": low + 0.1, "confidence": 0.95}

    metrics = {"rouge_l": 0.5, "bleu": 10.0, "exact_match": 0.1, "normalised_match": 0.2, "perplexity": 9.0,
               "tokens_per_second": 100.0, "generated_tokens": 100, "generation_seconds": 1.0}
    systems = {"candidate": metrics, "base": metrics}
    comparisons = {"base": {m: diff(improvement_low) for m in ("rouge_l", "bleu", "exact_match",
                                                               "normalised_match", "perplexity")}}
    if champion_version:
        systems["champion"] = metrics
        comparisons["champion"] = {m: diff(0.0) for m in comparisons["base"]}
    return {"examples": 50, "primary_metric": "rouge_l", "systems": systems, "comparisons": comparisons,
            "slices": {}, "samples": [], "champion_version": champion_version, "mlflow_run_id": ""}


class Workspace:
    """The stage outputs `register` and `promote` read, in a temporary folder."""

    def __init__(self, root: Path, base: Path, server_uri: str, model_name: str, seed: int = 0) -> None:
        self.root = root
        self.adapter = build_adapter(root / "adapter", base, seed=seed)
        reports = root / "reports"
        for stage, data in {"train": {"mlflow_run_id": "", "eval_loss": 1.0},
                            "validate": {"pass_rate": 1.0, "evaluated": 27, "rows": 6400}}.items():
            (reports / stage).mkdir(parents=True, exist_ok=True)
            (reports / stage / "metrics.json").write_text(json.dumps(data))
        self.overrides = [
            f"paths.reports_dir={reports}", f"paths.validate_dir={reports / 'validate'}",
            f"base_model.output_dir={base}", f"train.adapter_dir={self.adapter}",
            f"tracking.uri={server_uri}", f"registry.model_name={model_name}", "evaluate.dtype=float32",
        ]
        self.params_file = root / "params.yaml"
        self.params_file.write_text((REPO / "params.yaml").read_text())

    def params(self, *extra: str):
        from pipelines.config.params import load_params

        return load_params(self.params_file, [*self.overrides, *extra])

    def set_evaluation(self, results: dict) -> None:
        (self.root / "reports" / "evaluate").mkdir(parents=True, exist_ok=True)
        (self.root / "reports" / "evaluate" / "results.json").write_text(json.dumps(results))

    def cli(self, command: str, *args: str) -> subprocess.CompletedProcess:
        sets = [x for o in self.overrides for x in ("--set", o)]
        return subprocess.run([sys.executable, "-m", "pipelines.cli", command, "--params", str(self.params_file),
                               *sets, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def register(ws: Workspace, results: dict) -> str:
    from pipelines.stages import register as register_stage

    ws.set_evaluation(results)
    params = ws.params()
    register_stage.main(params)
    return json.loads((ws.root / "reports/register/version.json").read_text())["version"]


TEST_TOKEN = "test-token-0123456789abcdef"
# vLLM engine settings for the tiny model on 2 cores: a small KV cache, few sequences
# the engine core in the API server process: ~20 s less per engine start on 2 cores (benchmarks/RESULTS.md)
TINY_ENGINE = ["serve.engine.kv_cache_gib=0.25", "serve.engine.max_num_seqs=8", "serve.engine.multiprocessing=false"]


class ServeProcess:
    """A real `llmops serve` process on a free loopback port, configured by --set overrides."""

    def __init__(self, ws: Workspace, log_dir: Path, *overrides: str, token: str = TEST_TOKEN) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws, self.token, self.log_dir = ws, token, log_dir
        self.overrides = [*ws.overrides, f"serve.port={self.port}",
                          f"inference_log.url=sqlite:///{log_dir / 'inference.db'}",
                          f"inference_log.spool_dir={log_dir / 'spool'}",
                          f"serve.engine.cache_dir={log_dir / 'models'}", *TINY_ENGINE, *overrides]
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        sets = [x for o in self.overrides for x in ("--set", o)]
        return [sys.executable, "-m", "pipelines.cli", "serve", "--params", str(self.ws.params_file), *sets]

    def start(self, timeout: float = 300) -> ServeProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.output = open(self.log_dir / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "LLMOPS_API_TOKEN": self.token}
        self.process = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=self.output,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"{self.url}/ready", timeout, self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"llmops serve did not start:\n{self.read_log()[-3000:]}") from None
        return self

    def read_log(self) -> str:
        return (self.log_dir / "serve.log").read_text(errors="replace")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def post(self, path: str, body: Any, **kwargs: Any) -> Any:
        import requests

        return requests.post(f"{self.url}{path}", json=body, headers=self.headers(), timeout=120, **kwargs)

    def stop(self) -> None:
        stop_process_group(self.process, 30)
        if getattr(self, "output", None):
            self.output.close()
