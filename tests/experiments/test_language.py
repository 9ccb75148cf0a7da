"""Tests for the WikiText language-model experiment (`experiments/language`) and its blocks."""

import dataclasses
import pathlib
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revdeq_jax as rdeq
from experiments.language import data, train
from experiments.language.configs import CONFIGS
from experiments.language.model import ExplicitTransformerLM, lm_loss, make_model
from revdeq_jax.nn import EquilibriumTransformerLayer, VariationalDropout


# ../shared/data beside the repository (or beside a folder holding this worktree)
SHARED = next(
    (p / "shared" / "data" for p in pathlib.Path(__file__).resolve().parents[2].parents
     if (p / "shared" / "data").is_dir()),
    pathlib.Path("shared/data"),
)  # fmt: skip
WIKITEXT = SHARED / "wikitext-2-raw"
GPT2 = SHARED / "gpt2"
needs_data = pytest.mark.skipif(
    not (WIKITEXT / "wiki.valid.raw").is_file() or not (GPT2 / "vocab.bpe").is_file(),
    reason="needs ../shared/data/{wikitext-2-raw,gpt2}",
)


@pytest.fixture(scope="module")
def enc():
    if not (GPT2 / "vocab.bpe").is_file():
        pytest.skip("needs ../shared/data/gpt2")
    return data.load_tokenizer(GPT2)


def _slice_dir(tmp_path, lines: int = 60) -> pathlib.Path:
    """A data dir with the first `lines` lines of the real wiki.valid.raw / wiki.test.raw."""
    out = tmp_path / "wikitext"
    out.mkdir(parents=True)
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        text = (WIKITEXT / name).read_text(encoding="utf-8")
        (out / name).write_text("".join(text.splitlines(keepends=True)[:lines]), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def test_tokenizer_offline(enc):
    assert enc.encode("hello world") == [31373, 995]
    assert enc.n_vocab == data.GPT2_VOCAB_SIZE < data.PADDED_VOCAB_SIZE


@needs_data
def test_tokenise_real_slice_and_cache(tmp_path, enc, monkeypatch):
    directory, cache = _slice_dir(tmp_path), tmp_path / "cache"
    splits = data.load_splits(
        data_dir=directory,
        splits="valid-as-train",
        holdout_fraction=0.25,
        tokenizer_dir=GPT2,
        cache_dir=cache,
    )
    valid = enc.encode_ordinary((directory / "wiki.valid.raw").read_text(encoding="utf-8"))
    test = enc.encode_ordinary((directory / "wiki.test.raw").read_text(encoding="utf-8"))
    # valid-as-train: train is the head of wiki.valid, val its held-out tail, test wiki.test
    np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), valid)
    np.testing.assert_array_equal(splits.test, test)
    assert len(splits.val) == round(0.25 * len(valid))
    assert enc.decode(valid) == (directory / "wiki.valid.raw").read_text(encoding="utf-8")
    assert len(list(cache.glob("*.npy"))) == 2

    # Second load comes from the cache: tokenisation must not run again.
    monkeypatch.setattr(data, "encode", lambda *a: pytest.fail("re-tokenised despite the cache"))
    again = data.load_splits(
        data_dir=directory,
        splits="valid-as-train",
        holdout_fraction=0.25,
        tokenizer_dir=GPT2,
        cache_dir=cache,
    )
    np.testing.assert_array_equal(again.test, splits.test)


@needs_data
def test_full_valid_token_count(enc):
    tokens = data.encode((WIKITEXT / "wiki.valid.raw").read_text(encoding="utf-8"), enc)
    assert tokens.dtype == np.uint16 and len(tokens) == 249_887  # as in shared/data's README


@needs_data
def test_train_batches_shift_and_determinism(enc):
    text = (WIKITEXT / "wiki.valid.raw").read_text(encoding="utf-8")[:20_000]
    tokens = data.encode(text, enc)
    x, y = data.get_batch(tokens, 7, batch_size=4, seq_len=32, seed=0)
    assert x.shape == y.shape == (4, 32) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    for row_x, row_y in zip(x, y):  # each row is a real window of the token stream
        start = next(
            i for i in range(len(tokens) - 32) if np.array_equal(tokens[i : i + 32], row_x)
        )
        np.testing.assert_array_equal(tokens[start + 1 : start + 33], row_y)
    x2, y2 = data.get_batch(tokens, 7, batch_size=4, seq_len=32, seed=0)
    np.testing.assert_array_equal(x, x2)
    x3, _ = data.get_batch(tokens, 8, batch_size=4, seq_len=32, seed=0)
    assert not np.array_equal(x, x3)


