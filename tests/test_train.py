"""peer_train: a few-step smoke test per framework, determinism, resuming, mixed precision, sparse
table gradients with the lazy optimizer, the transfer and pool experiments, reports and every bad
flag. Small sizes only; nothing here is timed."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from peer_bench import formulas
from peer_train import data, experiments, report
from peer_train.cli import main
from peer_train.config import ConfigError, ModelConfig, TrainConfig
from peer_train.train import ResumeError, run

TINY = ModelConfig(
    d_model=32, n_layers=2, n_heads=2, seq=32, ffn_width=64, n_experts=8**2, peer_heads=2, topk=4, d_key=16
)
TINY_FLAGS = [
    "--d-model",
    "32",
    "--n-layers",
    "2",
    "--n-heads",
    "2",
    "--seq",
    "32",
    "--ffn-width",
    "64",
    "--n-experts",
    "64",
    "--peer-heads",
    "2",
    "--topk",
    "4",
    "--d-key",
    "16",
    "--batch",
    "8",
    "--eval-batches",
    "2",
    "--warmup",
    "2",
]


def _train_cfg(steps=30, **kw):
    return TrainConfig(
        **{"steps": steps, "batch": 8, "lr": 3e-3, "warmup": 5, "eval_every": 10, "eval_batches": 2, **kw}
    )


@pytest.fixture(scope="module")
def corpus():
    return data.load()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- data ---------------------------------------------------------------------------------


def test_stdlib_corpus_is_deterministic_and_split_by_file_name(corpus):
    root, files = data.stdlib_files()
    relative = [f.relative_to(root).as_posix() for f in files]
    assert relative == sorted(relative)
    assert not any(part in data.SKIP_DIRS for r in relative for part in r.split("/")[:-1])
    assert 0.02 < corpus.n_val_files / corpus.n_files < 0.3
    again = data.load()
    assert again.sha256 == corpus.sha256 and np.array_equal(again.val, corpus.val)
    assert corpus.train.dtype == np.uint8 and corpus.train.size > 10 * corpus.val.size / 3


def test_directory_split_moves_no_other_file(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i}.txt").write_text(f"file {i} " * 200)
    first = data.load(tmp_path)
    (tmp_path / "f0.txt").write_text("changed " * 300)
    second = data.load(tmp_path)
    assert second.sha256 != first.sha256
    assert second.n_val_files == first.n_val_files


def test_a_folder_of_few_files_is_split_by_position(tmp_path):
    (tmp_path / "a.md").write_text("alpha " * 6000)
    (tmp_path / "b.txt").write_text("beta " * 6000)
    corpus = data.load(tmp_path)
    assert corpus.split == "position" and corpus.n_files == 2
    assert corpus.val.size == int(66000 * 0.1) and bytes(corpus.val[-5:]) == b"beta "


def test_batches_depend_only_on_seed_and_step(corpus):
    a = data.train_batch(corpus.train, 3, 7, 4, 16)
    assert a.shape == (4, 17) and a.dtype == np.int32
    assert np.array_equal(a, data.train_batch(corpus.train, 3, 7, 4, 16))
    assert not np.array_equal(a, data.train_batch(corpus.train, 3, 8, 4, 16))
    val = data.val_batches(corpus.val, 4, 16, 3)
    assert len(val) == 3 and np.array_equal(val[0][0], corpus.val[:17])


# ---- FLOPs --------------------------------------------------------------------------------


def test_dense_and_peer_models_have_equal_flops_per_token():
    peer, dense = TINY, dataclasses.replace(TINY, ffn="dense")
    assert dense.block_ffns()[1] == ("dense", formulas.dense_width(peer.peer_flops(), 32))
    f_peer, f_dense = peer.flops_per_token()["total"], dense.flops_per_token()["total"]
    assert abs(f_peer - f_dense) <= 2 * (32 + 32) / 2  # one rounded width
    d, layers, seq, vocab = 32, 2, 32, 256
    expected = 8 * d * d * layers + 4 * seq * d * layers + 2 * 64 * 2 * d + peer.peer_flops() + 2 * d * vocab
    assert f_peer == expected
    assert peer.train_flops_per_token() == 3 * f_peer
    every = dataclasses.replace(TINY, peer_blocks="all")
    assert [k for k, _ in every.block_ffns()] == ["peer", "peer"]


def test_peer_glu_model_selects_the_top_k_of_equal_flops():
    glu = dataclasses.replace(TINY, ffn="peer_glu")
    built = glu.peer_config()
    assert built.expert_glu and (built.n_experts, built.heads, built.d_key) == (64, 2, 16)
    assert not TINY.peer_config().expert_glu and TINY.peer_config().topk == 4
    # h=2, d=32, d_key=16, n_keys=8: 2*32*2*16 + 2*2*8*16 + 2*k*k + 2*2*k*(2*32 + 32)
    by_k = {k: 2048 + 512 + 2 * k * k + 384 * k for k in range(1, 9)}
    assert TINY.peer_flops() == 2048 + 512 + 32 + 1024
    assert built.topk == min(by_k, key=lambda k: abs(by_k[k] - TINY.peer_flops())) == 3
    assert glu.built_peer_flops() == by_k[3]
    assert glu.flops_per_token()["ffn"] - TINY.flops_per_token()["ffn"] == by_k[3] - TINY.peer_flops()
    assert glu.block_ffns() == TINY.block_ffns()


# ---- training, per framework -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_loss_falls_and_metrics_are_in_range(corpus, backend):
    if backend == "jax":
        pytest.importorskip("flax")
    record = run(TINY, _train_cfg(), corpus, backend=backend)
    losses = record["losses"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert losses[0] == pytest.approx(math.log(256), abs=0.6)
    assert [e["step"] for e in record["evals"]] == [10, 20, 30]
    assert record["evals"][-1]["val_bpb"] < record["evals"][0]["val_bpb"] < 8.5
    assert record["val_bpb"] == pytest.approx(record["evals"][-1]["val_bpb"])
    ((block, m),) = record["routing"].items()
    assert block == "1"
    assert 0 < m["usage"] <= 1 and 0 <= m["unevenness"] <= math.log(TINY.n_experts)
    assert record["train_flops"] == 30 * 8 * 32 * TINY.train_flops_per_token()


@pytest.mark.parametrize(
    "backend, precision, sparse",
    [("torch", "float32", False), ("jax", "float32", False), ("torch", "bfloat16", False), ("torch", "float32", True)],
)
def test_same_seed_same_losses_and_resume_reproduces_them(corpus, backend, precision, sparse, tmp_path):
    if backend == "jax":
        pytest.importorskip("flax")
    cfg = _train_cfg(steps=12, eval_every=6, precision=precision, sparse=sparse)
    whole = run(TINY, cfg, corpus, backend=backend)
    stopped = run(TINY, cfg, corpus, backend=backend, out_dir=tmp_path, checkpoint_every=5, stop_after=7)
    assert stopped["losses"] == whole["losses"][:7] and "val_bpb" not in stopped
    resumed = run(TINY, cfg, corpus, backend=backend, out_dir=tmp_path, checkpoint_every=5, resume=True)
    assert resumed["losses"] == whole["losses"]
    assert resumed["evals"] == whole["evals"]
    assert resumed["routing"] == whole["routing"]
    assert whole["sparse"] is resumed["sparse"] is sparse
    assert np.mean(whole["losses"][-3:]) < np.mean(whole["losses"][:3])
    # each JAX engine compiles afresh; the rest is framework- and precision-independent
    if (backend, precision, sparse) == ("torch", "float32", False):
        other = run(TINY, _train_cfg(steps=3, seed=1), corpus, backend=backend)
        assert other["losses"][:3] != whole["losses"][:3]
        with pytest.raises(ResumeError, match="other settings"):
            run(TINY, _train_cfg(steps=13, eval_every=6), corpus, backend=backend, out_dir=tmp_path, resume=True)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_bfloat16_training_keeps_float32_weights_and_runs_peer_in_its_mixed_mode(corpus, backend, tmp_path):
    if backend == "jax":
        pytest.importorskip("flax")
    record = run(
        TINY,
        _train_cfg(precision="bfloat16"),
        corpus,
        backend=backend,
        out_dir=tmp_path,
        checkpoint_every=30,
        keep_engine=True,
    )
    eng, losses = record.pop("engine"), record["losses"]
    assert record["precision"] == record["train"]["precision"] == "bfloat16"
    assert all(math.isfinite(x) for x in losses) and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert record["evals"][-1]["val_bpb"] < record["evals"][0]["val_bpb"]
    batch = data.train_batch(corpus.train, 0, 99, 8, TINY.seq)
    if backend == "torch":
        import torch

        seen = []
        hook = eng.peer_layer(1).register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
        try:
            eng.step(batch)  # a training step: forward under autocast, backward outside it
        finally:
            hook.remove()
        # the PEER layer read float32 LayerNorm output and answered in bfloat16 (SPEC §10.3)
        assert seen == [(torch.float32, torch.bfloat16)]
        assert {p.dtype for p in eng.model.parameters()} == {torch.float32}
        assert {p.grad.dtype for p in eng.model.parameters() if p.grad is not None} == {torch.float32}
        assert {v.dtype for v in eng.opt.state_dict()["state"][0].values() if v.ndim} == {torch.float32}
        stored = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["engine"]["model"]
        assert {v.dtype for v in stored.values()} == {torch.float32}
    else:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        logits, routed = eng.model(jnp.asarray(batch[:, :-1]))
        ((h, y, _, weights),) = routed.values()
        assert (h.dtype, y.dtype, weights.dtype, logits.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32, jnp.bfloat16)
        assert {p.dtype for p in jax.tree.leaves(nnx.state(eng.model, nnx.Param))} == {jnp.dtype("float32")}
        with np.load(tmp_path / "checkpoint.npz") as stored:
            assert {stored[k].dtype for k in stored.files if k.startswith("['model']")} == {np.dtype("float32")}


def test_float16_training_scales_the_loss_and_resumes(corpus, tmp_path):
    cfg = _train_cfg(steps=8, eval_every=4, precision="float16")
    whole = run(TINY, cfg, corpus, keep_engine=True)
    assert whole.pop("engine").scaler.is_enabled()
    assert np.mean(whole["losses"][-3:]) < np.mean(whole["losses"][:3])
    run(TINY, cfg, corpus, out_dir=tmp_path, checkpoint_every=4, stop_after=5)
    resumed = run(TINY, cfg, corpus, out_dir=tmp_path, checkpoint_every=4, resume=True)
    assert resumed["losses"] == whole["losses"] and resumed["precision"] == "float16"
    with pytest.raises(ResumeError, match="other settings"):  # a float16 checkpoint is not a float32 run's
        run(TINY, _train_cfg(steps=8, eval_every=4), corpus, out_dir=tmp_path, resume=True)


def test_sparse_steps_only_the_listed_table_rows_and_the_rest_with_adamw(corpus):
    """SPEC §7.1's lazy optimizer: a sparse step moves the expert-table rows the step's gradient
    lists and leaves every other row (and its SparseAdam state) alone, where dense AdamW's weight
    decay moves every row; every other parameter is AdamW's in both."""
    import torch

    from peer_train.torch_model import Engine

    cfg = dataclasses.replace(TINY, n_experts=32**2)  # one 32-token sequence selects few of 1024 rows
    batch = data.train_batch(corpus.train, 0, 0, 1, cfg.seq)
    moved = {}
    for sparse in (True, False):
        eng = Engine(cfg, _train_cfg(steps=2, sparse=sparse))
        layer = eng.peer_layer(1)
        tables = list(layer.sparse_parameters())
        if sparse:
            assert [p for g in eng.sparse_opt.param_groups for p in g["params"]] == tables
            assert isinstance(eng.sparse_opt, torch.optim.SparseAdam)
        else:
            assert eng.sparse_opt is None
        in_adamw = [p for g in eng.opt.param_groups for p in g["params"]]
        assert any(p is t for p in in_adamw for t in tables) is not sparse
        assert len(in_adamw) + len(tables) * sparse == len(list(eng.model.parameters()))
        before = [t.detach().clone() for t in tables]
        eng.step(batch)
        grad = layer.experts.down.grad
        assert grad.layout == (torch.sparse_coo if sparse else torch.strided)
        if sparse:
            listed = torch.zeros(cfg.n_experts, dtype=torch.bool)
            listed[grad.coalesce().indices()[0]] = True
            assert 0 < int(listed.sum()) < cfg.n_experts // 2
            assert eng.rows_listed() == {"1": pytest.approx(float(listed.float().mean()))}
        moved[sparse] = [(t.detach() != b).reshape(len(b), -1).any(dim=1) for t, b in zip(tables, before)]
    assert len(moved[True]) == len(tables) >= 2
    for rows in moved[True]:
        assert torch.equal(rows, listed)
    for rows, table in zip(moved[False], tables):
        if table.ndim == 2:
            assert bool(rows.all())  # AdamW's weight decay reaches every row of a matrix
    assert eng.rows_listed() is None


