"""What the project's HF path finds for a checkpoint, for the vLLM tests to compare with. Runs in the main venv
(transformers >= 5.23), not in the vLLM one:

    python tests_vllm/hf_reference.py MODEL OUT.json

OUT.json: ``triattn_compile.discover(model)`` as the same dict ``VllmLayout.as_dict`` gives (without layer names).
"""

from __future__ import annotations

import json
import sys

import triattn_compile as tc
from triattn_compile.loading import load_model


def layout_dict(layout) -> dict:
    return {
        "describe": layout.describe(), "num_layers": layout.num_layers, "num_heads": layout.num_heads,
        "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
        "attention_scaling": layout.attention_scaling, "omega": layout.omega.tolist(),
        "signature": layout.signature.__dict__,
        "layers": [{"index": layer.index, "rotary_form": layer.rotary_form, "pairing": layer.pairing,
                    "key_pairing": layer.key_pairing, "rotary_dim": layer.rotary_dim,
                    "rotary_start": layer.rotary_start, "window": layer.window, "key_dim": layer.key_dim,
                    "value_dim": layer.value_dim} for layer in layout.layers],
    }


def main() -> None:
    model, _ = load_model(sys.argv[1])
    with open(sys.argv[2], "w") as fh:
        json.dump(layout_dict(tc.discover(model)), fh)


if __name__ == "__main__":
    main()
