"""What the project's HF path finds for a checkpoint, for the vLLM tests to compare with. Runs in the main venv
(transformers >= 5.23), not in the vLLM one:

    python tests_vllm/hf_reference.py MODEL OUT.json [--keys IDS.json | --stats IDS.json
                                                      | --generate IDS.json TOKENS OPTIONS.json]

OUT.json: ``triattn_compile.discover(model)`` as the same dict ``VllmLayout.as_dict`` gives (without layer names).
With ``--keys``: instead, the post-RoPE keys the unmodified HF model caches for each token id list in IDS.json
(``[[ids], ...]`` -> ``[[per layer [Hkv, len, D]], ...]``, float32, one forward each). With ``--stats``: the
running sums ``triattn_compile.calibrate`` makes over those token id lists, one document each (``{name: nested
list}``, ``calibration.stats.TENSOR_NAMES``). With ``--generate``: ``{"outputs": [[ids]], "logprobs": [[floats]]}``, the
greedy continuation of ``TOKENS`` tokens of each prompt, and each chosen token's log-probability, by the project's HF
path (``optimize(model, **options)``, Dynamo's eager backend; an end token does
not stop it), one prompt at a time (``[[ids], ...]``).
"""

from __future__ import annotations

import json
import sys

import torch

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


@torch.no_grad()
def cached_keys(model, ids: list[int]) -> list:
    cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    return [layer.keys[0].tolist() for layer in cache.layers]


def main() -> None:
    model, _ = load_model(sys.argv[1])
    if "--keys" in sys.argv:
        with open(sys.argv[sys.argv.index("--keys") + 1]) as fh:
            result = [cached_keys(model, ids) for ids in json.load(fh)]
    elif "--stats" in sys.argv:
        from triattn_compile.calibration.stats import TENSOR_NAMES

        with open(sys.argv[sys.argv.index("--stats") + 1]) as fh:
            stats = tc.calibrate(model, [torch.tensor(ids) for ids in json.load(fh)])
        result = {name: t.tolist() for name, t in zip(TENSOR_NAMES, stats.tensors())}
    elif "--generate" in sys.argv:
        at = sys.argv.index("--generate")
        prompts_file, tokens, options = sys.argv[at + 1: at + 4]
        tc.optimize(model, **{**json.loads(options), "compiler": "eager"})
        with open(prompts_file) as fh:
            prompts = json.load(fh)
        model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: an end token does not stop it
        result = {"outputs": [], "logprobs": []}
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=int(tokens), do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            chosen = out.sequences[0, len(ids):]
            logits = torch.stack(out.logits)[:, 0].float()  # [T, vocab], raw (as vLLM's default raw_logprobs)
            result["outputs"].append(chosen.tolist())
            result["logprobs"].append(logits.log_softmax(-1).gather(-1, chosen[:, None])[:, 0].tolist())
    else:
        result = layout_dict(tc.discover(model))
    with open(sys.argv[2], "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