def test_clipping_sparse_gradients_clips_as_torch_clips_the_dense_ones():
    import torch

    from peer_train.torch_model import clip_grad_norm_

    grads = {}
    for sparse in (True, False):
        torch.manual_seed(0)
        table, head = torch.nn.Embedding(50, 4, sparse=sparse), torch.nn.Linear(4, 1)
        head(table(torch.tensor([1, 2, 3, 3]))).sum().backward()
        params = [table.weight, *head.parameters()]
        clip = clip_grad_norm_ if sparse else torch.nn.utils.clip_grad_norm_
        grads[sparse] = (clip(params, 0.1), [p.grad.to_dense() for p in params])
    assert table.weight.grad.layout == torch.strided and grads[True][0] > 0.1
    torch.testing.assert_close(grads[True][0], grads[False][0])
    for a, b in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(a, b)


def test_jax_sparse_steps_only_the_listed_table_rows(corpus):
    """The JAX engine's sparse step (peer_backends.jax.sparse_value_and_grad, RowOptimizer): the
    rows of both tables that moved are the same set, of the size the step listed, and AdamW steps
    the rest of the model."""
    pytest.importorskip("flax")
    from peer_train.jax_model import Engine

    cfg = dataclasses.replace(TINY, n_experts=32**2)
    eng = Engine(cfg, _train_cfg(steps=2, sparse=True))
    experts = eng.model.blocks[1].ffn.experts
    before = {name: np.array(getattr(experts, name)[...]) for name in ("down", "up")}
    head = np.array(eng.model.head.kernel[...])
    eng.step(data.train_batch(corpus.train, 0, 0, 1, cfg.seq))
    moved = {name: (np.asarray(getattr(experts, name)[...]) != b).any(axis=1) for name, b in before.items()}
    assert np.array_equal(moved["down"], moved["up"])
    assert 0 < moved["down"].sum() < cfg.n_experts // 2
    assert eng.rows_listed() == {"1": pytest.approx(moved["down"].mean())}
    assert not np.array_equal(np.asarray(eng.model.head.kernel[...]), head)
    assert "RowOptimizer" in eng.optimizer_description()["expert_tables"]


