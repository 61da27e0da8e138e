"""`llmops`: run one pipeline stage (or tool) from the command line.

    llmops --help                 lists the stages with one-line descriptions
    llmops validate               runs one stage with params.yaml
    llmops prepare --set prepare.seed=7

Errors the user can fix print one line (`llmops <stage>: error: ...`) and exit non-zero.
Stage modules are imported only when their command runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from pipelines.config.params import load_params
from pipelines.errors import LLMOpsError

# command -> (module, extra arguments). The module's docstring gives the help line; its
# `main(params, **extras)` runs. The first block are the DVC stages, in pipeline order.
Argument = tuple[tuple[str, ...], dict[str, Any]]
COMMANDS: dict[str, tuple[str, list[Argument]]] = {
    "ingest": ("pipelines.stages.ingest", []),
    "validate": ("pipelines.stages.validate", [
        (("--list",), {"dest": "list_only", "action": "store_true", "help": "list the expectations and exit"}),
    ]),
    "prepare": ("pipelines.stages.prepare", []),
    "base_model": ("pipelines.stages.base_model", []),
    "train": ("pipelines.stages.train", []),
    "evaluate": ("pipelines.stages.evaluate", []),
    "register": ("pipelines.stages.register", []),
    "quantize": ("pipelines.stages.quantize", []),
    "promote": ("pipelines.stages.promote", [
        (("--force",), {"action": "store_true", "help": "promote whatever the gate says (recorded as forced)"}),
        (("--reason",), {"help": "why (required with --force; recorded on the version)"}),
    ]),
    "rollback": ("pipelines.commands.rollback", [
        (("--to",), {"metavar": "VERSION", "help": "roll back to this version (default: previous-champion)"}),
        (("--reason",), {"help": "why (recorded on the version)"}),
    ]),
    "deploy": ("pipelines.stages.deploy", [
        (("--strict",), {"action": "store_true", "help": "exit non-zero when verification fails"}),
    ]),
    "serve": ("pipelines.commands.serve", [
        (("--wait",), {"action": "store_true", "help": "start even when no version holds the alias yet, and serve "
                                                      "it once one does (make demo starts the gateway first)"}),
    ]),
    "simulate-traffic": ("pipelines.commands.simulate_traffic", [
        (("--requests",), {"type": int, "default": 200, "help": "how many requests (default 200)"}),
        (("--drift-share",), {"type": float, "default": 0.5, "help": "share of FOLDOC prompts, 0..1 (default 0.5)"}),
        (("--url",), {"help": "send to this running service instead of writing the inference log directly"}),
        (("--end",), {"metavar": "WHEN", "help": "direct mode: end of the window the records fall in (default: now)"}),
        (("--hours",), {"type": float, "help": "direct mode: window length (default monitor.window_hours)"}),
        (("--seed",), {"type": int, "default": 0}),
    ]),
    "monitor": ("pipelines.commands.monitor", [
        (("--end",), {"metavar": "WHEN", "help": "end of the window, ISO date/time (default: now); Airflow passes "
                                                  "its data interval end"}),
        (("--json",), {"dest": "as_json", "action": "store_true",
                       "help": "print the decision as one JSON line on stdout (for the orchestrator)"}),
    ]),
    "experiment": ("pipelines.commands.experiment", [
        (("action",), {
            "choices": ["start", "save", "end"],
            "help": "start: params.yaml := HEAD + overrides; save: `dvc exp save`; end: release the workspace"}),
        (("--name",), {"required": True, "help": "the DVC experiment name (Airflow passes its run id)"}),
        (("-S", "--set-param"), {"dest": "set_params", "action": "append", "default": [], "metavar": "KEY=VALUE",
                                 "help": "start: a `dvc exp run -S` override (repeatable)"}),
        (("--message",), {"help": "save: the experiment's commit message"}),
    ]),
    "sweep": ("pipelines.commands.sweep", [
        (("--trials",), {"type": int, "help": "finished trials the study should hold (default sweep.trials)"}),
        (("--study",), {"help": "the Optuna study (default sweep.study); a known one continues"}),
        (("--apply",), {"action": "store_true",
                        "help": "then `dvc exp apply` the best trial (its params.yaml, dvc.lock and outputs)"}),
    ]),
    "airflow": ("pipelines.commands.airflow", [
        (("--port",), {"type": int, "default": 8080, "help": "UI/API port on 127.0.0.1 (default 8080)"}),
        (("--home",), {"default": "airflow_home", "help": "AIRFLOW_HOME (default ./airflow_home)"}),
    ]),
    "settings": ("pipelines.commands.settings", [
        (("--configure-dvc",), {"dest": "configure_dvc_remote", "action": "store_true",
                                "help": "make the resolved DVC remote the default in .dvc/config.local"}),
    ]),
    "review": ("pipelines.commands.review", [
        (("action",), {"choices": ["serve", "request", "collect", "decide", "corrections", "export"],
                       "help": "serve: start Label Studio; request/collect/decide: a candidate's blind A/B review; "
                               "corrections/export: production answers reviewed into training data"}),
        (("--version",), {"help": "request/collect/decide: the registered version (default: challenger)"}),
        (("--when-enabled",), {"dest": "when_enabled", "action": "store_true",
                               "help": "request: nothing when promote.human_review is off; with advisory, a "
                                       "review tool that is down is a warning (the training DAG)"}),
        (("--json",), {"dest": "as_json", "action": "store_true", "help": "print the result as one JSON line"}),
    ]),
    "lineage": ("pipelines.commands.lineage", [
        (("version",), {"help": "the registered model version"}),
        (("--json",), {"dest": "as_json", "action": "store_true", "help": "print JSON"}),
    ]),
}
TOOLS = {"review", "rollback", "lineage", "serve", "monitor", "simulate-traffic", "experiment", "sweep", "airflow",
         "settings"}
STAGES = [name for name in COMMANDS if name not in TOOLS]


def _summary(module_name: str) -> str:
    doc = importlib.import_module(module_name).__doc__ or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return first.split(": ", 1)[-1].rstrip(".")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmops",
        description="LLMOps pipeline: data, fine-tuning, evaluation, registry, serving, monitoring.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, arguments) in COMMANDS.items():
        command = sub.add_parser(name, help=_summary(module), description=importlib.import_module(module).__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a param for this run, e.g. --set prepare.seed=7 (repeatable)")
        for flags, options in arguments:
            command.add_argument(*flags, **options)
    return parser


def _run(args: argparse.Namespace) -> None:

    params = load_params(args.params, args.overrides)
    module_name, arguments = COMMANDS[args.command]
    extras = {}
    for flags, options in arguments:
        dest = options.get("dest") or flags[-1].lstrip("-").replace("-", "_")
        extras[dest] = getattr(args, dest)
    entry: Callable = importlib.import_module(module_name).main
    if args.command not in STAGES or extras.get("list_only"):
        entry(params, **extras)
        return
    # Every stage run is metered: reports/cost/<stage>.json once it succeeded (pipelines/accounting).
    from pipelines.accounting.cost import Meter

    meter = Meter(args.command, params)
    entry(params, **extras)
    meter.finish()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("great_expectations", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        _run(args)
    except LLMOpsError as error:
        print(f"llmops {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"llmops {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
