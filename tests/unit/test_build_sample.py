"""The committed sample is exactly what scripts/build_sample.py makes from the Debian packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import require

REPO = Path(__file__).resolve().parents[2]


def test_sample_rebuilds_byte_for_byte(tmp_path):
    require(Path("/usr/share/wordnet/data.noun").exists() and Path("/usr/share/dictd/foldoc.dict.dz").exists(),
            "Debian packages wordnet-base and dict-foldoc are not installed (make install adds them as root)")
    result = subprocess.run([sys.executable, "scripts/build_sample.py", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("wordnet.jsonl", "foldoc.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "sample" / name).read_bytes(), name


def test_sample_stays_small():
    total = sum(p.stat().st_size for p in (REPO / "data" / "sample").iterdir())
    assert total < 5 * 1024 * 1024
