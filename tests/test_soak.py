"""bench/soak.py's six-night version: new data, an unchanged night, a SIGKILL mid-training, an
on-demand run next to the nightly, a full disk and an adapter night, checked night by night."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # seven pipeline runs


def test_six_nights_end_named_bounded_and_without_orphans(tmp_path):
    res = subprocess.run(
        [sys.executable, "bench/soak.py", "--nights", "6", "--workdir", str(tmp_path / "soak")],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    assert figures["nights"] == 6 and figures["states"][:3] == ["promoted v1", "Unchanged (v1)", "killed"]
    assert figures["champions"][0] == "1" and figures["max_used_mib"] < 64