@needs_data
@pytest.mark.parametrize("num_tokens", [2, 33, 64, 65, 500])
def test_eval_windows_cover_every_token_once(enc, num_tokens):
    text = (WIKITEXT / "wiki.test.raw").read_text(encoding="utf-8")[:5_000]
    tokens = data.encode(text, enc)[:num_tokens]
    batches = list(data.eval_batches(tokens, batch_size=3, seq_len=32))
    assert all(x.shape == y.shape == w.shape == (3, 32) for x, y, w in batches)
    x, y, w = (np.concatenate(a) for a in zip(*batches))
    real = w.ravel() == 1.0
    np.testing.assert_array_equal(
        y.ravel()[real], tokens[1:]
    )  # every target exactly once, in order
    np.testing.assert_array_equal(x.ravel()[real], tokens[:-1])
    assert w.sum() == num_tokens - 1


def test_unigram_perplexity_oracle_le_fitted():
    rng = np.random.default_rng(0)
    train_tokens, eval_tokens = rng.integers(0, 50, 5_000), rng.integers(0, 50, 2_000)
    u = data.unigram_perplexity(train_tokens, eval_tokens)
    assert 40 < u["oracle"] <= u["fitted"]


# ----------------------------------------------------------------------------------------
# Clear errors for missing or corrupt files
# ----------------------------------------------------------------------------------------


@needs_data
def test_missing_data_file_error(tmp_path):
    directory = _slice_dir(tmp_path)
    (directory / "wiki.test.raw").unlink()
    with pytest.raises(data.DataError, match=r"wiki\.test\.raw missing in .*--data-dir"):
        data.load_splits(
            data_dir=directory,
            splits="valid-as-train",
            tokenizer_dir=GPT2,
            cache_dir=tmp_path,
        )
    with pytest.raises(data.DataError, match=r"wiki\.train\.raw.*missing.*--splits=valid-as-train"):
        data.load_splits(
            data_dir=_slice_dir(tmp_path / "b"),
            splits="standard",
            tokenizer_dir=GPT2,
            cache_dir=tmp_path,
        )
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_splits(data_dir=tmp_path / "nowhere", tokenizer_dir=GPT2, cache_dir=tmp_path)


@needs_data
@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty"),
        (b"\x00\x01\x02binary", "NUL"),
        (b" = Title = \n\xff\xfe", "UTF-8"),
        (b"<html>404 Not Found</html>\n", "heading"),
    ],
)
def test_corrupt_data_file_error(tmp_path, content, problem):
    directory = _slice_dir(tmp_path)
    (directory / "wiki.valid.raw").write_bytes(content)
    with pytest.raises(
        data.DataError, match=rf"wiki\.valid\.raw is corrupt: .*{problem}.*--data-dir"
    ):
        data.load_splits(
            data_dir=directory,
            splits="valid-as-train",
            tokenizer_dir=GPT2,
            cache_dir=tmp_path,
        )


@needs_data
def test_missing_and_corrupt_tokenizer_error(tmp_path):
    tok = tmp_path / "gpt2"
    tok.mkdir()
    shutil.copy(GPT2 / "vocab.bpe", tok / "vocab.bpe")
    with pytest.raises(data.DataError, match=r"encoder\.json is missing.*--tokenizer-dir"):
        data.load_tokenizer(tok)
    (tok / "encoder.json").write_bytes((GPT2 / "encoder.json").read_bytes()[:1000])
    with pytest.raises(data.DataError, match=r"encoder\.json is corrupt \(sha256"):
        data.load_tokenizer(tok)


@needs_data
def test_cli_reports_data_error_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(
            [
                "--config=tiny",
                f"--data-dir={tmp_path / 'nowhere'}",
                f"--workdir={tmp_path / 'run'}",
            ]
        )
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err
        == f"error: --data_dir={tmp_path / 'nowhere'}: does not exist; give an existing directory\n"
    )
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config=tiny", "--solvr=anderson"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(
        "error: unknown option --solvr; did you mean 'solver'?"
    )
    # A data file missing in an existing directory: one line, exit status 1.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config=tiny", f"--data-dir={empty}", f"--workdir={tmp_path / 'run'}"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: WikiText file(s) wiki.valid.raw, wiki.test.raw missing in")
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------
# Library blocks
# ----------------------------------------------------------------------------------------


