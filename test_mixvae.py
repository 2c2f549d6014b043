"""Tests: the math against independent float64 references, the router, the model, the
steps, and (further down) the program end to end."""

import csv
import ctypes
import dataclasses
import gzip
import inspect
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage as scipy_ndimage
from scipy.special import logsumexp as np_logsumexp
from scipy.special import softmax as np_softmax
from scipy.stats import entropy as np_entropy
from scipy.stats import multivariate_normal

import configs
import mixvae
import train

jax.config.update("jax_platforms", "cpu")


try:
    GLIBC = ctypes.CDLL("libc.so.6")  # Linux: its malloc_trim, and /proc below
except OSError:
    GLIBC = None


@pytest.fixture(autouse=True)
def bounded_memory():
    """Keep a worker under about 2 GB: after each test, return the heap's free pages to the
    system (XLA's compiler threads leave them in malloc arenas), and once the compiled
    programs of earlier tests hold over 1.4 GB (about 100 MB a configuration), drop them."""
    yield
    if GLIBC is None:
        return
    GLIBC.malloc_trim(0)
    if int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") > 1.4e9:
        jax.clear_caches()
        GLIBC.malloc_trim(0)


def reference_log_prior(y, mean, sigma, mask):
    """log (1/|A|) sum_{k in A} N(y; M e_k, sigma^2 I), float64, via scipy."""
    num_components = y.shape[-1]
    active = np.flatnonzero(mask)
    log_densities = [
        multivariate_normal(
            mean * np.eye(num_components)[k], sigma**2 * np.eye(num_components)
        ).logpdf(y)
        for k in active
    ]
    return np_logsumexp(np.stack(log_densities, axis=-1), axis=-1) - np.log(len(active))


# --------------------------------------------------------------------------------------
# logit-MoG log-prior
# --------------------------------------------------------------------------------------


def test_logit_mog_penalty_prefers_axis_aligned_logits():
    """The seed's guard: axis-aligned logits get a lower penalty than flat logits."""
    axis_aligned = jnp.array([[7.0, 0.0, 0.0, 0.0], [0.0, 0.0, 7.0, 0.0]])
    flat = jnp.full((2, 4), 7.0 / 4)

    def penalty(y):
        return -mixvae.logit_mog_log_prior(y, mean=7.0, sigma=1.0)

    assert np.all(penalty(axis_aligned) < penalty(flat))


