"""Training: the step (gradient accumulation exactness, loss goes down), data, `armt train`."""

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from armt_jax import cli
from armt_jax.config import ArmtConfig
from armt_jax.model import ArmtModel
from armt_jax.sequential import sequential_forward
from conftest import TINY, all_eqns, random_params
from train.data import Example, pad_batch, qa_example
from train.step import counted_targets, make_train_step

ACFG = ArmtConfig(segment_size=8, num_mem_tokens=2, d_mem=16)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_batch(rng, batch=4):
    """Random lengths and loss masks; the first example spans 3-4 segments and has loss tokens
    in its last one, so the memory weights always get a gradient (a draw without loss tokens
    past the first segment leaves W_mv's gradient exactly zero, which failed the W_mv check)."""
    examples = []
    for i in range(batch):
        n = int(rng.integers(17, 30) if i == 0 else rng.integers(5, 30))
        mask = (rng.random(n) < 0.5).astype(int)
        if i == 0:
            mask[-4:] = 1
        examples.append(Example(tuple(rng.integers(1, TINY.vocab_size, n)), tuple(mask)))
    return {k: jnp.asarray(v) for k, v in pad_batch(examples, ACFG.segment_size).items()}


def test_pad_batch_and_qa_example():
    encode = lambda s: [ord(c) % 50 for c in s]
    ex = qa_example({"input": "ab", "question": "q?", "target": "yes"}, encode, eos_id=7)
    assert ex.tokens[-1] == 7 and sum(ex.loss_mask) == len(" yes") + 1
    assert ex.loss_mask[-5:] == (1, 1, 1, 1, 1) and ex.loss_mask[0] == 0
    with_bos = qa_example({"input": "ab", "question": "q?", "target": "yes"}, encode, eos_id=7,
                          bos_id=5)
    assert with_bos.tokens == (5, *ex.tokens) and with_bos.loss_mask == (0, *ex.loss_mask)
    b = pad_batch([ex, Example((1, 2, 3), (0, 1, 1))], multiple=8)
    assert b["tokens"].shape[1] % 8 == 0 and list(b["lengths"]) == [len(ex.tokens), 3]
    assert b["loss_mask"][1, 3:].sum() == 0


def test_accumulation_equals_one_big_batch(rng):
    params = random_params(rng, TINY, ACFG)
    batch = random_batch(rng)
    sgd = optax.sgd(0.1)
    one = make_train_step(TINY, ACFG, sgd, accum_steps=1)
    two = make_train_step(TINY, ACFG, sgd, accum_steps=2)
    p1, _, m1 = one(params, sgd.init(params), batch)
    p2, _, m2 = two(params, sgd.init(params), batch)
    want = sequential_forward(params, batch["tokens"], TINY, ACFG, output="none",
                              compute_loss=True, loss_mask=batch["loss_mask"],
                              lengths=batch["lengths"]).loss
    np.testing.assert_allclose(m1["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m2["loss"], want, rtol=1e-5)
    for a, b, p in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), jax.tree.leaves(params)):
        np.testing.assert_allclose(a - p, b - p, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(p1["memory"]["w_mv"] - params["memory"]["w_mv"]).max()) > 0


