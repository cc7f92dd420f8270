"""lrq-info --json tells scripts where the patched binaries and the assets are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lrq import assets, tools


def test_info_json_lists_tools_backends_assets():
    assets.path("smollm2-135m")
    proc = subprocess.run([sys.executable, "-m", "lrq.cli.info", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert Path(info["bin_dir"]).is_dir()
    assert set(info["tools"]) == set(tools.TOOL_NAMES)
    for path in info["tools"].values():
        assert Path(path).is_file() and Path(path).parent == Path(info["bin_dir"])
    assert "CPU" in info["backends"]
    assert info["assets"]["smollm2-135m"] == str(assets.path("smollm2-135m"))


def test_info_unknown_fetch_fails():
    proc = subprocess.run([sys.executable, "-m", "lrq.cli.info", "--fetch", "nonsense"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "unknown asset 'nonsense'" in proc.stderr

