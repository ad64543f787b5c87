"""What the scripts in ``bench/`` share: command-line options for SmolLM2-135M's dtype and the CPU thread count,
and the model loaded with them."""

from __future__ import annotations

import argparse

import torch

from triattn_compile.cli import DTYPES
from triattn_compile.loading import load_model


def model_parser(doc: str, dtype: str = "float32", threads: int = 0) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with ``--dtype`` and ``--threads``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dtype", default=dtype, choices=sorted(DTYPES), help="weight and KV dtype")
    parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads (0: torch's choice)")
    return parser


def load(args: argparse.Namespace):
    """``(model, tokenizer)``: SmolLM2-135M in ``args.dtype``, after setting ``args.threads``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(dtype=DTYPES[args.dtype])