def test_layer_is_causal_and_dropout_mask_is_fixed(getkey):
    module = EquilibriumTransformerLayer(16, num_heads=8, key=getkey())
    layer = eqx.filter_jit(module)
    z, x = jax.random.normal(getkey(), (2, 6, 16))
    x_future = x.at[-1].add(1.0)
    out, out_future = layer(z, x), layer(z, x_future)
    np.testing.assert_array_equal(out[:-1], out_future[:-1])  # the past cannot see the future
    assert not np.allclose(out[-1], out_future[-1])

    mask = module.dropout_mask(0.5, key=getkey())
    assert mask.shape == (2, 16) and set(np.unique(mask).tolist()) <= {0.0, 2.0}
    np.testing.assert_array_equal(
        layer(z, (x, mask)), layer(z, (x, mask))
    )  # deterministic given mask
    assert not np.allclose(layer(z, (x, mask)), out)
    ones = module.dropout_mask(0.5, inference=True)
    np.testing.assert_allclose(layer(z, (x, ones)), out, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="0 <= p < 1"):
        VariationalDropout(1.0)


def test_layer_compute_dtype(getkey):
    key = getkey()
    layer = EquilibriumTransformerLayer(16, num_heads=8, key=key, compute_dtype=jnp.bfloat16)
    exact = EquilibriumTransformerLayer(16, num_heads=8, key=key)
    z, x = jax.random.normal(getkey(), (2, 5, 16))
    out, out_exact = eqx.filter_jit(layer)(z, x), eqx.filter_jit(exact)(z, x)
    assert out.dtype == jnp.float32  # the fixed-point contract: same dtype as z
    np.testing.assert_allclose(out, out_exact, atol=0.1)
    assert not np.array_equal(out, out_exact)


# ----------------------------------------------------------------------------------------
# Model and training
# ----------------------------------------------------------------------------------------


def _tiny(**changes):
    return dataclasses.replace(CONFIGS["tiny"], **changes)


def _fixed_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 1000, (config.batch_size, config.seq_len + 1)).astype(np.int32)
    return jnp.asarray(x[:, :-1]), jnp.asarray(x[:, 1:])


def test_explicit_model_shapes(getkey):
    config = _tiny(model="explicit", num_layers=3)
    model = make_model(config, key=getkey())
    assert isinstance(model, ExplicitTransformerLM) and len(model.layers) == 3
    logits, stats = eqx.filter_jit(lambda m, ids, k: m(ids, key=k))(
        model, jnp.arange(config.seq_len), getkey()
    )
    assert logits.shape == (config.seq_len, data.PADDED_VOCAB_SIZE) and int(stats["nfe"]) == 3


