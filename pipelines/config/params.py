"""Typed parameters: params.yaml parsed into frozen pydantic models that validate themselves.

Every section of params.yaml maps to one model here. Loading rejects unknown keys and
out-of-range values with a one-line message that names the key (`prepare.test_fraction`),
what was wrong, and the allowed range or keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipelines.errors import ParamsError

DEFAULT_PARAMS = Path("params.yaml")

# What one run may change on top of the committed params.yaml: `llmops experiment start -S`,
# which every Airflow run goes through (the trigger form's fields and its free-form overrides).
# A key is overridable when it is listed or lies under a listed key. Hyperparameters and the
# choice of data only: everything else stays what the commit says, because it decides where
# secrets go or what counts as good enough, which the person who triggers a run must not change:
# - service endpoints and credentials (tracking.uri, deploy.service_url, serve.token_file, ...)
#   are deployment settings: the environment of the workers (pipelines/config/settings.py);
# - paths.* and every *_dir: the project's layout, which dvc.yaml reads too;
# - validate.*, evaluate.*, promote.*, registry.*, deploy.*: the checks and gates and their
#   evidence (skip the gate on purpose with the form's skip_gate: that is recorded as forced);
# - train.deepspeed.* (hostfile, master_addr: hosts to ssh to) and the other compute settings.
# docs/orchestration.md shows this list as a table (a test keeps the two equal).
RUN_OVERRIDABLE: tuple[str, ...] = (
    "base_model.source", "base_model.revision", "base_model.dtype", "base_model.licence",
    "ingest.sources",
    "prepare",
    "train.lora", "train.learning_rate", "train.lr_scheduler_type", "train.warmup_steps",
    "train.num_train_epochs", "train.max_steps", "train.per_device_train_batch_size",
    "train.per_device_eval_batch_size", "train.gradient_accumulation_steps", "train.max_length", "train.packing",
    "train.completion_only_loss", "train.seed", "train.precision", "train.activation_checkpointing",
    "train.qlora", "train.weight_decay", "train.max_grad_norm", "train.logging_steps", "train.eval_steps",
    "train.save_steps", "train.save_total_limit", "train.max_train_samples", "train.max_eval_samples",
    "train.merge", "train.objective", "train.dpo",
    # a plan over budget.per_run runs when a reason is given; the reason is recorded with the run
    # (like the form's skip_gate): the limit itself stays what the commit says
    "budget.override_reason",
)


def run_overridable(key: str) -> bool:
    """Whether one run may set the dotted `key` (RUN_OVERRIDABLE or below one of its entries)."""
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RUN_OVERRIDABLE)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    # Keys an earlier release used: {old name: (new name, a note on the value)}, so that a
    # params.yaml or an override written for it gets the new name in its error, not a list.
    _renamed: ClassVar[dict[str, tuple[str, str]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        # pydantic's own extra="forbid" error does not say which keys are allowed.
        if isinstance(data, dict):
            renamed = sorted(str(key) for key in data if key in cls._renamed and key not in cls.model_fields)
            if renamed:
                raise PydanticCustomError("renamed_key", "renamed key", {
                    "renamed": [(key, *cls._renamed[key]) for key in renamed]})
            allowed = {field.alias or name for name, field in cls.model_fields.items()}
            unknown = sorted(str(key) for key in data if key not in allowed and key not in cls.model_fields)
            if unknown:
                raise PydanticCustomError(
                    "unknown_key", "unknown key", {"unknown": unknown, "allowed": sorted(allowed)}
                )
        return data


class Paths(Section):
    sample_dir: Path = Path("data/sample")
    raw_dir: Path = Path("data/raw")
    ingested: Path = Path("data/ingested/pairs.parquet")
    validate_dir: Path = Path("reports/validate")
    prepared_dir: Path = Path("data/prepared")
    reports_dir: Path = Path("reports")
    # Files one stage writes and another reads, under reports_dir (the catalog: dvc.yaml names
    # them as ${paths.reports_dir}/${paths.<name>}, the code as paths.report("<name>")).
    evaluation_results: Path = Path("evaluate/results.json")
    evaluation_samples: Path = Path("evaluate/samples.csv")
    registered_version: Path = Path("register/version.json")
    quantization_results: Path = Path("quantize/results.json")
    promotion_decision: Path = Path("promote/decision.json")
    deployment_report: Path = Path("deploy/deployment.json")
    validation_result: Path = Path("result.json")  # under validate_dir: validate -> prepare, register
    # Reviewed production answers (`llmops review export`), one DVC-tracked Parquet file per writer;
    # a `review` source with no path reads this folder, and dvc.yaml makes it a dep of `ingest`.
    feedback_dir: Path = Path("data/feedback")

    def validation_file(self) -> Path:
        """validate's verdict, which prepare checks before it splits: <validate_dir>/<validation_result>."""
        return self.validate_dir / self.validation_result

    def metrics(self, stage: str) -> Path:
        """A stage's DVC metrics file: <reports_dir>/<stage>/metrics.json, by rule."""
        return self.reports_dir / stage / "metrics.json"

    def cost(self, stage: str) -> Path:
        """A stage's cost record: <reports_dir>/cost/<stage>.json, by rule (pipelines/accounting)."""
        return self.reports_dir / "cost" / f"{stage}.json"

    def report(self, name: str) -> Path:
        """A catalog file, e.g. report("evaluation_results") -> reports/evaluate/results.json."""
        return self.reports_dir / getattr(self, name)


