"""Benchmark: the `train` stage's training loop vs a hand-written PyTorch loop, MFU, 1 vs 2 DeepSpeed ranks.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_throughput.py \
        [--base-model models/base] [--batch-size 8] [--seq-len 128] [--warmup-steps 2] \
        [--steps 8] [--rounds 3] [--precision fp32|bf16] [--trl-loss] [--ds-steps 16] [--ds-rounds 2] [--skip-deepspeed]

1. Tokens/s of the stage's loop, in this process: `training_arguments` (TRL's SFTConfig),
   `load_model`, `add_lora`, `load_splits`, `build_trainer` (TRL's SFTTrainer, which
   tokenizes, masks and collates), `_trainer_class` and `_callbacks` of
   pipelines/training/loop.py with params.yaml's `train` section (only batch size, sequence length,
   max_steps, precision and the output folders overridden; outputs and the MLflow run, which gets the
   per-step metrics as in the stage, go to a temporary folder). Versus a minimal loop: the
   same base model + LoRA (same seeded init), the same micro-batches in the Trainer's order
   (recorded from TRL's collator), fp32, torch.optim.AdamW with the same lr and weight decay,
   forward (the model's own loss) + backward + step + zero_grad. With --precision bf16 the
   stage runs under CPU bf16 autocast (as train.precision: bf16 does) and the hand-written
   loop too, and the stage's final validation loss is printed for comparison with fp32.
   The machine is shared and noisy, so the two are
   interleaved step by step: hand-written step k runs on Trainer step k's micro-batch right
   after it (odd k) or right before it (even k), from a Trainer callback; its time (and that
   of the Trainer's evaluations and checkpoint saves) is subtracted from the Trainer's step
   intervals. A Trainer step is the interval between two step ends, so its data loading,
   logging and callbacks count. Each round is one Trainer run from freshly loaded models;
   the first `warmup-steps` steps of every round are not timed. Tokens are real
   (attention-mask) tokens.
2. MFU: the fp32 matmul peak of this machine (torch.matmul of two 4096x4096 fp32
   matrices, best of 3, measured before, between and after the rounds) against model FLOPs
   per real token = 2*N (forward of every Linear, LoRA included) + 2*N (gradients w.r.t.
   activations, needed through all layers because every layer holds LoRA) + 2*N_trainable
   (weight gradients of the LoRA matrices only) + causal attention 12*L*d_attn*(i+1) for
   the token at position i. N = all Linear weights incl. the (tied) lm_head, not the
   embedding lookup.
3. `llmops train` (the stage's own launch path through the `deepspeed` launcher) with
   configs/deepspeed/zero2.json on 1 and on 2 ranks, for the same number of examples;
   timed from the rank-0 progress log lines ("step N/M", one per optimizer step).

Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


# --- helpers ---------------------------------------------------------------------------------

def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class ForeignCpu:
    """CPU time used by other processes on the machine while a block runs (busy cores on average).

    From /proc/stat (all processes) minus this process and its waited-for children (os.times).
    """

    def __enter__(self) -> ForeignCpu:
        self.start = (self._busy(), self._own(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        busy, own, wall = self._busy(), self._own(), time.perf_counter()
        self.cores = max(0.0, (busy - self.start[0]) - (own - self.start[1])) / (wall - self.start[2])

    @staticmethod
    def _busy() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def matmul_peak(n: int, repeats: int = 3) -> float:
    """Best fp32 GFLOP/s of torch.matmul(n x n, n x n) over `repeats` (after one warm-up)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


