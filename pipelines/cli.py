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

from pipelines.errors import LLMOpsError

# command -> module; the module's docstring gives the help line, its `main(params)` runs.
STAGES: dict[str, str] = {
    "ingest": "pipelines.ingest",
    "validate": "pipelines.validate",
    "prepare": "pipelines.prepare",
}


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
    for name, module in STAGES.items():
        stage = sub.add_parser(name, help=_summary(module), description=importlib.import_module(module).__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        stage.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        stage.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a param for this run, e.g. --set prepare.seed=7 (repeatable)")
        if name == "validate":
            stage.add_argument("--list", action="store_true", help="list the expectations and exit")
    return parser


def _run(args: argparse.Namespace) -> None:
    from pipelines.params import load_params

    params = load_params(args.params, args.overrides)
    module = importlib.import_module(STAGES[args.command])
    if getattr(args, "list", False):
        print(module.list_checks(params))
        return
    entry: Callable = module.main
    entry(params)


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