def test_sparse_needs_peer_layers():
    with pytest.raises(ConfigError, match="sparse='yes', but expected a bool"):
        _train_cfg(sparse="yes")
    with pytest.raises(ConfigError, match="sparse=True with ffn='dense', but expected ffn 'peer' or 'peer_glu'"):
        run(dataclasses.replace(TINY, ffn="dense"), _train_cfg(sparse=True), None)


def test_precision_setting_is_checked_by_name():
    # the command line maps its aliases; the setting takes the dtype's name
    with pytest.raises(ConfigError, match=r"precision='bf16', but expected one of \('float32', 'bfloat16', 'f"):
        _train_cfg(precision="bf16")
    pytest.importorskip("flax")
    from peer_train.jax_model import Engine

    with pytest.raises(ConfigError, match="precision='float16' with the JAX engine.*needs loss scaling"):
        Engine(TINY, _train_cfg(precision="float16"))


def test_every_block_can_be_peer(corpus):
    record = run(dataclasses.replace(TINY, peer_blocks="all"), _train_cfg(steps=4), corpus)
    assert sorted(record["routing"]) == ["0", "1"]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_peer_blocks_start_from_distinct_tables_drawn_from_the_models_seed(backend):
    """Each PEER block draws from the framework's seeded random state (torch's generator, the
    model's nnx.Rngs): the blocks differ, and the same seed builds the same model."""
    if backend == "jax":
        pytest.importorskip("flax")
        from peer_train.jax_model import Transformer
    else:
        from peer_train.torch_model import Transformer
    cfg = dataclasses.replace(TINY, peer_blocks="all")

    def tables(seed):
        return [
            np.array(layer.params_and_state()[0]["experts.down"].tolist())
            for layer in _peer_layers(Transformer(cfg, seed))
        ]

    first, again, other = tables(0), tables(0), tables(1)
    assert len(first) == 2 and not np.array_equal(first[0], first[1])
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def _peer_layers(model):
    return [block.ffn for block in model.blocks if hasattr(block.ffn, "params_and_state")]


