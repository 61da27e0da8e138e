"""Semantic metrics: how close an answer's meaning is to the reference's, per example.

- `semantic_similarity`: cosine similarity of the answer's and the reference's sentence
  embeddings (the SemScore method, Aynetdinov & Akbik 2024), with sentence-transformers.
- `bertscore_f1`: BERTScore F1 (Zhang et al. 2020, the `bert-score` package): greedy matching of
  the two texts' token embeddings from one layer of the encoder.

Both use a local encoder (`evaluate.encoder`; default the bundled all-MiniLM-L6-v2, so they run
offline). Lexical metrics give no credit to a correct definition in other words ("a feline kept
as a pet" vs "a small domesticated cat"); these do. They are per-example scores, so the harness
gives them the same paired-bootstrap intervals and slices as ROUGE-L.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.model.encoders import encoder_layers

logger = logging.getLogger(__name__)

SEMANTIC_METRICS = ("semantic_similarity", "bertscore_f1")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SemanticScorer:
    """Loads the encoder once per evaluation; scores many systems' answers against one set of references."""

    def __init__(self, folder: Path, metrics: Sequence[str], *, bertscore_layer: int | None = None,
                 batch_size: int = 64) -> None:
        unknown = set(metrics) - set(SEMANTIC_METRICS)
        if unknown:
            raise ValueError(f"unknown semantic metrics: {sorted(unknown)}")
        self.folder, self.metrics, self.batch_size = Path(folder), list(metrics), batch_size
        self.layer = bertscore_layer or encoder_layers(self.folder)
        self._sentence: Any = None
        self._bertscore: Any = None
        self._embeddings: dict[str, np.ndarray] = {}  # the references are embedded once for all systems

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._sentence is None:
            from sentence_transformers import SentenceTransformer

            self._sentence = SentenceTransformer(str(self.folder), device=_device())
        missing = list(dict.fromkeys(t for t in texts if t not in self._embeddings))
        if missing:
            vectors = self._sentence.encode(missing, batch_size=self.batch_size, convert_to_numpy=True,
                                            normalize_embeddings=True, show_progress_bar=False)
            self._embeddings.update(zip(missing, vectors.astype(np.float32)))
        return np.stack([self._embeddings[t] for t in texts])

    def semantic_similarity(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        scores = np.zeros(len(predictions))
        keep = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
        if keep:
            a = self._embed([predictions[i].strip() for i in keep])
            b = self._embed([references[i].strip() for i in keep])
            scores[keep] = np.clip((a * b).sum(axis=1), -1.0, 1.0)
        return scores

    def bertscore_f1(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        # An empty answer scores 0 (it says nothing). bert-score 0.3.13 cannot take one anyway: it
        # encodes "" with tokenizer.build_inputs_with_special_tokens, which transformers 5 removed.
        scores = np.zeros(len(predictions))
        keep = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
        if not keep:
            return scores
        if self._bertscore is None:
            from bert_score import BERTScorer

            # model_type is the local folder: bert-score loads it with AutoModel/AutoTokenizer. It
            # has no recommended layer for it, so num_layers is given (default: the last layer,
            # the one all-MiniLM-L6-v2 was trained to pool). No idf weights, no baseline rescaling
            # (both need a corpus or a file fetched from the hub): raw F1, comparable across runs
            # with the same encoder and layer.
            self._bertscore = BERTScorer(model_type=str(self.folder), num_layers=self.layer, idf=False,
                                         batch_size=self.batch_size, device=_device(), lang=None)
        _, _, f1 = self._bertscore.score([predictions[i].strip() for i in keep],
                                         [references[i].strip() for i in keep], verbose=False)
        scores[keep] = f1.cpu().numpy()
        return scores

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
        if len(predictions) != len(references):
            raise ValueError("predictions and references differ in length")
        return {name: getattr(self, name)(predictions, references) for name in self.metrics}