def test_diagonal_schedule_step_equals_sequential(rng):
    """A training step whose loss runs through diagonal batching, with accumulation over two
    micro-batches of ragged lengths: the same loss and update as through the sequential schedule
    (3-4 segments over TINY's 3 layers: ramps and a full step)."""
    params = random_params(rng, TINY, ACFG)
    batch = random_batch(rng)
    sgd = optax.sgd(0.1)
    got = make_train_step(TINY, ACFG, sgd, accum_steps=2, schedule="diagonal")
    want = make_train_step(TINY, ACFG, sgd, accum_steps=2)
    p_got, _, m_got = got(params, sgd.init(params), batch)
    p_want, _, m_want = want(params, sgd.init(params), batch)
    np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_got["grad_norm"], m_want["grad_norm"], rtol=1e-5)
    for a, b, p in zip(jax.tree.leaves(p_got), jax.tree.leaves(p_want), jax.tree.leaves(params)):
        np.testing.assert_allclose(a - p, b - p, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_train_step(TINY, ACFG, sgd, schedule="diagonal_pallas")


# 64-dimensional memory keys for comparing bf16 with float32 training: with ACFG's 16, DPFP keys
# and queries are sparse, and one nearly orthogonal to z (k.z or q.z near 0) makes the memory's
# division by it amplify bf16 rounding in the update (measured over 600 draws: cosine to the
# float32 step below 0.79 on 1 %, down to 0.13). With 64: >= 0.997 on 2500 draws.
ACFG_WIDE_KEYS = ArmtConfig(segment_size=8, num_mem_tokens=2, d_mem=64)


def test_mixed_precision_step(rng):
    """compute_dtype=bf16: the loss and gradient are the bf16 model's (its gradient taken directly
    with respect to bf16-cast weights, then widened), the weights stay float32, and the update
    points where the float32 step's does: over all weights, the layers' and the memory's (2500
    draws: cosines >= 0.997, 0.994, 0.961; a step without the layers' gradient gives <= 0.944
    overall and none for the layers)."""
    params = random_params(rng, TINY, ACFG_WIDE_KEYS)
    batch = random_batch(rng)
    lr = 0.5
    sgd = optax.sgd(lr)
    p_mixed, _, m_mixed = make_train_step(TINY, ACFG_WIDE_KEYS, sgd, compute_dtype=jnp.bfloat16)(
        params, sgd.init(params), batch)
    p_full, _, _ = make_train_step(TINY, ACFG_WIDE_KEYS, sgd)(params, sgd.init(params), batch)

    count = counted_targets(batch)

    def bf16_loss_sum(p):   # the step differentiates loss * count, then divides by count
        return count * sequential_forward(
            p, batch["tokens"], TINY, ACFG_WIDE_KEYS, output="none", compute_loss=True,
            loss_mask=batch["loss_mask"], lengths=batch["lengths"], remat=True).loss

    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    loss_sum, grads = jax.value_and_grad(bf16_loss_sum)(bf16)
    np.testing.assert_allclose(m_mixed["loss"], loss_sum / count, rtol=1e-5)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p_mixed))
    flat = lambda tree: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])
    step_mixed = jax.tree.map(jnp.subtract, p_mixed, params)
    want = -lr * flat(grads).astype(jnp.float32) / count
    assert float(jnp.linalg.norm(flat(step_mixed) - want) / jnp.linalg.norm(want)) <= 1e-5
    step_full = jax.tree.map(jnp.subtract, p_full, params)

    def cosine(part):
        a, b = flat(part(step_mixed)), flat(part(step_full))
        return float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))

    assert cosine(lambda t: t) >= 0.99, cosine(lambda t: t)
    assert cosine(lambda t: t["layers"]) >= 0.98, cosine(lambda t: t["layers"])
    assert cosine(lambda t: t["memory"]) >= 0.9, cosine(lambda t: t["memory"])
    with pytest.raises(ValueError, match="compute_dtype"):
        make_train_step(TINY, ACFG, sgd, compute_dtype=jnp.int32)


