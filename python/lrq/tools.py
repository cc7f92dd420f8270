"""Locate and run the patched llama.cpp tools that `make build` produced."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_BUILD_JSON = Path(__file__).with_name("_build.json")

TOOL_NAMES = ("llama-cli", "llama-completion", "llama-server", "llama-perplexity", "llama-bench",
              "llama-quantize", "llama-imatrix", "rpc-server")
# the binary behind a tool name where the pinned llama.cpp names it differently
_BINARY = {"rpc-server": "ggml-rpc-server"}


class ToolError(RuntimeError):
    """A patched tool is missing or failed."""


def build_info() -> dict:
    """What CMake recorded at configure time (bin_dir, llama_commit, ...), or {} before a build."""
    if os.environ.get("LRQ_BIN_DIR"):
        return {"bin_dir": os.environ["LRQ_BIN_DIR"]}
    try:
        return json.loads(_BUILD_JSON.read_text())
    except FileNotFoundError:
        return {}


def bin_dir() -> Path:
    d = build_info().get("bin_dir")
    if not d:
        raise ToolError("lrq is not built: run `make build` (or set LRQ_BIN_DIR)")
    return Path(d)


def tool(name: str) -> Path:
    """Path of a patched llama.cpp tool, e.g. tool('llama-perplexity')."""
    p = bin_dir() / _BINARY.get(name, name)
    if not p.is_file():
        raise ToolError(f"{p} does not exist: run `make build`")
    return p


def tools() -> dict[str, str]:
    out = {}
    for name in TOOL_NAMES:
        try:
            out[name] = str(tool(name))
        except ToolError:
            pass
    return out


def run(name: str, args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a tool; a non-zero exit raises ToolError with the tail of its output."""
    cmd = [str(tool(name)), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ToolError(f"{name} exited with {proc.returncode}:\n{tail}")
    return proc


@dataclass(frozen=True)
class PerplexityRun:
    ppl: float
    ppl_err: float
    n_chunks: int
    log: str


_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks")


def perplexity(model: Path, text_file: Path, ctx: int = 512, chunks: int | None = None,
               threads: int | None = None, extra: list[str] | None = None) -> PerplexityRun:
    """llama-perplexity's figure for a model and a text file (protocol of docs/RESULTS.md)."""
    args = ["-m", model, "-f", text_file, "-c", ctx]
    if chunks is not None:
        args += ["--chunks", chunks]
    if threads:
        args += ["-t", threads]
    proc = run("llama-perplexity", args + list(extra or []))
    log = proc.stdout + proc.stderr
    m = _FINAL.search(log)
    if not m:
        raise ToolError(f"llama-perplexity printed no final estimate for {model}")
    c = _CHUNKS.search(log)
    return PerplexityRun(float(m.group(1)), float(m.group(2)), int(c.group(1)) if c else -1, log)
