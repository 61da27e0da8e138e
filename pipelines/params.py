"""Typed parameters: params.yaml parsed into frozen pydantic models that validate themselves.

Every section of params.yaml maps to one model here. Loading rejects unknown keys and
out-of-range values with a one-line message that names the key (`prepare.test_fraction`),
what was wrong, and the allowed range or keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipelines.errors import ParamsError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        # pydantic's own extra="forbid" error does not say which keys are allowed.
        if isinstance(data, dict):
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

    def metrics(self, stage: str) -> Path:
        return self.reports_dir / stage / "metrics.json"


class BaseModelParams(Section):
    source: str = Field("bundled:smollm2-135m-instruct", min_length=1)
    revision: str | None = None


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


Source = Annotated[BundledSource | FileSource | HFSource, Field(discriminator="kind")]


class IngestParams(Section):
    sources: list[Source] = Field(min_length=1)


class ValidateParams(Section):
    min_rows: int = Field(1000, ge=1)
    prompt_chars: tuple[int, int] = (8, 1000)
    response_chars: tuple[int, int] = (2, 2000)
    prompt_tokens: tuple[int, int] = (2, 256)
    response_tokens: tuple[int, int] = (1, 512)
    allowed_values: dict[str, list[str]] = Field(default_factory=dict)
    pii_columns: list[Literal["prompt", "response"]] = ["prompt", "response"]
    warn_only: list[str] = Field(default_factory=list)

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


class Params(Section):
    paths: Paths = Paths()
    base_model: BaseModelParams = BaseModelParams()
    ingest: IngestParams
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    prepare: PrepareParams = PrepareParams()


def format_validation_error(error: ValidationError, origin: str) -> str:
    """One line per problem, naming the dotted key, e.g. `prepare.seed: ...`."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        shown = [p for p in loc if p not in ("bundled", "file", "hf")]
        key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in shown).replace(".[", "[")
        if item["type"] == "unknown_key":
            ctx = item["ctx"]
            for name in ctx["unknown"]:
                dotted = f"{key}.{name}" if key else name
                lines.append(f"{origin}: unknown key '{dotted}' (allowed here: {', '.join(ctx['allowed'])})")
        elif item["type"] == "missing":
            lines.append(f"{origin}: missing required key '{key}'")
        else:
            message = item["msg"].removeprefix("Value error, ")
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
