"""The artifact catalog: every file one stage writes and another reads is named once.

params.yaml is the one place (the params models' defaults are the same values). The files under
`paths:` are asked for as `paths.report(name)` in the code and `${paths.reports_dir}/${paths.<name>}`
in dvc.yaml; the folders and files kept in their own section (the model folders, serving's and
monitoring's files: SECTION_PATHS) as `params.<section>.<key>` and `${<section>.<key>}`. The
inference log's embedded default database is config/settings.py's DEFAULT_INFERENCE_LOG (params.yaml
leaves `inference_log.url` null). A catalog path written out again in a string of the code
(docstrings and comments aside; inside a message too) or in dvc.yaml is a second place that would drift.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from pipelines.config.params import Params, Paths, load_params
from pipelines.config.settings import DEFAULT_INFERENCE_LOG

REPO = Path(__file__).resolve().parents[2]
SECTION_PATHS = ("base_model.output_dir", "train.adapter_dir", "train.merged_dir", "train.checkpoint_dir",
                 "serve.engine.cache_dir", "inference_log.spool_dir", "monitor.reports_dir",
                 "monitor.embedding_cache")
# the one place each of these may be written as a value
DEFINITIONS = {"pipelines/config/params.py": None,  # the models' defaults: the catalog itself
               "pipelines/config/settings.py": DEFAULT_INFERENCE_LOG}


def code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module, without its docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def mentions(text: str, literal: str) -> bool:
    """`literal` as a path in `text` (alone, in a message or a URL, or with a sub-path after it)."""
    return re.search(rf"(?<![\w.-]){re.escape(literal)}(?![\w.-])", text) is not None


def catalog() -> dict[str, str]:
    return {name: str(value) for name, value in yaml.safe_load((REPO / "params.yaml").read_text())["paths"].items()}


def section_value(tree: dict | object, key: str) -> object:
    for part in key.split("."):
        tree = tree[part] if isinstance(tree, dict) else getattr(tree, part)
    return tree


def section_catalog() -> dict[str, str]:
    params_yaml = yaml.safe_load((REPO / "params.yaml").read_text())
    return {key: str(section_value(params_yaml, key)) for key in SECTION_PATHS}


def literals() -> set[str]:
    entries = catalog()
    # a one-word path ("reports") cannot be told apart from the same word used otherwise
    found = {v for v in entries.values() if "/" in v} | {f"{entries['reports_dir']}/{v}" for k, v in entries.items()
                                         if k != "reports_dir" and not v.startswith(entries["reports_dir"])}
    return found | set(section_catalog().values()) | {DEFAULT_INFERENCE_LOG.removeprefix("sqlite:///")}


def written_out(root: Path, literal_set: set[str]) -> list[str]:
    found = []
    for path in sorted((root / "pipelines").rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative in DEFINITIONS and DEFINITIONS[relative] is None:
            continue
        hits = [(line, text) for line, text in code_strings(path) if any(mentions(text, lit) for lit in literal_set)]
        if relative in DEFINITIONS:  # its one definition is the value itself
            definition = next((hit for hit in hits if hit[1] == DEFINITIONS[relative]), None)
            hits = [hit for hit in hits if hit is not definition]
        found += [f"{relative}:{line}: {text!r}" for line, text in hits]
    dvc = (root / "dvc.yaml").read_text()
    found += [f"dvc.yaml: {literal!r}" for literal in sorted(literal_set)
              if any(mentions(re.sub(r"\$\{[^}]*\}", "", line.split("#")[0]), literal) for line in dvc.splitlines())]
    return found


def test_params_yaml_and_the_model_name_the_same_catalog():
    assert catalog() == {name: str(value) for name, value in Paths().model_dump().items()}
    params = load_params(REPO / "params.yaml")
    assert params.paths.report("evaluation_results") == Path("reports/evaluate/results.json")


def test_params_yaml_and_the_models_name_the_same_section_paths():
    defaults = {key: str(section_value(Params.model_fields[key.split(".")[0]].default, key.split(".", 1)[1]))
                for key in SECTION_PATHS}
    assert section_catalog() == defaults
    assert DEFAULT_INFERENCE_LOG.startswith("sqlite:///")


def test_no_catalog_path_is_written_out_twice():
    found = written_out(REPO, literals())
    assert not found, ("catalog paths written out again (use paths.report(...), params.<section>.<key>, "
                       "DEFAULT_INFERENCE_LOG or ${...}):\n" + "\n".join(found))


def test_the_check_sees_a_written_out_path(tmp_path):
    module = tmp_path / "stage.py"
    module.write_text('"""Writes evaluate/results.json."""\nOUT = "evaluate/results.json"\n')
    assert code_strings(module) == [(2, "evaluate/results.json")]
    assert mentions("e.g. sqlite:///data/inference/inference.db or postgresql://", "data/inference/inference.db")
    assert mentions("models/serving/logs", "models/serving") and not mentions("models/serving2", "models/serving")


def test_the_check_fails_on_a_model_folder_written_out_again(tmp_path):
    """The rule bites: a copy of the repository whose code spells out train.adapter_dir is caught."""
    (tmp_path / "pipelines" / "config").mkdir(parents=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    outs:\n      - ${train.adapter_dir}\n")
    (tmp_path / "pipelines" / "config" / "settings.py").write_text(f"DEFAULT = {DEFAULT_INFERENCE_LOG!r}\n")
    assert written_out(tmp_path, literals()) == []
    (tmp_path / "pipelines" / "merge.py").write_text('ADAPTER = Path("models/adapter")\n')
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    outs:\n      - models/adapter\n")
    assert written_out(tmp_path, literals()) == ["pipelines/merge.py:1: 'models/adapter'", "dvc.yaml: 'models/adapter'"]