def test_default_compiler_options():
    """The zero-init pass is the GPU step's default and nowhere else's; an explicit {} compiles
    with XLA's own defaults (checked against the GPU default in the test below)."""
    from train import step
    assert step.default_compiler_options("gpu") == step.GPU_COMPILER_OPTIONS
    assert step.default_compiler_options("gpu") is not step.GPU_COMPILER_OPTIONS
    assert step.default_compiler_options("cpu") == {}
    assert step.default_compiler_options() == step.default_compiler_options(jax.default_backend())
    assert step.default_compiler_options("gpu", deterministic=True) == {
        **step.GPU_COMPILER_OPTIONS, "xla_gpu_deterministic_ops": True}
    assert step.default_compiler_options("cpu", deterministic=True) == {}


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_deterministic_step_is_bitwise_reproducible(rng):
    """With the deterministic options two compilations of a bf16 step and two calls of each give
    bitwise the same update (across processes: eval/reproducibility.py on the H200). It fails
    if the option stops reaching XLA or stops working; on this tiny model a step without it
    may be reproducible too, so it does not show the option is needed (the 1b run does)."""
    from train.step import default_compiler_options
    params = random_params(rng, TINY, ACFG_WIDE_KEYS)
    batch = random_batch(rng)
    sgd = optax.sgd(0.5)
    results = []
    for _ in range(2):
        jax.clear_caches()
        step = make_train_step(TINY, ACFG_WIDE_KEYS, sgd, compute_dtype=jnp.bfloat16,
                               compiler_options=default_compiler_options(deterministic=True))
        results += [step(params, sgd.init(params), batch) for _ in range(2)]
    first = jax.tree.leaves(results[0])
    for other in results[1:]:
        for a, b in zip(first, jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("compute_dtype", [None, jnp.bfloat16])
def test_gpu_step_with_and_without_zero_init_pass(rng, compute_dtype):
    """XLA's zero-init elimination (on by default on a GPU) must not change a step: a buffer it
    wrongly left uninitialised would put garbage into the gradients. Adam's update is
    insensitive to gradient scale, so SGD: the update is the gradient itself."""
    params = random_params(rng, TINY, ACFG_WIDE_KEYS)
    batch = random_batch(rng)
    sgd = optax.sgd(0.5)
    outs = [make_train_step(TINY, ACFG_WIDE_KEYS, sgd, compute_dtype=compute_dtype,
                            compiler_options=opts)(params, sgd.init(params), batch)
            for opts in (None, {})]
    (p_pass, _, m_pass), (p_plain, _, m_plain) = outs
    tol = 1e-5 if compute_dtype is None else 1e-2   # bf16: two compilations may round differently
    np.testing.assert_allclose(m_pass["loss"], m_plain["loss"], rtol=tol)
    for (path, a), b, p in zip(jax.tree_util.tree_leaves_with_path(p_pass),
                               jax.tree.leaves(p_plain), jax.tree.leaves(params)):
        got, want = np.asarray(a - p, np.float64), np.asarray(b - p, np.float64)
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
        assert np.all(np.isfinite(got)) and err <= tol, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_gradients_at_16_bits(tied):
    """The logits' backward with bf16 weights (layers._logits_bf16): both products take the
    cotangent rounded to bf16 and accumulate in float32; float64 oracle. With float16 weights
    the head is autodiff's (float32 cotangent: no underflow of small logit gradients), with
    float32 weights the plain einsum (float32 precision)."""
    import dataclasses

    from armt_jax import layers
    from conftest import fresh_rng
    rng, info = fresh_rng()
    cfg = dataclasses.replace(TINY, tie_word_embeddings=tied)
    b, t, d, v = 2, 5, cfg.hidden_size, cfg.vocab_size
    h = rng.standard_normal((b, t, d))
    w = rng.standard_normal((d, v)) / np.sqrt(d)
    norm = 1 + 0.1 * rng.standard_normal(d)
    cot = rng.standard_normal((b, t, v))
    for dtype, tol in ((jnp.bfloat16, 1e-2), (jnp.float16, 2e-3), (jnp.float32, 1e-5)):
        cast = lambda a: jnp.asarray(a, dtype)
        params = {"final_norm": cast(norm), **({"embed": cast(w.T)} if tied else
                                               {"lm_head": cast(w)})}
        logits, vjp = jax.vjp(lambda p, x: layers.head(p, x, cfg, "logits"), params, cast(h))
        d_params, dh = vjp(jnp.asarray(cot, jnp.float32))
        assert logits.dtype == jnp.float32 and dh.dtype == dtype, info
        # oracle: float64 from the same rounded operands (the normalised h as the head rounds it)
        x = np.asarray(layers.rms_norm(cast(h), params["final_norm"], cfg.rms_norm_eps),
                       np.float64)
        w64 = np.asarray(cast(w), np.float64)
        # the cotangent as the backward products see it: rounded to bf16 only on the bf16 path
        g64 = np.asarray(jnp.asarray(cot, jnp.bfloat16 if dtype == jnp.bfloat16 else
                                     jnp.float32), np.float64)
        rel = lambda got, want: float(np.linalg.norm(np.asarray(got, np.float64) - want)
                                      / np.linalg.norm(want))
        assert rel(logits, x @ w64) <= 1e-5, info
        dw = np.einsum("btd,btv->dv", x, g64)
        got_dw = d_params["embed"].T if tied else d_params["lm_head"]
        assert got_dw.dtype == dtype and rel(got_dw, dw) <= tol, f"{dtype} dw {info}"
        # dh passes through the norm: check the logits' part via the norm's own vjp
        _, norm_vjp = jax.vjp(lambda x: layers.rms_norm(x, params["final_norm"],
                                                        cfg.rms_norm_eps), cast(h))
        want_dh, = norm_vjp(jnp.asarray(g64 @ w64.T, dtype))
        assert rel(dh, np.asarray(want_dh, np.float64)) <= tol, f"{dtype} dh {info}"
    # float16: logit gradients below its smallest subnormal (6e-8) still add up in the weight
    # gradient (256 positions x 2e-8 ~ 5e-6), since the cotangent is not rounded to float16
    h_pos = jnp.asarray(np.abs(rng.standard_normal((4, 64, d))), jnp.float16)
    params = {"final_norm": jnp.ones(d, jnp.float16),
              **({"embed": jnp.asarray(w.T, jnp.float16)} if tied else
                 {"lm_head": jnp.asarray(w, jnp.float16)})}
    _, vjp = jax.vjp(lambda p: layers.head(p, h_pos, cfg, "logits"), params)
    tiny, = vjp(jnp.full((4, 64, v), 2e-8, jnp.float32))
    dw_tiny = np.asarray(tiny["embed"] if tied else tiny["lm_head"], np.float32)
    assert np.all(dw_tiny > 1e-6), info


@pytest.mark.parametrize("remat", [True, False])
def test_backward_keeps_no_per_layer_weight_copies(rng, remat):
    """The layer scan's backward reads the weights it scans over, and writes each weight's
    gradient once: a [L, 1, k, n] copy of a weight saved per segment (what a slice reshaped
    inside the scan body costs, since the grouped matmul's VJP keeps w) would show as a second
    layer-scan output of that weight's shape. Removing them took a 1B training step on the XLA
    path from 0.193 to 0.180 s on an H200 (eval/results/train_h200.md)."""
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(rng, TINY, ACFG))
    tokens = jnp.asarray(rng.integers(1, TINY.vocab_size, (2, 4 * ACFG.segment_size)))
    L = TINY.num_hidden_layers   # 3 layers, 4 segments: the two scans have different lengths

    def loss(p):
        return sequential_forward(p, tokens, TINY, ACFG, output="none", compute_loss=True,
                                  remat=remat).loss

    outs = [tuple(v.aval.shape) for e in all_eqns(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
            if e.primitive.name == "scan" and e.params["length"] == L for v in e.outvars]
    stacked = [w.shape[1:] for w in jax.tree.leaves((params["layers"], params["memory"]))
               if w.ndim == 3 and w.shape[0] == L]
    for shape in set(stacked):   # one gradient per stacked weight of that shape, nothing else
        per_layer = [s for s in outs if s in ((L, 1) + shape, (L,) + shape)]
        assert len(per_layer) == stacked.count(shape), (shape, per_layer)


@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_remat_keeps_no_logits_per_segment(rng, schedule):
    """With remat the loss is recomputed in the backward too: XLA's temporary buffers of the
    compiled gradient stay below half of what the 16 segments' [B, T, V] float32 logits alone
    take (64 MB here; the sequential schedule kept them until its loss was rematerialised: 76 MB
    of temporaries before, 12 MB after; at Llama's V = 128256 a 1024-token segment's logits are
    0.5 GB). The loss equals the one without remat."""
    from armt_jax.schedules import schedule_forward
    cfg = dataclasses.replace(TINY, vocab_size=8192)
    acfg = ArmtConfig(segment_size=64, num_mem_tokens=4, d_mem=8)
    params = random_params(rng, cfg, acfg)
    B, N = 2, 16
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, N * acfg.segment_size)), jnp.int32)

    def loss(p, remat):
        return schedule_forward(schedule)(p, tokens, cfg, acfg, output="none", compute_loss=True,
                                          remat=remat, gmm_impl="xla").loss

    grad = jax.jit(jax.value_and_grad(functools.partial(loss, remat=True))).lower(params).compile()
    logits_bytes = N * B * acfg.segment_size * cfg.vocab_size * 4
    assert grad.memory_analysis().temp_size_in_bytes < logits_bytes / 2
    assert abs(float(grad(params)[0]) / float(jax.jit(loss, static_argnums=1)(params, False)) - 1) \
        <= 1e-6