@pytest.mark.parametrize("num_components", [1, 2, 5, 20])
@pytest.mark.parametrize("mean,sigma", [(7.0, 1.0), (3.0, 0.5), (10.0, 2.5)])
@pytest.mark.parametrize("masked", [False, True])
def test_logit_mog_log_prior_matches_scipy(num_components, mean, sigma, masked):
    rng = np.random.default_rng(num_components * 100 + int(mean * 10) + masked)
    y = rng.normal(0.0, 4.0, size=(16, num_components))
    y[:4] += mean * np.eye(num_components)[rng.integers(num_components, size=4)]  # near modes
    mask = np.ones(num_components, bool)
    if masked and num_components > 1:
        mask = rng.random(num_components) < 0.5
        mask[rng.integers(num_components)] = True
    expected = reference_log_prior(y, mean, sigma, mask)
    got = mixvae.logit_mog_log_prior(
        jnp.asarray(y, jnp.float32), mean=mean, sigma=sigma, active_mask=jnp.asarray(mask)
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_loss_terms_take_any_leading_batch_shape():
    y = jax.random.normal(jax.random.key(0), (2, 3, 4)) * 5
    mask = jnp.array([True, False, True, True])
    prior = mixvae.logit_mog_log_prior(y, mean=7.0, sigma=1.0, active_mask=mask)
    assert prior.shape == (2, 3)
    np.testing.assert_allclose(
        prior.reshape(-1),
        reference_log_prior(np.asarray(y, float).reshape(6, 4), 7.0, 1.0, np.asarray(mask)),
        rtol=1e-5,
    )
    routing = mixvae.route(
        y, jax.random.key(1), temperature=0.5, mode="straight_through", active_mask=mask
    )
    assert routing.weights.shape == (2, 3, 4) and np.all(np.asarray(routing.weights)[..., 1] == 0)
    r = routing.responsibilities
    assert mixvae.categorical_kl(r, jnp.full(4, 0.25), mask).shape == (2, 3)
    with pytest.raises(AssertionError):
        mixvae.logit_mog_log_prior(y, mean=7.0, sigma=1.0, active_mask=mask[:3])


def test_logit_mog_masked_channels_leave_the_distances_but_not_the_sum():
    """Masking removes components from the sum only: the distance of every component still
    uses all K raw logits, including the masked channels' (never -inf)."""
    y = jnp.array([[6.0, 1.0, -2.0], [0.5, 0.2, 9.0]])
    mask = jnp.array([True, True, False])
    got = mixvae.logit_mog_log_prior(y, mean=7.0, sigma=1.0, active_mask=mask)
    np.testing.assert_allclose(
        got, reference_log_prior(np.asarray(y, float), 7.0, 1.0, mask), rtol=1e-6
    )
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize(
    "logits,sigma,mask",
    [
        (1e4 * np.array([[1.0, -1.0, 0.5], [-1.0, 1.0, 1.0]]), 1.0, None),
        (np.array([[7.0, 0.001, -0.002], [3.0, 3.0, 3.0]]), 1e-3, None),
        (np.array([[2.0], [-1e4]]), 0.5, None),  # K = 1
        (np.array([[1e4, -3.0, 2.0], [0.0, 7.0, 0.0]]), 1e-3, np.array([False, True, False])),
    ],
    ids=["huge-logits", "tiny-sigma", "K=1", "one-active"],
)
def test_logit_mog_extremes_are_finite_with_finite_gradients(logits, sigma, mask):
    y = jnp.asarray(logits, jnp.float32)
    active = None if mask is None else jnp.asarray(mask)

    def fn(y):
        return jnp.sum(mixvae.logit_mog_log_prior(y, mean=7.0, sigma=sigma, active_mask=active))

    value, grad = jax.value_and_grad(fn)(y)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    reference = reference_log_prior(
        np.asarray(logits, float), 7.0, sigma, np.ones(y.shape[-1], bool) if mask is None else mask
    )
    np.testing.assert_allclose(float(value), reference.sum(), rtol=1e-5)


# --------------------------------------------------------------------------------------
# categorical KL and the other terms
# --------------------------------------------------------------------------------------


def test_categorical_kl_is_zero_at_pi_positive_elsewhere_and_matches_numpy():
    rng = np.random.default_rng(0)
    pi = rng.dirichlet(np.ones(6))
    r = rng.dirichlet(np.ones(6), size=10)
    np.testing.assert_array_equal(mixvae.categorical_kl(jnp.asarray(pi), jnp.asarray(pi)), 0.0)
    got = np.asarray(mixvae.categorical_kl(jnp.asarray(r), jnp.asarray(pi)))
    np.testing.assert_allclose(got, np.sum(r * np.log(r / pi), axis=-1), rtol=1e-5)
    assert np.all(got > 0)


def test_categorical_kl_with_zeros_and_mask_renormalises_pi():
    pi = np.array([0.1, 0.2, 0.3, 0.4])
    mask = np.array([True, False, True, True])
    r = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.5]])
    pi_active = pi * mask / np.sum(pi * mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.nansum(np.where(r > 0, r * np.log(r / pi_active), 0.0), axis=-1)

    def fn(r):
        return mixvae.categorical_kl(r, jnp.asarray(pi), jnp.asarray(mask))

    got, grad = fn(jnp.asarray(r)), jax.grad(lambda r: jnp.sum(fn(r)))(jnp.asarray(r))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.all(np.isfinite(grad))


def test_gaussian_kl_matches_closed_form():
    rng = np.random.default_rng(1)
    mean, log_var = rng.normal(size=(2, 7, 3))
    expected = 0.5 * np.sum(mean**2 + np.exp(log_var) - 1 - log_var, axis=-1)
    np.testing.assert_allclose(
        mixvae.gaussian_kl(jnp.asarray(mean), jnp.asarray(log_var)), expected, rtol=1e-5
    )
    assert float(mixvae.gaussian_kl(jnp.zeros(3), jnp.zeros(3))) == 0.0


def test_dirichlet_penalty_and_entropy():
    pi = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(
        mixvae.dirichlet_penalty(jnp.asarray(pi), 3.0), -2 * np.log(pi).sum(), rtol=1e-6
    )
    np.testing.assert_allclose(mixvae.entropy(jnp.asarray([1.0, 0.0])), 0.0)
    np.testing.assert_allclose(mixvae.entropy(jnp.full(4, 0.25)), np.log(4), rtol=1e-6)


@pytest.mark.parametrize("likelihood", mixvae.LIKELIHOODS)
def test_reconstruction_nll_matches_scipy(likelihood):
    from scipy.stats import bernoulli, norm

    rng = np.random.default_rng(2)
    x = rng.random((3, 5))
    out = rng.normal(size=(3, 6))
    got = mixvae.reconstruction_nll(
        jnp.asarray(x),
        jnp.asarray(out),
        likelihood=likelihood,
        observation_sigma=0.2,
        sigma_min=0.05,
        sigma_max=1.0,
    )
    p = 1 / (1 + np.exp(-out[:, :5]))
    if likelihood == "bernoulli":
        binary = (x > 0.5).astype(float)  # the Bernoulli pmf at binary x; the formula covers [0,1]
        got = mixvae.reconstruction_nll(
            jnp.asarray(binary), jnp.asarray(out), likelihood=likelihood
        )
        expected = -bernoulli(p).logpmf(binary).sum(-1)
    else:
        sigma = (
            0.2
            if likelihood == "gaussian"
            else np.clip(0.05 + np.log1p(np.exp(out[:, 5:])), 0.05, 1.0)
        )
        expected = -norm(p, sigma).logpdf(x).sum(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_softplus_and_its_gradient_match_float64_at_any_scale():
    from scipy.special import expit

    v = np.array([-1e4, -88.0, -30.0, -1.0, -1e-6, 0.0, 1e-6, 1.0, 30.0, 88.0, 1e4])
    np.testing.assert_allclose(
        mixvae.softplus(jnp.asarray(v, jnp.float32)), np.logaddexp(0.0, v), rtol=1e-6, atol=1e-30
    )
    grad = jax.vmap(jax.grad(mixvae.softplus))(jnp.asarray(v, jnp.float32))
    np.testing.assert_allclose(grad, expit(v), rtol=1e-6, atol=1e-30)


# --------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------


LOGITS = jnp.array([[2.0, 0.5, -1.0, 3.0], [0.0, 0.1, 0.2, 0.3], [-2.0, 4.0, 1.0, 0.0]])
MASK = jnp.array([True, True, False, True])


@pytest.mark.parametrize("mode", mixvae.ROUTERS)
def test_masked_channels_get_exactly_zero_weight_in_every_mode(mode):
    for key in (jax.random.key(0), None):
        routing = mixvae.route(
            LOGITS + 10.0 * ~MASK, key, temperature=0.5, mode=mode, active_mask=MASK
        )
        assert np.all(np.asarray(routing.weights)[:, 2] == 0.0)
        assert np.all(np.asarray(routing.responsibilities)[:, 2] == 0.0)
        np.testing.assert_allclose(np.sum(routing.weights, -1), 1.0, rtol=1e-6)


def test_straight_through_is_one_hot_forward_and_soft_backward():
    soft_when_not_hard = mixvae.route(
        LOGITS, jax.random.key(3), temperature=0.7, mode="straight_through", hard=False
    )
    np.testing.assert_array_equal(
        soft_when_not_hard.weights,
        mixvae.route(LOGITS, jax.random.key(3), temperature=0.7, mode="gumbel").weights,
    )
    key = jax.random.key(3)
    routing = mixvae.route(LOGITS, key, temperature=0.7, mode="straight_through")
    weights = np.asarray(routing.weights)
    assert set(np.unique(weights)) <= {0.0, 1.0} and np.all(weights.sum(-1) == 1.0)
    # the channel picked is the argmax of the noisy logits, y + g (the gumbel sample's)
    picked = np.argmax(np.asarray(soft_when_not_hard.weights), -1)
    np.testing.assert_array_equal(weights, np.eye(4)[picked])
    # Gumbel-max: over many keys, channel k is picked with probability softmax(y)_k
    draws = jax.vmap(
        lambda k: mixvae.route(LOGITS[0], k, temperature=0.7, mode="straight_through").weights
    )(jax.random.split(jax.random.key(5), 20_000))
    np.testing.assert_allclose(np.mean(draws, 0), jax.nn.softmax(LOGITS[0]), atol=0.015)
    probe = jnp.arange(12.0).reshape(3, 4)
    hard_grad = jax.grad(
        lambda y: jnp.sum(
            probe * mixvae.route(y, key, temperature=0.7, mode="straight_through").weights
        )
    )(LOGITS)
    soft_grad = jax.grad(
        lambda y: jnp.sum(probe * mixvae.route(y, key, temperature=0.7, mode="gumbel").weights)
    )(LOGITS)
    np.testing.assert_allclose(hard_grad, soft_grad, rtol=1e-6)
    assert np.any(hard_grad != 0)


@pytest.mark.parametrize("mode", mixvae.ROUTERS)
def test_evaluation_routing_is_deterministic(mode):
    """key=None draws no noise: s is a function of y alone (g = 0)."""
    first = mixvae.route(LOGITS, None, temperature=0.5, mode=mode)
    np.testing.assert_allclose(first.responsibilities, jax.nn.softmax(LOGITS), rtol=1e-6)
    expected = {
        "softmax": jax.nn.softmax(LOGITS),
        "gumbel": jax.nn.softmax(LOGITS / 0.5),
        "straight_through": jax.nn.one_hot(jnp.argmax(LOGITS, -1), 4),
    }[mode]
    np.testing.assert_allclose(first.weights, expected, rtol=1e-6)


# --------------------------------------------------------------------------------------
# Model and steps
# --------------------------------------------------------------------------------------


def tiny_model(key=0, **kwargs):
    """A small model, its weights drawn with XLA's own generator ("rbg"): built op by op, each
    weight shape compiles a random-number program, and rbg's compile in half threefry's time."""
    options = dict(input_dim=64, num_components=3, latent_dim=2, width=32, embed_dim=4)
    return mixvae.MixVAE(jax.random.key(key, impl="rbg"), **(options | kwargs))


PI_LOGITS = np.array([0.5, -1.0, 0.2])  # a learnable pi away from uniform, for tiny_model


def with_pi_logits(model):
    return eqx.tree_at(lambda m: m.pi_logits, model, jnp.asarray(PI_LOGITS, jnp.float32))


def all_active(num_components=3, **kwargs):
    return mixvae.Schedule(
        **(
            {"c_anneal": 1.0, "temperature": 1.0, "active_mask": jnp.ones(num_components, bool)}
            | kwargs
        )
    )


TINY_BATCH = (jax.random.uniform(jax.random.key(42), (16, 64)) > 0.6).astype(jnp.float32)


@pytest.mark.parametrize("conditioning", mixvae.CONDITIONINGS)
@pytest.mark.parametrize("decoder", mixvae.DECODERS)
def test_model_trains_on_a_tiny_batch(conditioning, decoder):
    model = tiny_model(conditioning=conditioning, decoder=decoder, encoder=decoder)
    objective = mixvae.Objective(c_regularizer="both", router="gumbel", consistency_weight=0.0)
    optimizer = mixvae.make_optimizer(3e-3)
    opt_state = mixvae.init_optimizer(optimizer, model)
    sched = all_active()
    key = jax.random.key(0)
    losses = []  # each before its step's update
    for step in range(50):
        model, opt_state, metrics = mixvae.train_step(
            model, opt_state, TINY_BATCH, jax.random.fold_in(key, step), sched, objective, optimizer
        )
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("decoder", mixvae.DECODERS)
def test_separate_decoders_are_independent_stacked_networks(decoder):
    model = tiny_model(conditioning="separate", decoder=decoder)
    network = model.decoders.network
    first_layer = (network.layers[0] if decoder == "mlp" else network.dense).weight
    assert first_layer.shape[0] == 3 and not np.allclose(first_layer[0], first_layer[1])
    z = jax.random.normal(jax.random.key(1), (3, 5, 2))
    out = model.decoders(z)
    one = jax.tree.map(lambda leaf: leaf[1] if eqx.is_array(leaf) else leaf, model.decoders.network)
    np.testing.assert_allclose(out[1], one(z[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "conditioning,layout",
    [("separate", "decentralized"), ("concat", "shared"), ("film", "decentralized")],
)
def test_top_m_decodes_exactly_the_top_channels(conditioning, layout):
    model = tiny_model(num_components=4, conditioning=conditioning, latent_layout=layout)
    x = TINY_BATCH
    _, mean, _ = jax.vmap(model.encoder)(x)
    full = mixvae.channel_nll(model, x, mixvae.decode_channels(model, mean)).T  # [B, K]
    scores = jax.random.normal(jax.random.key(3), full.shape)
    # M = K with capacity 1 (C = B): every channel of every row, the exact sum.
    nll, decoded = mixvae.decode_top_m(model, x, mean, scores, 4, 1.0)
    assert np.all(decoded)
    np.testing.assert_allclose(nll, full, rtol=1e-5)
    # M = 2: the two highest scores of each row, with their exact losses, zeros elsewhere.
    nll, decoded = mixvae.decode_top_m(model, x, mean, scores, 2, 2.0)
    top = np.argsort(-np.asarray(scores), axis=1)[:, :2]
    expected = np.zeros(full.shape, bool)
    np.put_along_axis(expected, top, True, axis=1)
    np.testing.assert_array_equal(
        decoded, expected
    )  # separate: capacity ceil(2 16 2 / 4) = B, no drops
    np.testing.assert_allclose(np.where(expected, full, 0.0), nll, rtol=1e-5)


def test_top_m_capacity_drops_rows_past_it_in_row_order():
    model = tiny_model(num_components=4, conditioning="separate")
    z = jax.random.normal(jax.random.key(1), (6, 1, 2))
    channels = jnp.array([[0], [2], [0], [0], [2], [0]])
    outputs, kept = mixvae.dispatch(model.decoders, z, channels, capacity=2)
    np.testing.assert_array_equal(kept[:, 0], [True, True, True, False, True, False])
    all_channels = model.decoders(jnp.broadcast_to(z[:, 0], (4, 6, 2)))  # [K, N, P]
    for n in np.flatnonzero(kept[:, 0]):
        np.testing.assert_allclose(outputs[n, 0], all_channels[channels[n, 0], n], rtol=1e-5)
    assert np.all(outputs[~kept] == 0)


def test_top_m_weights_renormalise_and_unselected_decoders_get_no_gradient():
    model = tiny_model(num_components=4, conditioning="separate")
    objective = mixvae.Objective(
        router="gumbel", top_m=2, top_m_capacity=4.0, consistency_weight=0.0
    )
    sched = all_active(4)
    key = jax.random.key(5)
    forward = eqx.filter_jit(mixvae.forward)
    terms = forward(model, TINY_BATCH, key, sched, objective)
    assert np.all(np.sum(np.asarray(terms.decoded_mask), axis=1) == 2)
    np.testing.assert_allclose(np.sum(terms.weights, axis=1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(terms.weights)[~np.asarray(terms.decoded_mask)] == 0)
    # One image alone: exactly its two decoders receive a reconstruction gradient.
    one = TINY_BATCH[:1]
    used = np.flatnonzero(forward(model, one, key, sched, objective).decoded_mask[0])
    grads = eqx.filter_jit(
        eqx.filter_grad(lambda m: mixvae.loss_fn(m, one, key, sched, objective)[0])
    )(model)
    last = np.abs(np.asarray(grads.decoders.network.layers[-1].weight)).sum(
        axis=(1, 2)
    )  # per channel
    assert len(used) == 2 and np.all(last[used] > 0) and np.all(np.delete(last, used) == 0)
    # Evaluation (no key) decodes every channel whatever top_m is.
    assert np.all(forward(model, TINY_BATCH, None, sched, objective).decoded_mask)


def test_train_step_and_epoch_compile_once_across_schedule_values():
    model = tiny_model()
    objective = mixvae.Objective(consistency_weight=0.0)
    optimizer = mixvae.make_optimizer(1e-3)
    opt_state = mixvae.init_optimizer(optimizer, model)
    before_step = eqx.debug.get_num_traces(mixvae.train_step)
    before_epoch = eqx.debug.get_num_traces(mixvae.train_epoch)
    batches = jnp.arange(16).reshape(2, 8)
    mask = jnp.ones(3, bool)
    for scale, temperature, active in [
        (0.1, 2.0, mask),
        (0.5, 1.0, mask),
        (1.0, 0.3, mask.at[2].set(False)),
    ]:
        sched = all_active(c_anneal=scale, temperature=temperature, active_mask=active)
        model, opt_state, _ = mixvae.train_step(
            model, opt_state, TINY_BATCH, jax.random.key(0), sched, objective, optimizer
        )
        model, opt_state, _ = mixvae.train_epoch(
            model, opt_state, TINY_BATCH, batches, jax.random.key(1), sched, objective, optimizer
        )
    # train_epoch traces train_step once inside its own single trace.
    assert eqx.debug.get_num_traces(mixvae.train_step) - before_step == 2
    assert eqx.debug.get_num_traces(mixvae.train_epoch) - before_epoch == 1


def test_loss_terms_follow_the_regularizer_choice_and_schedule():
    model = tiny_model()
    sched = all_active(c_anneal=0.25)
    _, cat = mixvae.loss_fn(
        model,
        TINY_BATCH,
        None,
        sched,
        mixvae.Objective(c_regularizer="categorical", diversity_weight=0.0),
    )
    _, mog = mixvae.loss_fn(
        model,
        TINY_BATCH,
        None,
        sched,
        mixvae.Objective(c_regularizer="logit_mog", prior_weight=2.0, prior_sigma=1.0),
    )
    _, both = mixvae.loss_fn(
        model,
        TINY_BATCH,
        None,
        sched,
        mixvae.Objective(
            c_regularizer="both",
            kl_c_weight=3.0,
            prior_weight=2.0,
            prior_sigma=1.0,
            diversity_weight=0.0,
        ),
    )
    assert float(cat["kl_c_logit_mog"]) == 0.0
    terms = mixvae.forward(
        model, TINY_BATCH, None, sched, mixvae.Objective(router="straight_through")
    )
    neg_log_prior = -mixvae.logit_mog_log_prior(terms.logits, mean=7.0, sigma=1.0)
    np.testing.assert_allclose(
        mog["kl_c_logit_mog"], 0.25 * 2.0 * np.mean(neg_log_prior), rtol=1e-6
    )

    def rest(m):
        return m["reconstruction_loss"] + m["kl_z"]

    np.testing.assert_allclose(cat["loss"], rest(cat) + 0.25 * cat["kl_c"], rtol=1e-6)
    np.testing.assert_allclose(
        both["loss"], rest(both) + 0.25 * 3.0 * both["kl_c"] + both["kl_c_logit_mog"], rtol=1e-6
    )
    every = mixvae.Objective(
        c_regularizer="both",
        kl_c_weight=3.0,
        beta_z=0.5,
        dirichlet_alpha=2.0,
        dirichlet_weight=0.3,
        diversity_weight=-2.0,
        consistency_weight=4.0,
    )
    _, m = mixvae.loss_fn(model, TINY_BATCH, jax.random.key(1), sched, every)
    # each summand from the forward pass's terms (the same key: the same noise), in float64
    terms = mixvae.forward(model, TINY_BATCH, jax.random.key(1), sched, every)
    s, r, nll, kl_z, logits = (
        np.asarray(v, np.float64)
        for v in (terms.weights, terms.responsibilities, terms.nll, terms.kl_z, terms.logits)
    )
    usage = r.mean(0)
    weighted = {
        "reconstruction": np.mean(np.sum(s * nll, -1)),
        "kl_z": 0.5 * np.mean(np.sum(kl_z, -1)),
        "kl_c": 0.25 * 3.0 * np.mean(np.sum(r * np.log(r * 3), -1)),
        "logit_mog": 0.25
        * np.mean(-reference_log_prior(logits, 7.0, every.prior_sigma, np.ones(3, bool))),
        "dirichlet": 0.3 * 3 * np.log(3),  # -(alpha - 1) sum_k log(1/3), pi uniform
        "diversity": -2.0 * np_entropy(usage),
        "consistency": 4.0 * np.mean(np.asarray(terms.consistency, np.float64)),
    }
    for name, value in weighted.items():  # each summand as it enters L, and L their sum
        np.testing.assert_allclose(m[f"loss_{name}"], value, rtol=2e-5, err_msg=name)
        assert value != 0.0, name
    np.testing.assert_allclose(m["loss"], sum(weighted.values()), rtol=2e-5)


@pytest.mark.parametrize("layout", mixvae.LATENT_LAYOUTS)
@pytest.mark.parametrize("top_m", [None, 1])
def test_neg_elbo_matches_a_float64_reference(layout, top_m):
    """-ELBO = mean_x [sum_k r_k (nll_k + KL_z,k) + KL(r || pi)] (the shared layout: its one KL_z
    unweighted), with top_m: r restricted to the decoded channels, renormalised, in the nll."""
    model = with_pi_logits(tiny_model(latent_layout=layout, learnable_pi=True))
    sched = all_active()
    objective = mixvae.Objective(top_m=top_m, consistency_weight=0.0)
    key = None if top_m is None else jax.random.key(2)
    terms = mixvae.forward(model, TINY_BATCH, key, sched, objective)
    _, metrics = mixvae.aggregate(model, terms, sched, objective)
    r, nll, kl_z = (
        np.asarray(v, np.float64) for v in (terms.responsibilities, terms.nll, terms.kl_z)
    )
    pi = np_softmax(PI_LOGITS)
    decoded = np.asarray(terms.decoded_mask)
    if top_m is not None:
        assert np.all(decoded.sum(-1) == 1)
    r_decoded = np.where(decoded, r, 0) / np.sum(np.where(decoded, r, 0), -1, keepdims=True)
    expected_kl_z = kl_z if layout == "shared" else np.sum(r * kl_z, -1)
    kl_c = np.sum(r * np.log(r / pi), -1)
    expected = np.mean(np.sum(r_decoded * nll, -1) + expected_kl_z + kl_c)
    np.testing.assert_allclose(metrics["neg_elbo"], expected, rtol=2e-5)


def test_inactive_channels_do_not_change_reconstruction_or_prior_sum():
    model = tiny_model()
    mask = jnp.array([True, False, True])
    sched = all_active(active_mask=mask)
    terms = mixvae.forward(
        model,
        TINY_BATCH,
        jax.random.key(0),
        sched,
        mixvae.Objective(router="gumbel", consistency_weight=0.0),
    )
    assert np.all(np.asarray(terms.weights)[:, 1] == 0) and np.all(
        np.asarray(terms.responsibilities)[:, 1] == 0
    )
    _, metrics = mixvae.aggregate(model, terms, sched, mixvae.Objective(prior_sigma=1.0))
    two_channel = np.sum(
        np.asarray(terms.weights)[:, [0, 2]] * np.asarray(terms.nll)[:, [0, 2]], -1
    ).mean()
    np.testing.assert_allclose(metrics["reconstruction_loss"], two_channel, rtol=1e-6)
    expected = -mixvae.logit_mog_log_prior(
        terms.logits, mean=7.0, sigma=1.0, active_mask=mask
    ).mean()
    np.testing.assert_allclose(metrics["kl_c_logit_mog"], expected, rtol=1e-6)
    assert float(metrics["k_active"]) == 2.0
    # what channel 1 decodes does not matter while it is closed: its decoder gets no gradient
    objective = mixvae.Objective(router="gumbel", consistency_weight=0.0)

    @eqx.filter_jit
    def loss(m):
        return mixvae.loss_fn(m, TINY_BATCH, jax.random.key(0), sched, objective)[0]

    decoders = model.decoders
    assert decoders.embeddings is None  # separate decoders: one stacked network, [K, ...] leaves
    changed = eqx.tree_at(
        lambda m: m.decoders.network,
        model,
        jax.tree.map(lambda leaf: leaf.at[1].add(1.0), decoders.network),
    )
    assert float(loss(changed)) == float(loss(model))
    grads = eqx.filter_jit(eqx.filter_grad(loss))(model)
    for leaf in jax.tree.leaves(grads.decoders.network):
        assert np.all(np.asarray(leaf[1]) == 0) and np.any(np.asarray(leaf[0]) != 0)


def test_evaluate_in_chunks_equals_one_batch():
    model = tiny_model(latent_layout="shared", learnable_pi=True)
    sched = all_active()
    objective = mixvae.Objective(c_regularizer="both", dirichlet_alpha=2.0, diversity_weight=-0.5)
    images = (jax.random.uniform(jax.random.key(7), (37, 64)) * 255).astype(jnp.uint8)
    chunked, terms = mixvae.evaluate(model, images, sched, objective, chunk_size=8)
    _, whole = mixvae.loss_fn(model, mixvae.to_unit_interval(images), None, sched, objective)
    assert terms.responsibilities.shape == (37, 3)
    for name in mixvae.METRICS:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=2e-5, atol=1e-6, err_msg=name)
    # the encoder alone gives evaluate's responsibilities, with a closed channel and a kick's bias
    sched = all_active(
        active_mask=jnp.array([True, False, True]), logit_bias=jnp.array([0, 0, 2.0])
    )
    _, kicked = mixvae.evaluate(model, images, sched, objective, chunk_size=8)
    encoded = mixvae.encode_responsibilities(model, images, sched, chunk_size=8)
    assert np.all(encoded[:, 1] == 0) and not np.allclose(encoded, terms.responsibilities)
    np.testing.assert_allclose(encoded, kicked.responsibilities, rtol=1e-6, atol=1e-7)


def test_routing_statistics_follow_their_formulas_and_the_epoch_recomputes_k_eff():
    model = tiny_model()
    sched = all_active()
    terms = mixvae.forward(model, TINY_BATCH, None, sched, mixvae.Objective())
    _, metrics = mixvae.aggregate(model, terms, sched, mixvae.Objective())
    r = np.asarray(terms.responsibilities, np.float64)
    usage = r.mean(0)

    expected = {
        "component_diversity": np_entropy(usage),
        "k_eff": np.exp(np_entropy(usage)),
        "active_components": np.sum(usage > 1e-3),
        "component_entropy": np.mean(np_entropy(r, axis=-1)),
        "responsibility_confidence": np.mean(r.max(-1)),
        "pi_entropy": np.log(3),
        "kl_c": np.mean(np.sum(r * np.log(3 * r), -1)),
        "kl_z": np.mean(np.sum(np.asarray(terms.kl_z, np.float64), -1)),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    # an epoch's k_eff and active channels come from its mean usage, not from the batches' values
    batches = {"usage": jnp.array([[1.0, 0, 0], [0, 1.0, 0]]), "k_eff": jnp.ones(2)}
    batches["active_components"] = jnp.ones(2)
    epoch = mixvae.summarize(batches)
    np.testing.assert_allclose(epoch["usage"], [0.5, 0.5, 0])
    assert float(epoch["k_eff"]) == pytest.approx(2.0) and float(epoch["active_components"]) == 2


def test_metrics_cover_the_design_list():
    _, metrics = mixvae.loss_fn(tiny_model(), TINY_BATCH, None, all_active(), mixvae.Objective())
    assert set(mixvae.METRICS) <= set(metrics)
    design = (
        "loss reconstruction_loss kl_z kl_c kl_c_logit_mog dirichlet_penalty component_diversity "
        "component_entropy responsibility_confidence k_eff active_components pi_entropy kl_c_scale "
        "gumbel_temperature k_active"
    ).split()
    assert set(design) <= set(mixvae.METRICS)


# --------------------------------------------------------------------------------------
# The program: configuration, CLI, a short run end to end
# --------------------------------------------------------------------------------------

REPO = Path(__file__).parent


# Child processes run on the CPU as this process does (jax_platforms above), also on a machine
# with a GPU: their numbers are compared with in-process runs, bit for bit.
CHILD_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def run_cli(*args, timeout=180):
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=CHILD_ENV,
    )


def test_mixvae_defaults_are_what_train_py_trains():
    """One source of defaults: mixvae.py's own API, called with nothing but the data's size,
    builds the model and objective of `python train.py`: the same objective fields, every
    MixVAE argument that train.py sets equal to its default, and the same weights."""
    config = configs.Config()
    assert train.build_objective(config) == mixvae.Objective()
    defaults = inspect.signature(mixvae.MixVAE.__init__).parameters
    for name, value in train.model_settings(config):  # what build_model passes to MixVAE
        assert value == defaults[name].default, name
    built = train.build_model(config, 64, jax.random.key(0))
    assert bool(eqx.tree_equal(built, mixvae.MixVAE(jax.random.key(0), input_dim=64)))


def test_usage_line_parses_to_the_expected_config():
    config = train.parse_config(["--c-regularizer", "logit_mog", "--prior-mean", "7"])
    assert config == configs.Config(c_regularizer="logit_mog", prior_mean=7.0)
    config = train.parse_config(
        [
            "--c-regularizer",
            "both",
            "--prior-sigma",
            "0.5",
            "--kl-c-weight",
            "0",
            "--learnable-pi",
            "--dirichlet-alpha",
            "2",
            "--router",
            "gumbel",
        ]
    )
    assert (config.c_regularizer, config.prior_sigma, config.kl_c_weight) == ("both", 0.5, 0.0)
    assert config.learnable_pi and config.dirichlet_alpha == 2.0 and config.router == "gumbel"


def test_help_groups_every_flag_once_in_config_order_with_whole_paragraphs(capsys):
    listed = [name for _, names in configs.HELP_GROUPS.values() for name in names]
    assert listed == [field.name for field in dataclasses.fields(configs.Config)]
    with pytest.raises(SystemExit) as exit_:
        train.parse_config(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    titles = [f"{title} options" for title in configs.HELP_GROUPS]
    assert [text.index(title) for title in titles] == sorted(text.index(t) for t in titles)
    assert text.index("--learning-rate") < text.index("--prior-mean") < text.index("--curriculum")
    assert "{None" not in text and "(default: None)" not in text and "(default: )" not in text
    # each docstring reaches tyro as one paragraph (its source line breaks would show)
    helps = configs.field_help(configs.Config)
    assert set(helps) == set(listed) and not any("\n" in help for help in helps.values())
    assert helps["restarts"].startswith("Candidates per seed: train N (their own initialisations,")


def test_preset_sets_defaults_and_flags_override_it():
    quick = train.parse_config(["--preset", "quick"])
    assert quick == configs.PRESETS["quick"]
    assert (quick.c_regularizer, quick.prior_mean, quick.prior_sigma, quick.prior_weight) == (
        "logit_mog",
        7,
        1,
        1,
    )
    assert quick.kl_c_weight == 0 and quick.router == "straight_through"
    overridden = train.parse_config(["--latent-dim", "3", "--preset", "quick"])
    assert overridden.latent_dim == 3 and overridden.num_components == quick.num_components


def test_validate_only_trains_nothing_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--validate-only", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and str(out) in result.stdout
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prior-sigma", "0"], "--prior-sigma=0.0 is not allowed"),
        (["--num-components", "0"], "--num-components=0"),
        (["--batch-size", "100000"], "--batch-size=100000"),
        (["--dataset", "imagenet"], "'imagenet' for argument '--dataset'"),
        (["--gumbel-temperature", "-1"], "--gumbel-temperature=-1.0"),
        (
            ["--gumbel-temperature", "1e-8"],
            "--gumbel-temperature=1e-08 .* --gumbel-temperature-min",
        ),
        (["--gumbel-temperature-min", "2"], "--gumbel-temperature-min=2.0 .* at most"),
        (["--val-split", "1.5"], "--val-split=1.5"),
        (["--prior-mean", "nan"], "--prior-mean=nan .* finite"),
        (["--prior-mean", "inf"], "--prior-mean=inf .* finite"),
        (["--learning-rate", "inf"], "--learning-rate=inf .* finite"),
        (["--prior-sigma", "inf"], "--prior-sigma=inf .* finite"),
        (["--diversity-weight", "nan"], "--diversity-weight=nan .* finite"),
        (["--data-dir", "somewhere"], "--data-dir='somewhere' .* --dataset=digits"),
        (["--epochs", "abc"], "--epochs: invalid literal"),
        (["--bogus", "3"], "Unrecognized options: --bogus"),
        (["--sweep", "prior-meen=3,5"], "prior-meen is not a flag .*sweepable: prior-mean"),
        (["--sweep", "hidden-dim=8,16"], "hidden-dim is not sweepable in one compiled program"),
        (
            ["--sweep", "kl-c-weight=1,2"],
            "kl-c-weight=... has no effect with --c-regularizer logit",
        ),
        (["--sweep", "prior-mean=7,7.0000001"], "two points share the name prior-mean7"),
        (["--sweep", "prior-mean=3", "--sweep", "beta-z=1,2"], "--sweep is given twice"),
        (["--distributed", "--process-id", "3", "--num-processes", "2"], "--process-id=3"),
        (["--process-id", "1"], "--process-id is not allowed without --distributed"),
        (["--sweep", "prior-sigma=0.5,0"], "point prior-sigma0: --prior-sigma=0.0 .* > 0"),
        (["--sweep", "prior-mean=3,x"], "prior-mean=3,x' .* must be numbers"),
        (["--sweep", "prior-mean="], "prior-mean=' .* lists no values"),
        (["--sweep", "prior-mean"], "write NAME=V1,V2"),
        (["--sweep", "prior-mean=3", "prior-mean=5"], "prior-mean is swept twice"),
        (["--sweep", "beta-z=1,1"], "a value is listed twice"),
        (["--sweep", "prior-mean=3,5", "--prior-mean", "4"], "--prior-mean is not allowed with"),
        (["--sweep", "prior-mean=3,5", "--curriculum"], "--sweep is not allowed with --curric"),
        (["--restarts", "2", "--restart-choice", "agreement"], "'agreement' .* two or more --se"),
        (["--consistency-neighbors", "-1"], "--consistency-neighbors=-1 .* integer >= 0"),
        (
            ["--consistency-neighbors", "100000"],
            "--consistency-neighbors=100000 .* fewer than the 1293 training images",
        ),
    ],
)
def test_bad_values_are_one_line_naming_the_flag_typed_and_write_nothing(
    args, message, tmp_path, capsys
):
    assert train.main([*args, "--out-dir", str(tmp_path / "run")]) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert re.search(message, stderr), stderr
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_never_overwritten(tmp_path, monkeypatch, capsys):
    """Refused before any work: no data loaded, no model built."""
    (tmp_path / "keep.txt").write_text("precious")
    monkeypatch.setattr(train, "load_dataset", None)
    monkeypatch.setattr(train, "initial_state", None)
    assert train.main(["--out-dir", str(tmp_path), "--epochs", "1"]) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_neighbours_are_warped_only_where_the_consistency_term_is_on(tmp_path, monkeypatch):
    """k > 0 builds a neighbour table only if some run of the config weights the consistency term;
    at weight 0 (an ablation of the defaults, the plain preset) k is unused and not refused."""
    monkeypatch.setattr(mixvae, "nearest_neighbors", None)  # a call would raise
    out = tmp_path / "run"
    ablation = ["--out-dir", str(out), "--consistency-weight", "0", "--epochs", "1", *SMALL_RUN]
    assert train.main(ablation) == 0
    assert "neighbours" not in json.loads((out / "summary.json").read_text())["timing_sec"]
    parse = train.parse_config
    assert train.warps_neighbours(parse([]))  # the defaults: k = 5, weight 40
    assert not train.warps_neighbours(parse(["--consistency-weight", "0"]))
    assert not train.warps_neighbours(parse(["--consistency-neighbors", "0"]))
    assert not train.warps_neighbours(parse(["--preset", "plain"]))
    assert not train.warps_neighbours(parse(["--preset", "plain", "--sweep", "prior-mean=5,7"]))
    swept = [
        "--preset",
        "plain",
        "--consistency-neighbors",
        "5",
        "--sweep",
        "consistency-weight=0,9",
    ]
    assert train.warps_neighbours(parse(swept))
    unused = parse(["--consistency-weight", "0", "--consistency-neighbors", "100000"])
    assert train.load_dataset(unused).train.images.shape == (1293, 64)


def test_validation_and_evaluation_compile_ahead_once_each(tmp_path, caplog):
    """run() compiles the validation, the test evaluation, the training split's responsibilities
    and the IW-NLL in threads while the epoch compiles; their calls find them compiled. A call whose
    arguments differ from the ahead-of-time ones (shardings, say) would compile a second time.
    K = 3 and width 24: shapes no other test compiles in this process."""
    args = ["--out-dir", str(tmp_path / "run"), "--epochs", "2", "--no-figures"]
    args += ["--num-components", "3", "--hidden-dim", "24", "--eval-iw-samples", "2"]
    jax.config.update("jax_log_compiles", True)  # in every thread (jax.log_compiles: this one)
    try:
        with caplog.at_level(logging.WARNING):
            assert train.main(args) == 0
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = Counter(
        match[1]
        for record in caplog.records
        if (match := re.match(r"Compiling jit\((\w+)\)", record.getMessage()))
    )
    assert compiled["train_replicas"] == 1 and compiled["validate_replicas"] == 1
    assert compiled["evaluate"] == 1 and compiled["encode_responsibilities"] == 1
    assert compiled["evaluate_iw"] == 1


def test_a_short_run_writes_every_artifact(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tables = []  # the neighbour table each epoch trains with

    def recording(*args, **kwargs):
        tables.append(np.asarray(args[8]))
        return train_replicas(*args, **kwargs)

    train_replicas = mixvae.train_replicas
    monkeypatch.setattr(mixvae, "train_replicas", recording)
    assert (
        train.main(
            [
                "--out-dir",
                str(out),
                "--epochs",
                "2",
                "--hidden-dim",
                "16",
                "--latent-dim",
                "2",
                "--num-components",
                "4",
                "--c-regularizer",
                "both",
                "--consistency-weight",
                "1",
                "--consistency-neighbors",
                "3",
            ]
        )
        == 0
    )
    for name in [
        "config.json",
        "history.csv",
        "summary.json",
        "REPORT.md",
        "checkpoint.eqx",
        "checkpoint.json",
        "figures/loss_curves.png",
        "figures/routing.png",
        "figures/usage.png",
        "figures/reconstructions.png",
        "figures/samples.png",
        "figures/latent.png",
        "figures/contingency.png",
    ]:
        assert (out / name).is_file(), name
    from matplotlib import image as plt_image

    for figure in (out / "figures").iterdir():  # a picture, not an empty canvas
        pixels = plt_image.imread(figure)
        assert pixels.ndim == 3 and np.std(pixels[..., :3]) > 0.05, figure.name
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for name in mixvae.METRICS:
        assert name in rows[0] and f"val_{name}" in rows[0], name
    summary = json.loads((out / "summary.json").read_text())
    for name in mixvae.METRICS:
        assert np.isfinite(summary["training"][f"final_{name}"]), name
        assert f"final_val_{name}" in summary["training"]
    assert summary["training"]["epochs_completed"] == 2 and summary["training"]["best_epoch"] in (
        1,
        2,
    )
    assert {"training_time_sec", "compile_time_sec"} <= set(summary["training"])
    images = train.load_dataset(configs.Config()).train.images  # the run's training split
    expected = mixvae.nearest_neighbors(mixvae.deskew(images), 3)  # of the deskewed images
    assert len(tables) == 2 and tables[0].shape == (1293, 3)
    np.testing.assert_array_equal(tables[0], expected)
    np.testing.assert_array_equal(tables[1], expected)
    phases = ["imports", "data", "initialisation", "neighbours", "training", "compile"]
    phases += ["test_evaluation"]
    assert set(phases + ["figures"]) <= set(summary["timing_sec"])
    assert all(seconds >= 0 for seconds in summary["timing_sec"].values())
    assert summary["timing_sec"]["compile"] <= summary["timing_sec"]["training"]
    assert "| test_evaluation |" in (out / "REPORT.md").read_text()
    for name in [
        "cluster_accuracy",
        "nmi",
        "ari",
        "many_to_one_accuracy",
        "neg_elbo",
        "k_eff",
        "iw_nll",
    ]:
        assert 0 <= summary["evaluation"][name] < np.inf, name
    assert summary["dataset"]["name"] == "digits"
    assert json.loads((out / "config.json").read_text())["c_regularizer"] == "both"
    report = (out / "REPORT.md").read_text()
    assert "kl_c_logit_mog" in report
    assert report.splitlines()[2].startswith("**What happened:** finished all 2 epochs; the model")
    assert "anneals of a(e) and tau(e) never ended" in report.splitlines()[2]
    decomposition = report.split("## The objective, term by term")[1].split("## Training metrics")[
        0
    ]
    for name in ["loss_reconstruction", "loss_kl_c", "loss_logit_mog", "loss_diversity", "loss"]:
        assert f"| `{name}` |" in decomposition, name
    evaluation = report.split("## Evaluation")[1].split("##")[0]
    assert "`loss_kl_z`" not in evaluation and "`kl_c_scale`" not in evaluation
    config = train.config_from_json(json.loads((out / "config.json").read_text()))
    restored = eqx.tree_deserialise_leaves(
        out / "checkpoint.eqx", train.build_model(config, 64, jax.random.key(1))
    )
    assert restored.decoders.network.layers[0].weight.shape[0] == 4
    best = summary["training"]["best_epoch"]
    assert json.loads((out / "checkpoint.json").read_text())["epoch"] == best
    assert float(rows[-1]["val_loss"]) == pytest.approx(summary["training"]["final_val_loss"])
    # the checkpoint holds the evaluated model: evaluating it again gives the summary's numbers
    again, *_ = train.evaluation(restored, config, train.load_dataset(config), 4)
    for name in ("neg_elbo", "cluster_accuracy", "nmi"):
        assert again[name] == pytest.approx(summary["evaluation"][name], rel=1e-5), name


def test_channel_order_is_hungarian_with_empty_channels_left_out():
    contingency = np.array(  # [channel, label]
        [
            [0, 9, 1],  # -> label 1
            [0, 0, 0],  # empty
            [8, 0, 0],  # -> label 0
            [5, 1, 0],  # unmatched, majority label 0
            [0, 0, 7],  # -> label 2
        ]
    )
    order, matched = train.channel_order(contingency)
    assert order == [2, 0, 4, 3] and matched == {0: 1, 2: 0, 4: 2}
    assert train.empty_note([1]) == "channel 1 received no test image"
    assert train.empty_note(list(range(20))) == "20 channels received no test image"


def test_clustering_scores_against_hand_computed_values():
    labels = np.array([0, 0, 1, 1, 2, 2])
    channels = np.array([2, 2, 0, 0, 0, 1])  # channel 0 mixes labels 1 and 2
    scores = train.clustering_scores(channels, labels, channels, labels)
    assert scores["cluster_accuracy"] == pytest.approx(5 / 6)
    assert scores["many_to_one_accuracy"] == pytest.approx(5 / 6)
    relabelled = np.array([1, 1, 2, 2, 0, 0])
    perfect = train.clustering_scores(relabelled, labels, relabelled, labels)
    assert perfect["cluster_accuracy"] == perfect["nmi"] == perfect["ari"] == pytest.approx(1.0)
    # NMI: I(c; y) / mean(H(c), H(y)), in float64 from the joint counts
    joint = np.zeros((3, 3))
    np.add.at(joint, (channels, labels), 1 / 6)
    pc, py = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = np.sum(joint[nonzero] * np.log(joint[nonzero] / np.outer(pc, py)[nonzero]))
    entropies = [-np.sum(p[p > 0] * np.log(p[p > 0])) for p in (pc, py)]
    assert scores["nmi"] == pytest.approx(mutual / np.mean(entropies))
    assert scores["ari"] == pytest.approx(adjusted_rand_index(channels, labels))
    # many-to-one: each channel's majority label on the training split, not on the test split
    train_channels, train_labels = np.array([0, 0, 0, 2, 2, 1]), np.array([2, 2, 1, 0, 0, 2])
    other = train.clustering_scores(channels, labels, train_channels, train_labels)
    assert other["many_to_one_accuracy"] == pytest.approx(4 / 6)  # 0 -> 2, 1 -> 2, 2 -> 0
    assert other["cluster_accuracy"] == pytest.approx(5 / 6)


def adjusted_rand_index(a, b) -> float:
    """Hubert and Arabie's ARI from the contingency table of two labelings, float64."""
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1.0)

    def pairs(counts):
        return float(np.sum(counts * (counts - 1) / 2))

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([len(a)]))
    return (index - expected) / ((rows + cols) / 2 - expected)


def test_recurrence_is_the_mean_over_other_seeds_of_the_best_matching_candidate():
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 5, 400)  # a partition that two seeds reach
    lone = [rng.integers(0, 5, 400) for _ in range(3)]  # partitions that one start fell into
    noisy = np.where(rng.random(400) < 0.2, rng.integers(0, 5, 400), shared)
    channels = [shared, lone[0], lone[1], noisy, lone[2], np.array([4, 3, 2, 1, 0])[shared]]
    seeds = [0, 0, 1, 1, 2, 2]
    got = train.recurrence(channels, seeds)
    ari = np.array([[adjusted_rand_index(a, b) for b in channels] for a in channels])
    expected = [
        np.mean([ari[i, [j for j in range(6) if seeds[j] == t]].max() for t in {0, 1, 2} - {s}])
        for i, s in enumerate(seeds)
    ]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert got[0] == got[5] == pytest.approx((adjusted_rand_index(shared, noisy) + 1) / 2)
    assert max(got[[1, 2, 4]]) < 0.05 < min(got[[0, 3, 5]])  # a lone partition recurs nowhere


def test_seed_agreement_is_the_mean_and_lowest_pairwise_adjusted_rand_index():
    rng = np.random.default_rng(0)
    channels = rng.integers(0, 4, 500)
    renamed = np.array([2, 0, 3, 1])[channels]  # the same partition, its channels renamed
    noisy = np.where(rng.random(500) < 0.3, rng.integers(0, 4, 500), channels)
    pairs = [1.0, adjusted_rand_index(channels, noisy), adjusted_rand_index(renamed, noisy)]
    agreement = train.seed_agreement([channels, renamed, noisy])
    assert agreement["pairs"] == 3 and 0.3 < min(pairs) < 0.9
    assert agreement["mean"] == pytest.approx(np.mean(pairs), abs=1e-12)
    assert agreement["min"] == pytest.approx(min(pairs), abs=1e-12)
    assert train.seed_agreement([channels, renamed])["mean"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------
# Curriculum
# --------------------------------------------------------------------------------------


def scripted(losses, **kwargs):
    """Feed a fake validation-loss sequence; return (unlock epochs, kick flags per epoch, "
    "k_active per epoch)."""
    curriculum = train.Curriculum(
        **(
            {"num_components": 4, "k_active": 1, "patience": 2, "min_delta": 0.0, "kick_epochs": 2}
            | kwargs
        )
    )
    kicks, k_active = [], []
    for epoch, loss in enumerate(losses, start=1):
        kicks.append(curriculum.kick_left > 0)
        k_active.append(curriculum.k_active)
        curriculum.update(epoch, loss, neg_elbo=10.0)
    return curriculum.unlock_epochs, kicks, k_active


def test_curriculum_unlocks_on_each_plateau_and_kicks_for_exactly_kick_epochs():
    # epoch:  1   2  3  4 | 5  6 (kick) | 7  8  9 | 10 11 (kick) | 12 13 14 | 15
    losses = [10, 9, 9, 9, 1, 1, 8, 8, 8, 1, 1, 7, 7, 7, 6]
    unlocks, kicks, k_active = scripted(losses)
    # two epochs without improvement after the bests at epochs 2, 7 and 12; the kicks' low
    # losses (a softened objective) neither become the best nor count towards a plateau
    assert unlocks == [4, 9, 14]
    assert k_active == [1] * 4 + [2] * 5 + [3] * 5 + [4]
    assert kicks == [False] * 4 + [True] * 2 + [False] * 3 + [True] * 2 + [False] * 3 + [True]


def test_curriculum_stops_when_an_unlock_did_not_help_and_at_k():
    unlocks, _, k_active = scripted([10, 9, 9, 9, 9.5, 9.2, 9.1, 9.3, 9.0, 9.0, 9.0])
    assert unlocks == [4] and k_active[-1] == 2  # the plateau after the unlock is no better than 9
    unlocks, _, k_active = scripted(
        list(range(20, 0, -2)) + [1] * 12, num_components=2, kick_epochs=0
    )
    assert len(unlocks) == 1 and k_active[-1] == 2  # never beyond K
    unlocks, _, _ = scripted([0.5, 0.45, 0.41, 0.0], min_delta=0.01)
    assert unlocks == [3]  # improvements below min_delta x -ELBO (0.1) do not count


def test_curriculum_run_opens_channels_with_kicks_in_the_compiled_step(tmp_path):
    out = tmp_path / "run"
    before = eqx.debug.get_num_traces(mixvae.train_epoch)
    # min-delta 100: nothing after epoch 1 counts as an improvement, so the plateau rule unlocks
    # at the end of epoch 1 + unlock-patience, and then stops (the unlock did not help).
    assert (
        train.main(
            [
                "--out-dir",
                str(out),
                "--curriculum",
                "--unlock-patience",
                "2",
                "--unlock-min-delta",
                "100",
                "--kick-epochs",
                "2",
                "--epochs",
                "7",
                "--patience",
                "0",
                "--hidden-dim",
                "16",
                "--num-components",
                "3",
                "--kl-c-anneal-epochs",
                "0",
                "--gumbel-temperature-anneal-epochs",
                "0",
            ]
        )
        == 0
    )
    assert (
        eqx.debug.get_num_traces(mixvae.train_epoch) - before == 1
    )  # unlocks and kicks never recompile
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))

    def column(name):
        return [float(row[name]) for row in rows]

    assert column("unlocked") == [0, 0, 1, 0, 0, 0, 0]
    assert column("kick_active") == [0, 0, 0, 1, 1, 0, 0]
    assert column("k_active") == [1, 1, 1, 2, 2, 2, 2]
    assert column("kl_c_logit_mog")[:3] == [0.0, 0.0, 0.0] and column("kl_c_logit_mog")[5] > 0
    assert all(u == 0.0 for u in column("usage_1")[:3] + column("usage_2"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["curriculum"]["unlock_count"] == 1 and summary["curriculum"][
        "unlock_epochs"
    ] == [3]
    # the kept model: two open channels, after the kick (epochs 4-5 train a softened objective)
    assert summary["training"]["best_epoch"] in (6, 7), summary["training"]["best_epoch"]
    assert summary["curriculum"]["best_model_k_active"] == 2
    assert (out / "figures" / "curriculum.png").is_file() and "## Curriculum" in (
        out / "REPORT.md"
    ).read_text()


def test_schedules_follow_their_formulas():
    """a(e) = min(1, (e + 1) / N); tau(e) = tau_0 (tau_min / tau_0)^min(1, e / N)."""
    assert [mixvae.c_anneal(e, 4) for e in (0, 1, 3, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert mixvae.c_anneal(0, 0) == 1.0
    taus = [mixvae.router_temperature(e, 1.0, 0.25, 20) for e in (0, 10, 20, 40)]
    np.testing.assert_allclose(taus, [1.0, 0.5, 0.25, 0.25])
    assert mixvae.router_temperature(0, 1.0, 0.25, 0) == 0.25


def test_kick_schedule_softens_routing_and_biases_the_new_channel():
    config = configs.Config(
        num_components=4, kick_temperature=3.0, kick_logit_bias=2.5, kick_prior_scale=0.25
    )
    kick = train.schedule(config, 0, k_active=2, kick=True)
    np.testing.assert_array_equal(kick.active_mask, [True, True, False, False])
    np.testing.assert_array_equal(kick.logit_bias, [0.0, 2.5, 0.0, 0.0])
    assert (
        float(kick.temperature) == 3.0
        and float(kick.prior_scale) == 0.25
        and not bool(kick.straight_through)
    )
    calm = train.schedule(config, 0, k_active=2)
    assert (
        float(calm.prior_scale) == 1.0
        and bool(calm.straight_through)
        and not np.any(calm.logit_bias)
    )


def test_bench_counts_the_multiply_adds_of_matmuls_and_convolutions():
    import bench

    linear = eqx.nn.Linear(64, 32, key=jax.random.key(0))
    conv = eqx.nn.Conv2d(1, 8, 4, stride=2, padding=1, key=jax.random.key(1))
    jaxpr = jax.make_jaxpr(lambda x: jax.vmap(linear)(x))(jnp.zeros((5, 64)))
    assert bench._count_macs(jaxpr.jaxpr) == 5 * 64 * 32
    jaxpr = jax.make_jaxpr(conv)(jnp.zeros((1, 28, 28)))
    assert bench._count_macs(jaxpr.jaxpr) == (8 * 14 * 14) * (1 * 4 * 4)
    jaxpr = jax.make_jaxpr(lambda x: jax.lax.map(linear, x))(
        jnp.zeros((7, 64))
    )  # a scan body, 7 times
    assert bench._count_macs(jaxpr.jaxpr) == 7 * 64 * 32
    model = tiny_model(conditioning="separate")  # 3 stacked decoders of 2 -> 32 -> 32 -> 64
    flops = bench.train_step_flops(  # without the consistency term's second encoder pass
        model, all_active(), mixvae.Objective(consistency_weight=0.0), batch_size=4, input_dim=64
    )
    encoder = 64 * 32 + 32 * 32 + 32 * 3 + 32 * 2 * 3 * 2
    decoders = 3 * (2 * 32 + 32 * 32 + 32 * 64)
    assert flops == 3 * 2 * 4 * (encoder + decoders)


def test_results_table_rows_give_mean_std_and_every_seed(tmp_path):
    """bench.py --results: a row read from a `--seeds 0 1 2` run directory as train.py writes it
    (summary.json with each metric's mean and std, seed_<s>/summary.json), then the markdown,
    JSON and figure."""
    import bench

    accuracy, iw = [0.9, 0.8, 0.95], [117.0, 118.5, 116.9]
    run = tmp_path / "run"
    for seed in range(3):
        evaluation = {metric: 0.5 for metric in bench.RESULT_METRICS}
        evaluation |= {"cluster_accuracy": accuracy[seed], "iw_nll": iw[seed]}
        (run / f"seed_{seed}").mkdir(parents=True)
        (run / f"seed_{seed}" / "summary.json").write_text(json.dumps({"evaluation": evaluation}))
    stats = {
        metric: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))}
        for metric, v in [("cluster_accuracy", accuracy), ("iw_nll", iw)]
    }
    stats |= {m: {"mean": 0.5, "std": 0.0} for m in bench.RESULT_METRICS if m not in stats}
    (run / "summary.json").write_text(json.dumps({"evaluation": stats}))
    row = bench.result_row(str(run), [0, 1, 2], "python train.py --seeds 0 1 2", 12.3)
    assert row["per_seed"]["cluster_accuracy"] == accuracy and row["per_seed"]["iw_nll"] == iw
    result = {"table": "toy", "seeds": [0, 1, 2], "machine": "here", "rows": {"a": row}}
    bench.write_results(str(tmp_path), result)
    table = (tmp_path / "results-toy.md").read_text()
    assert "| a | 0.883 ± 0.076 | 0.500 ± 0.000 |" in table and "| 117.467 ± 0.896 |" in table
    assert (
        "| 12 s | 0.900 / 0.800 / 0.950 |" in table and "`python train.py --seeds 0 1 2`" in table
    )
    assert json.loads((tmp_path / "results-toy.json").read_text()) == result
    assert (tmp_path / "results-toy.png").stat().st_size > 10_000
    # the capacity table: the mnist preset first, then wider, then K = 1 at the widest
    mnist = {name: train.parse_config(flags) for name, flags in bench.result_rows("mnist").items()}
    assert mnist["logit_mog + consistency over neighbours"] == configs.PRESETS["mnist"]
    assert mnist["logit_mog + consistency"].consistency_neighbors == 0
    assert mnist["logit_mog"].consistency_weight == 0
    assert not train.warps_neighbours(mnist["logit_mog"])
    digits = {
        name: train.parse_config(flags) for name, flags in bench.result_rows("digits").items()
    }
    assert digits["logit_mog + consistency over neighbours"] == configs.Config()  # the usage line
    assert digits["logit_mog + consistency"] == configs.Config(consistency_neighbors=0)
    assert digits["categorical"] == configs.Config(
        c_regularizer="categorical", consistency_weight=0
    )
    runs = [train.parse_config(flags) for flags in bench.result_rows("mnist-capacity").values()]
    as_ran = dataclasses.replace(configs.PRESETS["mnist"], latent_dim=4, hidden_dim=128)
    assert runs[0] == dataclasses.replace(as_ran, consistency_neighbors=0)
    assert [(run.latent_dim, run.hidden_dim) for run in runs[:-1]] == list(bench.CAPACITIES)
    plain = dataclasses.replace(runs[-2], num_components=1, consistency_weight=0.0)
    assert runs[-1] == plain


# --------------------------------------------------------------------------------------
# MNIST-style data: IDX files, checksums, errors
# --------------------------------------------------------------------------------------

SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def write_idx(path, array, magic, *, truncate=0):
    import gzip

    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + np.asarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw[: len(raw) - truncate]))


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """Four small valid IDX files (8x8 images, 10 classes) registered as dataset "mnist"."""
    import hashlib

    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 200), ("t10k", 50)):
        labels = np.arange(n) % 10
        write_idx(
            tmp_path / f"{split}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 8, 8)),
            train.IDX_IMAGES,
        )
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels, train.IDX_LABELS)
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        files[name] = hashlib.md5((tmp_path / name).read_bytes()).hexdigest()
    monkeypatch.setitem(train.IDX_DATASETS, "mnist", (("http://127.0.0.1:9/",), files))
    return tmp_path


