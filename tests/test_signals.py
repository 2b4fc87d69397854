"""The suite behaves the same however it is launched: with SIGINT ignored (`pytest &` in a script,
nohup, some CI runners), the processes the tests start still answer the SIGINT a test sends them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD_IGNORES_SIGINT = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"


def test_processes_the_tests_start_answer_sigint():
    child = subprocess.run([sys.executable, "-c", CHILD_IGNORES_SIGINT], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "False"


def test_the_suite_launched_with_sigint_ignored():
    """The test above, in a pytest launched the way `pytest &` in a script launches it."""
    this = f"{Path(__file__).relative_to(ROOT)}::test_processes_the_tests_start_answer_sigint"
    launched = subprocess.run(["sh", "-c", 'trap "" INT; exec "$0" "$@"', sys.executable, "-m", "pytest", "-q",
                               "-p", "no:cacheprovider", this], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "1 passed" in launched.stdout
