"""Triton key scoring (``triattn_compile.kernels.scoring.triton_kernel``) against ``naive.score_postrope``.

The raw kernel runs under Triton's CPU interpreter in a **subprocess** (this file run as a script, with
``TRITON_INTERPRET=1``): Triton decides interpretation when ``@triton.jit`` decorates a function, ``tl.sum`` included,
i.e. when ``triton`` is first imported, which in a whole-suite run has already happened. The subprocess saves the
kernel outputs; the assertions run here, against the reference on the same inputs (rebuilt from the case id).
Cases: a hand-picked list plus seeded random shapes (head dims 64/128/256, fp32/bf16/fp16, GQA ratios 1-4).
The ``triattn::score_keys`` op is checked in-process with ``opcheck`` and under ``torch.compile(fullgraph=True)``;
the code Inductor generates for it is read with ``run_and_get_code`` (CPU: the torch body, inlined; CUDA: our Triton
kernel, the only test skipped without a GPU together with the other CUDA runs).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from triattn_compile.kernels.scoring import naive
from triattn_compile.kernels.scoring.triton_kernel import score_keys, score_keys_triton_eager

# max |out - ref| / max |ref|; both sides compute in fp32 from the same (possibly low-precision) key values
REL_ERR_BOUND = 1e-5
ROUND_START = 4321
_REPO_ROOT = Path(__file__).resolve().parents[2]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    B: int
    Hkv: int
    G: int
    N: int
    D: int
    dtype: str
    pairing: str
    scale: float = 1.0
    layout: str = "contig"  # contig | bnhd (HF [B, N, Hkv, D] transposed) | strided_d (every other element of 2D)
    ablation: str = "full"  # full | no_trig | no_norm | no_mlr
    round_start: int = ROUND_START

    @property
    def id(self) -> str:
        rs = "" if self.round_start == ROUND_START else f"-t{self.round_start}"
        return (
            f"B{self.B}-Hkv{self.Hkv}-G{self.G}-N{self.N}-D{self.D}-{self.dtype}-{self.pairing}"
            f"-s{self.scale}-{self.layout}-{self.ablation}{rs}"
        )


KERNEL_CASES = [
    Case(1, 1, 1, 1, 64, "fp32", "half"),
    Case(1, 1, 1, 1, 128, "bf16", "interleaved", layout="bnhd"),
    Case(2, 2, 3, 63, 64, "fp32", "interleaved", 1.25, "bnhd"),
    Case(2, 2, 3, 63, 128, "fp32", "half", 1.25, "strided_d"),
    Case(1, 2, 4, 63, 256, "fp16", "half", layout="bnhd"),
    Case(1, 1, 4, 63, 256, "bf16", "interleaved", 1.25, "strided_d"),
    Case(2, 1, 3, 500, 64, "bf16", "half", 1.25, "bnhd"),
    Case(1, 2, 1, 500, 128, "fp16", "interleaved", layout="strided_d"),
    Case(1, 2, 4, 500, 256, "fp32", "interleaved", 1.25),
    Case(1, 1, 3, 500, 128, "fp32", "half", layout="bnhd"),
    Case(1, 2, 3, 63, 128, "fp16", "half", 1.25, "contig"),
    Case(1, 2, 4, 63, 64, "bf16", "interleaved", 1.0, "strided_d"),
    Case(1, 2, 3, 63, 64, "fp32", "half", 1.25, "bnhd", "no_trig"),
    Case(1, 2, 3, 63, 64, "fp32", "interleaved", 1.0, "contig", "no_norm"),
    Case(1, 2, 3, 63, 64, "bf16", "half", 1.0, "strided_d", "no_mlr"),
]


def random_cases(count: int, seed: int = 2026) -> list[Case]:
    """Seeded random shapes: every (head_dim, dtype) pair of 64/128/256 x fp32/bf16/fp16 once, GQA ratios 1-4 in
    turn, the rest (batch, KV heads, key count, pairing, layout, scaling, round start) drawn."""
    rng = random.Random(seed)
    combos = [(d, t) for t in _DTYPES for d in (64, 128, 256)]
    cases = []
    for i in range(count):
        d, t = combos[i % len(combos)]
        cases.append(Case(
            B=rng.randint(1, 2), Hkv=rng.randint(1, 3), G=1 + i % 4, N=rng.randint(1, 200), D=d, dtype=t,
            pairing=rng.choice(naive.PAIRINGS), scale=rng.choice([1.0, 1.1, 1.3863]),
            layout=rng.choice(["contig", "bnhd", "strided_d"]), round_start=rng.randint(0, 200_000),
        ))
    return cases


KERNEL_CASES += random_cases(9)


def make_inputs(case: Case) -> dict:
    """Deterministic inputs for ``case`` (seeded by the id, so the subprocess and this process agree)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    B, Hkv, N, D, F, H = case.B, case.Hkv, case.N, case.D, case.D // 2, case.Hkv * case.G
    dtype = _DTYPES[case.dtype]
    if case.layout == "contig":
        keys = torch.randn(B, Hkv, N, D, generator=gen).to(dtype)
    elif case.layout == "bnhd":
        keys = torch.randn(B, N, Hkv, D, generator=gen).to(dtype).transpose(1, 2)
    else:
        keys = torch.randn(B, Hkv, N, 2 * D, generator=gen).to(dtype)[..., ::2]
    q_mean = torch.complex(torch.randn(H, F, generator=gen), torch.randn(H, F, generator=gen))
    q_abs = q_mean.abs() + torch.rand(H, F, generator=gen)
    flags = {"use_trig": case.ablation != "no_trig", "use_norm": case.ablation != "no_norm"}
    flags["mlr"] = case.ablation != "no_mlr"
    return dict(
        keys_rot=keys,
        round_start=case.round_start,
        q_mean=q_mean,
        q_abs=q_abs,
        omega=10000.0 ** (-torch.arange(F, dtype=torch.float64) / F),
        pairing=case.pairing,
        offsets=naive.geometric_offsets(),
        scale=case.scale,
        **flags,
    )


