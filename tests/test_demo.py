"""The README's main command runs end to end."""

import subprocess
import sys

import pytest


@pytest.mark.slow  # a subprocess that imports everything and trains: about 18 s
def test_demo_runs_and_checks_zero_init_adapters():
    out = subprocess.run([sys.executable, "-m", "fusionkit", "demo", "--frames", "8", "--size", "32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "expert output unchanged: True" in out.stdout
    assert "T2S (time window)" in out.stdout and "videomae_vit" in out.stdout
    assert "Training summary" in out.stdout and "finished" in out.stdout
    assert "xformers" not in out.stderr.lower(), out.stderr
