"""The benchmark harness: its formulas, its derived numbers, and one smoke run end to end."""

import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest

from peer_bench import formulas, report
from peer_bench.presets import PRESETS, BenchCase, sweep_cases


def test_peer_flops_per_term():
    # d_model=4, N=9 (n_keys=3), heads=2, topk=2, d_key=6, worked out by hand
    terms = formulas.peer_flops_per_token(d_model=4, n_experts=9, heads=2, topk=2, d_key=6)
    assert terms == {"query": 96, "sub_keys": 72, "candidates": 8, "down": 32, "gate": 0, "up": 32, "total": 240}


def test_glu_experts_add_a_gate_term_equal_to_the_down_term():
    plain = formulas.peer_flops_per_token(d_model=4, n_experts=9, heads=2, topk=2, d_key=6, d_out=8)
    glu = formulas.peer_flops_per_token(d_model=4, n_experts=9, heads=2, topk=2, d_key=6, d_out=8, expert_glu=True)
    assert glu["gate"] == glu["down"] == 2 * 2 * 2 * 4
    assert glu["total"] == plain["total"] + glu["gate"]
    assert {k: v for k, v in glu.items() if k not in ("gate", "total")} == {
        k: v for k, v in plain.items() if k not in ("gate", "total")
    }
    # One more (tokens*h*k, d_model) gather of gate rows.
    assert (
        formulas.expert_stage_bytes(3, 2, 4, 5, 7, 4, expert_glu=True) - formulas.expert_stage_bytes(3, 2, 4, 5, 7, 4)
        == 3 * 2 * 4 * 5 * 4
    )
    glu_case = BenchCase(d_model=8, n_experts=64, heads=1, topk=2, d_key=4, tokens=32, expert_glu=True)
    assert formulas.case_counts(glu_case)["peer_flops_per_token"]["gate"] == 2 * 1 * 2 * 8


def test_case_from_results_written_before_expert_glu():
    case = BenchCase(d_model=8, n_experts=64, heads=1, topk=2, d_key=4, tokens=32)
    old = {k: v for k, v in case.to_dict().items() if k != "expert_glu"}
    assert BenchCase.from_dict(old) == case and case.config()["expert_glu"] is False


def test_peer_flops_grow_with_sqrt_n_and_d_out():
    small = formulas.peer_flops_per_token(256, 256**2, 8, 16, 128)
    large = formulas.peer_flops_per_token(256, 1024**2, 8, 16, 128)
    assert large["sub_keys"] == 4 * small["sub_keys"]
    assert {k: large[k] for k in ("query", "candidates", "down", "up")} == {
        k: small[k] for k in ("query", "candidates", "down", "up")
    }
    assert formulas.peer_flops_per_token(4, 9, 2, 2, 6, d_out=8)["up"] == 2 * 2 * 2 * 8


def test_dense_width_matches_peer_flops():
    case = PRESETS["cpu"].case
    peer = formulas.peer_flops_per_token(**case.config())["total"]
    width = formulas.dense_width(peer, case.d_model)
    assert peer == 1_181_696 and width == 1154  # 1_181_696 / (2 * (256 + 256))
    assert formulas.dense_flops_per_token(width, case.d_model) == peer
    for flops in (1000, 1001, 5000, 77777):
        w = formulas.dense_width(flops, 10, 20)
        assert abs(formulas.dense_flops_per_token(w, 10, 20) - flops) <= 2 * (10 + 20) / 2
    assert formulas.dense_width(1, 10) == 1


def test_expert_stage_bytes_and_mode_factor():
    assert (
        formulas.expert_stage_bytes(tokens=3, heads=2, topk=4, d_model=5, d_out=7, itemsize=4)
        == (3 * 2 * 4 * 12 + 3 * 12) * 4
    )
    assert formulas.mode_factor("forward_backward") == 3 * formulas.mode_factor("forward")
    with pytest.raises(ValueError, match="mode='backward'"):
        formulas.mode_factor("backward")


def test_sweep_cases_measure_the_base_case_once():
    base = BenchCase(d_model=8, n_experts=64, heads=1, topk=2, d_key=4, tokens=32)
    pairs = sweep_cases(base, {"experts": (16, 64, 256), "tokens": (8,)})
    cases = [c for c, _ in pairs]
    assert len(cases) == len(set(cases)) == 4
    assert dict(pairs)[base] == ["experts", "tokens"]