def test_loss_goes_down(rng):
    params = random_params(rng, TINY, ACFG)
    batch = random_batch(rng)
    adam = optax.adam(1e-2)
    step = make_train_step(TINY, ACFG, adam)
    state = adam.init(params)
    losses = []
    for _ in range(12):
        params, state, metrics = step(params, state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0]


def test_fit_marks_the_steps_that_compile(rng, tmp_path):
    """train.loop.fit: the first batch of each padded shape compiles the step, and its metrics
    say so (`includes_compile`), so a step time is not read from it; metrics.jsonl has a line
    per step."""
    from train.loop import fit

    def example(n):
        return Example(tuple(rng.integers(1, TINY.vocab_size, n)), (1,) * n)

    lengths = [12, 14, 20, 9]            # padded to 16, 16, 24, 16 tokens (segments of 8)
    stream = iter([pad_batch([example(n), example(5)], ACFG.segment_size) for n in lengths])
    _, history = fit(random_params(rng, TINY, ACFG), TINY, ACFG, stream, steps=4,
                     optimizer=optax.sgd(1e-3), out_dir=tmp_path, progress=False)
    assert [h["includes_compile"] for h in history] == [True, False, True, False]
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["includes_compile"] for l in lines] == [True, False, True, False]
    assert [l["tokens"] for l in lines] == [n + 5 for n in lengths]


