"""dvc.yaml's code dependencies are complete: `dvc repro` reruns a stage whenever code it runs changed.

Each stage's module (pipelines/stages/<stage>.py) and every project module it imports, directly
or through others (found by grimp, the import graph import-linter checks), must be covered by one
of the stage's `deps`: the module's file or a folder above it. The CLI entry point every stage
runs through (`llmops <stage>`: pipelines/cli.py) is shared by all and listed by none.
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
SHARED = {"pipelines", "pipelines.cli"}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("pipelines", cache_dir=None)


def module_file(module: str) -> str:
    path = Path(*module.split("."))
    return str(path / "__init__.py") if (REPO / path).is_dir() else f"{path}.py"


def covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_one_of_its_deps(graph, stage):
    module = f"pipelines.stages.{stage}"
    assert module in graph.find_children("pipelines.stages"), f"dvc.yaml stage {stage} has no module {module}"
    deps = [str(dep) for dep in STAGES[stage].get("deps", [])]
    used = {module} | graph.find_upstream_modules(module)
    # a package's __init__.py (empty here) is covered with its folder; the modules in it are checked
    files = {module_file(m) for m in used - SHARED} - {module_file(m) for m in used if graph.find_children(m)}
    missing = sorted(f for f in files if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage}: add to its deps {missing} (it imports them)"


def test_the_check_fails_on_a_missing_dependency(graph):
    """The rule bites: without its library folder, train's deps are incomplete."""
    deps = [d for d in STAGES["train"]["deps"] if not str(d).startswith("pipelines/training")]
    used = graph.find_upstream_modules("pipelines.stages.train")
    assert any(not covered(module_file(m), deps) for m in used if m.startswith("pipelines.training"))
