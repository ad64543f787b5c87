"""A call with more tokens than the compressed cache has free slots (a long prompt, a long new turn), fed in pieces.

Each piece fills the cache up to its capacity, then the full rows compact, as after a decode step: the cache never
holds more than ``budget + divide_length`` tokens, and every token of a piece attends to the kept tokens before it
and to the piece's own earlier tokens. This is how teacher-forced evaluation feeds documents (``triattn eval``), and
the same as the caller feeding the pieces one by one. The outputs are joined: the logits (or the last hidden states)
of every piece, concatenated.
"""

from __future__ import annotations

import torch

# keyword arguments that carry one entry per token, and the axis of their tokens
SEQUENCE_AXES = {"input_ids": 1, "inputs_embeds": 1, "token_type_ids": 1, "position_ids": -1, "cache_position": -1}
JOINED_OUTPUTS = ("logits", "last_hidden_state")


def check_splittable(kwargs: dict, length: int, capacity: int) -> None:
    """Refuse, in one line, a call that cannot be split into pieces without changing what it returns."""
    if kwargs.get("labels") is not None:
        raise ValueError(f"a call of {length} tokens with labels does not fit the compressed cache ({capacity} slots): "
                         "call without labels and compute the loss from the returned logits")
    keep = kwargs.get("logits_to_keep")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int)):
        raise ValueError(f"logits_to_keep={type(keep).__name__} with {length} tokens, more than the compressed cache's "
                         f"{capacity} slots: the call runs in pieces; pass an int or feed at most {capacity} tokens")
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise ValueError(f"{flag}=True with {length} tokens, more than the compressed cache's {capacity} slots: "
                             "the call runs in pieces, whose per-layer outputs are not joined; feed at most "
                             f"{capacity} tokens per call")
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and name not in SEQUENCE_AXES and value.dim() > 1 and length in value.shape:
            raise ValueError(f"argument {name!r} looks per-token (shape {list(value.shape)}) and a call of {length} "
                             f"tokens runs in pieces that do not split it; feed at most {capacity} tokens per call")


def piece_of(kwargs: dict, start: int, stop: int, keep_last: int) -> dict:
    """``kwargs`` with every per-token argument cut to tokens ``[start, stop)``; ``logits_to_keep`` (when given)
    asks for at most ``keep_last`` of the piece's tokens."""
    out = dict(kwargs)
    for name, axis in SEQUENCE_AXES.items():
        if isinstance(out.get(name), torch.Tensor):
            out[name] = out[name].narrow(axis, start, stop - start)
    if "logits_to_keep" in kwargs:
        out["logits_to_keep"] = min(keep_last, stop - start) if keep_last else 0
    return out


def join(outputs: list, keep_last: int):
    """The last piece's output with its logits (or last hidden states) replaced by every piece's, concatenated over
    the tokens (the last ``keep_last`` of them when ``logits_to_keep`` asked for that many)."""
    last = outputs[-1]
    as_tuple = isinstance(last, tuple)
    for name in ((0,) if as_tuple else JOINED_OUTPUTS):
        if not as_tuple and getattr(last, name, None) is None:
            continue
        joined = torch.cat([out[name] for out in outputs], dim=1)
        joined = joined[:, -keep_last:] if keep_last else joined
        if as_tuple:
            last = (joined, *last[1:])
        else:
            last[name] = joined
    return last