# ---- experiments and reports ----------------------------------------------------------------


def test_trained_torch_layer_gives_the_same_outputs_in_jax_and_tensorflow(corpus, monkeypatch):
    pytest.importorskip("flax")
    pytest.importorskip("tensorflow")
    monkeypatch.setitem(
        experiments.SIZES,
        "quick",
        {
            **experiments.SIZES["quick"],
            "transfer_steps": 8,
            "model": {**TINY.to_dict()},
            "train": {"batch": 8, "eval_batches": 2, "warmup": 2},
        },
    )
    result = experiments.transfer(corpus, "quick")
    assert result["tokens_compared"] == 2 * 8 * 32
    assert 0 < result["torch"]["usage"] <= 1
    for name in ("jax", "tensorflow"):
        target = result["targets"][name]
        assert target["outputs_within_tolerance"], target
        assert target["indices_equal"] > 0.99
        assert target["usage_abs_diff"] <= 0.01 and target["unevenness_abs_diff"] <= 0.01


def test_isoflop_and_usage_reports(corpus, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    tiny = {
        "model": TINY.to_dict(),
        "train": {"batch": 4, "eval_batches": 1, "warmup": 1},
        "budgets": (2, 4),
        "seeds": (0, 1),
        "experts": (4**2, 8**2),
        "usage_steps": 2,
        "transfer_steps": 2,
    }
    monkeypatch.setitem(experiments.SIZES, "quick", tiny)
    env = {
        "command": "python -m peer_train",
        "date": "d",
        "wall_s": 1.0,
        "threads": 1,
        "cpu_model": "cpu",
        "python": "3",
        "versions": {"torch": "x"},
    }
    iso = experiments.isoflop(corpus, "quick") | {"environment": env, "corpus": corpus.describe()}
    assert [(r["variant"], r["budget_steps"], r["seeds"]) for r in iso["table"]] == [
        (v, b, 2) for b in (2, 4) for v in experiments.VARIANTS
    ]
    rows = {(r["variant"], r["budget_steps"]): r for r in iso["table"]}
    assert rows["dense", 4]["train_flops"] == pytest.approx(rows["peer", 4]["train_flops"], rel=0.01)
    assert rows["dense", 4]["usage_mean"] is None and 0 < rows["peer", 4]["usage_mean"] <= 1
    assert rows["peer_glu", 4]["train_flops"] == pytest.approx(rows["peer", 4]["train_flops"], rel=0.01)
    topks = (rows["peer", 4]["peer_topk"], rows["peer_glu", 4]["peer_topk"], rows["dense", 4]["peer_topk"])
    assert topks == (4, 3, None)
    assert 0 < rows["peer_glu", 4]["usage_mean"] <= 1
    assert rows["peer_glu", 4]["n_params"] - rows["peer", 4]["n_params"] == 64 * 32  # experts.gate
    files = report.write(tmp_path, "isoflop", iso)
    assert [p.name for p in files] == ["isoflop.json", "isoflop.md", "isoflop.png"]
    assert json.loads((tmp_path / "isoflop.json").read_text())["table"][0]["variant"] == "dense"
    assert "| PEER, no query BN | 4 | 4 |" in (tmp_path / "isoflop.md").read_text()
    assert "| PEER-GLU (equal FLOPs) | 3 | 4 |" in (tmp_path / "isoflop.md").read_text()
    assert iso["precision"] == "float32" and "(quick size, float32 training)" in (tmp_path / "isoflop.md").read_text()
    use = experiments.usage(corpus, "quick") | {"environment": env, "corpus": corpus.describe()}
    assert [(r["n_experts"], r["query_norm"]) for r in use["table"]] == [
        (16, "batch"),
        (16, "none"),
        (64, "batch"),
        (64, "none"),
    ]
    assert (tmp_path / "usage.md").name in [p.name for p in report.write(tmp_path, "usage", use)]
    assert (tmp_path / "usage.png").stat().st_size > 0


def test_pool_experiment_quick_size_trains_sparse_and_compares_the_lazy_optimizer(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pool"
    assert main(["pool", "--quick", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "pool.json").read_text())
    quick = experiments.SIZES["quick"]
    assert [r["n_experts"] for r in result["table"]] == list(quick["pool_experts"])
    assert [(r["n_experts"], r["sparse"]) for r in result["runs"]] == [
        *((n, True) for n in quick["pool_experts"] for _ in quick["seeds"]),
        *((n, False) for n in quick["lazy_experts"] for _ in quick["seeds"]),
    ]
    # equal heads x top-k and tokens at every N; the expert stage's FLOPs are the same
    assert len({(r["model"]["peer_heads"], r["model"]["topk"], r["completed_steps"]) for r in result["runs"]}) == 1
    for row in result["table"]:
        assert 0 < row["usage_mean"] <= 1 and 0 < row["rows_listed"] <= 1 and math.isfinite(row["val_bpb_mean"])
    dense, lazy = result["lazy"]
    assert "SparseAdam" in lazy["optimizer"]["expert_tables"] and "AdamW" in dense["optimizer"]["expert_tables"]
    assert lazy["minus_dense_mean"] == pytest.approx(lazy["val_bpb_mean"] - dense["val_bpb_mean"])
    text = (out / "pool.md").read_text()
    assert "| 64 (8²) |" in text and "### What the lazy optimizer costs" in text
    assert (out / "pool.png").stat().st_size > 0
    assert "pool: wrote" in capsys.readouterr().err


# ---- the command line -------------------------------------------------------------------------


def test_cli_trains_and_writes_its_record(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY_FLAGS,
                "--steps",
                "6",
                "--eval-every",
                "3",
                "--out",
                str(out),
                "--no-progress",
                "--checkpoint-every",
                "3",
            ]
        )
        == 0
    )
    record = json.loads((out / "train.json").read_text())
    assert len(record["losses"]) == 6 and record["corpus"]["sha256"] == data.load().sha256
    assert record["environment"]["python"] and "torch" in record["environment"]["versions"]
    assert (out / "checkpoint.pt").exists()
    assert "val bpb" in capsys.readouterr().err
    assert record["precision"] == record["train"]["precision"] == "float32"
    assert record["sparse"] is False and record["rows_listed"] is None


