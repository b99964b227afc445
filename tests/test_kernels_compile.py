"""The GPU kernels compile for a GPU, without one: what the interpreters cannot show.

The kernel tests run Triton's and Pallas's interpreters, which execute the kernels' Python on CPU
arrays and accept code a GPU compiler would refuse. Here the same launches are compiled for an
H100/H200 (CUDA compute capability 9.0) ahead of time:

- torch, implementation "triton": every launch that ``peer_backends.torch.kernels`` makes for a
  CUDA tensor (block sizes as on a GPU) is recorded instead of run, then compiled by
  ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` through Triton's whole pipeline (TTIR,
  TTGIR, LLVM IR, PTX, and a cubin from the ptxas that ships with triton). Each kernel's shared
  memory must fit an sm_90 block (227 KiB).
- JAX, implementation "pallas": the forward and backward are lowered for the "cuda" platform,
  which runs Pallas's Triton lowering on every kernel (``jax.jit(...).trace(...).lower(
  lowering_platforms=("cuda",))``); a primitive that lowering lacks fails here.

Triton must be imported without TRITON_INTERPRET=1 (and before TensorFlow), so this module runs in
a process of its own: the noxfile's ``kernels`` session does so.
"""

import inspect
import os
import re
import sys

import pytest

if "tensorflow" in sys.modules:
    pytest.skip("triton cannot be imported after tensorflow in one process", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 replaces Triton's compiler by its interpreter", allow_module_level=True)

from peer_ref import PEERConfig

# A block's shared memory on compute capability 9.0 (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability": 227 KB per thread block).
SM90_SHARED_BYTES = 227 * 1024

# (activation, bias, GLU, dtype, mixed-mode low dtype, heads, topk): every activation, with and
# without bias and gate, float32/float64, both mixed dtypes, and a power of two and not of heads*topk.
CASES = [
    ("gelu", True, False, "float32", None, 8, 16),
    ("gelu_tanh", False, False, "float32", None, 3, 5),
    ("relu", True, True, "float32", None, 2, 4),
    ("silu", False, True, "float32", None, 4, 4),
    ("identity", True, False, "float32", None, 2, 3),
    ("gelu", True, True, "float64", None, 3, 5),
    ("gelu", True, False, "float32", "bfloat16", 8, 16),
    ("silu", True, True, "float32", "float16", 2, 4),
]


def _config(activation, bias, glu, heads, topk):
    return PEERConfig(
        d_model=24,
        n_experts=256,
        heads=heads,
        topk=topk,
        d_key=4,
        d_out=40,
        activation=activation,
        expert_bias=bias,
        expert_glu=glu,
    )


# ---------------------------------------------------------------- torch: Triton for sm_90


@pytest.fixture(scope="module")
def triton_launches():
    """{(kernel name, signature, constexprs): the jit function} for every case's forward and backward."""
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    from peer_backends.torch import kernels

    triton = kernels.triton
    launches = {}
    real = {
        name: getattr(kernels, name) for name in ("_forward_kernel", "_token_backward_kernel", "_table_backward_kernel")
    }

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                fn = real[self.name]
                names = list(inspect.signature(fn.fn).parameters)
                signature = {name: _triton_type(torch, value) for name, value in zip(names, args)}
                signature.update({name: "constexpr" for name in constexprs})
                key = (self.name, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()))
                launches[key] = (fn, signature, {(names.index(k),): v for k, v in constexprs.items()})

            return launch

    saved = {name: getattr(kernels, name) for name in list(real) + ["_interpreted"]}
    try:
        kernels._interpreted = lambda device: False  # the block sizes of a CUDA launch
        for name in real:
            setattr(kernels, name, Recorder(name))
        for activation, bias, glu, dtype, low, heads, topk in CASES:
            cfg = _config(activation, bias, glu, heads, topk)
            dtype = getattr(torch, dtype)
            tokens, j = 5, heads * topk
            x = torch.randn(tokens, cfg.d_model, dtype=dtype)
            indices = torch.randint(0, cfg.n_experts, (tokens, j))
            weights = torch.randn(tokens, j, dtype=dtype)
            down = torch.randn(cfg.n_experts, cfg.d_model, dtype=dtype)
            up = torch.randn(cfg.n_experts, cfg.d_out, dtype=dtype)
            b = torch.randn(cfg.n_experts, dtype=dtype) if bias else None
            gate = torch.randn(cfg.n_experts, cfg.d_model, dtype=dtype) if glu else None
            low = getattr(torch, low) if low else None
            y, pre, gated = kernels._forward(x, indices, weights, down, up, b, gate, activation, low)
            kernels._experts_backward_op(
                torch.randn_like(y), x, indices, weights, down, up, b, gate, pre, gated, activation, low, True, True
            )
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)
    return triton, launches


