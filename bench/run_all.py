"""`make bench`: every bench/bench_*.py in turn, each bounded in time.

Pass --quick to run each benchmark's short form. Figures are printed, never
asserted: these machines are shared and noisy, so each benchmark reports
medians and side-by-side ratios.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Each benchmark promises to stop by itself well within this.
TIMEOUT = 600


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    # issue 14: detection quality on the held-out sets runs with the benchmarks.
    for script in [*sorted(HERE.glob("bench_*.py")), HERE / "detection_eval.py"]:
        print(f"== {script.name}", flush=True)
        start = time.monotonic()
        try:
            r = subprocess.run([sys.executable, str(script), *extra], cwd=HERE.parent, timeout=TIMEOUT)
            ok = r.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
            print(f"   {script.name}: timed out after {TIMEOUT}s")
        if not ok:
            failed.append(script.name)
        print(f"   ({time.monotonic() - start:.1f}s)\n", flush=True)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