def mnist_config(data_dir, **kwargs):
    return configs.Config(dataset="mnist", data_dir=str(data_dir), batch_size=16, **kwargs)


def test_idx_dataset_loads_with_official_test_split_and_stratified_subset(fake_mnist):
    data = train.load_dataset(mnist_config(fake_mnist))
    assert (
        data.train.images.dtype == np.uint8
        and data.train.images.shape[1] == 64
        and data.image_side == 8
    )
    assert len(data.test.images) == 50 and len(data.train.images) + len(data.val.images) == 200
    subset = train.load_dataset(mnist_config(fake_mnist, num_samples=100))
    assert len(subset.train.images) + len(subset.val.images) == 100
    counts = np.bincount(np.concatenate([subset.train.labels, subset.val.labels]), minlength=10)
    assert np.all(counts == 10)  # stratified
    np.testing.assert_array_equal(subset.test.labels, data.test.labels)

    def written(name, header_size):  # the IDX payload as written, read with gzip and numpy alone
        return np.frombuffer(
            gzip.decompress((fake_mnist / name).read_bytes())[header_size:], np.uint8
        )

    test_images = written("t10k-images-idx3-ubyte.gz", 16).reshape(50, 64)
    np.testing.assert_array_equal(data.test.images, test_images)  # the official order, row-major
    np.testing.assert_array_equal(data.test.labels, written("t10k-labels-idx1-ubyte.gz", 8))
    pairs = zip(
        written("train-images-idx3-ubyte.gz", 16).reshape(200, 64),
        written("train-labels-idx1-ubyte.gz", 8),
        strict=True,
    )
    expected = Counter((image.tobytes(), int(label)) for image, label in pairs)
    loaded = Counter(
        (image.tobytes(), int(label))
        for split in (data.train, data.val)
        for image, label in zip(split.images, split.labels, strict=True)
    )
    assert loaded == expected  # every training image with its own label, once