def _cli_train_inputs(rng, tmp_path):
    """A tiny word-level checkpoint with its tokenizer, and a one-book library."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[UNK]"] + sorted({w for w in "mary john sandra daniel went moved travelled journeyed "
                                "back to the bathroom bedroom garden hallway kitchen office where "
                                "is question answer".split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = TINY.__class__(**{**TINY.to_dict(), "vocab_size": len(words), "rope_scaling": None})
    ArmtModel(cfg, ACFG, params=random_params(rng, cfg, ACFG)).save(tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    books = tmp_path / "books"
    books.mkdir()
    (books / "b.txt").write_text("*** START OF X ***\n" + "Mary went to the garden. " * 200
                                 + "\n*** END OF X ***\n")
    args = ["train", str(tmp_path / "ckpt"), "--babi", str(DATA / "tasks_1-20_v1-2.tar.gz"),
            "--books", str(books), "--tasks", "1", "--context-tokens", "40", "--steps", "3",
            "--batch-size", "2", "--warmup", "1", "--out", str(tmp_path / "run")]
    return cfg, args


def _check_cli_training_run(out, cfg):
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3] and all(np.isfinite(l["loss"]) for l in lines)
    trained = ArmtModel.from_checkpoint(out / "step_3")
    assert trained.cfg == cfg     # float32 master weights saved, whatever the compute dtype
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(trained.param_tree()))


@pytest.mark.skipif(not (DATA / "tasks_1-20_v1-2.tar.gz").exists(), reason="no shared bAbI data")
def test_cli_train_end_to_end(rng, tmp_path):
    cfg, args = _cli_train_inputs(rng, tmp_path)
    assert cli.main(args + ["--compute-dtype", "bfloat16"]) == 0
    _check_cli_training_run(tmp_path / "run", cfg)


@pytest.mark.skipif(not (DATA / "tasks_1-20_v1-2.tar.gz").exists(), reason="no shared bAbI data")
def test_cli_train_diagonal_deterministic_in_a_fresh_process(rng, tmp_path):
    """`python -m armt_jax.cli train --schedule diagonal --deterministic`, as a user runs it:
    its own process, bf16 compute."""
    import subprocess
    import sys
    cfg, args = _cli_train_inputs(rng, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "armt_jax.cli", *args, "--compute-dtype",
                           "bfloat16", "--schedule", "diagonal", "--deterministic"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final loss" in proc.stdout
    _check_cli_training_run(tmp_path / "run", cfg)