def _row(impl, backend, path, mode, median, case):
    return {
        "impl": impl,
        "backend": backend,
        "path": path,
        "mode": mode,
        "case": case,
        "status": "ok",
        "median_s": median,
    }


def test_ratios_pair_like_with_like():
    case = BenchCase(d_model=8, n_experts=64, heads=1, topk=2, d_key=4, tokens=32).to_dict()
    rows = [
        _row("peer", "jax", "compiled", "forward", 2.0, case),
        _row("dense", "jax", "compiled", "forward", 0.5, case),
        _row("dense", "jax", "eager", "forward", 0.25, case),
        _row("peer_pytorch", "torch", "eager", "forward", 8.0, case),
        _row("dense", "torch", "eager", "forward", 4.0, case),
        _row("peer", "jax", "compiled", "forward_backward", 3.0, case),
        {
            "impl": "peer",
            "backend": "tensorflow",
            "path": "eager",
            "mode": "forward",
            "case": case,
            "status": "skipped",
            "reason": "not installed",
        },
    ]
    report.add_derived(rows, copy_bytes_per_s=1e9)
    peer_fwd, _, _, baseline, _, peer_bwd, skipped = rows
    assert peer_fwd["ratio_vs_peer_pytorch"] == 0.25 and peer_fwd["ratio_vs_dense"] == 4.0
    assert baseline["ratio_vs_dense"] == 2.0 and "ratio_vs_peer_pytorch" not in baseline
    assert "ratio_vs_peer_pytorch" not in peer_bwd and "ratio_vs_dense" not in peer_bwd
    moved = formulas.expert_stage_bytes(32, 1, 2, 8, None, 4)
    assert peer_fwd["expert_bandwidth_fraction"] == pytest.approx(moved / 2.0 / 1e9)
    assert "expert_bandwidth_fraction" not in peer_bwd and "ratio_vs_dense" not in skipped


def test_glu_rows_are_labelled_and_timed_against_the_plain_row():
    plain_case = BenchCase(d_model=8, n_experts=64, heads=1, topk=2, d_key=4, tokens=32)
    glu_case = dataclasses.replace(plain_case, expert_glu=True).to_dict()
    rows = [
        _row("peer", "torch", "eager", "forward", 2.0, plain_case.to_dict()),
        _row("peer", "torch", "eager", "forward", 3.0, glu_case),
        _row("peer", "torch", "eager", "forward_backward", 5.0, glu_case),
    ]
    report.add_derived(rows, copy_bytes_per_s=1e9)
    plain, glu_fwd, glu_bwd = rows
    assert report.label(glu_fwd) == "PEER-GLU torch" and report.label(plain) == "PEER torch"
    assert glu_fwd["ratio_vs_plain"] == 1.5 and "ratio_vs_plain" not in plain
    assert "ratio_vs_plain" not in glu_bwd  # no plain fwd+bwd row to compare with
    assert glu_fwd["expert_stage_bytes"] == formulas.expert_stage_bytes(32, 1, 2, 8, None, 4, expert_glu=True)


def test_mixed_rows_are_labelled_and_timed_against_float32_and_peer_pytorch_bfloat16():
    plain_case = BenchCase(d_model=8, n_experts=64, heads=1, topk=2, d_key=4, tokens=32)
    mixed_case = dataclasses.replace(plain_case, compute_dtype="bfloat16").to_dict()
    baseline_case = dataclasses.replace(plain_case, dtype="bfloat16").to_dict()
    rows = [
        _row("peer", "torch", "eager", "forward", 2.0, plain_case.to_dict()),
        _row("peer", "torch", "eager", "forward", 1.5, mixed_case),
        _row("peer_pytorch", "torch", "eager", "forward", 3.0, baseline_case),
        _row("peer_pytorch", "torch", "eager", "forward", 6.0, plain_case.to_dict()),
    ]
    report.add_derived(rows, copy_bytes_per_s=1e9)
    plain, mixed, baseline_bf16, baseline = rows
    assert report.label(mixed) == "PEER mixed-bfloat16 torch" and report.label(plain) == "PEER torch"
    assert report.label(baseline_bf16) == "PEER-pytorch bfloat16" and report.label(baseline) == "PEER-pytorch"
    assert mixed["ratio_vs_plain"] == 0.75 and mixed["ratio_vs_peer_pytorch"] == 0.5
    assert plain["ratio_vs_peer_pytorch"] == 2.0 / 6.0
    # the mixed mode's expert rows are counted at bfloat16's 2 bytes
    assert mixed["expert_stage_bytes"] == formulas.expert_stage_bytes(32, 1, 2, 8, None, 2)
    assert BenchCase.from_dict(mixed_case).activation_dtype == "bfloat16" and plain_case.activation_dtype == "float32"