@pytest.mark.parametrize(
    "damage,message",
    [
        ("missing", "could not be downloaded"),
        ("truncated-gzip", "not a readable gzip file"),
        ("checksum", "is not the official"),
        ("magic", "IDX magic number"),
        ("shape", "the header promises shape"),
    ],
)
def test_broken_idx_files_give_one_line_errors_naming_the_file(
    fake_mnist, monkeypatch, damage, message
):
    import hashlib

    images = fake_mnist / "train-images-idx3-ubyte.gz"
    if damage == "missing":
        images.unlink()
    elif damage == "truncated-gzip":
        images.write_bytes(images.read_bytes()[:-20])
    elif damage == "checksum":
        images.write_bytes(images.read_bytes() + b"\0")
    else:
        array = np.zeros((200, 8, 8))
        write_idx(
            images,
            array,
            2049 if damage == "magic" else train.IDX_IMAGES,
            truncate=64 if damage == "shape" else 0,
        )
    if (
        damage != "checksum"
    ):  # the other damages must be caught by the reader, past a matching checksum
        mirrors, files = train.IDX_DATASETS["mnist"]
        files = dict(
            files,
            **(
                {}
                if damage == "missing"
                else {images.name: hashlib.md5(images.read_bytes()).hexdigest()}
            ),
        )
        monkeypatch.setitem(train.IDX_DATASETS, "mnist", (mirrors, files))
    with pytest.raises(train.DataError, match=message) as error:
        train.load_dataset(mnist_config(fake_mnist))
    assert "train-images-idx3-ubyte.gz" in str(error.value) and "\n" not in str(error.value)