def test_cli_sparse_flag_trains_the_tables_with_sparse_adam(tmp_path):
    out = tmp_path / "run"
    flags = [*TINY_FLAGS, "--steps", "3", "--eval-every", "3", "--out", str(out), "--no-progress", "--sparse"]
    assert main(["train", *flags]) == 0
    record = json.loads((out / "train.json").read_text())
    assert record["sparse"] is record["train"]["sparse"] is True
    assert record["optimizer"]["expert_tables"].startswith("torch.optim.SparseAdam")
    assert record["optimizer"]["other"].startswith("torch.optim.AdamW")
    assert 0 < record["rows_listed"]["1"] <= 1


def test_cli_precision_flag_trains_bf16_and_resumes_only_the_same_precision(tmp_path, capsys):
    out, flags = tmp_path / "run", [*TINY_FLAGS, "--eval-every", "2", "--no-progress", "--checkpoint-every", "2"]
    assert main(["train", *flags, "--steps", "2", "--out", str(out), "--precision", "bf16"]) == 0
    record = json.loads((out / "train.json").read_text())
    assert record["precision"] == record["train"]["precision"] == "bfloat16"
    assert "--precision bf16" in record["environment"]["command"]
    assert main(["train", *flags, "--steps", "2", "--out", str(out), "--precision", "bfloat16", "--resume"]) == 0
    assert json.loads((out / "train.json").read_text())["losses"] == record["losses"]
    capsys.readouterr()
    assert main(["train", *flags, "--steps", "2", "--out", str(out), "--resume"]) == 2
    assert "other settings" in capsys.readouterr().err.replace("\n", "")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--precision", "fp64"],
            "--precision 'fp64', but expected one of float32 (fp32), bf16 (bfloat16) or fp16 (float16)",
        ),
        (
            ["train", "--precision", "fp16", "--backend", "jax"],
            "--precision fp16 with --backend jax, but expected float32 or bf16: float16 training needs loss scaling",
        ),
        (["usage", "--precision", "float16", "--backend", "jax"], "--precision float16 with --backend jax"),
        (["train", "--threads", "0"], "--threads 0, but expected an int >= 1"),
        (["train", "--seed", "-1"], "--seed -1, but expected an int >= 0"),
        (["train", "--steps", "0"], "steps=0, but expected an int >= 1"),
        (["train", "--lr", "nan"], "lr=nan, but expected a finite float"),
        (["train", "--d-model", "30", "--n-heads", "4"], "d_model=30 with n_heads=4"),
        (["train", "--topk", "100"], "PEERConfig.topk=100"),
        (["train", "--n-experts", "1000"], "PEERConfig.n_experts=1000, but expected a perfect square"),
        (["train", "--data", "/nonexistent/corpus"], "--data '/nonexistent/corpus': no such file or directory"),
        (["train", "--resume"], "--resume: no checkpoint at"),
        (
            ["train", "--sparse", "--ffn", "dense"],
            "sparse=True with ffn='dense', but expected ffn 'peer' or 'peer_glu'",
        ),
    ],
)
def test_bad_flags_fail_with_a_clear_message(argv, message, capsys, tmp_path):
    argv = [*argv, "--out", str(tmp_path / "o"), "--no-progress"]
    if argv[0] == "train" and "--resume" in argv:
        argv += TINY_FLAGS + ["--steps", "2"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err.replace("\n", "")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--device", "tpu"],
        ["train", "--backend", "mxnet"],
        ["fly"],
        ["train", "--ffn", "moe"],
        ["train", "--steps", "many"],
    ],
)
def test_unknown_choices_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_unreadable_or_too_small_data_fails_clearly(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--no-progress"]) == 2
    assert "holds no text files" in capsys.readouterr().err.replace("\n", "")
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    assert main(["train", "--data", str(small), "--no-progress"]) == 2
    assert "but expected at least 4096" in capsys.readouterr().err.replace("\n", "")
    broken = tmp_path / "broken"
    broken.mkdir()
    os.symlink(tmp_path / "missing.txt", broken / "gone.txt")
    assert main(["train", "--data", str(broken), "--no-progress"]) == 2
    assert "cannot read" in capsys.readouterr().err.replace("\n", "")


def test_cuda_without_a_gpu_fails_clearly(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["train", "--device", "cuda", "--no-progress"]) == 2
    assert "--device cuda, but torch sees no CUDA device" in capsys.readouterr().err.replace("\n", "")


def test_data_flag_trains_on_a_users_text_file(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(2000)))
    out = tmp_path / "o"
    assert (
        main(
            [
                "train",
                "--data",
                str(text),
                *TINY_FLAGS,
                "--steps",
                "3",
                "--eval-every",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    record = json.loads((out / "train.json").read_text())
    assert record["corpus"]["name"] == str(text) and record["corpus"]["files"] == 1


def test_importing_the_trainer_imports_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, peer_train, peer_train.cli, peer_train.experiments, peer_train.report\n"
        "print(sorted(m for m in ('torch', 'jax', 'tensorflow', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