class BaseModelParams(Section):
    source: str = Field("bundled:smollm2-135m-instruct", min_length=1)
    revision: str | None = None
    # stage `base_model`: where the plain transformers folder is written, in which dtype,
    # and the licence to record when the model card does not state one (SPDX id).
    output_dir: Path = Path("models/base")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    licence: str | None = None


class _SourceCommon(Section):
    prompt_field: str = "prompt"
    response_field: str = "response"
    id_field: str | None = None
    domain: str | None = None  # set on every row of this source when the data has no `domain`
    max_rows: int | None = Field(None, gt=0)


class BundledSource(_SourceCommon):
    kind: Literal["bundled"]
    name: Literal["wordnet", "foldoc"]


class FileSource(_SourceCommon):
    kind: Literal["file"]
    path: Path
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"


class HFSource(_SourceCommon):
    kind: Literal["hf"]
    name: str = Field(min_length=1)  # a hub dataset id, a local dataset folder, or a builder name
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    data_files: list[str] | None = None


class ReviewSource(_SourceCommon):
    """Answers people reviewed (`llmops review export`): every *.parquet file under a folder, with
    the `rejected` answer and the provenance columns (request_id, task_id, reviewer, reviewed_at,
    window) carried through ingest. An empty folder is zero rows, not an error: it fills over time."""

    kind: Literal["review"]
    path: Path | None = None  # a folder; null: paths.feedback_dir


Source = Annotated[BundledSource | FileSource | HFSource | ReviewSource, Field(discriminator="kind")]


class IngestParams(Section):
    sources: list[Source] = Field(min_length=1)


class ConflictingAnswersParams(Section):
    """Per split, what one prompt with two different answers does: block the run or warn."""

    train: Literal["block", "warn"] = "warn"
    validation: Literal["block", "warn"] = "warn"
    test: Literal["block", "warn"] = "block"  # contradictory references make every test metric wrong


class ValidateParams(Section):
    min_rows: int = Field(1000, ge=1)
    prompt_chars: tuple[int, int] = (8, 1000)
    response_chars: tuple[int, int] = (2, 2000)
    prompt_tokens: tuple[int, int] = (2, 256)
    response_tokens: tuple[int, int] = (1, 512)
    allowed_values: dict[str, list[str]] = Field(default_factory=dict)
    pii_columns: list[Literal["prompt", "response", "rejected"]] = ["prompt", "response"]
    warn_only: list[str] = Field(default_factory=list)
    conflicting_answers: ConflictingAnswersParams = ConflictingAnswersParams()

    @field_validator("prompt_chars", "response_chars", "prompt_tokens", "response_tokens")
    @classmethod
    def _check_bounds(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError("must be [min, max] with 0 <= min <= max")
        return value


class PrepareParams(Section):
    template: Literal["chat", "alpaca", "plain"] = "chat"
    system_prompt: str | None = None
    near_duplicate_threshold: float = Field(0.9, gt=0.0, le=1.0)
    validation_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    seed: int = Field(42, ge=0)


# The train section speaks the vocabulary of the libraries that do the work: peft's LoraConfig
# (lora.*), TRL's SFTConfig / transformers' TrainingArguments (the rest) and TRL's DPOConfig
# (dpo.*), with the same names and meanings, so their documentation is ours. Only what they
# lack is ours: the model folders, precision: auto, qlora, the sample caps, merge, the adapter
# gate's tolerance, the DeepSpeed launch, objective and dpo.min_pairs.
_PEFT = "the name peft's LoraConfig uses"
_TRL = "the name TRL's SFTConfig and transformers use"


class LoraParams(Section):
    _renamed = {"alpha": ("lora_alpha", _PEFT), "dropout": ("lora_dropout", _PEFT)}
    r: int = Field(8, gt=0, le=1024)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # names of the Linear layers to adapt (the last part of the module name, e.g. q_proj)
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)

    @field_validator("target_modules")
    @classmethod
    def _check_modules(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("module names must be non-empty, e.g. [q_proj, v_proj]")
        return value


class DeepSpeedParams(Section):
    # a ZeRO config file (configs/deepspeed/zero2.json, ...) or null for plain PyTorch
    config: Path | None = None
    # processes per node; > 1 (or a hostfile) re-launches the stage through `deepspeed`
    num_processes: int = Field(1, ge=1, le=1024)
    hostfile: Path | None = None  # "host slots=N" lines for multi-node runs
    master_addr: str | None = None  # defaults to 127.0.0.1, or the first hostfile host
    master_port: int = Field(29500, ge=1024, le=65535)


# TRL's DPOConfig loss types (trl 1.16); several combine with loss_weights (e.g. MPO).
DpoLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class DpoParams(Section):
    """train.objective: dpo: names and meanings of TRL's DPOConfig; min_pairs is ours."""

    beta: float = Field(0.1, gt=0.0)  # how far the policy may move from the reference (higher: less)
    loss_type: list[DpoLoss] = Field(["sigmoid"], min_length=1)  # a name or a list of names
    loss_weights: list[float] | None = None  # one weight per loss_type; null: 1.0 each
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # robust DPO: the chance a preference is flipped
    # fewer preference pairs (train rows with a `rejected` answer) stop the run before any work
    min_pairs: int = Field(16, ge=1)

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> DpoParams:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"train.dpo.loss_weights has {len(self.loss_weights)} weight(s) for "
                             f"{len(self.loss_type)} loss_type(s); give one weight per loss type, or null")
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise ValueError("train.dpo.loss_type exo_pair needs train.dpo.label_smoothing > 0 (the EXO paper: 1e-3)")
        return self