@dataclass
class FlopModel:
    linear_params: int  # every nn.Linear weight (base + LoRA + lm_head)
    trainable: int
    layers: int
    attn_dim: int  # heads * head_dim

    def batch_flops(self, lengths: list[int]) -> float:
        tokens = sum(lengths)
        dense = (4 * self.linear_params + 2 * self.trainable) * tokens
        causal = sum(n * (n + 1) // 2 for n in lengths)  # sum over tokens of (position + 1)
        attention = 12 * self.layers * self.attn_dim * causal  # fwd 4*L*d*ctx, backward 2x forward
        return dense + attention


def flop_model(model) -> FlopModel:
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopModel(linear, trainable, config.num_hidden_layers, config.num_attention_heads * head_dim)


@dataclass
class Measure:
    tokens: int
    seconds: float
    flops: float
    padded_tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# --- part 1: the stage's Trainer vs a hand-written loop ---------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        from transformers import AutoTokenizer

        from pipelines.config.params import load_params
        from pipelines.training import loop as stage

        self.args = args
        self.tmp = tmp
        self.max_steps = args.warmup_steps + args.steps
        overrides = [
            f"base_model.output_dir={args.base_model}", f"paths.prepared_dir={args.data_dir}",
            f"train.per_device_train_batch_size={args.batch_size}", f"train.max_length={args.seq_len}",
            f"train.max_steps={self.max_steps}", "train.deepspeed.config=null", "train.deepspeed.num_processes=1",
            f"train.precision={args.precision}",
            f"train.adapter_dir={tmp}/adapter", f"train.merged_dir={tmp}/merged",
            f"train.checkpoint_dir={tmp}/checkpoints", f"paths.reports_dir={tmp}/reports",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        ]
        self.params = load_params(REPO / "params.yaml", overrides)
        self.plan = stage.plan(self.params)
        assert self.plan.precision == args.precision and not self.plan.cuda, self.plan
        self.autocast = None
        if args.precision == "bf16":
            import torch

            self.autocast = torch.bfloat16
        self.tokenizer = AutoTokenizer.from_pretrained(self.plan.base_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.frames, self.datasets = stage.load_splits(self.params)
        self.order: list[tuple[int, ...]] | None = None  # the Trainer's micro-batches (their input ids)
        self.flops: FlopModel | None = None
        self.stats: dict = {}
        self.eval_losses: list[float] = []

    def fresh_model(self):
        from transformers import set_seed

        from pipelines.training import loop as stage

        set_seed(self.params.train.seed)  # as run(): the LoRA init is seeded
        model = stage.add_lora(stage.load_model(self.plan.base_dir, self.params.train, self.plan.precision),
                               self.params.train)
        if self.flops is None:
            self.flops = flop_model(model)
        return model

    def measure(self, durations: list[float], batches: list[dict]) -> Measure:
        """Tokens, FLOPs and seconds of the timed steps (after the warm-up steps)."""
        w, m = self.args.warmup_steps, self.args.steps
        timed = batches[w:w + m]
        lengths = [int(n) for batch in timed for n in batch["attention_mask"].sum(dim=1)]
        padded = sum(batch["input_ids"].numel() for batch in timed)
        steps = durations[w:w + m]
        return Measure(sum(lengths), sum(steps), self.flops.batch_flops(lengths), padded, extra={"steps": steps})

    def run_round(self, round_no: int) -> tuple[Measure, Measure]:
        """One run of the stage's Trainer (built as pipelines.training.loop.run builds it), with the
        hand-written loop's steps interleaved: hand step k runs right after Trainer step k
        when k is odd and right before it when k is even, on the same micro-batch. The
        hand-written steps (and the Trainer's evaluations and checkpoint saves) are timed
        and subtracted from the Trainer's step intervals."""
        import contextlib

        import torch
        from transformers import TrainerCallback

        from pipelines.registry import tracking
        from pipelines.training import loop as stage

        train = self.params.train.model_copy(update={"checkpoint_dir": self.tmp / f"checkpoints-{round_no}"})
        params = self.params.model_copy(update={"train": train})
        args = stage.training_arguments(train, self.plan.cuda, self.plan.precision)
        seen: list[dict] = []  # the Trainer's training micro-batches, as TRL's collator made them
        evaluating = [False]
        step_ends: list[float] = []
        spans: list[tuple[str, float, float]] = []  # (hand | eval | save, start, end)
        hand_durations: dict[int, float] = {}

        # the minimal loop: same base model and LoRA (same seeded init), AdamW, same lr
        hand_model = self.fresh_model()
        hand_model.train()
        optimizer = torch.optim.AdamW([p for p in hand_model.parameters() if p.requires_grad],
                                      lr=train.learning_rate, weight_decay=train.weight_decay)
        autocast = self.autocast

        def hand_step(k: int) -> None:
            start = time.perf_counter()
            inputs = {key: value for key, value in seen[k - 1].items() if isinstance(value, torch.Tensor)}
            context = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
            with context:
                loss = hand_model(**inputs, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            hand_durations[k] = end - start
            spans.append(("hand", start, end))

        class Interleave(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                if (state.global_step + 1) % 2 == 0:  # step k = global_step + 1 is about to run
                    hand_step(state.global_step + 1)

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                step_ends.append(time.perf_counter())
                if state.global_step % 2 == 1:
                    hand_step(state.global_step)

        base = stage._trainer_class()
        base.autocast_dtype = autocast  # as run() sets them
        base.model_loss = not self.plan.cuda and not self.args.trl_loss

        class TimedTrainer(base):  # only adds clocks around evaluation and checkpoint saving
            def _evaluate(self, *a, **k):  # noqa: ANN002, ANN003
                start = time.perf_counter()
                evaluating[0] = True
                try:
                    return super()._evaluate(*a, **k)
                finally:
                    evaluating[0] = False
                    spans.append(("eval", start, time.perf_counter()))

            def _save_checkpoint(self, *a, **k):  # noqa: ANN002, ANN003
                start = time.perf_counter()
                try:
                    return super()._save_checkpoint(*a, **k)
                finally:
                    spans.append(("save", start, time.perf_counter()))

        model = self.fresh_model()
        tracking.start_run(self.params.tracking, run_name=f"bench-train-{round_no}")  # as run(): steps log to MLflow
        try:
            trainer, self.stats = stage.build_trainer(params, self.plan, model, self.tokenizer, self.frames,
                                                      self.datasets, args, [*stage._callbacks(train), Interleave()],
                                                      TimedTrainer)
            collate = trainer.data_collator
            self.mean_tokens = statistics.mean(len(ids) for ids in trainer.train_dataset["input_ids"])

            def recording_collator(features):  # TRL's collator, plus a record of the training batches
                batch = collate(features)
                if not evaluating[0]:
                    seen.append(dict(batch))
                return batch

            trainer.data_collator = recording_collator
            trainer.train()
            self.eval_losses.append([e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]
                                    if any("eval_loss" in e for e in trainer.state.log_history) else math.nan)
        finally:
            tracking.end_run("FINISHED")
        batches = seen[: self.max_steps]
        order = [tuple(batch["input_ids"].flatten().tolist()) for batch in batches]
        if self.order is None:
            self.order = order
        assert order == self.order, "the Trainer's data order changed between rounds"
        # Trainer step k: from the end of step k-1 to its own end (data, logging, callbacks
        # included), minus the hand-written step / evaluation / save that fell in between.
        stage_durations = [math.nan]
        for k in range(1, len(step_ends)):
            lo, hi = step_ends[k - 1], step_ends[k]
            other = sum(min(e, hi) - max(s, lo) for _, s, e in spans if e > lo and s < hi)
            stage_durations.append(hi - lo - other)
        stage_result = self.measure(stage_durations, batches)
        stage_result.extra.update(eval=[e - s for what, s, e in spans if what == "eval"],
                                  save=[e - s for what, s, e in spans if what == "save"],
                                  optim=type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
                                  fused=_fused(trainer.optimizer))
        hand_result = self.measure([hand_durations[k] for k in range(1, len(step_ends) + 1)], batches)
        del trainer, model
        hand_model = optimizer = None  # free them (a `del` of closure variables confuses linters)
        return stage_result, hand_result


def _fused(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = getattr(inner, "param_groups", [{}])
    return str(groups[0].get("fused"))


# --- part 3: DeepSpeed ranks through `llmops train` --------------------------------------------

_STEP_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*pipelines\.training\.loop: step (\d+)/(\d+) loss=")


def run_deepspeed(args: argparse.Namespace, tmp: Path, ranks: int, steps: int, tag: str) -> dict:
    """`llmops train` on `ranks` DeepSpeed ranks (ZeRO config args.ds_config); step timings from its log."""
    out = tmp / f"ds-{tag}"
    max_steps = args.warmup_steps + steps
    overrides = {
        "base_model.output_dir": args.base_model, "paths.prepared_dir": args.data_dir,
        "train.per_device_train_batch_size": args.batch_size, "train.max_length": args.seq_len,
        "train.max_steps": max_steps,
        # evaluation and checkpointing only at the end, after the timed steps
        "train.eval_steps": max_steps, "train.save_steps": max_steps,
        "train.deepspeed.config": args.ds_config, "train.deepspeed.num_processes": ranks,
        "train.deepspeed.master_port": args.master_port,
        "train.adapter_dir": out / "adapter", "train.merged_dir": out / "merged",
        "train.checkpoint_dir": out / "checkpoints", "paths.reports_dir": out / "reports",
        "tracking.uri": f"sqlite:///{out}/mlflow.db",
    }
    command = [str(Path(sys.executable).with_name("llmops")), "train"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (tmp / f"ds-{tag}.log").write_text(log, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"llmops train ({ranks} ranks) failed with code {proc.returncode}; log:\n{log[-4000:]}")
    stamps: dict[int, float] = {}
    for match in _STEP_LINE.finditer(log):
        stamps[int(match.group(2))] = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    w = args.warmup_steps
    seconds = stamps[max_steps] - stamps[w]
    examples = steps * args.batch_size * ranks
    return {"ranks": ranks, "steps": steps, "examples": examples, "seconds": seconds,
            "examples_per_s": examples / seconds, "wall": wall}


# --- main ------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="models/base", help="materialised base model folder")
    parser.add_argument("--data-dir", default="data/prepared", help="folder with train/validation.parquet")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at the start of every run")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round and loop")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Trainer runs, each with the hand-written loop interleaved")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: CPU autocast in the stage (train.precision: bf16) and the hand-written loop")
    parser.add_argument("--trl-loss", action="store_true",
                        help="stage with TRL's fused-LM-head loss (its GPU path), not the model's own")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--ds-config", default="configs/deepspeed/zero2.json")
    parser.add_argument("--ds-steps", type=int, default=16,
                        help="timed steps on 1 rank; 2 ranks run half as many (same examples)")
    parser.add_argument("--ds-rounds", type=int, default=2, help="runs per rank count, order 1,2,2,1,...")
    parser.add_argument("--master-port", type=int, default=29731)
    parser.add_argument("--skip-deepspeed", action="store_true")
    args = parser.parse_args()
    assert args.warmup_steps >= 1 and args.steps >= 1

    import logging
    import warnings

    import peft
    import torch
    import transformers
    import trl

    # quieter output (model loading, outside the timed steps); the timed work is unchanged
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)

    ds_version = "n/a"
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception:  # noqa: BLE001
        pass
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, trl {trl.__version__}, deepspeed {ds_version}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}; load average at start: {loadavg()}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still remove the temporary folder
    tmp = Path(tempfile.mkdtemp(prefix="train-bench-"))
    try:
        bench = Bench(args, tmp)
        t = bench.params.train
        print(f"train params: batch {t.per_device_train_batch_size}, max_length {t.max_length}, "
              f"precision {t.precision}, loss {'TRL fused LM head' if args.trl_loss else 'the model own'}, "
              f"lr {t.learning_rate}, "
              f"LoRA r={t.lora.r} lora_alpha={t.lora.lora_alpha} lora_dropout={t.lora.lora_dropout} on "
              f"{','.join(t.lora.target_modules)}, "
              f"max_grad_norm {t.max_grad_norm}, logging_steps {t.logging_steps}, eval/save every "
              f"{t.eval_steps}/{t.save_steps} steps, scheduler {t.lr_scheduler_type}; "
              f"{len(bench.frames['train'])} train rows")

        peaks = [matmul_peak(args.matmul_size)]
        stage_runs, hand_runs = [], []
        for r in range(args.rounds):
            with ForeignCpu() as others:
                stage_result, hand_result = bench.run_round(r)
            stage_runs.append(stage_result)
            hand_runs.append(hand_result)
            print(f"  round {r + 1}: stage {stage_result.tokens_per_s:.0f} tok/s, hand-written "
                  f"{hand_result.tokens_per_s:.0f} tok/s ({stage_result.tokens} tokens each); other processes "
                  f"used {others.cores:.2f} cores (load {loadavg()})", flush=True)
            print(f"    s/step, stage: {' '.join(f'{x:.2f}' for x in stage_result.extra['steps'])}; hand-written: "
                  f"{' '.join(f'{x:.2f}' for x in hand_result.extra['steps'])}", flush=True)
            peaks.append(matmul_peak(args.matmul_size))
        peak = max(peaks)

        fm = bench.flops
        med_stage = statistics.median(m.tokens_per_s for m in stage_runs)
        med_hand = statistics.median(m.tokens_per_s for m in hand_runs)
        ratios = [s.tokens_per_s / h.tokens_per_s for s, h in zip(stage_runs, hand_runs)]
        # the same micro-batch in the same round: hand-written step time / stage step time
        step_ratios = [h / s for sr, hr in zip(stage_runs, hand_runs)
                       for s, h in zip(sr.extra["steps"], hr.extra["steps"])]
        flops_per_token = stage_runs[0].flops / stage_runs[0].tokens
        pad_share = 1 - stage_runs[0].tokens / stage_runs[0].padded_tokens
        w, m = args.warmup_steps, args.steps
        print(f"\nPart 1-2: {args.rounds} rounds x {m} timed steps (after {w} warm-up) per variant, "
              f"batch {args.batch_size}, max {args.seq_len} tokens; {stage_runs[0].tokens} real tokens per "
              f"round ({pad_share:.0%} of the padded batch positions are padding)")
        print(f"model: {fm.linear_params:,} Linear weights, {fm.trainable:,} trainable (LoRA); "
              f"{flops_per_token / 1e6:.0f} MFLOP per real token (4N + 2N_trainable + causal attention)")
        print(f"fp32 matmul peak ({args.matmul_size}^2, best of 3 per measurement): best {peak:.0f} GFLOP/s "
              f"(median {statistics.median(peaks):.0f}); measurements {', '.join(f'{p:.0f}' for p in peaks)}")
        print("\n| loop | tokens/s per round | median tokens/s | median s/step | achieved GFLOP/s | MFU |")
        print("|---|---|---:|---:|---:|---:|")
        for name, runs, med in (("stage (TRL SFTTrainer, pipelines/training/loop.py)", stage_runs, med_stage),
                                ("hand-written PyTorch loop", hand_runs, med_hand)):
            gflops = med * flops_per_token / 1e9
            step_s = statistics.median(x.seconds / m for x in runs)
            print(f"| {name} | {', '.join(f'{x.tokens_per_s:.0f}' for x in runs)} | {med:.0f} | {step_s:.2f} | "
                  f"{gflops:.1f} | {gflops / peak:.1%} |")
        print(f"\nratio stage / hand-written: median of medians {med_stage / med_hand:.3f}; per round "
              f"{', '.join(f'{x:.3f}' for x in ratios)} (median {statistics.median(ratios):.3f}); "
              "per step, same micro-batch "
              f"and round: median {statistics.median(step_ratios):.3f} over {len(step_ratios)} pairs")
        evals = [x for s in stage_runs for x in s.extra["eval"]]
        saves = [x for s in stage_runs for x in s.extra["save"]]
        if evals or saves:
            evaluated = bench.stats["validation"]["examples"]
            print(f"outside the timed window, the stage's evaluation ({evaluated} examples) "
                  f"took median {statistics.median(evals) if evals else float('nan'):.2f} s and a checkpoint save "
                  f"{statistics.median(saves) if saves else float('nan'):.2f} s (each every "
                  f"{t.eval_steps}/{t.save_steps} steps)")
        print(f"stage's final validation loss per round ({args.precision}, after {bench.max_steps} steps): "
              f"{', '.join(f'{x:.4f}' for x in bench.eval_losses)}")
        print(f"Trainer optimizer: {stage_runs[0].extra['optim']} fused={stage_runs[0].extra['fused']}; "
              "hand-written: torch.optim.AdamW defaults")

        if not args.skip_deepspeed:
            half = max(1, args.ds_steps // 2)
            runs: dict[int, list[dict]] = {1: [], 2: []}
            sequence = []
            for r in range(args.ds_rounds):
                sequence += [1, 2] if r % 2 == 0 else [2, 1]
            for i, ranks in enumerate(sequence):
                with ForeignCpu() as others:
                    result = run_deepspeed(args, tmp, ranks, args.ds_steps if ranks == 1 else half, f"{ranks}r-{i}")
                runs[ranks].append(result)
                print(f"  deepspeed {ranks} rank(s): {result['examples']} examples in {result['seconds']:.2f} s = "
                      f"{result['examples_per_s']:.2f} ex/s (whole `llmops train` {result['wall']:.0f} s; other "
                      f"processes used {others.cores:.2f} cores; load {loadavg()})", flush=True)
            mean_tokens = bench.mean_tokens
            print(f"\nPart 3: `llmops train` with {args.ds_config}, {args.ds_steps} timed steps on 1 rank, {half} on 2 "
                  f"ranks (batch {args.batch_size} per rank), after {args.warmup_steps} warm-up steps; "
                  f"{args.ds_rounds} runs each")
            print("\n| ranks | OMP threads per rank | examples timed | examples/s per run | median examples/s | "
                  "~tokens/s | median s/step | whole run (s) |")
            print("|---:|---:|---:|---|---:|---:|---:|---:|")
            for ranks, results in runs.items():
                med = statistics.median(x["examples_per_s"] for x in results)
                step = statistics.median(x["seconds"] / x["steps"] for x in results)
                wall = statistics.median(x["wall"] for x in results)
                print(f"| {ranks} | {max(1, (os.cpu_count() or 1) // ranks)} | {results[0]['examples']} | "
                      f"{', '.join(format(x['examples_per_s'], '.2f') for x in results)} | {med:.2f} | "
                      f"{med * mean_tokens:.0f} | {step:.2f} | {wall:.0f} |")
            one = statistics.median(x["examples_per_s"] for x in runs[1])
            two = statistics.median(x["examples_per_s"] for x in runs[2])
            print(f"\n2 ranks / 1 rank: {two / one:.2f}x examples/s. For reference, part 1's in-process stage "
                  f"loop (no DeepSpeed): {med_stage / (stage_runs[0].tokens / (m * args.batch_size)):.2f} examples/s. "
                  f"~tokens/s = examples/s x {mean_tokens:.1f} (mean real tokens per train example)")
        print(f"\nload average at end: {loadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