def _triton_type(torch, value):
    if isinstance(value, torch.Tensor):
        return (
            "*"
            + {
                torch.float32: "fp32",
                torch.float64: "fp64",
                torch.bfloat16: "bf16",
                torch.float16: "fp16",
                torch.int64: "i64",
                torch.int32: "i32",
            }[value.dtype]
        )
    if isinstance(value, bool):
        return "i1"
    assert isinstance(value, int), f"a launch argument of type {type(value).__name__}"
    return "i32" if -(2**31) <= value < 2**31 else "i64"


def test_every_triton_launch_compiles_for_sm90(triton_launches):
    triton, launches = triton_launches
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = {key[0] for key in launches}
    assert kernels == {"_forward_kernel", "_token_backward_kernel", "_table_backward_kernel"}
    # Every case adds launches of its own (activation, dtypes, blocks): none is recorded twice.
    assert len(launches) >= 2 * len(CASES)
    for (name, _, constexprs), (fn, signature, values) in launches.items():
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=values), target=GPUTarget("cuda", 90, 32)
        )
        where = f"{name} {dict(constexprs)} {signature}"
        assert compiled.asm["cubin"], f"no cubin for {where}"
        assert ".target sm_90" in compiled.asm["ptx"], where
        assert compiled.metadata.shared <= SM90_SHARED_BYTES, (
            f"{compiled.metadata.shared} bytes of shared memory: {where}"
        )


# ---------------------------------------------------------------- JAX: Pallas's Triton lowering

TRITON_CALL = re.compile(r"stablehlo\.custom_call @__gpu\$xla\.gpu\.triton")


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(str(v) for v in case))
def test_pallas_kernels_lower_to_triton_for_cuda(case, monkeypatch):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from peer_backends.jax import kernels

    activation, bias, glu, dtype, low, heads, topk = case
    if dtype == "float64":
        pytest.skip("float64 needs jax_enable_x64, set for the whole process; float32 covers the kernels")
    cfg = _config(activation, bias, glu, heads, topk)
    monkeypatch.setattr(kernels, "interpreted", lambda: False)  # lower as on a GPU
    tokens = 5
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (tokens, cfg.d_model))
    indices = jax.random.randint(keys[1], (tokens, heads, topk), 0, cfg.n_experts)
    weights = jax.random.normal(keys[2], (tokens, heads, topk))
    tables = [
        jax.random.normal(keys[3], (cfg.n_experts, cfg.d_model)),
        jax.random.normal(keys[4], (cfg.n_experts, cfg.d_out)),
        jnp.ones((cfg.n_experts,)) if bias else None,
        jax.random.normal(keys[5], (cfg.n_experts, cfg.d_model)) if glu else None,
    ]

    def loss(x, weights, tables):
        return kernels.pallas_experts(activation, low, x, indices, weights, *tables).sum()

    forward = jax.jit(lambda x, weights, tables: kernels.pallas_experts(activation, low, x, indices, weights, *tables))
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    # Forward: row dots, row sums. Backward: those again (the forward's), then row dots of dy with
    # the up rows, row sums into dx, segment rows into the tables (peer_backends.jax.kernels).
    for name, fn, calls in (("forward", forward, 2), ("backward", backward, 5)):
        text = fn.trace(x, weights, tables).lower(lowering_platforms=("cuda",)).as_text()
        found = len(TRITON_CALL.findall(text))
        assert found == calls, f"{name}: {found} Triton kernels lowered, expected {calls}"