class TrackingParams(Section):
    # MLflow tracking (and registry) URI; null: env MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the
    # project root (the rule of every deployment setting: pipelines/config/settings.py)
    uri: str | None = None
    experiment: str = Field("llmops", min_length=1)
    system_metrics: bool = True
    system_metrics_interval: float = Field(5.0, gt=0)  # seconds between samples


class TrainParams(Section):
    _renamed = {
        "lr_scheduler": ("lr_scheduler_type", _TRL),
        "warmup_ratio": ("warmup_steps", f"{_TRL}; a value below 1 is a fraction of the steps"),
        "epochs": ("num_train_epochs", _TRL),
        "per_device_batch_size": ("per_device_train_batch_size", f"{_TRL}; evaluation has per_device_eval_batch_size"),
        "max_seq_length": ("max_length", _TRL),
        "gradient_checkpointing": ("activation_checkpointing", _TRL),
    }
    adapter_dir: Path = Path("models/adapter")
    merged_dir: Path = Path("models/merged")
    checkpoint_dir: Path = Path("models/checkpoints")  # kept between runs for resume
    lora: LoraParams = LoraParams()
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = "cosine"
    # as transformers reads it: a whole number of steps, or below 1 a fraction of the optimizer steps
    warmup_steps: float = Field(0, ge=0.0)
    num_train_epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(30, gt=0)  # demo-sized; null trains for `num_train_epochs`
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(128, ge=8)  # tokens per sequence; longer examples are cut from the right
    packing: bool = False  # TRL packing: examples share max_length sequences (no padding), attention kept apart
    completion_only_loss: bool = True  # loss on the completion only; false trains on the prompt too
    seed: int = Field(42, ge=0)
    # auto: bf16 on a CUDA GPU that has it (else fp16), fp32 on CPU (see training/loop.py resolve_precision)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool = False
    qlora: bool = False  # 4-bit base weights (bitsandbytes); needs a CUDA GPU
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    logging_steps: int = Field(1, ge=1)
    eval_steps: int = Field(10, ge=1)
    save_steps: int = Field(10, ge=1)  # a resumable checkpoint every N optimizer steps
    save_total_limit: int = Field(2, ge=2)  # >= 2: the previous checkpoint stays until the next is complete
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(64, gt=0)
    merge: bool = False  # also write base + adapter merged into one model (merge_and_unload)
    sanity_tolerance: float = Field(0.02, gt=0.0, le=1.0)  # relative loss difference allowed on reload
    deepspeed: DeepSpeedParams = DeepSpeedParams()
    # sft: TRL's SFTTrainer on every train row (prompt -> response); dpo: TRL's DPOTrainer on the
    # rows that have a `rejected` answer (response = chosen), the reference being the base model
    objective: Literal["sft", "dpo"] = "sft"
    dpo: DpoParams = DpoParams()

    @model_validator(mode="after")
    def _sft_only(self) -> TrainParams:
        if self.objective == "dpo":
            if self.packing:
                raise ValueError("train.packing is SFT only (TRL's DPOTrainer does not pack); "
                                 "set train.packing: false or train.objective: sft")
            if not self.completion_only_loss:
                raise ValueError("train.completion_only_loss: false is SFT only (DPO scores the answers alone); "
                                 "set it to true or train.objective: sft")
        return self

    @field_validator("warmup_steps")
    @classmethod
    def _whole_steps(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a whole number of steps, or a fraction of the steps below 1 (e.g. 0.1)")
        return value


class DecodingParams(Section):
    max_new_tokens: int = Field(48, ge=1, le=4096)
    do_sample: bool = False  # greedy by default: deterministic evaluation
    temperature: float = Field(1.0, gt=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=1.0, le=3.0)
    seed: int = Field(0, ge=0)


class ForgettingParams(Section):
    """The forgetting check (pipelines/evaluation/forgetting.py): an lm-eval-harness task outside the
    training domains, candidate vs base; null task: no check."""

    task: Path | None = Path("configs/lm_eval/llmops_general.yaml")
    limit: int | None = Field(None, gt=0)  # the first N questions; null: all
    batch_size: int = Field(16, ge=1, le=1024)


class EvaluateParams(Section):
    max_examples: int | None = Field(200, gt=0)  # a seeded subset of the test split (null: all of it)
    batch_size: int = Field(16, ge=1, le=1024)
    max_length: int = Field(512, ge=8)  # prompt + reference tokens scored for perplexity
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    decoding: DecodingParams = DecodingParams()
    # `agreement`: the answer metric that agreed most with the reviewers' A/B choices (the newest
    # version's `llmops review collect`; highest lower bound over min_agreement_tasks tasks or more),
    # else agreement_fallback
    primary_metric: Literal["rouge_l", "bleu", "exact_match", "normalised_match", "perplexity",
                            "semantic_similarity", "bertscore_f1", "agreement"] = "rouge_l"
    agreement_fallback: Literal["rouge_l", "bleu", "exact_match", "normalised_match", "perplexity",
                                "semantic_similarity", "bertscore_f1"] = "rouge_l"
    min_agreement_tasks: int = Field(20, ge=1)
    # Scores of meaning (pipelines/evaluation/semantic.py) with a local sentence encoder; null
    # encoder: the bundled all-MiniLM-L6-v2. bertscore_layer null: the encoder's last layer.
    semantic_metrics: list[Literal["semantic_similarity", "bertscore_f1"]] = ["semantic_similarity", "bertscore_f1"]
    encoder: str | None = None
    bertscore_layer: int | None = Field(None, ge=1)
    slices: list[str] = ["pos", "response_length"]  # test-split columns, or response_length (word buckets)
    length_buckets: list[int] = Field([5, 10, 20], min_length=1)
    min_slice_size: int = Field(10, ge=1)
    # Slice columns whose values the seeded max_examples sample tops up to min_slice_size rows when
    # the test split holds that many: a new domain that is a small share of the test split (the
    # reviewed `production` rows) is then evaluated and gated instead of falling below the size.
    top_up_slices: list[str] = ["domain"]
    bootstrap_samples: int = Field(1000, ge=50, le=100_000)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = Field(0, ge=0)
    sample_size: int = Field(20, ge=0)  # rows in the sample-generations table
    compare_champion: bool = True
    forgetting: ForgettingParams = ForgettingParams()

    @field_validator("length_buckets")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(value, value[1:])) or value[0] <= 0:
            raise ValueError("must be positive and strictly increasing, e.g. [5, 10, 20]")
        return value

    @model_validator(mode="after")
    def _primary_is_computed(self) -> EvaluateParams:
        for key in ("primary_metric", "agreement_fallback"):
            metric = getattr(self, key)
            if metric in ("semantic_similarity", "bertscore_f1") and metric not in self.semantic_metrics:
                raise ValueError(f"{key} {metric} is not computed: add it to evaluate.semantic_metrics or choose "
                                 f"another {key}")
        return self


