"""How long `liftdeploy check` takes on the example deployments (the PR check's budget: well under 1 s).

    python benchmarks/check_speed.py

Prints the in-process time of the checks (all manifests and envs, drift included) and the
wall time of the whole CLI process, each as the median of several runs.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def median_seconds(fn, runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from liftdeploy.checks import check

    deployments = [ROOT / "deployments"]
    first = median_seconds(lambda: check(deployments), 1)
    warm = median_seconds(lambda: check(deployments), 20)
    cli = median_seconds(
        lambda: subprocess.run([sys.executable, "-m", "liftdeploy.cli", "check", str(deployments[0])],
                               cwd=ROOT, capture_output=True, check=False),
        5,
    )
    report = check(deployments)
    print(f"manifests and envs checked: {len(report.checked)}; findings: {len(report.findings)}")
    print(f"checks, first run in process:  {first * 1000:7.1f} ms")
    print(f"checks, warm (median of 20):   {warm * 1000:7.1f} ms")
    print(f"CLI process (median of 5):     {cli * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
