"""Stage `train`: LoRA fine-tuning of the base model on the prepared splits.

Reads   `base_model.output_dir` (the `base_model` stage's folder), `paths.prepared_dir`
        train/validation.parquet (prompt_text + completion_text; for dpo also `rejected`),
        params `train`, and the DeepSpeed config named by `train.deepspeed.config`.
Writes  `train.adapter_dir` (the LoRA adapter and tokenizer), `train.merged_dir` when
        `train.merge` is on, reports/train/metrics.json (final losses) and
        reports/train/{train_loss,eval_loss}.csv (per step, for `dvc plots show`); all
        appear whole or not at all. Checkpoints go to `train.checkpoint_dir` and are
        removed after a successful run. Each run is an MLflow run.
Run     `llmops train` or `dvc repro train`; with `train.deepspeed.num_processes: 2` the
        stage re-launches itself on 2 ranks through the `deepspeed` launcher.

`train.objective: dpo` trains on the preference pairs instead (rows with a `rejected` answer:
TRL's DPOTrainer, the base model as reference); too few pairs stop the run before any work.

The loss is computed on completion tokens only (prompt labels are -100). A killed run
resumes from its last complete checkpoint when started again with the same params and
data. Before publishing, the adapter is reloaded from disk and must reproduce the trained
model's loss (pipelines/model/adapter_gate.py); a NaN or infinite loss stops the run.
"""

from pipelines.training.loop import main

__all__ = ["main"]
