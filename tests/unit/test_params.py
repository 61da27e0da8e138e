"""params.yaml parsing: the shipped file is valid; bad keys and values get clear messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipelines.config.params import BundledSource, FileSource, load_params, parse_params
from pipelines.errors import ParamsError

REPO = Path(__file__).resolve().parents[2]


def shipped() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_shipped_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.prepare.template == "chat"
    assert isinstance(params.ingest.sources[0], BundledSource)
    assert params.paths.metrics("prepare") == Path("reports/prepare/metrics.json")


def test_unknown_key_is_named_with_the_allowed_keys():
    data = shipped()
    data["prepare"]["sed"] = 7
    with pytest.raises(ParamsError) as error:
        parse_params(data)
    message = str(error.value)
    assert "unknown key 'prepare.sed'" in message
    assert "seed" in message and "test_fraction" in message


def test_unknown_top_level_section():
    data = shipped()
    data["trian"] = {}
    with pytest.raises(ParamsError, match="unknown key 'trian'"):
        parse_params(data)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("prepare.test_fraction", 0.7, "prepare.test_fraction: Input should be less than 0.5 (got 0.7)"),
        ("prepare.near_duplicate_threshold", 0, "prepare.near_duplicate_threshold: Input should be greater than 0"),
        ("validate.min_rows", 0, "validate.min_rows: Input should be greater than or equal to 1"),
        ("validate.prompt_chars", [10, 5], "validate.prompt_chars: must be [min, max] with 0 <= min <= max"),
        ("prepare.template", "llama", "prepare.template: Input should be 'chat', 'alpaca' or 'plain'"),
    ],
)
def test_out_of_range_values_name_the_key(key, value, expected):
    section, name = key.split(".")
    data = shipped()
    data[section][name] = value
    with pytest.raises(ParamsError) as error:
        parse_params(data)
    assert expected in str(error.value)


def test_source_kinds_are_checked():
    data = shipped()
    data["ingest"]["sources"] = [{"kind": "file"}]
    with pytest.raises(ParamsError, match=r"missing required key 'ingest.sources\[0\].path'"):
        parse_params(data)
    data["ingest"]["sources"] = [{"kind": "file", "path": "x.jsonl", "pth": 1}]
    with pytest.raises(ParamsError, match=r"unknown key 'ingest.sources\[0\].pth'"):
        parse_params(data)
    data["ingest"]["sources"] = [{"kind": "ftp"}]
    with pytest.raises(ParamsError, match="ingest.sources"):
        parse_params(data)


def test_params_are_frozen():
    params = load_params(REPO / "params.yaml")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        params.prepare.seed = 1  # type: ignore[misc]


def test_overrides(tmp_path):
    params = load_params(REPO / "params.yaml", ["prepare.seed=7", "ingest.sources=[{kind: file, path: a.csv}]"])
    assert params.prepare.seed == 7
    assert isinstance(params.ingest.sources[0], FileSource)
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        load_params(REPO / "params.yaml", ["prepare.seed"])
    with pytest.raises(ParamsError, match="prepare.seed: Input should be greater than or equal to 0"):
        load_params(REPO / "params.yaml", ["prepare.seed=-1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


# --- what one run may override (pipelines/registry/experiments.py enforces it) ---------------------

def _model_has(model: type, dotted: str) -> bool:
    """Whether the Params model has the dotted key (sections are nested pydantic models)."""
    from pydantic import BaseModel

    node: type | None = model
    for part in dotted.split("."):
        if node is None:
            return False  # a key below a plain value
        fields = {(f.alias or name): f for name, f in node.model_fields.items()}
        if part not in fields:
            return False
        annotation = fields[part].annotation
        node = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return True


def test_every_run_overridable_key_exists_and_none_is_a_deployment_setting_or_a_path():
    from pipelines.config.params import RUN_OVERRIDABLE, Params, run_overridable
    from pipelines.config.settings import DEPLOYMENT_SETTINGS

    assert all(_model_has(Params, key) for key in RUN_OVERRIDABLE), RUN_OVERRIDABLE
    assert not any(run_overridable(key) for key in DEPLOYMENT_SETTINGS)
    for refused in ("paths.raw_dir", "train.adapter_dir", "train.checkpoint_dir", "base_model.output_dir",
                    "promote.min_improvement", "validate.warn_only", "evaluate.max_examples",
                    "train.deepspeed.hostfile", "train", "trainer.lora"):
        assert not run_overridable(refused), refused
    assert run_overridable("train.lora.r") and run_overridable("prepare.seed")


def test_docs_table_lists_exactly_the_run_overridable_keys():
    import re

    from pipelines.config.params import RUN_OVERRIDABLE

    text = (REPO / "docs" / "orchestration.md").read_text()
    section = text.split("## What a run may override", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z_.]+)` \|", section, flags=re.MULTILINE)
    assert listed == list(RUN_OVERRIDABLE)


@pytest.mark.parametrize(("variants", "message"), [
    ([{"name": "a", "scheme": "w8a8-int8", "group_size": 64}], "group_size applies to w4a16 only"),
    ([{"name": "a", "scheme": "w8a8-int8"}, {"name": "a", "scheme": "w4a16"}], "variant names must be unique"),
    ([{"name": "A b", "scheme": "w4a16"}], "quantize.variants[0].name"),
    ([{"name": "a", "scheme": "fp4"}], "quantize.variants[0].scheme"),
])
def test_quantized_variants_are_checked(variants, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params({"ingest": {"sources": [{"kind": "bundled", "name": "wordnet"}]},
                      "quantize": {"variants": variants}})
