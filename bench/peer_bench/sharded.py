"""`python -m peer_bench --devices P`: per-device memory and communicated bytes per token of
the column-sharded expert tables (peer_backends.torch.parallel, peer_backends.jax.parallel).

torch runs P gloo processes on 127.0.0.1 (nccl on --device gpu) and counts the collectives one
training step (forward + backward) issues, with a CommDebugMode that also keeps their sizes.
JAX runs in a child process with P devices (--xla_force_host_platform_device_count=P on cpu,
the real ones on gpu) and reads the collectives off the compiled HLO of the same step.

Reported per device: the bytes of parameters it holds (tables and replicated rest) and, per
token, the payload of each collective (the elements of the all-reduced or all-gathered array
times the item size) and the bytes a ring implementation sends: 2 (P-1)/P of the payload for
an all-reduce, (P-1)/P of it for an all-gather.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys

from .presets import DTYPE_BYTES, BenchCase

RING = {
    "all_reduce": lambda p: 2 * (p - 1) / p,
    "all_gather": lambda p: (p - 1) / p,
    "reduce_scatter": lambda p: (p - 1) / p,
}


def model(case: BenchCase, devices: int) -> dict:
    """The analytic counts of one training step per device, d_out = d_model (the formulas of docs/guide/sharding.md).

    b is the layer's item size, c the compute item size (4 for bfloat16, SPEC §10; else b),
    g = 2 for GLU experts (SPEC §3.10: experts.gate is sharded like experts.down and its partial
    dots are all-reduced stacked with down's), else 1.
    Forward: an all-reduce of the g*heads*topk partial dots (c each) and an all-gather of the
    d_model output features (b each); backward: an all-reduce of the heads*topk coefficient
    gradients (c) and an all-gather of x's d_model gradient features (c). Tables:
    N * (g + 1) * d_model * b / P; replicated: query.kernel, the two shared sub-key halves,
    experts.bias, the batch-norm scale and offset.
    """
    b = DTYPE_BYTES[case.dtype]
    c = 4 if case.dtype == "bfloat16" else b
    g = 2 if case.expert_glu else 1
    hk, d, n = case.heads * case.topk, case.d_model, case.n_experts
    reduce, gather = RING["all_reduce"](devices), RING["all_gather"](devices)
    return {
        "devices": devices,
        "table_bytes": n * (g + 1) * d * b / devices,
        "replicated_bytes": (d * case.heads * case.d_key + math.isqrt(n) * case.d_key + n + 2 * case.heads * case.d_key)
        * b,
        "payload_bytes_per_token": {"forward": g * hk * c + d * b, "backward": hk * c + d * c},
        "wire_bytes_per_token": {
            "forward": g * hk * c * reduce + d * b * gather,
            "backward": (hk * reduce + d * gather) * c,
        },
    }


def _kind(op: str) -> str | None:
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"):
        if kind in op.replace("-", "_"):
            return kind
    return None


def _summarise(collectives, tokens, devices, param_bytes, table_bytes):
    """collectives: (kind, elements, itemsize, phase) for one rank's step."""
    out = {
        "devices": devices,
        "param_bytes_per_device": param_bytes,
        "table_bytes_per_device": table_bytes,
        "collectives": [],
        "payload_bytes_per_token": {},
        "wire_bytes_per_token": {},
    }
    for kind, elements, itemsize, phase in collectives:
        payload = elements * itemsize / tokens
        out["collectives"].append({"op": kind, "elements": elements, "phase": phase})
        out["payload_bytes_per_token"][phase] = out["payload_bytes_per_token"].get(phase, 0) + payload
        wire = payload * RING.get(kind, lambda p: 1.0)(devices)
        out["wire_bytes_per_token"][phase] = out["wire_bytes_per_token"].get(phase, 0) + wire
    return out


# ---------------------------------------------------------------- torch


def _torch_rank(rank, devices, case_dict, device, port, result_path):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import parallelize_module

    from peer_backends.torch.layer import PEER
    from peer_backends.torch.parallel import ExpertColumnParallel, column_tables
    from peer_ref.config import PEERConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    on_gpu = device == "gpu"
    if on_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=devices)
    try:
        case = BenchCase.from_dict(case_dict)
        mesh = init_device_mesh("cuda" if on_gpu else "cpu", (devices,))
        layer = PEER(PEERConfig(**case.config()), dtype=case.dtype, device="cuda" if on_gpu else None).train()
        layer = parallelize_module(layer, mesh, ExpertColumnParallel())
        x = (
            torch.randn(case.tokens, case.d_model, generator=torch.Generator().manual_seed(0))
            .to(layer.query.kernel.to_local())
            .requires_grad_(True)
        )  # inside a network x has a gradient

        phases = []

        class Sizes(CommDebugMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(getattr(func, "_overloadpacket", func))
                kind = _kind(name)
                if DTensor not in types and name.lstrip("_").startswith(("c10d_functional.", "c10d.")) and kind:
                    tensor = max((a for a in args if isinstance(a, torch.Tensor)), key=torch.Tensor.numel)
                    elements = tensor.numel() * (devices if kind == "all_gather" else 1)
                    phases.append((kind, elements, tensor.element_size(), self.phase))
                return super().__torch_dispatch__(func, types, args, kwargs)

        comm = Sizes()
        with comm:
            comm.phase = "forward"
            y = layer(x)
            comm.phase = "backward"
            y.float().square().sum().backward()
        local = {n: (p.to_local() if isinstance(p, DTensor) else p) for n, p in layer.named_parameters()}
        param_bytes = sum(t.numel() * t.element_size() for t in local.values())
        table_bytes = sum(local[n].numel() * local[n].element_size() for n in column_tables(layer.cfg))
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump(_summarise(phases, case.tokens, devices, param_bytes, table_bytes), f)
    finally:
        dist.destroy_process_group()


def measure_torch(case: BenchCase, devices: int, device: str, tmp: str) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.path.join(tmp, f"torch-{devices}.json")
    mp.spawn(_torch_rank, args=(devices, case.to_dict(), device, port, path), nprocs=devices, join=True)
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- jax

_HLO_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(-start)?\("
)
_ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "s64": 8, "u32": 4, "pred": 1}


