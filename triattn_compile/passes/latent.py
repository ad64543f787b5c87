"""Multi-head latent attention: the per-head key projection of a cached latent, read off the graph by probing it.

In DeepSeek-V2/V3 the cache holds, per token, a latent ``c`` ``[R]`` and one rotated key part ``k_pe``; each head's
key is ``[W_UK,h c ; k_pe]`` (``match.LatentKey``). The pass-through score term needs ``W_UK,h`` (see
``kernels/scoring/naive.py``). It is not looked up by module name: the graph's own nodes from the latent buffer to
the key's projected part are evaluated on unit latents, which gives the matrix whatever the layout ops in between
(a linear, views, a transpose, a split); a second probe checks that the map is linear.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from triattn_compile.passes.frequencies import evaluate
from triattn_compile.passes.match import AttentionSite, PatternNotFound
from triattn_compile.passes.rotary import fake_value


def latent_projection(gm: GraphModule, site: AttentionSite, example_inputs: list) -> torch.Tensor:
    """``M`` ``[H, R, P]`` float64 with ``key[h, t, pass dims] = Σ_r c[t, r] M[h, r]`` for the site's cached latent."""
    latent, projection = site.latent.latent, site.latent.projection
    shape = tuple(fake_value(latent).shape)  # [B, 1, C, R]
    capacity, rank = shape[-2], shape[-1]
    dtype = fake_value(projection).dtype

    def run(probe: torch.Tensor) -> torch.Tensor:  # [C, R] latents in every row -> [H, C, P]
        given = {latent: probe.to(dtype).expand(shape).contiguous()}
        with torch.no_grad():
            return evaluate(gm, [projection], example_inputs, given)[0][0].double()

    rows = []
    for start in range(0, rank, capacity):  # unit latents, `capacity` at a time
        n = min(capacity, rank - start)
        probe = torch.zeros(capacity, rank)
        probe[torch.arange(n), start + torch.arange(n)] = 1
        rows.append(run(probe)[:, :n])
    matrix = torch.cat(rows, dim=1)  # [H, R, P]
    x = torch.randn(capacity, rank, generator=torch.Generator().manual_seed(0))
    expected = torch.einsum("cr,hrp->hcp", x.double(), matrix)
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(run(x), expected, rtol=tol, atol=tol * float(expected.abs().max())):
        raise PatternNotFound(
            f"attention site {site.layer} ({site.module}): the key is not a linear function of the cached latent "
            f"({projection.name}); TriAttention scores latent keys only through a linear up-projection"
        )
    return matrix
