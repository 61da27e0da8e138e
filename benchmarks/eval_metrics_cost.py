"""Benchmark: what each evaluation metric costs per 100 examples, semantic vs lexical, and vs generation.

    python benchmarks/eval_metrics_cost.py [--samples reports/evaluate/samples.csv] [--examples 100] [--rounds 3]

Scores the answers of an evaluate run (samples.csv: reference and each system's answer, cycled to
`--examples` rows) with the harness's own code: ROUGE-L, corpus BLEU, normalised match
(pipelines/evaluation/metrics.py) and the semantic metrics (pipelines/evaluation/semantic.py,
the bundled all-MiniLM-L6-v2). The encoder's one-off load is timed apart. Each metric is timed
`--rounds` times side by side in one run (medians). With `--results` (results.json of the same
run) the cost is also put next to that run's generation time per 100 examples. With `--base`
(a base model folder, e.g. models/base) the forgetting check's lm-eval-harness run on the shipped
task is timed on that model too (one system; evaluate runs it for the candidate and the base).
Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=REPO / "reports/evaluate/samples.csv")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", type=Path, default=None)
    parser.add_argument("--task", type=Path, default=REPO / "configs/lm_eval/llmops_general.yaml")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from pipelines.evaluation.metrics import corpus_bleu, normalised_match, rouge_l
    from pipelines.evaluation.semantic import SEMANTIC_METRICS, SemanticScorer
    from pipelines.model.encoders import bundled_encoder_dir

    frame = pd.read_csv(args.samples).fillna("")
    frame = pd.concat([frame] * (args.examples // len(frame) + 1)).head(args.examples)
    answers, references = list(frame["candidate"].astype(str)), list(frame["reference"].astype(str))

    start = time.perf_counter()
    scorer = SemanticScorer(bundled_encoder_dir(), SEMANTIC_METRICS)
    scorer.score(answers[:2], references[:2])  # loads both models
    load = time.perf_counter() - start

    def fresh_semantic(name: str):
        def run() -> None:
            scorer._embeddings.clear()  # no reference embeddings carried over between rounds
            getattr(scorer, name)(answers, references)
        return run

    runs = {"rouge_l": lambda: rouge_l(answers, references), "bleu (corpus)": lambda: corpus_bleu(answers, references),
            "normalised_match": lambda: normalised_match(answers, references),
            **{name: fresh_semantic(name) for name in SEMANTIC_METRICS}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():  # interleaved: every metric sees the same machine state
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    per100 = {name: statistics.median(values) * 100 / args.examples for name, values in times.items()}

    generation = None
    if args.results:
        results = json.loads(args.results.read_text())
        system = results["systems"]["candidate"]
        generation = system["generation_seconds"] * 100 / results["examples"]

    print(f"Machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {args.examples} examples, {args.rounds} rounds")
    print(f"\nEncoder load (all-MiniLM-L6-v2 for SemScore and BERTScore, once per evaluate): {load:.1f} s\n")
    print("| metric | seconds per 100 examples (one system) | vs ROUGE-L |" +
          (" share of generating those answers |" if generation else ""))
    print("|---|---:|---:|" + ("---:|" if generation else ""))
    for name, seconds in per100.items():
        row = f"| {name} | {seconds:.3f} | {seconds / per100['rouge_l']:.1f}x |"
        if generation:
            row += f" {seconds / generation:.1%} |"
        print(row)
    if generation:
        print(f"\nGeneration of the candidate's answers in that run: {generation:.1f} s per 100 examples")
    if args.base:
        from pipelines.evaluation.forgetting import correct_per_question, load_task
        from pipelines.model.lm import CausalLM

        lm = CausalLM.load(args.base, dtype="float32", name="base")
        task = load_task(args.task)
        seconds = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            correct = correct_per_question(lm, task, limit=None, batch_size=16)
            seconds.append(time.perf_counter() - t0)
        per100 = statistics.median(seconds) * 100 / len(correct)
        print(f"\nForgetting check ({task['task']}, {len(correct)} questions, lm-eval-harness, {args.base}): "
              f"{statistics.median(seconds):.1f} s per system, {per100:.1f} s per 100 questions; accuracy "
              f"{correct.mean():.3f}")


if __name__ == "__main__":
    main()