class RegistryParams(Section):
    model_name: str = Field("llmops-dictionary", min_length=1, max_length=200)
    retries: int = Field(5, ge=1, le=20)  # attempts per registry call on transient errors
    retry_wait_seconds: float = Field(0.5, gt=0.0, le=60.0)  # first backoff; doubles per attempt
    lock_timeout_seconds: float = Field(120.0, gt=0.0)  # how long a promotion waits for another one
    lock_lease_seconds: float = Field(600.0, gt=0.0)  # after this a lock left by a dead process is taken over
    intended_use: str = ("Answer short dictionary-style definition questions in English. Not for advice, "
                         "facts beyond the training glossaries, or any safety-critical use.")
    data_licence: str = ("WordNet 3.0 licence (Princeton University); FOLDOC entries under the GNU FDL 1.1 or "
                         "later where the foldoc source is used")


    @field_validator("model_name")
    @classmethod
    def _mlflow_name(cls, value: str) -> str:
        if not value.strip() or "/" in value or ":" in value:
            raise ValueError("an MLflow registered model name must not be blank or contain '/' or ':'")
        return value


class VariantChoiceParams(Section):
    """Which of a version's quantized variants serves it (pipelines/quantization/choice.py)."""

    # cheapest: the variant that costs least per 1k generated tokens among those within the
    # tolerances and at least min_saving cheaper than full precision, else full precision;
    # full: always full precision; a variant's name: that one when within the tolerances
    choose: str = Field("cheapest", min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    # the lower bound of the paired-bootstrap CI of (variant - full precision) on the gate's primary
    # metric must be >= -tolerance, overall, and >= -slice_tolerance on every reported slice
    tolerance: float = Field(0.02, ge=0.0)
    slice_tolerance: float = Field(0.05, ge=0.0)
    # cost per 1k generated tokens at least this share below full precision's (measured in one run,
    # on the machine that ran `quantize`): a margin over run-to-run noise
    min_saving: float = Field(0.1, ge=0.0, lt=1.0)


class PromoteParams(Section):
    mode: Literal["auto", "manual"] = "auto"  # manual: the gate only recommends
    min_improvement: float = 0.0  # lower CI bound of (candidate - base) on the primary metric must exceed this
    champion_tolerance: float = Field(0.01, ge=0.0)  # allowed drop vs the champion on the primary metric
    slice_tolerance: float = Field(0.05, ge=0.0)  # allowed drop vs the champion on any slice
    # People's blind A/B review of the candidate (`llmops review request/collect`, docs/review.md):
    # off: not consulted; advisory: shown on the version and the model card, never blocks;
    # required: the gate passes only when collected reviews put the lower bound of the candidate's
    # win rate (ties count half) at or above min_win_rate_low, with at least min_reviews judgements.
    human_review: Literal["off", "advisory", "required"] = "off"
    min_win_rate_low: float = Field(0.5, ge=0.0, le=1.0)
    min_reviews: int = Field(20, ge=1)
    # the forgetting check (evaluate.forgetting): the largest accuracy drop vs the base model allowed
    # on the general-capability task; null: reported, never blocks
    max_forgetting: float | None = Field(0.05, ge=0.0, le=1.0)
    # which weights of the version serve (the stage `quantize` measured its variants)
    variant: VariantChoiceParams = VariantChoiceParams()

    @field_validator("human_review", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` (in params.yaml or `--set promote.human_review=off`) as false
        return "off" if value is False else value


class ReviewCandidateParams(Section):
    """What `llmops review request` sends for one candidate: a blind side-by-side task set."""

    test_prompts: int = Field(16, ge=0)  # prompts from the test split (seeded sample)
    production_prompts: int = Field(16, ge=0)  # recent prompts from the inference log (PII already redacted)
    production_days: float = Field(7.0, gt=0.0)  # how far back production prompts are taken from
    seed: int = 0  # the sample and the A/B order (the order is recorded per task)
    # how many people Label Studio hands each task to (two or more: their agreement can be measured)
    reviewers_per_task: int = Field(2, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)  # of the win rate's interval
    # required mode: how long the review DAG waits for min_reviews before it rejects the candidate
    deadline_hours: float = Field(48.0, gt=0.0)


class ReviewParams(Section):
    """Label Studio, the review tool (`llmops review serve`; docs/review.md)."""

    # null: env LLMOPS_REVIEW_URL, else http://127.0.0.1:<port> (the one `llmops review serve` starts)
    url: str | None = None
    port: int = Field(8081, ge=1, le=65535)
    # The virtualenv Label Studio runs from (its pins clash with ours: `make install` creates it)
    python: Path = Path(".venv-review/bin/python")
    data_dir: Path = Path("data/review/labelstudio")  # its SQLite database, media and token (git-ignored)
    candidate_project: str = Field("llmops candidate review", min_length=1)  # title prefix; + " v<version>"
    corrections_project: str = Field("llmops production corrections", min_length=1)
    candidate: ReviewCandidateParams = ReviewCandidateParams()


class InferenceLogParams(Section):
    # Where `llmops serve` records every request (SQLAlchemy URL), e.g. postgresql+psycopg2://user@host/db
    # for a team; `monitor` reads the same store. null: env LLMOPS_INFERENCE_LOG_URL, else
    # sqlite:///data/inference/inference.db (SQLite in WAL mode). See pipelines/config/settings.py.
    url: str | None = None
    # The write-ahead journal (JSONL, fsynced before an answer goes out) and where records wait while
    # the store is unreachable; one process at a time (locked: spool.lock), so one per gateway replica.
    spool_dir: Path = Path("data/inference/spool")
    redact_pii: bool = True  # mask e-mails, phones, IBANs, IPs, SSNs, card numbers and keys before storing
    flush_interval_seconds: float = Field(1.0, gt=0.0, le=60.0)  # retry period of the writer while the store is down
    batch_size: int = Field(256, ge=1, le=10000)  # records per fsync of the journal and per database transaction
    # While the store answers, the writer waits this long after a record reaches the (fsynced)
    # spool, so that one transaction takes the records of that moment: less CPU per request.
    store_delay_seconds: float = Field(0.25, ge=0.0, le=10.0)
    # How long an answer waits for its record to be on disk; past it (a hung disk) the answer goes
    # out anyway, the record is written when it can, and llmops_inference_log_late_total counts it.
    durable_wait_seconds: float = Field(5.0, gt=0.0, le=600.0)


class DvcRemoteParams(Section):
    # Where `dvc push` / `dvc pull` go once `llmops settings --configure-dvc` has run (pipelines/config/settings.py).
    # null: env LLMOPS_DVC_REMOTE, else the default remote .dvc/config names (the local .dvc-storage/).
    url: str | None = None  # e.g. s3://llmops-dvc/store
    endpoint_url: str | None = None  # an S3-compatible store such as MinIO; null: env LLMOPS_DVC_REMOTE_ENDPOINT


class ServeLimits(Section):
    max_body_bytes: int = Field(65536, ge=1024)
    max_prompt_tokens: int = Field(512, ge=1)
    max_tokens: int = Field(256, ge=1)  # a request asking for more gets 422
    default_max_tokens: int = Field(64, ge=1)
    max_temperature: float = Field(2.0, ge=0.0)  # larger values are clamped to this


class EngineParams(Section):
    """The vLLM engine `llmops serve` starts and supervises (pipelines/serving/engine.py)."""

    # The engine's interpreter (vLLM's own virtualenv): null: env LLMOPS_VLLM_PYTHON, else
    # .venv-vllm/bin/python in the project (made by `make install`).
    python: str | None = None
    # An engine started elsewhere (compose, Kubernetes): the gateway forwards to it and starts,
    # supervises and swaps nothing. null: env LLMOPS_VLLM_URL, else start one per version.
    url: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when nvidia-smi lists a GPU
    kv_cache_gib: float = Field(1.0, gt=0.0)  # KV-cache memory (CPU RAM or GPU memory)
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)  # cuda: instead of kv_cache_gib
    max_model_len: int | None = Field(None, ge=16)  # null: serve.limits (prompt + answer), within the model's
    max_num_seqs: int = Field(16, ge=1, le=1024)  # requests decoding together
    enforce_eager: bool = True  # no torch.compile: start-up 20-25 s instead of 60-90 s (benchmarks/RESULTS.md)
    # tokens per KV-cache block; prefix caching reuses whole blocks only. null: vLLM's default
    # (128 on CPU, 16 on GPU)
    block_size: int | None = Field(None, ge=1, le=1024)
    omp_threads_bind: str = "all"  # CPU: all (every core this process may use) | auto | a vLLM core list "0-7"
    # CPU: LD_PRELOAD tcmalloc and vLLM's Intel OpenMP, as vLLM's CPU guide says (benchmarks/RESULTS.md)
    cpu_preload: bool = True
    # false: the engine core runs in the API server's process (VLLM_ENABLE_V1_MULTIPROCESSING=0):
    # a faster start (tests, small machines), a lower throughput under load (benchmarks/RESULTS.md)
    multiprocessing: bool = True
    startup_timeout_seconds: float = Field(600.0, gt=0.0)
    # A new champion: blue_green starts its engine beside the old one and switches when it is
    # ready (memory and cores for two engines); stop_first drains and stops the old one, then
    # starts the new one while requests wait in the gateway; auto: blue_green on a GPU,
    # stop_first on a CPU, where a second engine bound to the same cores starved (docs/serving.md).
    swap: Literal["auto", "blue_green", "stop_first"] = "auto"
    restart_backoff_seconds: list[float] = Field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 30.0, 60.0])
    cache_dir: Path = Path("models/serving")  # the versions' merged weights, downloaded from the registry
    extra_args: list[str] = Field(default_factory=list)  # more `vllm serve` arguments, e.g. ["--seed", "1"]

    @field_validator("omp_threads_bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        if value not in ("all", "auto", "nobind") and not re.fullmatch(r"[0-9,\-|]+", value):
            raise ValueError(f"serve.engine.omp_threads_bind={value!r}: use all, auto, nobind or a core list "
                             "such as 0-7")
        return value

    @field_validator("restart_backoff_seconds")
    @classmethod
    def _backoff(cls, value: list[float]) -> list[float]:
        if not value or any(v < 0 for v in value):
            raise ValueError("serve.engine.restart_backoff_seconds: give one or more waits >= 0 (seconds)")
        return value


class ServeParams(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # What to serve: models:/<registry.model_name>@<alias> unless model_uri names one.
    alias: str = Field("champion", min_length=1)
    model_uri: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Bearer token: read from this environment variable, else from token_file; never from the repo.
    token_env: str = "LLMOPS_API_TOKEN"
    token_file: Path | None = None
    # Admission: up to engine.max_num_seqs requests decode, queue_size more wait in the engine;
    # beyond that 429 with Retry-After.
    queue_size: int = Field(64, ge=0)
    request_timeout_seconds: float = Field(120.0, gt=0.0)  # 504 after this
    # Client text holding the written-out form of a control token (<|im_start|>, <|endoftext|>, the
    # tokenizer's special and markup-like added tokens), which vLLM would parse as the real token:
    # reject (422) | escape (a zero-width space breaks it: plain text) | allow (the tokens act).
    special_tokens_in_content: Literal["reject", "escape", "allow"] = "reject"
    # A client `system` message: configured (refused with 422; the version's configured system prompt,
    # or none, is what the model gets, as in training and evaluation) | allow (it replaces the configured one).
    client_system_prompt: Literal["configured", "allow"] = "configured"
    poll_interval_seconds: float = Field(30.0, gt=0.0)  # how often the alias is checked for a new version
    # auto: the weights promote chose for the version (a quantized variant, tag serving.variant),
    # where this engine's device serves its scheme; full: always the full-precision merged weights
    variant: Literal["auto", "full"] = "auto"
    limits: ServeLimits = ServeLimits()
    engine: EngineParams = EngineParams()

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ServeParams:
        if self.limits.default_max_tokens > self.limits.max_tokens:
            raise ValueError(f"serve.limits.default_max_tokens ({self.limits.default_max_tokens}) must be <= "
                             f"serve.limits.max_tokens ({self.limits.max_tokens})")
        return self


class DeployParams(Section):
    # The running service to roll out to; null: env LLMOPS_SERVICE_URL; neither: only record the intent.
    service_url: str | None = None
    ready_timeout_seconds: float = Field(300.0, gt=0.0)
    canary_examples: int = Field(8, ge=1, le=1000)  # prompts from the test split sent after the switch
    canary_max_tokens: int = Field(48, ge=1)
    min_success_rate: float = Field(1.0, ge=0.0, le=1.0)  # share of canaries answered (HTTP 200, non-empty)
    min_rouge_l: float = Field(0.0, ge=0.0, le=1.0)  # mean ROUGE-L of the canary answers vs their references
    max_p95_latency_seconds: float = Field(30.0, gt=0.0)
    rollback_on_failure: bool = True


class DriftParams(Section):
    # Text descriptors compared between the reference and the window (Kolmogorov-Smirnov p-value).
    signals: list[Literal["prompt_length", "prompt_words", "prompt_oov", "prompt_non_letter", "response_length",
                          "response_words", "response_oov", "response_non_letter", "prompt_embedding"]] = [
        "prompt_length", "prompt_words", "prompt_oov", "prompt_non_letter", "response_length", "response_words",
        "prompt_embedding"]
    p_value: float = Field(0.01, gt=0.0, lt=1.0)  # a descriptor drifted when its K-S p-value is below this
    # Embedding drift: ROC AUC of a classifier telling reference from window prompts (0.5: alike).
    embedding_threshold: float = Field(0.65, gt=0.5, le=1.0)
    embedding_sample_size: int = Field(2000, ge=50)  # rows per side given to the classifier
    min_drifted_signals: int = Field(2, ge=1)  # the window counts as drifted from this many signals on


class OperationalParams(Section):
    max_p95_latency_ms: float = Field(10000.0, gt=0.0)
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)
    min_feedback_score: float = Field(0.5)  # mean feedback (1 = thumbs up) when any was given


class RetrainParams(Section):
    k: int = Field(2, ge=1)  # drift in k of the last n windows requests a retrain
    n: int = Field(3, ge=1)
    cooldown_hours: float = Field(72.0, ge=0.0)  # no new request this soon after the last one
    require_new_data: bool = True  # request only when enough new labelled rows exist
    min_new_rows: int = Field(500, ge=0)
    # Labelled data collected from production, in the `ingest` source format: {kind: review} for the
    # corrections people made in Label Studio (`llmops review export`), or the FOLDOC stream as a
    # stand-in; rows whose prompt the training data lacks count as new.
    new_data: Source | None = None

    @model_validator(mode="after")
    def _k_within_n(self) -> RetrainParams:
        if self.k > self.n:
            raise ValueError(f"monitor.retrain.k ({self.k}) must be <= monitor.retrain.n ({self.n})")
        return self


class MonitorParams(Section):
    window_hours: float = Field(24.0, gt=0.0)  # the window ends at the logical date given to `llmops monitor`
    reports_dir: Path = Path("reports/monitor")
    reference_size: int = Field(400, ge=20)  # training prompts sampled (seeded) as the reference
    reference_outputs: int = Field(64, ge=0)  # of which the champion answers this many (0: use training answers)
    min_rows: int = Field(30, ge=1)  # fewer requests in a window: "insufficient data", no drift verdict
    seed: int = 0
    embedding_cache: Path = Path("data/monitor/embeddings.npz")
    experiment: str = Field("llmops-monitoring", min_length=1)
    drift: DriftParams = DriftParams()
    operational: OperationalParams = OperationalParams()
    retrain: RetrainParams = RetrainParams()


class SearchDimension(Section):
    """One key of a sweep's search space, in Optuna's terms: float or int between low and high
    (log: sampled on a log scale; step: a grid), or one of `choices`."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("type categorical takes choices: [a, b, ...] (and no low/high)")
        else:
            if self.low is None or self.high is None or self.choices is not None:
                raise ValueError(f"type {self.type} takes low and high (and no choices)")
            if self.low > self.high:
                raise ValueError(f"low {self.low} is above high {self.high}")
            if self.log and (self.low <= 0 or self.step is not None):
                raise ValueError("log: true needs low > 0 and no step")
        return self


class QuantVariant(Section):
    """One quantized variant of a merged model (pipelines/quantization/variants.py)."""

    name: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    # w8a8-int8: int8 weights per output channel, int8 activations per token, quantized when they
    # come (no calibration data); w4a16: int4 weights per group of `group_size` input columns,
    # activations unquantized
    scheme: Literal["w8a8-int8", "w4a16"]
    group_size: int | None = Field(None, ge=2)  # w4a16: null quantizes per output channel
    ignore: list[str] = ["lm_head"]  # layers kept in full precision (llm-compressor's `ignore`)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in ("full", "cheapest"):
            raise ValueError(f"'{value}' is a word of promote.variant.choose; name the variant otherwise")
        return value

    @model_validator(mode="after")
    def _group_for_w4(self) -> QuantVariant:
        if self.scheme == "w8a8-int8" and self.group_size is not None:
            raise ValueError(f"quantize.variants[{self.name}]: group_size applies to w4a16 only")
        return self


class QuantizeParams(Section):
    """Quantized variants of the registered candidate, made with llm-compressor in its own virtualenv."""

    # llm-compressor's interpreter: null: env LLMOPS_QUANTIZE_PYTHON, else .venv-quantize/bin/python
    python: str | None = None
    output_dir: Path = Path("models/variants")
    variants: list[QuantVariant] = [QuantVariant(name="w8a8", scheme="w8a8-int8"),
                                    QuantVariant(name="w4a16", scheme="w4a16", group_size=64)]
    # requests in flight while each model answers the evaluated test prompts on vLLM (its
    # throughput is measured at this load); null: serve.engine.max_num_seqs
    concurrency: int | None = Field(None, ge=1)

    @field_validator("variants")
    @classmethod
    def _unique(cls, value: list[QuantVariant]) -> list[QuantVariant]:
        names = [variant.name for variant in value]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique (got {', '.join(names)})")
        return value


class MachinePrice(Section):
    """What one machine kind costs per hour: per core (CPU machines) or per GPU."""

    per_core_hour: float | None = Field(None, ge=0.0)
    per_gpu_hour: float | None = Field(None, ge=0.0)

    @model_validator(mode="after")
    def _one_unit(self) -> MachinePrice:
        if (self.per_core_hour is None) == (self.per_gpu_hour is None):
            raise ValueError("give exactly one of per_core_hour (CPU machines) or per_gpu_hour (GPU machines)")
        return self


class CostParams(Section):
    """Cost accounting (pipelines/accounting): what each stage and served token costs."""

    # This machine's row of `prices`; auto: `cpu` without a GPU, else the GPU's kind as
    # pipelines/accounting/cost.py names it from the device name (nvidia-h100, nvidia-h200, ...).
    machine: str = Field("auto", min_length=1)
    currency: str = Field("USD", min_length=1, max_length=8)
    prices: dict[str, MachinePrice] = Field(default_factory=lambda: {"cpu": MachinePrice(per_core_hour=0.045)})
    # `llmops serve`: generated tokens/s over this window price a served token (/metrics)
    throughput_window_seconds: float = Field(300.0, gt=0.0)


class BudgetParams(Section):
    """Spending limits, in cost.currency: checked before work starts (docs/training.md, "Cost and budget")."""

    per_run: float | None = Field(None, gt=0.0)  # one training run's estimated cost; null: no limit
    per_sweep: float | None = Field(None, gt=0.0)  # all trials of one `llmops sweep`; null: no limit
    # Run a plan over budget anyway: the reason is recorded (reports/cost/train.json, the MLflow run).
    override_reason: str | None = Field(None, min_length=3)


class SweepParams(Section):
    """`llmops sweep` (pipelines/commands/sweep.py): an Optuna study over run parameters, each
    trial a DVC experiment scored on the validation split."""

    study: str = Field("default", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # the study's database; null: env LLMOPS_SWEEP_STORAGE, else sqlite:///sweeps.db in the project
    storage: str | None = None
    trials: int = Field(8, ge=1, le=10_000)  # finished (complete or pruned) trials the study should hold
    # what the trials are compared by, on the validation split; null: the gate's primary metric
    # (evaluate.primary_metric; agreement: its fallback); eval_loss: training's own validation loss
    metric: Literal["rouge_l", "bleu", "exact_match", "normalised_match", "perplexity", "semantic_similarity",
                    "bertscore_f1", "eval_loss"] | None = None
    validation_examples: int = Field(64, ge=1)  # validation rows the objective scores (seeded sample)
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = Field(0, ge=0)
    pruner: Literal["median", "none"] = "median"
    pruner_startup_trials: int = Field(2, ge=0)  # trials that finish before any is pruned
    pruner_warmup_steps: int = Field(0, ge=0)  # training steps before a trial may be pruned
    enqueue_defaults: bool = True  # the first trial trains the committed params: the baseline to beat
    heartbeat_seconds: int = Field(60, ge=1)  # a trial silent for 2x this (a killed sweep) is failed and retried
    max_retries: int = Field(1, ge=0)
    max_consecutive_failures: int = Field(3, ge=1)  # then the sweep stops (a systematic error, not bad luck)
    space: dict[str, SearchDimension] = Field(default_factory=dict)

    @field_validator("space")
    @classmethod
    def _overridable(cls, value: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        refused = [key for key in value if not run_overridable(key)]
        if refused:
            raise ValueError(f"{', '.join(refused)} cannot be swept: a trial may set only the run parameters "
                             "docs/orchestration.md lists (train.*, prepare.*, ...)")
        return value


class Params(Section):
    paths: Paths = Paths()
    base_model: BaseModelParams = BaseModelParams()
    ingest: IngestParams
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    prepare: PrepareParams = PrepareParams()
    train: TrainParams = TrainParams()
    tracking: TrackingParams = TrackingParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    promote: PromoteParams = PromoteParams()
    review: ReviewParams = ReviewParams()
    inference_log: InferenceLogParams = InferenceLogParams()
    dvc_remote: DvcRemoteParams = DvcRemoteParams()
    serve: ServeParams = ServeParams()
    deploy: DeployParams = DeployParams()
    monitor: MonitorParams = MonitorParams()
    sweep: SweepParams = SweepParams()
    quantize: QuantizeParams = QuantizeParams()
    cost: CostParams = CostParams()
    budget: BudgetParams = BudgetParams()

    @model_validator(mode="after")
    def _chosen_variant_exists(self) -> Params:
        choose, names = self.promote.variant.choose, [v.name for v in self.quantize.variants]
        if choose not in ("cheapest", "full", *names):
            raise ValueError(f"promote.variant.choose: '{choose}' is none of cheapest, full or a variant of "
                             f"quantize.variants ({', '.join(names) or 'none'})")
        return self


def format_validation_error(error: ValidationError, origin: str) -> str:
    """One line per problem, naming the dotted key, e.g. `prepare.seed: ...`."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        shown = [p for p in loc if p not in ("bundled", "file", "hf", "review")]
        key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in shown).replace(".[", "[")
        if item["type"] == "renamed_key":
            for old, new, note in item["ctx"]["renamed"]:
                prefix = f"{key}." if key else ""
                lines.append(f"{origin}: '{prefix}{old}' is now '{prefix}{new}' ({note}); rename it")
        elif item["type"] == "unknown_key":
            ctx = item["ctx"]
            for name in ctx["unknown"]:
                dotted = f"{key}.{name}" if key else name
                lines.append(f"{origin}: unknown key '{dotted}' (allowed here: {', '.join(ctx['allowed'])})")
        elif item["type"] == "missing":
            lines.append(f"{origin}: missing required key '{key}'")
        else:
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "value_error" and isinstance(item.get("input"), dict):  # a check across keys
                lines.append(f"{origin}: {message}")
                continue
            got = repr(item.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            lines.append(f"{origin}: {key}: {message} (got {got})")
    return "; ".join(lines)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts (for --set overrides)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"--set {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_params(data: Any, origin: str = "params.yaml") -> Params:
    if not isinstance(data, dict):
        raise ParamsError(f"{origin}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise ParamsError(format_validation_error(error, origin)) from None


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read and validate params.yaml; `overrides` are `key.sub=value` strings (YAML values)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found; run from the project root or pass --params PATH")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ParamsError(f"--set {override!r}: expected KEY=VALUE, e.g. --set prepare.seed=7")
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    return parse_params(data, str(path))