def run(scorer, inputs: dict) -> torch.Tensor:
    """``scorer(keys, folded)`` on ``inputs``: its keys, and ``naive.fold_query_stats`` of the rest."""
    return scorer(inputs["keys_rot"], naive.fold_query_stats(**{k: v for k, v in inputs.items() if k != "keys_rot"}))


def reference(inputs: dict) -> torch.Tensor:
    """``naive.score_postrope`` on the same key values, upcast to fp32."""
    return run(naive.score_postrope, {**inputs, "keys_rot": inputs["keys_rot"].float()})


def rel_max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def check_scores(out: torch.Tensor, inputs: dict) -> None:
    keys = inputs["keys_rot"]
    B, _, N, _ = keys.shape
    H = inputs["q_mean"].shape[0]
    assert out.shape == (B, H, N) and out.dtype == torch.float32
    assert not out.isnan().any() and out.isfinite().all()
    ref = reference(inputs)
    err = rel_max_err(out, ref)
    assert err <= REL_ERR_BOUND, f"relative max error {err:.3g} > {REL_ERR_BOUND}"


# -- raw Triton kernel under the interpreter (subprocess) ---------------------------------------------------


def _run_interpreted_cases(out_path: str) -> None:
    """Subprocess body: run every kernel case through the raw (interpreted) Triton kernel and save the outputs."""
    from triattn_compile.kernels.scoring.triton_kernel import _is_interpreted

    assert _is_interpreted(), "TRITON_INTERPRET=1 did not take effect"
    outs = {case.id: run(score_keys_triton_eager, make_inputs(case)) for case in KERNEL_CASES}
    torch.save(outs, out_path)


@pytest.fixture(scope="module")
def interpreted_outputs(tmp_path_factory) -> dict[str, torch.Tensor]:
    out_path = tmp_path_factory.mktemp("triton_interp") / "scores.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, __file__, str(out_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out_path)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in KERNEL_CASES])
def test_kernel_matches_naive(case: Case, interpreted_outputs: dict[str, torch.Tensor]) -> None:
    check_scores(interpreted_outputs[case.id], make_inputs(case))


def test_error_bound_can_fail() -> None:
    """The metric separates a wrong rotary pairing by orders of magnitude (so the bound is meaningful)."""
    inputs = make_inputs(KERNEL_CASES[2])
    wrong = run(score_keys, {**inputs, "pairing": "half"})
    assert inputs["pairing"] == "interleaved"
    assert rel_max_err(wrong, reference(inputs)) > 1e3 * REL_ERR_BOUND


def test_eager_kernel_on_cpu_needs_interpreter() -> None:
    from triattn_compile.kernels.scoring.triton_kernel import _is_interpreted

    if _is_interpreted():
        pytest.skip("this process runs under TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        run(score_keys_triton_eager, make_inputs(KERNEL_CASES[0]))


# -- the triattn::score_keys op ------------------------------------------------------------------------------


@pytest.mark.parametrize("pairing", naive.PAIRINGS)
@pytest.mark.parametrize("dtype,layout", [("fp32", "contig"), ("bf16", "bnhd")], ids=["fp32-contig", "bf16-bnhd"])
def test_op_opcheck(pairing: str, dtype: str, layout: str) -> None:
    case = Case(2, 2, 3, 63, 64, dtype, pairing, 1.25, layout)
    keys = make_inputs(case)["keys_rot"]
    gen = torch.Generator().manual_seed(0)
    u_re, u_im, w = torch.randn(3, case.Hkv * case.G, case.D // 2, generator=gen).unbind(0)
    torch.library.opcheck(torch.ops.triattn.score_keys.default, (keys, u_re, u_im, w, case.scale, pairing))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in KERNEL_CASES[6:7]])
