"""The data checks behind the stage `validate`: the Great Expectations suite built from params,
the derived token and split columns it runs on, and the report of what failed.

What the stage reads and writes, and how it is run: pipelines/stages/validate.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config.params import Paths, PrepareParams, ValidateParams
from pipelines.data.pii import PII_PATTERNS
from pipelines.data.sources import PROVENANCE, REVIEW_SOURCE, SCHEMA
from pipelines.data.splits import SPLITS, normalise_text, split_of
from pipelines.errors import ParamsError

if TYPE_CHECKING:
    import pandas as pd

TOKEN_COLUMNS = {"prompt": "n_prompt_tokens", "response": "n_response_tokens"}
# Derived for the conflicting-answers expectations (see pipelines/stages/validate.py).
SPLIT_COLUMN, ANSWERS_COLUMN = "split", "answers_per_prompt"
SUITE_NAME = "instruction_pairs"
# Reviewed rows (`source` REVIEW_SOURCE) must say where they came from. The monitor window is
# left out: only corrections of flagged production windows have one.
REVIEW_PROVENANCE = [column for column in PROVENANCE if column != "window"]
EXAMPLES_PER_FAILURE = 3


@dataclass(frozen=True)
class Check:
    """One expectation with the stable name params refer to."""

    name: str
    gx_type: str
    kwargs: dict[str, Any]
    blocking: bool = True


@dataclass
class Outcome:
    name: str
    expectation: str
    column: str | None
    blocking: bool
    success: bool
    unexpected_count: int | None = None
    observed_value: Any = None
    examples: list[dict[str, Any]] = field(default_factory=list)


def build_checks(params: ValidateParams) -> list[Check]:
    """The suite as data: name, GX expectation class name, its arguments and whether it blocks."""
    from great_expectations.expectations.row_conditions import Column

    checks = [
        Check("columns_match", "ExpectTableColumnsToMatchSet",
              {"column_set": SCHEMA + list(TOKEN_COLUMNS.values()) + [SPLIT_COLUMN, ANSWERS_COLUMN],
               "exact_match": True}),
        Check("row_count", "ExpectTableRowCountToBeBetween", {"min_value": params.min_rows}),
        Check("unique_ids", "ExpectColumnValuesToBeUnique", {"column": "id"}),
        Check("unique_pairs", "ExpectCompoundColumnsToBeUnique", {"column_list": ["prompt", "response"]}),
    ]
    for column in ("id", "prompt", "response", "source", "domain"):
        checks.append(Check(f"{column}_not_null", "ExpectColumnValuesToNotBeNull", {"column": column}))
    # The rejected answer of a preference pair: text, not blank, where there is one (null elsewhere).
    checks += [
        Check("rejected_is_text", "ExpectColumnValuesToBeOfType", {"column": "rejected", "type_": "str"}),
        Check("rejected_not_blank", "ExpectColumnValuesToNotMatchRegex", {"column": "rejected", "regex": r"^\s*$"}),
    ]
    for column in REVIEW_PROVENANCE:
        checks.append(Check(f"review_{column}_not_null", "ExpectColumnValuesToNotBeNull",
                            {"column": column, "row_condition": Column("source") == REVIEW_SOURCE}))
    for column in ("prompt", "response"):
        low, high = getattr(params, f"{column}_chars")
        tok_low, tok_high = getattr(params, f"{column}_tokens")
        checks += [
            Check(f"{column}_is_text", "ExpectColumnValuesToBeOfType", {"column": column, "type_": "str"}),
            Check(f"{column}_not_blank", "ExpectColumnValuesToNotMatchRegex", {"column": column, "regex": r"^\s*$"}),
            Check(f"{column}_chars", "ExpectColumnValueLengthsToBeBetween",
                  {"column": column, "min_value": low, "max_value": high}),
            Check(f"{column}_tokens", "ExpectColumnValuesToBeBetween",
                  {"column": TOKEN_COLUMNS[column], "min_value": tok_low, "max_value": tok_high}),
        ]
    for column, values in sorted(params.allowed_values.items()):
        checks.append(Check(f"{column}_allowed", "ExpectColumnValuesToBeInSet",
                            {"column": column, "value_set": list(values)}))
    for column in params.pii_columns:
        for kind, pattern in PII_PATTERNS.items():
            checks.append(Check(f"{column}_no_{kind}", "ExpectColumnValuesToNotMatchRegex",
                                {"column": column, "regex": pattern}))
    # GX 1.x has no expectation for "column A determines column B" on pandas data (its
    # UnexpectedRowsExpectation runs SQL only), hence the derived count column.
    policy = params.conflicting_answers
    for split_name in SPLITS:
        checks.append(Check(
            f"conflicting_answers_{split_name}", "ExpectColumnValuesToBeBetween",
            {"column": ANSWERS_COLUMN, "max_value": 1, "row_condition": Column(SPLIT_COLUMN) == split_name},
            blocking=getattr(policy, split_name) == "block",
        ))
    names = {check.name for check in checks}
    unknown = sorted(set(params.warn_only) - names)
    if unknown:
        raise ParamsError(
            f"validate.warn_only names unknown expectation(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(names))}"
        )
    for column in params.allowed_values:
        if column not in SCHEMA:
            raise ParamsError(f"validate.allowed_values: '{column}' is not a column; columns: {', '.join(SCHEMA)}")
    warn_only = set(params.warn_only)
    return [Check(c.name, c.gx_type, c.kwargs, c.blocking and c.name not in warn_only) for c in checks]


def prompt_key(prompt: object) -> str:
    """What counts as "the same prompt": the text with its whitespace collapsed (case and
    punctuation kept: FOLDOC's "GB" and "Gb" are different questions)."""
    return " ".join(prompt.split()) if isinstance(prompt, str) else ""


def add_split_columns(frame: pd.DataFrame, prepare: PrepareParams) -> pd.DataFrame:
    """A copy of `frame` with `split` (where `prepare` will put the row) and `answers_per_prompt`
    (how many different answers, after `prepare`'s normalisation, the row's prompt has)."""
    out = frame.copy()
    prompts = [prompt_key(p) for p in frame["prompt"]]
    answers = [normalise_text(r) if isinstance(r, str) else "" for r in frame["response"]]
    distinct: dict[str, set[str]] = {}
    for prompt, answer in zip(prompts, answers):
        distinct.setdefault(prompt, set()).add(answer)
    out[SPLIT_COLUMN] = [split_of(p, prepare.validation_fraction, prepare.test_fraction, prepare.seed)
                         if isinstance(p, str) else "train" for p in frame["prompt"]]
    out[ANSWERS_COLUMN] = [len(distinct[p]) for p in prompts]
    return out


def annotate(frame: pd.DataFrame, tokenizer: Any, prepare: PrepareParams) -> pd.DataFrame:
    """The frame the suite validates: the pairs plus the token and split columns."""
    return add_split_columns(count_tokens(frame, tokenizer), prepare)


def count_tokens(frame: pd.DataFrame, tokenizer: Any, batch_size: int = 2048) -> pd.DataFrame:
    """A copy of `frame` with n_prompt_tokens / n_response_tokens (0 for missing text)."""
    out = frame.copy()
    for column, target in TOKEN_COLUMNS.items():
        texts = [v if isinstance(v, str) else "" for v in frame[column]]
        lengths: list[int] = []
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start: start + batch_size], add_special_tokens=False)["input_ids"]
            lengths.extend(len(ids) for ids in encoded)
        out[target] = lengths
    return out