def test_train_step_reduces_loss():
    config = _tiny(lr=1e-2, warmup_steps=0, dropout=0.0)
    state, step = train.init_state(config), train.make_train_step(config)
    batch = _fixed_batch(config)
    losses = []
    for i in range(4):
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
        assert float(metrics["nfe"]) >= 1 and np.isfinite(float(metrics["residual"]))
    assert int(state.step) == 4
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("steps", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_revdeq_gradients_equal_unrolled(x64, steps):
    config = _tiny(
        param_dtype="float64",
        compute_dtype="float64",
        max_steps=steps,
        tol=0.0,
        beta=0.5,
        dropout=0.2,
    )
    model = make_model(config, key=jax.random.key(0))
    unrolled = eqx.tree_at(lambda m: m.deq.adjoint, model, rdeq.UnrolledAdjoint())
    inputs, targets = _fixed_batch(config)
    key = jax.random.key(1)  # same dropout masks for both

    @eqx.filter_jit
    def grads(m):
        return eqx.filter_grad(lambda m: lm_loss(m, inputs, targets, key=key)[0])(m)

    g_rev, g_unr = grads(model), grads(unrolled)
    leaves_rev, leaves_unr = jax.tree.leaves(g_rev), jax.tree.leaves(g_unr)
    assert len(leaves_rev) == len(leaves_unr) > 0
    for a, b in zip(leaves_rev, leaves_unr):
        assert a.dtype == jnp.float64
        scale = float(jnp.max(jnp.abs(b)))
        if scale == 0:
            assert float(jnp.max(jnp.abs(a))) == 0
            continue
        assert float(jnp.max(jnp.abs(a - b))) / scale <= 1e-10
    # the equilibrium layer's parameters do get a gradient
    assert float(jnp.max(jnp.abs(g_rev.deq.layer.attention.qkv.weight))) > 0


@needs_data
@pytest.mark.slow
def test_resume_equivalence(tmp_path):
    """N steps + resume + N steps gives the same parameters as 2N steps in one go."""
    common = dict(
        data_dir=str(WIKITEXT),
        tokenizer_dir=str(GPT2),
        cache_dir=str(tmp_path / "cache"),
        eval_every=3,
        checkpoint_every=3,
        log_every=1,
        test_tokens=64,
        eval_tokens=64,
    )
    full = train.train(_tiny(train_steps=6, **common), tmp_path / "full")
    train.train(_tiny(train_steps=3, **common), tmp_path / "split")
    resumed = train.train(_tiny(train_steps=6, **common), tmp_path / "split", resume=True)

    like = train.init_state(_tiny(**common))
    from experiments.common.checkpoint import load_checkpoint

    a, _ = load_checkpoint(tmp_path / "full" / "latest.eqx", like)
    b, _ = load_checkpoint(tmp_path / "split" / "latest.eqx", like)
    assert int(a.step) == int(b.step) == 6
    for x, y in zip(
        jax.tree.leaves(eqx.filter(a, eqx.is_array)),
        jax.tree.leaves(eqx.filter(b, eqx.is_array)),
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert full["test"]["ppl"] == resumed["test"]["ppl"]
    assert (tmp_path / "full" / "curves.png").is_file() and (
        tmp_path / "full" / "results.json"
    ).is_file()

    # evaluate.py rebuilds the model from the checkpoint header and gets the same number
    from experiments.language import evaluate

    again = evaluate.evaluate_checkpoint(
        tmp_path / "full" / "best.eqx", split="test", max_tokens=64
    )
    assert again["ppl"] == pytest.approx(full["test"]["ppl"], rel=1e-6)


def test_paper_config_has_about_94m_parameters():
    config = CONFIGS["paper"]
    shapes = eqx.filter_eval_shape(make_model, config, key=jax.random.key(0))
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    params = sum(
        int(np.prod(x.shape))
        for x in leaves
        if isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.floating)
    )
    assert 92e6 < params < 96e6, params
    assert (
        config.seq_len,
        config.batch_size,
        config.lr,
        config.beta,
        config.tol,
        config.max_steps,
    ) == (512, 32, 3e-4, 0.5, 1e-3, 4)


def test_compare_training_seconds():
    from experiments.language.compare import training_seconds

    records = [
        {"step": 10, "split": "train", "loss": 1.0},  # compilation window: no rate yet
        {"step": 20, "split": "train", "loss": 1.0, "ms_per_step": 100.0},
        {"step": 20, "split": "val", "ppl": 3.0},
        {"step": 30, "split": "train", "loss": 1.0, "ms_per_step": 200.0},
    ]
    assert training_seconds(records) == {0: 0.0, 10: 1.0, 20: 2.0, 30: 4.0}


def test_exact_state_gradient_matches_float64_state():
    """`state_dtype="exact"` in the config reaches the solver: at 4 steps (where a float64
    state still reconstructs exactly) both give the same float32 model gradient."""
    grads = {}
    for state_dtype in ("float64", "exact"):
        config = _tiny(max_steps=4, tol=0.0, beta=0.8, dropout=0.0, state_dtype=state_dtype)
        model = make_model(config, key=jax.random.key(0))
        assert (
            model.deq.solver.state_dtype
            == rdeq.Reversible(0.8, state_dtype=state_dtype).state_dtype
        )
        inputs, targets = _fixed_batch(config)
        grads[state_dtype] = eqx.filter_jit(
            eqx.filter_grad(lambda m: lm_loss(m, inputs, targets, key=jax.random.key(1))[0])
        )(model)
    a = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(grads["exact"])])
    b = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(grads["float64"])])
    assert float(jnp.linalg.norm(b)) > 0
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) <= 1e-5