def test_op_eager_matches_naive(case: Case) -> None:
    check_scores(run(score_keys, make_inputs(case)), make_inputs(case))


def test_compiled_score_keys_matches_naive() -> None:
    """``torch.compile(fullgraph=True)`` through the op on CPU (Inductor traces the pure-torch body)."""
    torch._dynamo.reset()
    case = Case(2, 2, 3, 63, 64, "bf16", "interleaved", 1.25, "bnhd")
    inputs = make_inputs(case)
    inputs["round_start"] = torch.tensor(ROUND_START)
    static = {k: v for k, v in inputs.items() if k not in ("keys_rot", "round_start")}

    @torch.compile(fullgraph=True)
    def fn(keys_rot: torch.Tensor, round_start: torch.Tensor) -> torch.Tensor:
        return score_keys(keys_rot, naive.fold_query_stats(round_start, **static))

    check_scores(fn(inputs["keys_rot"], inputs["round_start"]), inputs)


def test_launcher_traces_symbolically() -> None:
    """The host launcher is traceable (what ``triton_op`` needs on CUDA): one kernel node, grid and N symbolic."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from triattn_compile.kernels.scoring.triton_kernel import _is_interpreted, score_keys_fwd

    if _is_interpreted():
        pytest.skip("wrap_triton does not trace interpreted kernels")
    keys = make_inputs(KERNEL_CASES[2])["keys_rot"]
    u_re, u_im, w = torch.randn(3, 6, 32).unbind(0)

    def fwd(k, a, b, c):
        return score_keys_fwd(k, naive.FoldedQuery(a, b, c, 1.25, "interleaved"))

    gm = make_fx(fwd, tracing_mode="symbolic")(keys, u_re, u_im, w)
    (node,) = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert isinstance(node.kwargs["kwargs"]["N"], torch.fx.Node)
    assert all(isinstance(d, torch.fx.Node) for d in node.kwargs["grid"][0][:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in KERNEL_CASES[2:9]])
def test_compiled_score_keys_cuda(case: Case) -> None:
    """On CUDA the op launches the Triton kernel; Inductor lowers it as a user-defined Triton kernel."""
    torch._dynamo.reset()
    inputs = make_inputs(case)
    inputs.update({k: inputs[k].cuda() for k in ("keys_rot", "q_mean", "q_abs")})  # omega/offsets stay fp64 on CPU
    static = {k: v for k, v in inputs.items() if k != "keys_rot"}
    fn = torch.compile(lambda keys_rot: score_keys(keys_rot, naive.fold_query_stats(**static)), fullgraph=True)
    out = fn(inputs["keys_rot"])
    cpu_inputs = make_inputs(case)
    check_scores(out.cpu(), cpu_inputs)
    check_scores(run(score_keys_triton_eager, inputs).cpu(), cpu_inputs)


def _compiled_score_keys_code(device: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Compile a small function around ``torch.ops.triattn.score_keys`` with Inductor; return its output, the
    pure-torch expectation and the generated source (``run_and_get_code``)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    case = Case(1, 2, 3, 100, 128, "bf16", "half", 1.25, "bnhd")
    keys = make_inputs(case)["keys_rot"].to(device)
    gen = torch.Generator().manual_seed(1)
    u_re, u_im, w = (t.to(device) for t in torch.randn(3, case.Hkv * case.G, case.D // 2, generator=gen).unbind(0))

    def fn(keys, u_re, u_im, w):
        return torch.ops.triattn.score_keys(keys, u_re, u_im, w, case.scale, case.pairing).amax(-1)

    out, code = run_and_get_code(torch.compile(fn, fullgraph=True), keys, u_re, u_im, w)
    folded = naive.FoldedQuery(u_re.cpu(), u_im.cpu(), w.cpu(), case.scale, case.pairing)
    expected = naive.score_postrope(keys.cpu(), folded).amax(-1)
    return out.cpu(), expected, "\n".join(code)


def test_inductor_code_on_cpu_runs_the_torch_body() -> None:
    """CPU: Inductor inlines the op's pure-torch body (no extern op call, no Triton kernel). This also shows that
    the source check of the CUDA test below can tell the two apart."""
    out, expected, src = _compiled_score_keys_code("cpu")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert "_score_keys_fwd_kernel" not in src
    assert "ops.triattn.score_keys" not in src  # inlined, not called as an opaque extern op


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_code_contains_the_triton_kernel_cuda() -> None:
    """CUDA: the generated code launches our Triton kernel (lowered as a user-defined Triton kernel)."""
    out, expected, src = _compiled_score_keys_code("cuda")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert "_score_keys_fwd_kernel" in src, src[:2000]
    assert "ops.triattn.score_keys" not in src  # lowered, not called as an opaque extern op


if __name__ == "__main__":
    _run_interpreted_cases(sys.argv[1])
