"""Print evaluate's per-slice primary metric for one slice column (used by `make demo`):
`python scripts/show_slices.py domain` -> each domain's n and candidate / champion / base values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    column = argv[0] if argv else "domain"
    sys.path.insert(0, str(REPO))
    from pipelines.config.params import load_params

    results = json.loads(load_params().paths.report("evaluation_results").read_text())
    metric, slices = results["primary_metric"], results["slices"].get(column, {})
    print(f"evaluate, {metric} by {column} (slices of at least evaluate.min_slice_size test rows):")
    for value, entry in slices.items():
        systems = "  ".join(f"{name} {entry[name][metric]:.4f}" for name in ("candidate", "champion", "base")
                            if name in entry)
        print(f"  {value:<12} n={entry['n']:<4} {systems}")
    if not slices:
        print(f"  no slice of {column} reached evaluate.min_slice_size")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
