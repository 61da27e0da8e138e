"""Stage `quantize`: quantized variants of the registered candidate, through the same evidence.

Reads   `paths.reports_dir`/register/version.json (the version `register` created; its merged
        weights from the registry), `paths.reports_dir`/evaluate/results.json (the gate's
        primary metric and how many examples it judged), `paths.prepared_dir`/test.parquet,
        params `quantize`, `serve` (the engine's settings), `evaluate` (the same test selection,
        decoding, slices and bootstrap) and `cost` (the price table).
Writes  `quantize.output_dir`/<variant>/ (compressed-tensors weights + llmops_variant.json) for
        each variant vLLM serves on this machine's device; `paths.reports_dir`/quantize/results.json
        (every figure, per slice) and metrics.json (the headline for `dvc metrics show`). In the
        registry: the variants and results.json as artifacts `variants/` of the version's run,
        the evidence as tags `variant.<name>.*` / `variants.*`, a history event `quantized` (the
        model card gets the table). Nothing is written unless all of it succeeded.
Run     `llmops quantize` or `dvc repro quantize`. `quantize.variants: []` makes it a no-op
        (promote then keeps full precision).

The work (make, serve, answer, compare, price): pipelines/quantization/evaluation.py; which
variant serves is promote's choice (pipelines/quantization/choice.py, params promote.variant).
"""

from __future__ import annotations

import json
import logging

from pipelines.config.params import Params
from pipelines.io import atomic_path, atomic_write_json, atomic_write_text
from pipelines.quantization.evaluation import headline, register_variants, run

logger = logging.getLogger(__name__)


def main(params: Params) -> None:
    with atomic_path(params.quantize.output_dir) as out_dir:
        results = run(params, out_dir)
        register_variants(params, results, out_dir)
    atomic_write_text(params.paths.report("quantization_results"),
                      json.dumps(results, indent=2, default=float) + "\n")
    atomic_write_json(params.paths.metrics("quantize"), headline(results))
    for name, entry in results["variants"].items():
        c = entry["comparison"]
        logger.info("quantize: %s %s %+.4f [%+.4f, %+.4f] vs full precision; %.1f vs %.1f tokens/s", name,
                    c["metric"], c["improvement"], c["low"], c["high"], entry["serving"]["tokens_per_second"],
                    results["full"]["serving"]["tokens_per_second"])
    if not results["variants"]:
        logger.info("quantize: no variant made (%s)", results.get("note"))