def _bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "peer_bench", *args], capture_output=True, text=True, timeout=timeout)


def test_bad_backend_is_refused():
    proc = _bench("--preset", "smoke", "--backends", "numpy,mxnet")
    assert proc.returncode == 2
    assert "--backends='mxnet'" in proc.stderr


@pytest.mark.parametrize("name", ["peer_pytorch:aten", "torch:", "mxnet:triton"])
def test_bad_backend_implementation_is_refused(name):
    proc = _bench("--preset", "smoke", "--backends", name)
    assert proc.returncode == 2 and f"--backends={name!r}" in proc.stderr, proc.stderr


def test_backend_implementation_rows(tmp_path):
    """BACKEND:IMPLEMENTATION passes implementation= on; a name the backend lacks is an error row."""
    proc = _bench(
        "--preset",
        "smoke",
        "--backends",
        "numpy:numpy,numpy:nope",
        "--paths",
        "eager",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--sweep",
        "none",
        "--no-glu",
        "--no-mixed",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    peer = {(r["backend"], r["mode"]): r for r in rows if r["impl"] == "peer"}
    assert {key[0] for key in peer} == {"numpy:numpy", "numpy:nope"}
    for mode in ("forward", "forward_backward"):
        assert peer["numpy:numpy", mode]["status"] == "ok"
        assert peer["numpy:nope", mode]["status"] == "error"
        assert "implementation='nope'" in peer["numpy:nope", mode]["reason"]


def test_importing_the_harness_imports_no_framework():
    code = (
        "import sys, peer_bench.cli, peer_bench.runner, peer_bench.report, peer_bench.plots; "
        "print(sorted(m for m in ('torch', 'jax', 'tensorflow', 'matplotlib') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    torch_backend = (
        importlib.util.find_spec("torch") is not None and importlib.util.find_spec("peer_backends.torch") is not None
    )
    backends = "numpy,torch" if torch_backend else "numpy"
    proc = _bench(
        "--preset",
        "smoke",
        "--backends",
        backends,
        "--paths",
        "eager",
        "--threads",
        "1",
        "--repeats",
        "2",
        "--sweep",
        "all",
        "--out",
        str(out),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, json.loads((out / "results.json").read_text()), backends.split(",")


def test_smoke_run_writes_report_and_plots(smoke):
    out, result, _ = smoke
    assert result["schema"] == report.SCHEMA
    for key in (
        "settings",
        "case",
        "counts",
        "formulas",
        "peer_pytorch_mapping",
        "bandwidth",
        "environment",
        "results",
        "sweeps",
        "jobs",
    ):
        assert key in result, key
    assert result["bandwidth"]["bytes_per_s"] > 0
    assert {"python", "cpu_model", "versions", "date", "command", "threads"} <= set(result["environment"])
    for name in ("summary.md", "bars.png", "sweep_experts.png", "sweep_tokens.png"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert "| PEER numpy | eager | fwd |" in summary and "dense FFN width" in summary
    assert "| PEER-GLU numpy | eager | fwd |" in summary
    assert "| PEER mixed-bfloat16 numpy | eager | fwd |" in summary


def test_smoke_rows_are_complete(smoke):
    _, result, backends = smoke
    rows = result["results"]
    assert {r["path"] for r in rows} == {"eager"}  # --paths eager
    for backend in backends:
        for mode in ("forward", "forward_backward"):
            mine = [r for r in rows if (r["impl"], r["backend"], r["mode"]) == ("peer", backend, mode)]
            peer = [r for r in mine if not r["case"]["expert_glu"] and not r["case"]["compute_dtype"]]
            glu = [r for r in mine if r["case"]["expert_glu"]]
            mixed = [r for r in mine if r["case"]["compute_dtype"]]
            # PEER-GLU and the mixed mode are in the default run
            assert len(peer) == len(glu) == len(mixed) == 1, (backend, mode)
            if peer[0]["status"] != "ok":
                assert backend != "numpy" and peer[0]["reason"], peer[0]
                continue
            row = peer[0]
            assert row["repeats"] == len(row["times_s"]) >= 1
            assert row["min_s"] <= row["q1_s"] <= row["median_s"] <= row["q3_s"] <= row["max_s"]
            assert row["flops"] == result["counts"]["peer_flops_forward"] * formulas.mode_factor(mode)
            assert row["peak_mem_bytes"] is not None and row["ratio_vs_dense"] > 0
            assert ("expert_bandwidth_fraction" in row) == (mode == "forward")
            glu_row = glu[0]
            assert glu_row["status"] == "ok" and glu_row["ratio_vs_plain"] > 0, glu_row
            glu_case = BenchCase.from_dict(glu_row["case"])
            assert glu_row["flops"] == formulas.case_counts(glu_case)["peer_flops_forward"] * formulas.mode_factor(mode)
            assert "ratio_vs_dense" not in glu_row and "PEER-GLU" in report.label(glu_row)
            mixed_row = mixed[0]
            assert mixed_row["status"] == "ok" and mixed_row["ratio_vs_plain"] > 0, mixed_row
            assert mixed_row["case"]["dtype"] == "float32" and mixed_row["case"]["compute_dtype"] == "bfloat16"
            assert "ratio_vs_dense" not in mixed_row and "mixed-bfloat16" in report.label(mixed_row)
    baseline = [r for r in rows if r["impl"] == "peer_pytorch"]
    assert baseline == []  # not asked for
    swept = {(r["case"]["n_experts"], r["case"]["tokens"]) for r in result["sweeps"] if r["backend"] == "numpy"}
    smoke = PRESETS["smoke"]
    assert swept == {(n, smoke.case.tokens) for n in smoke.sweep_full["experts"]} | {
        (smoke.case.n_experts, t) for t in smoke.sweep_full["tokens"]
    }


def test_missing_device_gives_skip_rows_with_reasons(tmp_path):
    proc = _bench(
        "--preset", "smoke", "--backends", "numpy", "--device", "gpu", "--sweep", "none", "--out", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["skipped"] * 8  # 4 plain cells, 2 PEER-GLU and 2 mixed cells
    assert rows[0]["reason"] == rows[-1]["reason"] == "numpy runs on the CPU only"
    assert all(r["reason"] for r in rows)


def test_sharded_model_counts_by_hand():
    from peer_bench import sharded

    # d_model=4, N=9, heads=2, topk=2, d_key=6, float32 over P=2: tables 9*(4+4)*4/2 bytes;
    # replicated query.kernel 4*2*6, sub-keys 3*6, bias 9, batch norm 2*2*6 elements.
    counts = sharded.model(BenchCase(d_model=4, n_experts=9, heads=2, topk=2, d_key=6, tokens=1), 2)
    assert counts["table_bytes"] == 144 and counts["replicated_bytes"] == (48 + 18 + 9 + 24) * 4
    assert counts["payload_bytes_per_token"] == {"forward": (4 + 4) * 4, "backward": (4 + 4) * 4}
    assert counts["wire_bytes_per_token"] == {"forward": (4 * 1 + 4 * 0.5) * 4, "backward": (4 * 1 + 4 * 0.5) * 4}
    bf16 = sharded.model(BenchCase(d_model=4, n_experts=9, heads=2, topk=2, d_key=6, tokens=1, dtype="bfloat16"), 2)
    assert bf16["payload_bytes_per_token"] == {"forward": 4 * 4 + 4 * 2, "backward": (4 + 4) * 4}
    # GLU experts: experts.gate is a third table of 9*4, its 4 partial dots ride the forward
    # all-reduce with down's (2*h*k); backward is unchanged (one h*k coefficient gradient).
    glu = sharded.model(BenchCase(d_model=4, n_experts=9, heads=2, topk=2, d_key=6, tokens=1, expert_glu=True), 2)
    assert glu["table_bytes"] == 9 * (4 + 4 + 4) * 4 / 2 and glu["replicated_bytes"] == counts["replicated_bytes"]
    assert glu["payload_bytes_per_token"] == {"forward": (8 + 4) * 4, "backward": (4 + 4) * 4}
    assert glu["wire_bytes_per_token"] == {"forward": (8 * 1 + 4 * 0.5) * 4, "backward": (4 * 1 + 4 * 0.5) * 4}
    lines = sharded.table(
        {
            "case": BenchCase(4, 9, 2, 2, 6, 1).to_dict(),
            "device": "cpu",
            "devices": 2,
            "model": counts,
            "measured": {},
            "glu": {"case": BenchCase(4, 9, 2, 2, 6, 1, expert_glu=True).to_dict(), "model": glu, "measured": {}},
        }
    )
    assert [line[:9].strip() for line in lines[2:]] == ["model", "model GLU"]
    assert [float(line.split()[-6]) for line in lines[2:]] == [round(144 / 2**20, 3), round(216 / 2**20, 3)]


def test_sharded_hlo_collectives_are_read_with_their_sizes():
    from peer_bench import sharded

    hlo = (
        "%a = f32[10,3,4]{2,1,0} all-reduce(%x), channel_id=1\n"
        "%b = (f32[1,10,3,4]{3,2,1,0}, bf16[10,3]{1,0}) all-reduce(%y, %z)\n"
        "%c = f32[10,12]{0,1} all-gather-start(%w), dimensions={1}\n%d = f32[5] add(%a, %a)\n"
    )
    assert sharded._hlo_collectives(hlo, "forward") == [
        ("all_reduce", 120, 4, "forward"),
        ("all_reduce", 120, 4, "forward"),
        ("all_reduce", 30, 2, "forward"),
        ("all_gather", 120, 4, "forward"),
    ]


def test_devices_flag_is_checked():
    from peer_bench.cli import main

    with pytest.raises(SystemExit):
        main(["--preset", "smoke", "--devices", "1"])
    with pytest.raises(SystemExit):
        main(["--preset", "smoke", "--devices", "2", "--backends", "numpy"])


def test_gpu_preset_is_training_sized():
    """The gpu preset: d_model=1024, N=1024², heads=8, topk=16, d_key=128, 32768 tokens per call,
    with a token sweep from 2048 to 65536 in the default run."""
    preset = PRESETS["gpu"]
    assert preset.case == BenchCase(d_model=1024, n_experts=1024**2, heads=8, topk=16, d_key=128, tokens=32768)
    assert preset.sweep_reduced["tokens"][0] == 2048 and preset.sweep_reduced["tokens"][-1] == 65536
    assert preset.case.tokens in preset.sweep_reduced["tokens"]


def test_train_step_plan_follows_backends_and_the_experts_sweep():
    from peer_bench import train_step
    from peer_bench.runner import Settings

    case = BenchCase(d_model=8, n_experts=64, heads=1, topk=2, d_key=4, tokens=32)
    timing = PRESETS["smoke"].timing
    settings = Settings(
        "smoke", case, timing, "cpu", 1, ("torch:aten", "peer_pytorch"), ("eager",), "experts", {}, timing, 60.0, 1
    )
    plan = [(impl, backend, grads, c.n_experts) for impl, backend, grads, c in train_step.planned(settings)]
    assert plan == [
        ("peer", "torch:aten", "dense", 64),
        ("peer", "torch:aten", "sparse", 64),
        ("peer_pytorch", "torch", "dense", 64),
        ("dense", "torch", "dense", 64),
    ]
    settings = dataclasses.replace(settings, backends=("jax",), sweep_axes={"experts": (16, 256), "tokens": (8,)})
    plan = [(impl, grads, c.n_experts, c.tokens) for impl, _, grads, c in train_step.planned(settings)]
    assert plan == [(i, g, n, 32) for n in (16, 64, 256) for i, g in (("peer", "dense"), ("peer", "sparse"))]


def test_train_step_targets_and_ratios():
    from peer_bench import train_step

    def row(impl, backend, grads, n, median, peak, grad_bytes):
        case = BenchCase(d_model=4, n_experts=n, heads=1, topk=2, d_key=4, tokens=8).to_dict()
        return {
            "impl": impl,
            "backend": backend,
            "grads": grads,
            "case": case,
            "status": "ok",
            "median_s": median,
            "forward_backward_median_s": median / 2,
            "optimizer_median_s": median / 2,
            "peak_step_bytes": peak,
            "table_grad_bytes": grad_bytes,
            "table_bytes": train_step.table_bytes(case),
        }

    rows = [
        row("peer", "torch", "sparse", 16, 1.0, 10, 8),
        row("peer", "torch", "dense", 256, 12.0, 9000, 8192),
        row("peer", "torch", "sparse", 256, 3.0, 5000, 64),
        row("peer_pytorch", "torch", "dense", 256, 6.0, 9000, 8192),
    ]
    train_step.add_ratios(rows)
    assert rows[2]["ratio_vs_dense_grads"] == 0.25 and rows[2]["ratio_vs_peer_pytorch"] == 0.5
    assert rows[2]["peak_over_table"] == 5000 / (256 * 4 * 4) and "ratio_vs_dense_grads" not in rows[1]
    targets = {t["what"]: (t["row"], t["n_experts"], t["value"], t["met"]) for t in train_step.targets(rows)}
    row = "PEER torch, sparse grads + SparseAdam"
    assert targets == {
        "step time / dense-gradient step": (row, 256, 0.25, True),
        "step time / PEER-pytorch step": (row, 256, 0.5, False),
        "step time at N = 16² / at N = 4²": (row, 256, 3.0, True),
        "bytes of the table gradients / bytes of one (N, d_model) table": (row, 256, 64 / 4096, True),
        "peak step memory / bytes of one (N, d_model) table": (row, 256, 5000 / 4096, False),
    }
    report = {
        "case": rows[0]["case"],
        "settings": {"preset": "smoke", "threads": 1},
        "environment": {"cpu_model": "cpu", "command": "python -m peer_bench --train-step"},
        "rows": rows,
        "targets": train_step.targets(rows),
    }
    text = train_step.markdown(report)
    assert "| 4² | PEER torch, sparse grads + SparseAdam | 1000 | 500 | 500 |" in text
    assert (
        "| step time / PEER-pytorch step | PEER torch, sparse grads + SparseAdam | 16² | 0.50 | ≤ 1/3 | **no** |"
        in text
    )


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("peer_backends.torch") is None,
    reason="torch is not installed",
)
def test_train_step_smoke_sparse_step_holds_no_table_sized_buffer(tmp_path):
    """One timed step of each torch row at N = 512², d_model = 64: one table is 64 MiB, above
    glibc's largest mmap threshold, so a table-sized buffer shows in the resident peak."""
    proc = _bench(
        "--preset",
        "smoke",
        "--train-step",
        "--backends",
        "torch",
        "--d-model",
        "64",
        "--n-experts",
        str(512**2),
        "--sweep",
        "none",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "train_step.json").read_text())
    assert result["schema"] == "peer_bench/train-step/1" and result["environment"]["command"]
    rows = {(r["impl"], r["grads"]): r for r in result["rows"]}
    assert set(rows) == {("peer", "dense"), ("peer", "sparse"), ("dense", "dense")}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("reason") for r in rows.values()]
    table = 512**2 * 64 * 4
    dense, sparse = rows["peer", "dense"], rows["peer", "sparse"]
    for r in rows.values():
        assert r["repeats"] == 1 and r["table_bytes"] == table and r["median_s"] > 0
        assert r["forward_backward_median_s"] + r["optimizer_median_s"] == pytest.approx(r["median_s"])
    assert dense["table_grad_layout"] == "strided" and dense["table_grad_bytes"] >= 2 * table
    assert sparse["table_grad_layout"] == "sparse_coo" and 0 < sparse["grad_rows"] <= 32 * 2 * 4
    assert sparse["table_grad_bytes"] < table
    # the measurement sees the dense step's two table gradients, and no table-sized buffer in the sparse step
    assert dense["peak_step_bytes"] >= 2 * table > table > sparse["peak_step_bytes"]
    assert "| 512² | PEER torch, sparse grads + SparseAdam |" in (tmp_path / "train_step.md").read_text()
