"""tests/gpu/check.sh without a GPU (issue 15 §3): one line on stderr, exit status 1, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO


def test_gpu_check_without_a_gpu_is_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, RESULTS=str(tmp_path / "results"))
    p = subprocess.run(["bash", str(REPO / "tests" / "gpu" / "check.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == f"tests/gpu/check.sh: no CUDA GPU visible to torch ({sys.executable}): nothing was checked\n"
    assert not (tmp_path / "results").exists()