def _hlo_collectives(hlo: str, phase: str):
    found = []
    for match in _HLO_COLLECTIVE.finditer(hlo):
        shapes = re.findall(r"([a-z]+\d*)\[([\d,]*)\]", match.group(1))
        if match.group(3) and match.group(2) == "all-gather":
            shapes = shapes[-1:]  # an async all-gather's result is (operand, gathered)
        for dtype, dims in shapes:
            elements = math.prod(int(v) for v in dims.split(",") if v)
            found.append((_kind(match.group(2)), elements, _ITEMSIZE.get(dtype, 4), phase))
    return found


def _jax_child(devices: int, case_dict: dict) -> dict:
    import jax

    from peer_backends.jax import parallel
    from peer_backends.jax.peer import forward_jit, init, vjp_jit
    from peer_ref.config import PEERConfig

    case = BenchCase.from_dict(case_dict)
    cfg = PEERConfig(**case.config())
    mesh = jax.make_mesh((devices,), ("model",))
    params, state = parallel.shard(cfg, *init(cfg, dtype=case.dtype), mesh)
    x = jax.random.normal(jax.random.key(0), (case.tokens, case.d_model), params["experts.down"].dtype)
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))  # replicated
    sharded = dict(implementation="sharded", layout=(mesh, "model"))
    forward = forward_jit.lower(cfg, True, params, state, x, None, None, **sharded).compile()
    step = vjp_jit.lower(cfg, True, params, state, x, x[:, : cfg.d_out], None, None, **sharded).compile()
    # XLA schedules the step as a whole (it may merge or drop the forward's collectives), so
    # the backward's bytes are the step's less the forward's.
    fwd = _hlo_collectives(forward.as_text(), "forward")
    both = _hlo_collectives(step.as_text(), "step")
    device0 = jax.devices()[0]
    nbytes = {
        name: sum(s.data.nbytes for s in v.addressable_shards if s.device == device0) for name, v in params.items()
    }
    out = _summarise(
        fwd + both,
        case.tokens,
        devices,
        sum(nbytes.values()),
        sum(nbytes[name] for name in parallel.column_tables(cfg)),
    )
    for key in ("payload_bytes_per_token", "wire_bytes_per_token"):
        out[key]["backward"] = out[key].pop("step", 0) - out[key].get("forward", 0)
    return out


