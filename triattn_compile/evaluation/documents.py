"""Offline texts: evaluation documents and calibration corpora, none written in this project.

Evaluation documents are the Debian/Ubuntu license texts in ``/usr/share/common-licenses`` (package ``base-files``),
named by file. Calibration corpora are shipped with every CPython: ``pydoc-topics`` (prose: the language reference
topics of ``pydoc_data/topics.py``) and ``stdlib-code`` (source files of a fixed list of standard-library modules).
"""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

import torch

LICENSES = Path("/usr/share/common-licenses")
STDLIB_CODE_MODULES = ("argparse", "typing", "dataclasses", "functools", "inspect", "pathlib", "subprocess",
                       "tarfile", "zipfile", "ast", "enum", "logging/__init__", "json/decoder", "collections/__init__")


def document_text(name: str) -> str:
    """Text of an evaluation document: a file name in ``/usr/share/common-licenses`` or a path."""
    path = Path(name) if "/" in name else LICENSES / name
    if not path.is_file():
        raise ValueError(f"document {name} not found: give a file of {LICENSES} (e.g. GPL-3) or a path to a text file")
    return path.read_text(errors="replace")


def document_source(name: str) -> str:
    """Where a document comes from, for the report."""
    path = Path(name) if "/" in name else LICENSES / name
    return str(path.resolve())


def calibration_text(name: str) -> str:
    """``pydoc-topics`` (prose), ``stdlib-code`` (Python source) or a path to a text file."""
    if name == "pydoc-topics":
        spec = importlib.util.find_spec("pydoc_data.topics")
        namespace: dict = {}
        exec(compile(Path(spec.origin).read_text(), spec.origin, "exec"), namespace)  # a module holding one dict
        return "\n\n".join(namespace["topics"][key] for key in sorted(namespace["topics"]))
    if name == "stdlib-code":
        root = Path(sysconfig.get_paths()["stdlib"])
        return "\n\n".join((root / f"{m}.py").read_text(errors="replace") for m in STDLIB_CODE_MODULES)
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"calibration text {name} not found: use pydoc-topics, stdlib-code or a path to a text file")
    return path.read_text(errors="replace")


def tokenize(tokenizer, text: str, tokens: int, what: str) -> torch.Tensor:
    """The first ``tokens`` token ids ``[tokens]`` of ``text``; an error if it is shorter."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < tokens:
        raise ValueError(f"{what} has {ids.numel()} tokens, fewer than the {tokens} asked for: choose a longer text "
                         "or lower --doc-tokens")
    return ids[:tokens]