def _gx_context() -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # offline: no usage statistics calls
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX pins this module's logger at INFO on import; its one message is noise here.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def run_suite(frame: pd.DataFrame, params: ValidateParams, docs_dir: Path | None = None) -> tuple[list[Outcome], dict]:
    """Validate `frame` (with token columns); return outcomes and GX's result as a dict.

    When `docs_dir` is given, GX Data Docs for this run are rendered into it.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.checkpoint import UpdateDataDocsAction

    checks = build_checks(params)
    context = _gx_context()
    batch = context.data_sources.add_pandas("pairs").add_dataframe_asset("pairs")
    batch_definition = batch.add_batch_definition_whole_dataframe("all_rows")
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for check in checks:
        expectation_class = getattr(gxe, check.gx_type)
        suite.add_expectation(expectation_class(
            **check.kwargs, meta={"name": check.name, "blocking": check.blocking},
        ))
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="pairs", data=batch_definition, suite=suite)
    )
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site(site_name="llmops", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        actions.append(UpdateDataDocsAction(name="data_docs", site_names=["llmops"]))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="validate", validation_definitions=[definition], actions=actions,
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES_PER_FAILURE},
    ))
    checkpoint_result = checkpoint.run(batch_parameters={"dataframe": frame})
    result = next(iter(checkpoint_result.run_results.values())).to_json_dict()

    outcomes = []
    for item in result["results"]:
        config = item["expectation_config"]
        meta = config.get("meta") or {}
        details = item.get("result") or {}
        indices = details.get("partial_unexpected_index_list") or []
        examples = [_example_row(frame, index, config["kwargs"].get("column")) for index in indices]
        if item.get("exception_info", {}).get("raised_exception"):
            details = {"observed_value": item["exception_info"]["exception_message"]}
        outcomes.append(Outcome(
            name=meta.get("name", config["type"]),
            expectation=config["type"],
            column=config["kwargs"].get("column") or ",".join(config["kwargs"].get("column_list", [])) or None,
            blocking=bool(meta.get("blocking", True)),
            success=bool(item["success"]),
            unexpected_count=details.get("unexpected_count"),
            observed_value=details.get("observed_value"),
            examples=examples,
        ))
    return outcomes, result


def _example_row(frame: pd.DataFrame, index: Any, column: str | None) -> dict[str, Any]:
    row = frame.loc[index]
    example: dict[str, Any] = {"row": int(index), "id": row.get("id")}
    for name in dict.fromkeys([column, "prompt", "response"]):
        if name and name in row:
            value = row[name]
            example[name] = value[:120] + "..." if isinstance(value, str) and len(value) > 120 else value
    return example


_RUN_SPECIFIC_KEYS = {"id", "validation_id", "checkpoint_id", "run_id", "validation_time", "ge_load_time"}


def without_run_details(value: Any) -> Any:
    """GX's result minus ids and timestamps, so the same data and suite give the same file
    (and DVC skips `prepare` when only the validation run, not its verdict, changed)."""
    if isinstance(value, dict):
        return {k: without_run_details(v) for k, v in value.items() if k not in _RUN_SPECIFIC_KEYS}
    if isinstance(value, list):
        return [without_run_details(v) for v in value]
    return value


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    failed = [o for o in outcomes if not o.success]
    return {
        "evaluated": len(outcomes),
        "passed": len(outcomes) - len(failed),
        "pass_rate": round((len(outcomes) - len(failed)) / len(outcomes), 4) if outcomes else 0.0,
        "blocking_failures": sum(o.blocking for o in failed),
        "warnings": sum(not o.blocking for o in failed),
        "success": not any(o.blocking for o in failed),
    }


def format_report(outcomes: list[Outcome], rows: int, data_path: Path, paths: Paths) -> str:
    """The short report printed when validation fails (and logged as warnings otherwise)."""
    blocking = [o for o in outcomes if not o.success and o.blocking]
    lines = [f"validate: {len(blocking)} blocking expectation(s) failed on {data_path} ({rows} rows):"]
    for outcome in blocking:
        lines.append("  - " + describe_failure(outcome))
    # absolute: the line is read in Airflow's task log, far from the checkout
    lines.append(f"Full report: {paths.validate_dir.resolve() / 'data_docs' / 'index.html'} and "
                 f"{paths.validation_file().resolve()}")
    lines.append("Fix the source data, or list an expectation in validate.warn_only (params.yaml) "
                 "to make it a warning.")
    return "\n".join(lines)


def describe_failure(outcome: Outcome) -> str:
    where = f" on '{outcome.column}'" if outcome.column else ""
    if outcome.unexpected_count is not None:
        what = f"{outcome.unexpected_count} row(s)"
    else:
        what = f"observed {outcome.observed_value!r}"
    text = f"{outcome.name} ({outcome.expectation}{where}): {what}"
    if outcome.examples:
        shown = "; ".join(
            ", ".join(f"{k}={v!r}" for k, v in example.items() if k != "row") for example in outcome.examples
        )
        text += f", e.g. {shown}"
    return text


def list_checks(params: ValidateParams) -> str:
    """The suite, one expectation a line: name, block/warn, GX type, column (`llmops validate --list`)."""
    return "\n".join(
        f"{c.name:32} {'block' if c.blocking else 'warn '} {c.gx_type} {c.kwargs.get('column', '')}"
        for c in build_checks(params)
    )
