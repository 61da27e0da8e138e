"""Wait until a gateway's /ready answers 200 (used by `make demo`): `python scripts/wait_ready.py URL`.

`--path /health` waits for another service instead (the demo's Label Studio) and prints its answer.

Exits non-zero with the gateway's own reason (its /ready body, and the end of its log when
given) if it is not ready in time, so a demo that cannot serve says why in one place.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--log", type=Path, help="the gateway's log, shown when it is not ready in time")
    parser.add_argument("--path", default="/ready", help="the readiness path (default /ready, the gateway's)")
    args = parser.parse_args()
    deadline, last = time.monotonic() + args.timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{args.url.rstrip('/')}{args.path}", timeout=5) as response:
                raw = response.read()
                if args.path != "/ready":
                    print(f"{args.url} is up ({args.path}: {raw[:100].decode(errors='replace').strip()})")
                    return 0
                body = json.loads(raw)
                print(f"the gateway serves v{body.get('model_version')} (engine ready in "
                      f"{(body.get('engine') or {}).get('start_seconds') or 0:.0f} s)")
                return 0
        except urllib.error.HTTPError as error:
            last = error.read().decode(errors="replace")[:500]
        except OSError as error:
            last = str(error)
        time.sleep(2)
    print(f"error: {args.url}{args.path} was not ready within {args.timeout:g} s: {last}", file=sys.stderr)
    if args.log and args.log.exists():
        print("".join(args.log.read_text(errors="replace").splitlines(keepends=True)[-20:]), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