def test_missing_data_is_a_clear_cli_error_and_creates_no_directory(tmp_path):
    missing = tmp_path / "parent" / "none"
    result = run_cli("--dataset", "fashion-mnist", "--data-dir", str(missing), "--validate-only")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "t10k-images-idx3-ubyte.gz" in result.stderr and str(missing) in result.stderr
    assert not (tmp_path / "parent").exists()  # a failed download leaves no directory behind


@pytest.mark.skipif(
    not SHARED_MNIST.is_dir(), reason="the official MNIST files are not beside the checkout"
)
def test_official_mnist_files_load_and_verify():
    data = train.load_dataset(
        configs.Config(dataset="mnist", data_dir=str(SHARED_MNIST), num_samples=3000)
    )
    assert data.image_side == 28 and data.test.images.shape == (10000, 784)
    assert len(data.train.images) + len(data.val.images) == 3000
    np.testing.assert_array_equal(
        np.bincount(data.test.labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    np.testing.assert_array_equal(data.test.labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    full = train.load_dataset(
        configs.Config(dataset="mnist", data_dir=str(SHARED_MNIST), val_split=0.5)
    )
    pixels = np.concatenate([full.train.images, full.val.images])
    assert pixels.shape == (60000, 784) and abs(pixels.mean() - 33.3184) < 1e-3


def decoders_ignoring_z(model, posterior_bias):
    """`model` (separate decoders) with a zero first decoder layer, so that x_hat_k does not
    depend on z, and a posterior head that ignores x: q(z|x) the same Gaussian for every x, its
    parameters `posterior_bias`; with the nll [B, K] of TINY_BATCH under it, float64."""
    head = model.encoder.posterior_head
    model = eqx.tree_at(
        lambda m: (m.encoder.posterior_head.weight, m.encoder.posterior_head.bias),
        model,
        (jnp.zeros_like(head.weight), posterior_bias),
    )
    first = model.decoders.network.layers[0].weight
    model = eqx.tree_at(lambda m: m.decoders.network.layers[0].weight, model, jnp.zeros_like(first))
    terms = mixvae.forward(
        model, TINY_BATCH, None, all_active(), mixvae.Objective(router="softmax")
    )
    return model, np.asarray(terms.nll, float)


def test_iw_log_likelihood_is_exact_when_the_posterior_is_the_prior_and_decoders_ignore_z():
    model = with_pi_logits(tiny_model(conditioning="separate", learnable_pi=True))
    bias = jnp.zeros_like(model.encoder.posterior_head.bias)
    model, nll = decoders_ignoring_z(model, bias)  # q(z|x) = N(0, I)
    sched = all_active()
    log_pi = np.log(np_softmax(PI_LOGITS))
    np.testing.assert_allclose(mixvae.mixture_weights(model), np.exp(log_pi), rtol=1e-6)
    expected = np_logsumexp(log_pi - nll, axis=-1)  # log sum_k pi_k p(x | k), exactly
    got = mixvae.iw_log_likelihood(model, TINY_BATCH, jax.random.key(0), sched, num_samples=7)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_iw_log_likelihood_weighs_each_sample_by_prior_over_posterior():
    """A posterior away from the prior (decoders still ignoring z): the estimate equals, in
    float64, logsumexp_{s,k}[log pi_k - nll_k + log N(z_s; 0, I) - log N(z_s; mu, sigma^2)] - log S
    with z_s = mu + sigma eps_s, eps_s the same draws."""
    model = tiny_model(conditioning="separate")
    bias = 0.6 * jax.random.normal(jax.random.key(9), model.encoder.posterior_head.bias.shape)
    model, nll = decoders_ignoring_z(model, bias)  # q(z|x) = N(mu, sigma^2), mu != 0, sigma != 1
    sched = all_active()
    _, mean, log_var = (np.asarray(v, float) for v in jax.vmap(model.encoder)(TINY_BATCH))
    assert np.abs(mean).max() > 0.1 and np.abs(log_var).max() > 0.1
    key, num_samples = jax.random.key(0), 5
    log_w = []
    for sample_key in jax.random.split(key, num_samples):
        eps = np.asarray(jax.random.normal(sample_key, mean.shape), float)  # [B, K, D]
        z = mean + np.exp(0.5 * log_var) * eps
        log_prior = multivariate_normal(np.zeros(2), np.eye(2)).logpdf(z.reshape(-1, 2))
        log_q = np.concatenate(
            [
                multivariate_normal(m, np.diag(np.exp(v))).logpdf(point)[None]
                for m, v, point in zip(
                    mean.reshape(-1, 2), log_var.reshape(-1, 2), z.reshape(-1, 2), strict=True
                )
            ]
        )
        log_w.append(np.log(1 / 3) - nll + (log_prior - log_q).reshape(nll.shape))
    expected = np_logsumexp(np.stack(log_w), axis=(0, 2)) - np.log(num_samples)
    got = mixvae.iw_log_likelihood(model, TINY_BATCH, key, sched, num_samples=num_samples)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("layout", mixvae.LATENT_LAYOUTS)
def test_iw_bound_is_tighter_than_the_elbo(layout):
    """IW-NLL (S = 64) below the -ELBO, the latter averaged over 256 sampled z (neg_elbo with a
    key); without a key neg_elbo decodes z = mu, a plug-in value that need not be above it."""
    model = tiny_model(latent_layout=layout)
    sched = all_active()

    def sampled_neg_elbo(key):
        return mixvae.loss_fn(
            model, TINY_BATCH, key, sched, mixvae.Objective(consistency_weight=0.0)
        )[1]["neg_elbo"]

    elbo = jnp.mean(jax.vmap(sampled_neg_elbo)(jax.random.split(jax.random.key(1), 256)))
    iw = mixvae.iw_log_likelihood(model, TINY_BATCH, jax.random.key(0), sched, num_samples=64)
    assert np.all(np.isfinite(iw)) and -float(np.mean(iw)) < float(elbo)


def test_eval_only_reevaluates_a_saved_run_without_training(tmp_path):
    out = tmp_path / "run"
    assert (
        train.main(
            [
                "--out-dir",
                str(out),
                "--epochs",
                "2",
                "--hidden-dim",
                "16",
                "--num-components",
                "4",
                "--eval-iw-samples",
                "2",
                "--no-figures",
            ]
        )
        == 0
    )
    before = json.loads((out / "summary.json").read_text())
    history = (out / "history.csv").read_text()
    (out / "REPORT.md").unlink()
    again = ["--eval-only", "--checkpoint", str(out), "--eval-iw-samples", "8", "--no-figures"]
    assert train.main(again) == 0
    after = json.loads((out / "summary.json").read_text())
    assert (out / "history.csv").read_text() == history and (out / "REPORT.md").is_file()
    assert after["training"] == before["training"] and after["evaluation"]["iw_samples"] == 8
    for name in ["cluster_accuracy", "nmi", "ari", "neg_elbo", "responsibility_confidence"]:
        assert after["evaluation"][name] == pytest.approx(before["evaluation"][name], rel=1e-6), (
            name
        )
    (out / "checkpoint.eqx").write_bytes((out / "checkpoint.eqx").read_bytes()[:100])  # truncated
    with pytest.raises(configs.ConfigError, match="does not match"):
        train.run(configs.Config(eval_only=True, checkpoint=str(out)))
    with pytest.raises(configs.ConfigError, match="not a run directory"):
        train.run(configs.Config(eval_only=True, checkpoint=str(tmp_path)))


# Many seeds in one run (vmapped replicas) and data parallel over devices
# --------------------------------------------------------------------------------------


def test_seeds_train_as_vmapped_replicas_each_equal_to_its_own_run(tmp_path):
    before = eqx.debug.get_num_traces(mixvae.train_replicas)
    seeds = ["--out-dir", str(tmp_path / "seeds"), "--seeds", "0", "3", "--epochs", "2"]
    assert train.main([*seeds, *SMALL_MODEL]) == 0
    assert (
        eqx.debug.get_num_traces(mixvae.train_replicas) - before == 1
    )  # one compiled step for all seeds
    assert (
        train.main(
            [
                "--out-dir",
                str(tmp_path / "one"),
                "--seed",
                "3",
                "--split-seed",
                "0",
                "--epochs",
                "2",
                *SMALL_RUN,
            ]
        )
        == 0
    )
    seeds_dir = tmp_path / "seeds"
    per_seed = {
        seed: json.loads((seeds_dir / f"seed_{seed}" / "summary.json").read_text())
        for seed in (0, 3)
    }
    for seed in (0, 3):
        with open(seeds_dir / f"seed_{seed}" / "history.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(row["seed"]) for row in rows] == [seed, seed]
        assert (seeds_dir / f"seed_{seed}" / "figures" / "contingency.png").is_file()
    alone = json.loads((tmp_path / "one" / "summary.json").read_text())["evaluation"]
    for name in ["loss", "neg_elbo", "responsibility_confidence"]:
        assert per_seed[3]["evaluation"][name] == pytest.approx(alone[name], rel=1e-4), name
    summary = json.loads((seeds_dir / "summary.json").read_text())
    assert summary["seeds"] == [0, 3]
    for name in ["cluster_accuracy", "nmi", "neg_elbo"]:
        values = [per_seed[seed]["evaluation"][name] for seed in (0, 3)]
        assert summary["evaluation"][name]["mean"] == pytest.approx(np.mean(values))
        assert summary["evaluation"][name]["std"] == pytest.approx(np.std(values, ddof=1))
    timing = [per_seed[seed]["timing_sec"] for seed in (0, 3)]
    assert summary["timing_sec"]["training"] == timing[0]["training"] == timing[1]["training"]
    assert summary["timing_sec"]["figures"] == pytest.approx(sum(t["figures"] for t in timing))
    assert summary["seed_agreement"]["pairs"] == 1
    agreement = summary["seed_agreement"]["mean"]
    assert summary["seed_agreement"]["min"] == agreement and -1 <= agreement <= 1
    report = (seeds_dir / "REPORT.md").read_text()
    assert "mean ± std" in report and "seed_3/REPORT.md" in report
    assert f"Seed agreement (label-free): {agreement:.3f}" in report
    assert "## Where the time went" in report
    assert (seeds_dir / "figures" / "seeds.png").is_file() and "figures/seeds.png" in report
    (seeds_dir / "summary.json").unlink()
    assert (
        train.main(
            [
                "--eval-only",
                "--checkpoint",
                str(seeds_dir),
                "--eval-iw-samples",
                "0",
                "--no-figures",
            ]
        )
        == 0
    )
    again = json.loads((seeds_dir / "summary.json").read_text())
    assert again["evaluation"]["nmi"] == summary["evaluation"]["nmi"]
    assert again["seed_agreement"] == summary["seed_agreement"]


def test_a_sweep_trains_its_grid_in_one_compile_each_point_equal_to_its_own_run(tmp_path):
    """--sweep prior-mean=3,9 learning-rate=...: four replicas of one compiled epoch, resumed bit
    for bit; a point's history equals the single run of its flags; the sweep's summary, CSVs,
    figure and report hold each point."""
    sweep, rates = tmp_path / "sweep", "0.001,0.004"
    args = ["--sweep", "prior-mean=3,9", f"learning-rate={rates}", "--out-dir", str(sweep)]
    before = eqx.debug.get_num_traces(mixvae.train_replicas)
    assert train.main([*args, "--epochs", "1", *SMALL_RUN]) == 0
    assert train.main(["--resume", str(sweep), "--epochs", "2", "--figures"]) == 0
    assert eqx.debug.get_num_traces(mixvae.train_replicas) - before == 1  # the grid's, reused
    point = sweep / "prior-mean9-learning-rate0.004"
    alone = tmp_path / "alone"
    flags = ["--prior-mean", "9", "--learning-rate", "0.004", "--epochs", "2", *SMALL_RUN]
    assert train.main(["--out-dir", str(alone), *flags]) == 0
    assert metrics_of(read_history(point)) == metrics_of(read_history(alone))
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(p["prior_mean"], p["learning_rate"]) for p in summary["points"]] == [
        (3.0, 0.001),
        (3.0, 0.004),
        (9.0, 0.001),
        (9.0, 0.004),
    ]
    evaluation = json.loads((point / "summary.json").read_text())["evaluation"]
    assert summary["points"][3]["nmi_mean"] == evaluation["nmi"]
    with open(sweep / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    report = (sweep / "REPORT.md").read_text()
    assert "prior-mean9-learning-rate0.004/REPORT.md" in report and "figures/sweep.png" in report
    assert (sweep / "figures" / "sweep.png").is_file()
    (sweep / "summary.json").unlink()
    assert (
        train.main(
            ["--eval-only", "--checkpoint", str(sweep), "--eval-iw-samples", "0", "--no-figures"]
        )
        == 0
    )
    assert json.loads((sweep / "summary.json").read_text())["points"] == summary["points"]
    objective = train.replica_objective(configs.Config(sweep=("prior-mean=3,9",), seeds=(0, 1)))
    assert objective.prior_mean.tolist() == [3, 3, 9, 9]
    assert objective.prior_sigma == configs.Config().prior_sigma  # unswept: a Python float


def test_restarts_keep_per_seed_the_candidate_with_the_best_monitored_value(tmp_path):
    def result(seed, scores, best_epoch):
        history = [{"val_loss": score} for score in scores]
        return train.TrainResult(seed, None, history, best_epoch, 4, 0.0, 0.0, None)

    results = [
        result(0, [5, 3, 4], 2),
        result(0, [4, 3.5], 1),
        result(7, [9, 2], 2),
        result(7, [1], 1),
    ]
    chosen = train.choose_restarts(results, 2, "loss")
    assert [(c.seed, c.restart, c.restart_scores) for c in chosen] == [
        (0, 0, (3, 4)),
        (7, 1, (2, 1)),
    ]
    by_agreement = train.choose_restarts(results, 2, "loss", np.array([0.5, 0.9, 0.7, 0.7]))
    assert [(c.restart, c.restart_recurrence) for c in by_agreement] == [
        (1, (0.5, 0.9)),
        (1, (0.7, 0.7)),  # a tie goes to the lower monitored value
    ]
    # restart 0 of a seed is the plain run of that seed: same keys, same batch order
    plain = jax.random.split(jax.random.key(3), 4)
    keys = train.replica_keys([(3, 0), (3, 1)])
    assert np.array_equal(jax.random.key_data(keys[0]), jax.random.key_data(plain))
    assert not np.array_equal(jax.random.key_data(keys[1]), jax.random.key_data(plain))
    assert (
        train.shuffler(3, 0).permutation(10).tolist()
        == np.random.default_rng(3).permutation(10).tolist()
    )
    out = tmp_path / "run"
    assert train.main(["--out-dir", str(out), "--restarts", "2", "--epochs", "2", *SMALL_RUN]) == 0
    summary = json.loads((out / "summary.json").read_text())
    scores = summary["restarts"]["val_loss"]
    assert len(scores) == 2 and summary["restarts"]["chosen"] == int(np.argmin(scores))
    candidates = [read_history(out / f"restart_{j}") for j in (0, 1)]
    assert read_history(out) == candidates[summary["restarts"]["chosen"]]
    kept = f"candidate {summary['restarts']['chosen']} of 2 kept (the lowest val loss: "
    assert kept in (out / "REPORT.md").read_text()
    assert [row["restart"] for row in candidates[1]] == ["1", "1"]
    pooled = tmp_path / "pooled"
    flags = ["--restarts", "2", "--restart-choice", "agreement", "--seeds", "0", "1"]
    assert train.main(["--out-dir", str(pooled), *flags, "--epochs", "2", *SMALL_RUN]) == 0
    for seed in (0, 1):
        restarts = json.loads((pooled / f"seed_{seed}" / "summary.json").read_text())["restarts"]
        assert restarts["choice"] == "agreement" and len(restarts["recurrence"]) == 2
        recurring = restarts["recurrence"]
        assert restarts["chosen"] == max(
            (0, 1), key=lambda j: (recurring[j], -restarts["val_loss"][j])
        )
        report = (pooled / f"seed_{seed}" / "REPORT.md").read_text()
        kept = f"candidate {restarts['chosen']} of 2 kept (its clustering recurs most in the other"
        assert kept in report


@pytest.mark.parametrize(
    "changes,flag",
    [
        (dict(top_m=0), "--top-m=0"),
        (dict(top_m=11), r"--top-m=11 .* \[1, --num-components=10\]"),
        (dict(top_m=2, top_m_capacity=0.5), "--top-m-capacity"),
    ],
)
def test_top_m_outside_its_range_is_refused(changes, flag):
    with pytest.raises(configs.ConfigError, match=flag):
        configs.validate(configs.Config(**changes))
    configs.validate(configs.Config(top_m=10, top_m_capacity=1.0))


def test_seeds_with_curriculum_and_bad_device_counts_are_refused():
    with pytest.raises(configs.ConfigError, match="--seeds"):
        configs.validate(configs.Config(seeds=(0, 1), curriculum=True))
    with pytest.raises(configs.ConfigError, match="--devices"):
        configs.validate(configs.Config(devices=3, batch_size=128))
    with pytest.raises(configs.ConfigError, match="--devices=64 .* there are 1 device"):
        train.data_mesh(configs.Config(devices=64, batch_size=128))


def launch(args, devices, tmp_path, processes=1, timeout=240):
    """train.py as `processes` processes (--distributed, a localhost coordinator) of `devices`
    forced host devices each -> [(returncode, stdout, stderr)]; scratch files in tmp_path. XLA
    compiles them unoptimised (half the compile time; what they check is how the work is split,
    and their losses still agree with an optimised run's to float32 rounding)."""
    env = {**CHILD_ENV, "TMPDIR": str(tmp_path / "scratch")}
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    )
    (tmp_path / "scratch").mkdir(exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    distributed = ["--distributed", "--coordinator-address", f"localhost:{port}"]
    commands = [
        [*distributed, "--num-processes", str(processes), "--process-id", str(i)]
        if processes > 1
        else []
        for i in range(processes)
    ]
    children = [
        subprocess.Popen(
            [sys.executable, "train.py", *command, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    try:
        outputs = [child.communicate(timeout=timeout) for child in children]
    finally:
        for child in children:
            child.kill()
    return [(child.returncode, *output) for child, output in zip(children, outputs, strict=True)]


def test_two_processes_train_as_one_four_device_run_with_one_writer(tmp_path):
    """jax.distributed over two local processes x 2 CPU devices (gloo): the losses of one
    process with 4 devices (data-parallel SPMD) and of one device, one run directory written by
    process 0, resume, and a refusal that stops both processes with the same line."""
    flags = [*SMALL_RUN, "--batch-size", "64", "--seeds", "0", "1"]
    run = tmp_path / "run"
    first, then = ["--out-dir", str(run), "--epochs", "1", *flags], ["--resume", str(run)]
    for args in (first, [*then, "--epochs", "2"]):
        for code, _, stderr in launch(args, 2, tmp_path, processes=2):
            assert code == 0, stderr[-2000:]
    # one process: SPMD over its 4 forced devices, and (this one) on 1 device
    [(code, _, stderr)] = launch(
        ["--out-dir", str(tmp_path / "devices4"), "--devices", "4", "--epochs", "2", *flags],
        4,
        tmp_path,
    )
    assert code == 0, stderr[-2000:]
    one_device = ["--out-dir", str(tmp_path / "devices1"), "--devices", "1", "--epochs", "2"]
    assert train.main([*one_device, *flags]) == 0
    for seed in (0, 1):
        runs = [run, tmp_path / "devices4", tmp_path / "devices1"]
        two, four, one = (metrics_of(read_history(d / f"seed_{seed}")) for d in runs)
        assert [row["epoch"] for row in two] == ["1", "2"]
        for name in ("loss", "val_loss", "val_neg_elbo", "grad_norm"):
            for other in (four, one):
                np.testing.assert_allclose(
                    [float(row[name]) for row in two],
                    [float(row[name]) for row in other],
                    rtol=1e-5,
                    err_msg=name,
                )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devices1", "devices4", "run", "scratch"]
    assert not list((tmp_path / "scratch").iterdir())  # process 1's scratch copies are gone
    refused = launch(first, 2, tmp_path, processes=2)
    lines = [
        [ln for ln in stderr.splitlines() if ln.startswith("error:")] for _, _, stderr in refused
    ]
    assert [code for code, _, _ in refused] == [2, 2]
    assert lines[0] == lines[1] and len(lines[0]) == 1 and "--out-dir" in lines[0][0]


# Nothing lost: checkpoints, resume, signals, divergence, hostile input
# --------------------------------------------------------------------------------------

SMALL_MODEL = ["--hidden-dim", "16", "--num-components", "4", "--eval-iw-samples", "0"]
SMALL_RUN = [*SMALL_MODEL, "--no-figures"]  # runs whose figures no test looks at


def test_resume_continues_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(["--out-dir", str(straight), "--epochs", "6", *SMALL_RUN]) == 0
    assert (
        train.main(
            ["--out-dir", str(resumed), "--epochs", "3", "--checkpoint-every", "1", *SMALL_RUN]
        )
        == 0
    )
    assert len(read_history(resumed)) == 3
    first_time = json.loads((resumed / "summary.json").read_text())["training"]["training_time_sec"]
    assert train.main(["--resume", str(resumed), "--epochs", "6"]) == 0
    assert metrics_of(read_history(resumed)) == metrics_of(read_history(straight))
    assert [row["train_state_saved"] for row in read_history(resumed)] == ["1"] * 6
    assert [row["train_state_saved"] for row in read_history(straight)] == ["0"] * 5 + ["1"]
    assert (resumed / "checkpoint.eqx").read_bytes() == (straight / "checkpoint.eqx").read_bytes()
    a, b = (json.loads((run / "summary.json").read_text()) for run in (straight, resumed))
    assert b["status"] == "finished" and b["evaluation"] == a["evaluation"]
    assert b["training"]["training_time_sec"] > first_time  # summed over both calls
    assert json.loads((resumed / "config.json").read_text())["epochs"] == 6


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU")
def test_resume_continues_bit_for_bit_on_a_gpu(tmp_path):
    """The same as above with every run a process on the GPU."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    runs = [
        ["--out-dir", str(straight), "--epochs", "6", *SMALL_RUN],
        ["--out-dir", str(resumed), "--epochs", "3", "--checkpoint-every", "1", *SMALL_RUN],
        ["--resume", str(resumed), "--epochs", "6"],
    ]
    for args in runs:
        done = subprocess.run(
            [sys.executable, str(REPO / "train.py"), *args],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=REPO,
            env={**os.environ, "JAX_PLATFORMS": "cuda"},
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert metrics_of(read_history(resumed)) == metrics_of(read_history(straight))
    assert (resumed / "checkpoint.eqx").read_bytes() == (straight / "checkpoint.eqx").read_bytes()


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "finished its 6 epochs; give --epochs N"),
        (["--epochs", "6"], "--epochs=6 is not allowed with --resume: .* 6 epochs already"),
        (["--epochs", "8", "--prior-mean", "3"], "not allowed with --prior-mean: .* keeps"),
        (["--epochs", "8", "--seeds", "1", "2"], "not allowed with --seeds"),
    ],
)
def test_resume_refuses_what_would_change_or_train_nothing(args, message, finished_run, capsys):
    config = (finished_run / "config.json").read_bytes()
    assert train.main(["--resume", str(finished_run), *args]) == 2
    assert re.search(message, capsys.readouterr().err), message
    assert (finished_run / "config.json").read_bytes() == config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 6-epoch run of the small config (not to be modified)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(["--out-dir", str(out), "--epochs", "6", *SMALL_RUN]) == 0
    return out


def read_history(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def metrics_of(rows):
    """History rows without the column that says when the training state was saved."""
    return [{k: v for k, v in row.items() if k != "train_state_saved"} for row in rows]


def test_checkpoint_is_written_atomically_and_every_n_epochs(tmp_path, monkeypatch):
    saved_after = []
    real_save = train.save_state
    monkeypatch.setattr(
        train,
        "save_state",
        lambda run_dir, config, state: (
            saved_after.append(state.epoch),
            real_save(run_dir, config, state),
        ),
    )
    out = tmp_path / "run"
    assert (
        train.main(["--out-dir", str(out), "--epochs", "5", "--checkpoint-every", "2", *SMALL_RUN])
        == 0
    )
    assert saved_after == [2, 4, 5]  # every 2 epochs, then at the end
    assert not [
        p.name for p in out.iterdir() if p.name.startswith(".")
    ]  # no temporary file left behind
    before = (out / "train_state.ckpt").read_bytes()

    def crash(f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError):
        train.atomic_write(out / "train_state.ckpt", crash)
    assert (out / "train_state.ckpt").read_bytes() == before  # the previous checkpoint is intact
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("signum", [2, 15])  # SIGINT, SIGTERM
def test_a_signal_after_the_first_epoch_checkpoints_reports_and_exits_nonzero(tmp_path, signum):
    out = tmp_path / "run"
    child = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "train.py"),
            "--out-dir",
            str(out),
            "--epochs",
            "500",
            "--patience",
            "0",
            *SMALL_RUN,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    for line in child.stdout:
        if line.startswith("epoch   1/"):
            child.send_signal(signum)
            break
    _, stderr = child.communicate(timeout=180)
    assert child.returncode == 128 + signum, stderr[-2000:]
    assert f"--resume {out}" in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 1 <= summary["training"]["epochs_completed"] < 500
    assert "Status: interrupted" in (out / "REPORT.md").read_text()
    completed = summary["training"]["epochs_completed"]
    assert train.main(["--resume", str(out), "--epochs", str(completed + 1)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["status"] == "finished" and summary["training"]["epochs_completed"] == completed + 1
    )


@pytest.mark.parametrize("bad_epoch", [1, 15])
def test_a_non_finite_loss_stops_the_run_as_diverged_keeping_what_it_says(
    bad_epoch, tmp_path, monkeypatch, capsys
):
    """NaN in epoch 1 (an --overwrite run: the previous run stays) and in epoch 15 (the default
    --checkpoint-every 10): the message and summary.json say what is kept, and it is."""
    out = tmp_path / "run"
    if bad_epoch == 1:
        assert train.main(["--out-dir", str(out), "--epochs", "2", *SMALL_RUN]) == 0
        previous = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real_step, calls = mixvae.train_replicas, []

    def poisoned(*args):
        models, opt_states, metrics = real_step(*args)
        calls.append(1)
        if len(calls) == bad_epoch:
            metrics = {**metrics, "loss": metrics["loss"] * jnp.nan}
        return models, opt_states, metrics

    monkeypatch.setattr(mixvae, "train_replicas", poisoned)
    capsys.readouterr()
    args = ["--out-dir", str(out), "--epochs", "20", "--overwrite", *SMALL_RUN]
    assert train.main(args) == 3
    stderr = capsys.readouterr().err
    assert f"loss became non-finite in epoch {bad_epoch}" in stderr
    if bad_epoch == 1:  # nothing trained: the previous run is back, untouched
        assert "previous run is back" in stderr
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == previous
        return
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["kept"] in stderr
    assert "history.csv and train_state.ckpt of the 14 finite epoch(s)" in summary["kept"]
    assert summary["training"]["epochs_completed"] == 14
    rows = read_history(out)
    assert len(rows) == 14 and all(np.isfinite(float(v)) for row in rows for v in row.values())
    assert [int(row["train_state_saved"]) for row in rows] == [0] * 9 + [1] + [0] * 3 + [1]
    assert train.saved_epoch(out) == 14
    assert all(np.isfinite(v) for v in summary["evaluation"].values() if isinstance(v, float))
    assert (out / "checkpoint.eqx").is_file() and (out / "REPORT.md").is_file()


def test_one_diverging_replica_stops_alone_and_the_others_train_on(tmp_path, monkeypatch, capsys):
    """Seed 1 of --seeds 0 1 turns NaN in epoch 3: it stops with its 2 finite epochs and its
    best model evaluated, marked diverged; seed 0 trains all 5 epochs; the run exits 0."""
    real_step, calls = mixvae.train_replicas, []

    def poisoned(*args):
        models, opt_states, metrics = real_step(*args)
        calls.append(1)
        if len(calls) == 3:
            metrics = {**metrics, "loss": metrics["loss"].at[1].set(jnp.nan)}
        return models, opt_states, metrics

    monkeypatch.setattr(mixvae, "train_replicas", poisoned)
    out = tmp_path / "run"
    args = ["--out-dir", str(out), "--epochs", "5", "--seeds", "0", "1", "--patience", "0"]
    assert train.main([*args, *SMALL_RUN]) == 0
    assert "diverged: loss became non-finite in epoch 3" in capsys.readouterr().err
    one = json.loads((out / "seed_1" / "summary.json").read_text())
    zero = json.loads((out / "seed_0" / "summary.json").read_text())
    assert one["status"] == "diverged" and "epoch 3" in one["status_detail"]
    assert zero["status"] == "finished"
    assert len(read_history(out / "seed_1")) == 2 and len(read_history(out / "seed_0")) == 5
    assert np.isfinite(one["evaluation"]["neg_elbo"])


def test_runs_started_together_get_a_directory_each(tmp_path):
    """Three identical runs started at once in one directory, under the default run name."""
    args = [sys.executable, str(REPO / "train.py"), "--epochs", "1", *SMALL_RUN]
    children = [
        subprocess.Popen(
            args, cwd=tmp_path, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    for child in children:
        _, stderr = child.communicate(timeout=240)
        assert child.returncode == 0, stderr.decode()[-2000:]
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 3
    assert all(
        d.name.endswith(("logit_mog-epochs1-num-components4-hidden-dim16", "-2", "-3"))
        for d in run_dirs
    )
    for run_dir in run_dirs:
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
        assert len(read_history(run_dir)) == 1 and (run_dir / "train_state.ckpt").is_file()


def test_sigkill_leaves_a_readable_history_and_a_state_to_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out-dir", str(out), "--epochs", "500", "--patience", "0"]
    args += ["--checkpoint-every", "2", *SMALL_RUN]
    child = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=CHILD_ENV,
    )
    for line in child.stdout:
        if line.startswith("epoch   3/"):  # epoch 3 is in history.csv; epoch 4 is running
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    rows = read_history(out)
    assert len(rows) >= 3 and [int(row["epoch"]) for row in rows] == list(range(1, len(rows) + 1))
    saved = [int(row["epoch"]) for row in rows if row["train_state_saved"] == "1"]
    assert saved and train.saved_epoch(out) == saved[-1]
    capsys.readouterr()
    assert train.main(["--eval-only", "--checkpoint", str(out)]) == 2
    assert f"python train.py --resume {out}" in capsys.readouterr().err
    assert train.main(["--resume", str(out), "--epochs", str(len(rows) + 1)]) == 0
    resumed = read_history(out)
    assert len(resumed) == len(rows) + 1
    assert metrics_of(resumed[: len(rows)]) == metrics_of(rows)  # bit for bit


def test_report_tables_hold_what_differs_and_never_a_negative_zero():
    assert train.number(-1e-9, ".3f") == "0.000" and train.number(-0.0) == "0"
    assert train.number(-2.5e-5) == "-2.5e-05" and train.number(-0.25, ".3f") == "-0.250"
    table = "\n".join(train.config_table(configs.Config(prior_mean=9.0, seed=3)))
    assert "| `--prior-mean` | `9.0` |" in table and "| `--seed` | `3` |" in table
    assert "--prior-sigma" not in table and "--validate-only" not in table
    assert "Every flag at its default" in "\n".join(train.config_table(configs.Config()))
    preset = "\n".join(train.config_table(train.parse_config(["--preset", "mnist"])))
    assert "| `--preset` | `mnist` |" in preset and "--dataset" not in preset


def test_failure_warnings_name_collapse_chance_accuracy_and_a_flat_elbo():
    labels = np.repeat(np.arange(10), 10)
    history = [{"val_neg_elbo": 30.0}, {"val_neg_elbo": 31.0}]
    result = train.TrainResult(0, None, history, 2, 4, 0.0, 0.0, None)
    one_channel = np.tile([0.0, 1.0, 0.0, 0.0], (100, 1))
    metrics = {"responsibility_confidence": 1.0, "cluster_accuracy": 0.1}
    warnings = train.failure_warnings(result, metrics, one_channel, labels)
    assert len(warnings) == 3
    assert "100 of 100 test images are routed to channel 1" in warnings[0]
    assert "near chance (0.100)" in warnings[1] and "never fell below" in warnings[2]
    spread = np.eye(4)[np.arange(100) % 4]
    good = {"responsibility_confidence": 0.97, "cluster_accuracy": 0.9}
    result = result._replace(history=history[::-1])
    assert train.failure_warnings(result, good, spread, labels) == []
    result = result._replace(best_k_active=1)  # one channel: a plain VAE, no collapse to flag
    assert train.failure_warnings(result, metrics, one_channel, labels) == []
    curriculum = train.Curriculum(4, 2, patience=5, min_delta=0.0, kick_epochs=3)
    result = result._replace(curriculum=curriculum)
    assert train.failure_warnings(result, good, spread, labels) == [
        "the curriculum ran out of epochs with 2 of 4 channels open: give more --epochs"
    ]
    curriculum.unlocking = False  # it stopped by its own rule: the last unlock did not help
    assert train.failure_warnings(result, good, spread, labels) == []


def test_a_collapsed_run_is_flagged_in_summary_report_and_stderr(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        train.main(["--out-dir", str(out), "--prior-mean", "1e6", "--epochs", "3", *SMALL_RUN]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert any("collapsed" in warning for warning in summary["warnings"]), summary["warnings"]
    assert "warning (" in capsys.readouterr().err
    assert "**Warning: collapsed" in (out / "REPORT.md").read_text()


def test_hostile_inputs_are_one_line_errors_and_overwrite_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--out-dir", str(run), "--epochs", "1", *SMALL_RUN]) == 0
    state = (run / "train_state.ckpt").read_bytes()

    def error_of(*args):  # main turns every expected failure into exit 2 and one line on stderr
        capsys.readouterr()
        assert train.main(list(args)) == 2
        stderr = capsys.readouterr().err.strip()
        assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
        return stderr

    assert "not a run directory" in error_of("--resume", str(tmp_path / "nothing"))
    other = tmp_path / "other"
    assert (
        train.main(
            [
                "--out-dir",
                str(other),
                "--epochs",
                "1",
                "--hidden-dim",
                "16",
                "--num-components",
                "5",
                "--eval-iw-samples",
                "0",
                "--no-figures",
            ]
        )
        == 0
    )
    (run / "train_state.ckpt").write_bytes((other / "train_state.ckpt").read_bytes())
    assert "another configuration (--num-components differ)" in error_of(
        "--resume", str(run), "--epochs", "2"
    )
    (run / "train_state.ckpt").write_bytes(state[: len(state) // 2])
    assert "truncated" in error_of("--resume", str(run), "--epochs", "2")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    assert "config.json does not parse" in error_of("--resume", str(tmp_path / "bad"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "--out-dir" in error_of("--out-dir", str(blocker / "run"), "--epochs", "1")
    history = (other / "history.csv").read_text()
    assert "--overwrite" in error_of("--out-dir", str(other), "--epochs", "1")
    assert (other / "history.csv").read_text() == history
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("precious")
    assert "--overwrite" in error_of(
        "--out-dir", str(tmp_path / "keep"), "--overwrite", "--epochs", "1"
    )
    assert (tmp_path / "keep" / "notes.txt").read_text() == "precious"
    assert train.main(["--out-dir", str(other), "--overwrite", "--epochs", "2", *SMALL_RUN]) == 0
    assert len((other / "history.csv").read_text().splitlines()) == 1 + 2


# Property-based: random valid configurations and random inputs of the loss terms
# --------------------------------------------------------------------------------------

positive = st.floats(1e-3, 50.0)


@st.composite
def valid_flags(draw):
    """Command-line flags of a random configuration inside the validated ranges."""
    k = draw(st.integers(1, 12))
    tau = draw(st.floats(0.05, 5.0))
    flags = {
        "--num-components": k,
        "--latent-dim": draw(st.integers(1, 6)),
        "--hidden-dim": draw(st.integers(1, 48)),
        "--latent-layout": draw(st.sampled_from(mixvae.LATENT_LAYOUTS)),
        "--encoder": draw(st.sampled_from(mixvae.ENCODERS)),
        "--decoder": draw(st.sampled_from(mixvae.DECODERS)),
        "--decoder-conditioning": draw(st.sampled_from(mixvae.CONDITIONINGS)),
        "--likelihood": draw(st.sampled_from(mixvae.LIKELIHOODS)),
        "--router": draw(st.sampled_from(mixvae.ROUTERS)),
        "--c-regularizer": draw(st.sampled_from(mixvae.C_REGULARIZERS)),
        "--prior-mean": draw(st.floats(-20, 20)),
        "--prior-sigma": draw(positive),
        "--prior-weight": draw(st.floats(0, 10)),
        "--kl-c-weight": draw(st.floats(0, 10)),
        "--beta-z": draw(st.floats(0, 10)),
        "--diversity-weight": draw(st.floats(-100, 100)),
        "--logit-init-scale": draw(positive),
        "--gumbel-temperature": tau,
        "--gumbel-temperature-min": draw(st.floats(0.01, 1.0)) * tau,
        "--batch-size": draw(st.integers(1, 256)),
        "--learning-rate": draw(st.floats(1e-6, 1.0)),
        "--val-split": draw(st.floats(0.05, 0.5)),
    }
    args = [str(item) for pair in flags.items() for item in pair]
    if draw(st.booleans()):
        args += ["--learnable-pi", "--dirichlet-alpha", str(draw(positive))]
    if draw(st.booleans()):
        args += ["--curriculum", "--curriculum-start", str(draw(st.integers(1, k)))]
    else:
        args += [
            "--seeds",
            *map(str, draw(st.lists(st.integers(0, 99), min_size=1, max_size=4, unique=True))),
        ]
    return args


@settings(max_examples=12, deadline=None)
@given(valid_flags())
def test_random_valid_configurations_pass_validate_only(tmp_path_factory, args):
    out = tmp_path_factory.mktemp("validate") / "run"
    assert train.main([*args, "--validate-only", "--out-dir", str(out)]) == 0
    assert not out.exists()


@jax.jit
def loss_terms_and_gradient(logits, mask, sigma, mean, temperature):
    """The routing, logit-MoG log-prior and categorical KL of `logits` [B, K], and the gradient
    of their sum (with the routed logits) with respect to the logits; compiled once per K."""
    k = logits.shape[-1]

    def terms(y):
        routing = mixvae.route(
            y, jax.random.key(0), temperature=temperature, mode="gumbel", active_mask=mask
        )
        log_prior = mixvae.logit_mog_log_prior(y, mean=mean, sigma=sigma, active_mask=mask)
        kl = mixvae.categorical_kl(routing.responsibilities, jnp.full(k, 1.0 / k), mask)
        return jnp.sum(log_prior) + jnp.sum(kl) + jnp.sum(routing.weights * y), (
            routing,
            log_prior,
            kl,
        )

    (_, aux), grad = jax.value_and_grad(terms, has_aux=True)(logits)
    return aux, grad


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 8), data=st.data())
def test_loss_terms_are_finite_for_random_logits_masks_and_sigmas(k, data):
    logits = data.draw(hnp.arrays(np.float32, (3, k), elements=st.floats(-1e4, 1e4, width=32)))
    mask = data.draw(hnp.arrays(np.bool_, (k,)).filter(np.any))
    sigma, mean = data.draw(st.floats(1e-3, 1e3)), data.draw(st.floats(-50, 50))
    temperature = data.draw(st.floats(0.05, 10.0))
    (routing, log_prior, kl), grad = loss_terms_and_gradient(
        logits, mask, np.float32(sigma), np.float32(mean), np.float32(temperature)
    )
    assert (
        np.all(np.isfinite(log_prior))
        and np.all(np.isfinite(kl))
        and np.all(np.asarray(kl) > -1e-5)
    )
    assert np.all(np.isfinite(grad))
    weights = np.asarray(routing.weights)
    assert np.all(np.isfinite(weights)) and np.all(weights[:, ~mask] == 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


# Routing consistency under random warps
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_symmetric_kl_matches_numpy_and_is_zero_for_equal_routings(masked):
    rng = np.random.default_rng(3)
    p_logits, q_logits = rng.normal(size=(2, 6, 5)) * 3
    mask = np.array([1, 1, 0, 1, 0], bool) if masked else np.ones(5, bool)
    value = np.asarray(
        mixvae.symmetric_kl(
            jnp.asarray(p_logits, jnp.float32),
            jnp.asarray(q_logits, jnp.float32),
            jnp.asarray(mask),
        )
    )
    p = np.exp(p_logits[:, mask] - np_logsumexp(p_logits[:, mask], axis=-1, keepdims=True))
    q = np.exp(q_logits[:, mask] - np_logsumexp(q_logits[:, mask], axis=-1, keepdims=True))
    reference = 0.5 * (np.sum(p * np.log(p / q), -1) + np.sum(q * np.log(q / p), -1))
    np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-6)
    assert np.all(
        np.asarray(
            mixvae.symmetric_kl(jnp.asarray(p_logits), jnp.asarray(p_logits), jnp.asarray(mask))
        )
        == 0
    )


def test_augment_is_identity_at_strength_zero_and_a_bounded_warp_otherwise():
    images = jax.random.uniform(jax.random.key(0), (4, 28 * 28))
    np.testing.assert_allclose(mixvae.augment(images, jax.random.key(1), 0.0), images, atol=1e-6)
    warped = np.asarray(mixvae.augment(images, jax.random.key(1), 1.0))
    assert warped.shape == images.shape and warped.min() >= 0 and warped.max() <= 1
    assert not np.allclose(warped, images)
    square = np.zeros((28, 28), np.float32)
    square[10:18, 10:18] = 1  # a centred square keeps most of its mass under a mild warp
    mass = np.asarray(
        mixvae.augment(jnp.asarray(square.reshape(1, -1)), jax.random.key(2), 1.0)
    ).sum()
    assert 0.7 * 64 < mass < 1.3 * 64


@pytest.mark.parametrize("num_images,num_dims,dtype", [(300, 10, np.float32), (200, 100, np.uint8)])
def test_nearest_neighbors_match_sklearn_on_the_principal_components(num_images, num_dims, dtype):
    """Against float64 PCA and brute-force neighbours; chunks of 128 cut the self-exclusion
    across chunks and a zero-padded last chunk; num_dims > P keeps every axis."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(4)
    images = rng.uniform(size=(num_images, 64))
    if dtype == np.uint8:
        images = np.round(images * 255).astype(np.uint8)
    table = np.asarray(
        mixvae.nearest_neighbors(jnp.asarray(images), 4, num_dims=num_dims, chunk_size=128)
    )
    unit = images / 255.0 if dtype == np.uint8 else images
    projected = PCA(min(num_dims, 64), svd_solver="full").fit_transform(unit.astype(np.float64))
    _, reference = NearestNeighbors(n_neighbors=5).fit(projected).kneighbors(projected)
    assert table.shape == (num_images, 4) and table.dtype == np.int32
    np.testing.assert_array_equal(table, reference[:, 1:])  # column 0: the image itself


def slanted_bar(side=28, slant=0.4, shift=(2.0, -3.0)):
    """A bar whose columns drift by `slant` per row, off the centre by `shift` (rows, columns)."""
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float64)
    centre = (side - 1) / 2
    drift = centre + shift[1] + slant * (rows - centre - shift[0])
    image = np.clip(1.5 - np.abs(cols - drift), 0, 1) * (np.abs(rows - centre - shift[0]) < 9)
    return image.reshape(-1)


def test_deskew_matches_scipy_and_leaves_images_upright_and_centred():
    rng = np.random.default_rng(5)
    images = np.stack([slanted_bar(), slanted_bar(slant=-0.3), rng.uniform(size=784) ** 4])
    images = np.round(images * 255).astype(np.uint8)
    value = np.asarray(mixvae.deskew(jnp.asarray(images)))
    side, centre = 28, 13.5
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float64)
    for image, deskewed in zip(images / 255.0, value, strict=True):
        grid = image.reshape(side, side)
        mass = grid.sum() + 1e-6
        row_mean, col_mean = (grid * rows).sum() / mass, (grid * cols).sum() / mass
        row_var = (grid * (rows - row_mean) ** 2).sum() / mass + 1e-6
        slant = (grid * (rows - row_mean) * (cols - col_mean)).sum() / mass / row_var
        coords = [row_mean + rows - centre, col_mean + cols - centre + slant * (rows - centre)]
        reference = scipy_ndimage.map_coordinates(grid, coords, order=1, mode="grid-constant")
        np.testing.assert_allclose(deskewed, reference.reshape(-1), atol=1e-4)
    for deskewed in value[:2]:  # the bars: upright and centred, up to the resampling
        grid = deskewed.reshape(side, side)
        mass = grid.sum()
        row_mean, col_mean = (grid * rows).sum() / mass, (grid * cols).sum() / mass
        covariance = (grid * (rows - row_mean) * (cols - col_mean)).sum() / mass
        assert abs(row_mean - centre) < 0.2 and abs(col_mean - centre) < 0.2
        assert abs(covariance) < 0.02 * (grid * (rows - row_mean) ** 2).sum() / mass
    blank = np.asarray(mixvae.deskew(jnp.zeros((1, 64), jnp.uint8)))
    assert np.all(blank == 0)


def test_neighbor_views_draw_each_rows_neighbours_uniformly():
    neighbors = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)
    indices = jnp.array([0, 1] * 20_000)
    views = np.asarray(mixvae.neighbor_views(neighbors, indices, jax.random.key(3)))
    for row in (0, 1):
        drawn = views[np.asarray(indices) == row]
        counts = np.bincount(drawn, minlength=9)[np.asarray(neighbors[row])]
        assert counts.sum() == len(drawn)  # only the row's own neighbours
        np.testing.assert_allclose(counts / len(drawn), 0.25, atol=0.015)


def test_an_epoch_warps_the_drawn_neighbours():
    """With every image its own neighbour the epoch is the plain one, bit for bit; with other
    neighbours the consistency term differs, and nothing else in the first step."""
    model = tiny_model()
    objective = mixvae.Objective(consistency_weight=2.0)
    optimizer = mixvae.make_optimizer(1e-3)
    opt_state = mixvae.init_optimizer(optimizer, model)
    batches, sched, key = jnp.arange(16).reshape(2, 8), all_active(), jax.random.key(1)

    def epoch(neighbors):
        return mixvae.train_epoch(
            model, opt_state, TINY_BATCH, batches, key, sched, objective, optimizer, neighbors
        )

    plain = epoch(None)
    itself = epoch(jnp.repeat(jnp.arange(16)[:, None], 3, axis=1))
    others = epoch((jnp.arange(16)[:, None] + jnp.arange(1, 4)) % 16)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(itself), strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.all(plain[2]["loss_reconstruction"][0] == others[2]["loss_reconstruction"][0])
    assert np.all(plain[2]["consistency"] != others[2]["consistency"])


def test_consistency_term_enters_the_loss_only_when_weighted_and_in_training():
    model, sched = tiny_model(), all_active()
    x = jax.random.uniform(jax.random.key(5), (16, 64))
    plain = mixvae.Objective(consistency_weight=0.0)
    weighted = mixvae.Objective(consistency_weight=2.0)
    loss_plain, m_plain = mixvae.loss_fn(model, x, jax.random.key(0), sched, plain)
    loss_weighted, m_weighted = mixvae.loss_fn(model, x, jax.random.key(0), sched, weighted)
    assert float(m_plain["consistency"]) == 0 and float(m_weighted["consistency"]) > 0
    np.testing.assert_allclose(
        float(loss_weighted), float(loss_plain) + 2.0 * float(m_weighted["consistency"]), rtol=1e-5
    )
    _, m_eval = mixvae.loss_fn(model, x, None, sched, weighted)  # evaluation draws no warp
    assert float(m_eval["consistency"]) == 0
