"""The artifact catalog: every file one stage writes and another reads is named once.

params.yaml `paths:` (the Paths model's defaults are the same values) is the one place; the code
asks `paths.report(name)` and dvc.yaml says `${paths.reports_dir}/${paths.<name>}`. A catalog
path written out again as a string in the code (docstrings and comments aside) or in dvc.yaml is
a second place that would drift.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from pipelines.config.params import Paths, load_params

REPO = Path(__file__).resolve().parents[2]


def code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module, without its docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def catalog() -> dict[str, str]:
    return {name: str(value) for name, value in yaml.safe_load((REPO / "params.yaml").read_text())["paths"].items()}


def test_params_yaml_and_the_model_name_the_same_catalog():
    assert catalog() == {name: str(value) for name, value in Paths().model_dump().items()}
    params = load_params(REPO / "params.yaml")
    assert params.paths.report("evaluation_results") == Path("reports/evaluate/results.json")


def test_no_catalog_path_is_written_out_twice():
    entries = catalog()
    # a one-word path ("reports") cannot be told apart from the same word used otherwise
    literals = {v for v in entries.values() if "/" in v} | {f"{entries['reports_dir']}/{v}" for k, v in entries.items()
                                        if k != "reports_dir" and not v.startswith(entries["reports_dir"])}
    found = []
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        if path == REPO / "pipelines/config/params.py":
            continue  # the model's defaults: the catalog itself
        found += [f"{path.relative_to(REPO)}:{line}: {text!r}" for line, text in code_strings(path)
                  if text in literals]
    dvc = (REPO / "dvc.yaml").read_text()
    found += [f"dvc.yaml: {literal!r}" for literal in sorted(literals)
              if any(literal in re.sub(r"\$\{[^}]*\}", "", line.split("#")[0]) for line in dvc.splitlines())]
    assert not found, "catalog paths written out again (use paths.report(...) or ${paths.*}):\n" + "\n".join(found)


def test_the_check_sees_a_written_out_path(tmp_path):
    module = tmp_path / "stage.py"
    module.write_text('"""Writes evaluate/results.json."""\nOUT = "evaluate/results.json"\n')
    assert code_strings(module) == [(2, "evaluate/results.json")]
