"""Hugging Face model directories: converted to an F32 GGUF by the pinned llama.cpp's own
convert_hf_to_gguf.py (run as a subprocess, never copied)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .arch import ConvertError

CONVERT_TIMEOUT_S = 3600


def llama_cpp_dir() -> Path:
    """The prepared llama.cpp tree: $LRQ_LLAMA_CPP_DIR, else <repo>/build/llama.cpp."""
    env = os.environ.get("LRQ_LLAMA_CPP_DIR")
    if env:
        return Path(env)
    # python/lrq/convert/hf.py -> repository root
    return Path(__file__).resolve().parents[3] / "build" / "llama.cpp"


def convert_hf_script() -> Path:
    p = llama_cpp_dir() / "convert_hf_to_gguf.py"
    if not p.is_file():
        raise ConvertError(f"{p} does not exist: the llama.cpp tree is not prepared (run `make build`, "
                           f"or set LRQ_LLAMA_CPP_DIR)")
    return p


def hf_config(hf_dir: Path) -> dict:
    cfg = hf_dir / "config.json"
    if not cfg.is_file():
        raise ConvertError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{cfg}: cannot read it ({e})") from None


def hf_n_layer(cfg: dict, where: str) -> int:
    if "num_hidden_layers" not in cfg:
        raise ConvertError(f"{where}: key num_hidden_layers is missing")
    return int(cfg["num_hidden_layers"])


def run_convert_hf(hf_dir: Path, out: Path) -> Path:
    """convert_hf_to_gguf.py HF_DIR --outfile OUT --outtype f32 (offline)."""
    cmd = [sys.executable, str(convert_hf_script()), str(hf_dir), "--outfile", str(out), "--outtype", "f32"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CONVERT_TIMEOUT_S)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ConvertError(f"{hf_dir}: convert_hf_to_gguf.py failed (exit {proc.returncode}):\n{tail}")
    return out
