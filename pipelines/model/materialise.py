"""The base model as a plain transformers folder: loaded (GGUF dequantized) from where
`base_model.source` says, saved with source.json (origin, licence, content hash); the work
behind the stage `base_model`.

What the stage reads and writes, and how it is run: pipelines/stages/base_model.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from pipelines.config.params import BaseModelParams
from pipelines.errors import LLMOpsError
from pipelines.io import atomic_path
from pipelines.model.sources import SOURCE_FILE, ResolvedSource, file_sha256, load_tokenizer, resolve

logger = logging.getLogger(__name__)

_LICENSE_LINE = re.compile(r"^licen[cs]e:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", re.MULTILINE)


def folder_hashes(folder: Path, exclude: tuple[str, ...] = (SOURCE_FILE,)) -> dict[str, str]:
    """sha256 of every file under `folder` (relative POSIX path -> hex digest), sorted."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in exclude)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def content_hash(hashes: dict[str, str]) -> str:
    """One digest for a folder: sha256 over the sorted `path  sha256` lines."""
    lines = "".join(f"{name}  {digest}\n" for name, digest in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def licence_from_card(text: str) -> str | None:
    """The `license:` of a model card's YAML front matter, if any."""
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    match = _LICENSE_LINE.search(front)
    return match.group(1).strip() if match else None


def find_licence(resolved: ResolvedSource, declared: str | None) -> str:
    if declared:
        return declared
    if resolved.licence:
        return resolved.licence
    card: Path | None = None
    if resolved.kind == "local":
        card = Path(resolved.location) / "README.md"
    elif resolved.kind == "hub":
        try:
            from huggingface_hub import hf_hub_download

            card = Path(hf_hub_download(resolved.location, "README.md", revision=resolved.revision))
        except Exception as error:  # noqa: BLE001 - a missing card only means an unknown licence
            logger.debug("no model card for %s: %s", resolved.location, error)
    if card is not None and card.is_file():
        found = licence_from_card(card.read_text(encoding="utf-8", errors="replace"))
        if found:
            return found
    logger.warning("base_model: no licence found for %s; set base_model.licence (an SPDX id) to record it",
                   resolved.location)
    return "unknown"


def _check_local(resolved: ResolvedSource, source: str) -> None:
    if resolved.kind == "local" and not (Path(resolved.location) / "config.json").is_file():
        raise LLMOpsError(
            f"base_model.source: '{source}' has no config.json; give a folder saved with save_pretrained "
            "(config.json, tokenizer files, *.safetensors), a hub id, or bundled:smollm2-135m-instruct"
        )


def load_plain_model(resolved: ResolvedSource, dtype: str) -> Any:
    """Load the model (dequantizing GGUF) into a model built from its config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    kwargs = resolved.from_pretrained_kwargs()
    try:
        config = AutoConfig.from_pretrained(resolved.location, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(resolved.location, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        hint = (" (no network? set HF_HUB_OFFLINE=1 and use a local folder or bundled:smollm2-135m-instruct)"
                if resolved.kind == "hub" else "")
        raise LLMOpsError(
            f"base_model.source: cannot load a causal LM from '{resolved.location}': "
            f"{str(error).splitlines()[0]}{hint}"
        ) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    return model


def materialise(params: BaseModelParams, output_dir: Path) -> dict[str, Any]:
    """Write the plain transformers folder and its source.json; return the source record."""
    import transformers

    resolved = resolve(params.source, params.revision)
    _check_local(resolved, params.source)
    licence = find_licence(resolved, params.licence)
    logger.info("base_model: loading %s (%s)", resolved.location, resolved.kind)
    model = load_plain_model(resolved, params.dtype)
    tokenizer = load_tokenizer(params.source, params.revision)
    source_file = Path(resolved.location) / resolved.gguf_file if resolved.gguf_file else None

    with atomic_path(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        hashes = folder_hashes(tmp)
        record = {
            "source": params.source,
            "kind": resolved.kind,
            "upstream": resolved.upstream,
            "revision": params.revision,
            "gguf_file": resolved.gguf_file,
            "source_sha256": file_sha256(source_file) if source_file else None,
            "licence": licence,
            "architecture": model.config.architectures[0] if model.config.architectures else type(model).__name__,
            "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
            "dtype": params.dtype,
            "content_sha256": content_hash(hashes),
            "files": hashes,
            "transformers_version": transformers.__version__,
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("base_model: wrote %s (%s parameters, licence %s, sha256 %s)", output_dir,
                f"{record['parameters']:,}", licence, record["content_sha256"][:12])
    return record