def measure_jax(case: BenchCase, devices: int, device: str) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
        env["JAX_PLATFORMS"] = "cpu"
    code = (
        "import json, sys; from peer_bench.sharded import _jax_child; "
        f"print(json.dumps(_jax_child({devices}, {case.to_dict()!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"the JAX child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(case: BenchCase, devices: int, backends, device: str, out_dir, glu: bool = False) -> dict:
    """Measure each backend of ``backends`` (torch, jax) on ``devices`` devices; writes sharded.json.

    ``glu``: also the same case with GLU experts (``expert_glu=True``), under ``results["glu"]``
    (skipped when ``case`` has GLU experts already).
    """
    import tempfile
    from pathlib import Path

    def measured(one: BenchCase, tmp: str) -> dict:
        out = {}
        for name in backends:
            if name == "torch":
                out["torch"] = measure_torch(one, devices, device, tmp)
            elif name == "jax":
                out["jax"] = measure_jax(one, devices, device)
        return out

    results = {"case": case.to_dict(), "device": device, "devices": devices, "model": model(case, devices)}
    with tempfile.TemporaryDirectory() as tmp:
        results["measured"] = measured(case, tmp)
        if glu and not case.expert_glu:
            glu_case = dataclasses.replace(case, expert_glu=True)
            results["glu"] = {
                "case": glu_case.to_dict(),
                "model": model(glu_case, devices),
                "measured": measured(glu_case, tmp),
            }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sharded.json").write_text(json.dumps(results, indent=1))
    return results


def rows(results: dict) -> dict[str, dict]:
    """The formulas' counts ("model") and each measured backend, then the same with GLU experts
    (names suffixed " GLU") when ``results`` holds them: per device, table and parameter bytes;
    per token, payload and ring-wire bytes of the forward and backward collectives."""
    out = {}
    for suffix, part in (("", results), (" GLU", results.get("glu"))):
        if part is None:
            continue
        counts = part["model"]
        out["model" + suffix] = {
            "table_bytes_per_device": counts["table_bytes"],
            "param_bytes_per_device": counts["table_bytes"] + counts["replicated_bytes"],
            "payload_bytes_per_token": counts["payload_bytes_per_token"],
            "wire_bytes_per_token": counts["wire_bytes_per_token"],
        }
        out.update({name + suffix: r for name, r in part["measured"].items()})
    return out


def _cells(r: dict) -> list[float]:
    pay, wire = r["payload_bytes_per_token"], r["wire_bytes_per_token"]
    return [
        r["table_bytes_per_device"] / 2**20,
        r["param_bytes_per_device"] / 2**20,
        pay.get("forward", 0),
        pay.get("backward", 0),
        wire.get("forward", 0),
        wire.get("backward", 0),
    ]


def table(results: dict) -> list[str]:
    """Plain-text lines of the report."""
    c, p = results["case"], results["devices"]
    glu = " GLU experts" if c.get("expert_glu") else ""
    lines = [
        f"sharded expert tables: P={p} devices ({results['device']}), d_model={c['d_model']} "
        f"N={c['n_experts']} heads={c['heads']} topk={c['topk']} tokens={c['tokens']} {c['dtype']}{glu}",
        f"{'':9} {'table MiB/dev':>14} {'params MiB/dev':>15} {'fwd B/token':>12} {'bwd B/token':>12}"
        f" {'fwd wire B/tok':>15} {'bwd wire B/tok':>15}",
    ]
    for name, r in rows(results).items():
        table_mib, param_mib, *per_token = _cells(r)
        lines.append(
            f"{name:9} {table_mib:>14.3f} {param_mib:>15.3f}"
            + "".join(f" {v:>{w}.1f}" for v, w in zip(per_token, (12, 12, 15, 15)))
        )
    return lines


def markdown(results: dict) -> str:
    """The report as a Markdown table (the docs' sharding page renders it from sharded.json)."""
    c = results["case"]
    lines = [
        f"P = {results['devices']} devices ({results['device']}); d_model {c['d_model']}, "
        f"N = {c['n_experts']}, heads {c['heads']}, top-{c['topk']}, {c['tokens']} tokens, {c['dtype']}.",
        "",
        "| | table MiB/device | params MiB/device | forward B/token | backward B/token "
        "| forward wire B/token | backward wire B/token |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows(results).items():
        label = name.replace("model", "formulas").replace(" GLU", ", GLU experts")
        table_mib, param_mib, *per_token = _cells(r)
        lines.append(
            f"| {label} | {table_mib:.3f} | {param_mib:.3f} | " + " | ".join(f"{v:.0f}" for v in per_token) + " |"
        )
    return "\n".join(lines) + "\n"


def scaling_markdown(case: Case, devices: tuple[int, ...]) -> str:
    """``model`` for ``case`` at each device count, single-neuron and GLU experts, as a Markdown table."""

    def size(n: float) -> str:
        for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
            if n >= scale:
                return f"{n / scale:.3g} {unit}"
        return f"{n:.0f} B"

    lines = [
        "| P | experts | tables / device | replicated / device | forward payload / token "
        "| backward payload / token | forward wire / token | backward wire / token |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for glu in (False, True):
        for p in devices:
            m = model(dataclasses.replace(case, expert_glu=glu), p)
            per_token = [m["payload_bytes_per_token"][k] for k in ("forward", "backward")] + [
                m["wire_bytes_per_token"][k] for k in ("forward", "backward")
            ]
            cells = ["—"] * 4 if p == 1 else [f"{v:,.0f} B" for v in per_token]
            lines.append(
                f"| {p} | {'GLU' if glu else 'single-neuron'} | {size(m['table_bytes'])} | "
                f"{size(m['replicated_bytes'])} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"
