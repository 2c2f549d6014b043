"""mixvae: a mixture VAE whose discrete channel c is regularised by a logit-space
mixture-of-Gaussians prior ("logit-MoG"), the categorical KL, or both.

Read top to bottom, as the paper: notation -> encoder -> router -> decoders -> model -> the
loss terms (each a pure function whose docstring states its formula) -> the objective that
combines them, every channel decoded -> its schedules (the warm-up a(e), the router
temperature tau(e), the curriculum's kick) -> the layers inside the networks (MLP and conv)
and the consistency term's second view (a random warp of x or of a neighbour of x) -> the one
speed device that changes what is computed
(--top-m: decode each example's top-M channels only) -> the compiled train/eval steps.

Notation: x in [0,1]^P, K channels, latent size D, active set A (a boolean mask
[K]; all True unless a curriculum is on), y(x) in R^K the raw channel logits, y' = y + b on A
and -inf off A (b: the curriculum kick's logit bias, 0 otherwise), r = softmax(y') the
responsibilities, s the router's selection weights.

The encoder acts on ONE example (Equinox style; batches are vmapped). The decoders act on a
batch of rows, channel-major [K, B, ...], so that every layer is one matmul and nothing is
transposed (a vmapped eqx.nn.Linear makes XLA transpose its [out, B] result).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import optax

ENCODERS = ("mlp", "conv")
DECODERS = ("mlp", "conv")
CONDITIONINGS = ("concat", "film", "separate")
LATENT_LAYOUTS = ("decentralized", "shared")
LIKELIHOODS = ("bernoulli", "gaussian", "heteroscedastic")
ROUTERS = ("softmax", "gumbel", "straight_through")
C_REGULARIZERS = ("categorical", "logit_mog", "both")

# --------------------------------------------------------------------------------------
# Encoder: x -> (y(x), mu, log sigma^2)
# --------------------------------------------------------------------------------------


class Encoder(eqx.Module):
    """Trunk h(x), then heads: channel logits y(x) in R^K and Gaussian posteriors.

    `decentralized`: one posterior per channel, mu and log-variance of shape [K, D].
    `shared`: one posterior for all channels, shape [D].

    The logits head's initial weights are multiplied by `logit_init_scale`, so that routing
    starts as a random but input-consistent partition (k-means' random start). With the usual
    small init, y(x) is nearly the same for every x, a Gumbel router sends images to channels
    at random at every step, no decoder specialises, and training can settle where the logits
    ignore the input.
    """

    trunk: eqx.Module
    logits_head: eqx.nn.Linear
    posterior_head: eqx.nn.Linear
    posterior_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self, input_dim, num_components, latent_dim, *, layout, kind, width, logit_init_scale, key
    ):
        k_trunk, k_logits, k_post = jax.random.split(key, 3)
        if kind == "mlp":
            self.trunk = eqx.nn.MLP(
                input_dim,
                width,
                width,
                depth=1,
                activation=jax.nn.relu,
                final_activation=jax.nn.relu,
                key=k_trunk,
            )
        else:
            self.trunk = ConvTrunk(input_dim, width, key=k_trunk)
        self.posterior_shape = (
            (num_components, latent_dim) if layout == "decentralized" else (latent_dim,)
        )
        logits_head = eqx.nn.Linear(width, num_components, key=k_logits)
        self.logits_head = eqx.tree_at(
            lambda head: head.weight, logits_head, logit_init_scale * logits_head.weight
        )
        self.posterior_head = eqx.nn.Linear(width, 2 * math.prod(self.posterior_shape), key=k_post)

    def __call__(self, x):
        h = self.trunk(x)
        mean, log_var = jnp.split(self.posterior_head(h), 2)
        return (
            self.logits_head(h),
            mean.reshape(self.posterior_shape),
            log_var.reshape(self.posterior_shape),
        )


# --------------------------------------------------------------------------------------
# Router: logits -> (selection weights s, responsibilities r). The -inf masking of
# inactive channels lives here and only here.
# --------------------------------------------------------------------------------------


class Routing(NamedTuple):
    weights: jax.Array  # s, [..., K], on the simplex; exactly 0 on inactive channels
    responsibilities: jax.Array  # r = softmax(y'), [..., K]; exactly 0 on inactive channels
    scores: (
        jax.Array
    )  # y' (softmax) or y' + g (gumbel, straight_through): s ranks channels by these


def mask_logits(logits, active_mask=None):
    """y'_k = y_k if k in A else -inf.  logits: [..., K], active_mask: [K]."""
    if active_mask is None:
        return logits
    chex.assert_shape(active_mask, logits.shape[-1:])
    return jnp.where(active_mask, logits, -jnp.inf)


def route(logits, key, *, temperature, mode, active_mask=None, hard=True) -> Routing:
    """Responsibilities r = softmax(y') and selection weights s:

    softmax:          s = r
    gumbel:           s = softmax((y' + g) / tau),  g ~ Gumbel(0, 1)
    straight_through: s = onehot(argmax((y' + g) / tau)) in the forward pass,
                      d s = d softmax((y' + g) / tau) in the backward pass;
                      `hard` False (an array is fine) softens it to the gumbel sample.

    `key=None` (evaluation) draws no noise: g = 0.
    """
    masked = mask_logits(logits, active_mask)
    responsibilities = jax.nn.softmax(masked, axis=-1)
    if mode == "softmax":
        return Routing(responsibilities, responsibilities, masked)
    noise = 0.0 if key is None else jax.random.gumbel(key, logits.shape, logits.dtype)
    scores = masked + noise
    soft = jax.nn.softmax(scores / temperature, axis=-1)
    if mode == "gumbel":
        return Routing(soft, responsibilities, scores)
    one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    # Parenthesised so the forward value is exactly `one_hot`: soft - soft == 0 in IEEE.
    straight_through = one_hot + (soft - jax.lax.stop_gradient(soft))
    return Routing(jnp.where(hard, straight_through, soft), responsibilities, scores)


# --------------------------------------------------------------------------------------
# Decoders: x_hat_k = f(z_k, k) for every channel k (the top-M dispatch: "Speed", below).
# A decoder network acts on a batch of rows z [..., D] (with an embedding e broadcastable to
# [..., E]): each layer is one matmul over all rows, channel-major, so nothing is transposed.
# --------------------------------------------------------------------------------------


class ChannelDecoders(eqx.Module):
    """x_hat_k = f(z_k, k), channel-major, never a Python loop over k.

    concat / film: one network conditioned on a learned channel embedding e_k.
    separate: K networks whose weights are stacked on a leading axis.
    """

    network: MLPDecoder | ConvDecoder
    embeddings: jax.Array | None  # [K, E]; None for separate decoders
    num_components: int = eqx.field(static=True)

    def __init__(
        self,
        num_components,
        latent_dim,
        input_dim,
        num_extra,
        *,
        kind,
        conditioning,
        width,
        embed_dim,
        key,
    ):
        k_net, k_emb = jax.random.split(key)
        self.num_components = num_components
        cls = MLPDecoder if kind == "mlp" else ConvDecoder

        def make(k):
            return cls(
                latent_dim,
                input_dim,
                num_extra,
                width=width,
                embed_dim=embed_dim,
                conditioning=conditioning,
                key=k,
            )

        if conditioning == "separate":
            self.network = eqx.filter_vmap(make)(jax.random.split(k_net, num_components))
            self.embeddings = None
        else:
            self.network = make(k_net)
            self.embeddings = jax.random.normal(k_emb, (num_components, embed_dim))

    def __call__(self, z):
        """Every channel on its own rows: z [K, N, D] -> decoder outputs [K, N, P (+ extra)]."""
        if self.embeddings is None and isinstance(self.network, ConvDecoder):
            # Channel by channel: XLA:CPU runs vmapped-weight (grouped) convolutions inside the
            # epoch's loop on a generic kernel, slower than K plain convolutions (README, Speed).
            params, static = eqx.partition(self.network, eqx.is_array)
            return jax.lax.map(
                lambda inputs: eqx.combine(inputs[0], static)(inputs[1]), (params, z)
            )
        if self.embeddings is None:
            return eqx.filter_vmap(lambda net, z_k: net(z_k))(self.network, z)
        return self.network(z, self.embeddings[:, None, :])


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")


class MixVAE(eqx.Module):
    """Encoder, K channel decoders, and the mixture weights pi = softmax(pi_logits).

    `pi_logits` is None when pi is fixed uniform (not learnable).
    The likelihood p(x | x_hat) is part of the generative model, so its constants live here.
    """

    encoder: Encoder
    decoders: ChannelDecoders
    pi_logits: jax.Array | None
    num_components: int = eqx.field(static=True)
    latent_layout: str = eqx.field(static=True)
    likelihood: str = eqx.field(static=True)
    observation_sigma: float = eqx.field(static=True)
    sigma_min: float = eqx.field(static=True)
    sigma_max: float = eqx.field(static=True)

    def __init__(
        self,
        key,
        *,
        input_dim,
        num_components=10,
        latent_dim=4,
        latent_layout="decentralized",
        encoder="mlp",
        decoder="mlp",
        conditioning="separate",
        likelihood="bernoulli",
        width=128,
        embed_dim=16,
        logit_init_scale=10.0,
        learnable_pi=False,
        observation_sigma=0.1,
        sigma_min=0.05,
        sigma_max=1.0,
    ):
        for name, value, allowed in [
            ("latent_layout", latent_layout, LATENT_LAYOUTS),
            ("encoder", encoder, ENCODERS),
            ("decoder", decoder, DECODERS),
            ("conditioning", conditioning, CONDITIONINGS),
            ("likelihood", likelihood, LIKELIHOODS),
        ]:
            _check_choice(name, value, allowed)
        k_enc, k_dec = jax.random.split(key)
        self.encoder = Encoder(
            input_dim,
            num_components,
            latent_dim,
            layout=latent_layout,
            kind=encoder,
            width=width,
            logit_init_scale=logit_init_scale,
            key=k_enc,
        )
        self.decoders = ChannelDecoders(
            num_components,
            latent_dim,
            input_dim,
            int(likelihood == "heteroscedastic"),
            kind=decoder,
            conditioning=conditioning,
            width=width,
            embed_dim=embed_dim,
            key=k_dec,
        )
        self.pi_logits = jnp.zeros(num_components) if learnable_pi else None
        self.num_components = num_components
        self.latent_layout = latent_layout
        self.likelihood = likelihood
        self.observation_sigma = observation_sigma
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max


def mixture_weights(model: MixVAE, active_mask=None):
    """pi = softmax(pi_logits) restricted to A and renormalised (uniform on A when fixed)."""
    logits = jnp.zeros(model.num_components) if model.pi_logits is None else model.pi_logits
    return jax.nn.softmax(mask_logits(logits, active_mask))


# --------------------------------------------------------------------------------------
# Loss terms: pure functions on arrays with any leading batch shape [..., K].
# --------------------------------------------------------------------------------------


def _xlogy(x, y):
    """x log y with 0 log 0 = 0 and finite gradients at x = 0 (double-where)."""
    safe_y = jnp.where(x > 0, y, 1.0)
    return jnp.where(x > 0, x * jnp.log(safe_y), 0.0)


def entropy(p):
    """H(p) = -sum_k p_k log p_k over the last axis, with 0 log 0 = 0."""
    return -jnp.sum(_xlogy(p, p), axis=-1)


def symmetric_kl(logits_p, logits_q, active_mask=None):
    """(KL(p || q) + KL(q || p)) / 2 = (1/2) sum_{k in A} (p_k - q_k)(log p_k - log q_k) with
    p = softmax(y'_p), q = softmax(y'_q) over the active channels.  [..., K] -> [...]."""
    log_p = jax.nn.log_softmax(mask_logits(logits_p, active_mask), axis=-1)
    log_q = jax.nn.log_softmax(mask_logits(logits_q, active_mask), axis=-1)
    active = jnp.ones(logits_p.shape[-1], bool) if active_mask is None else active_mask
    log_ratio = jnp.where(active, log_p - log_q, 0.0)  # -inf - -inf on closed channels
    return 0.5 * jnp.sum((jnp.exp(log_p) - jnp.exp(log_q)) * log_ratio, axis=-1)


def logit_mog_log_prior(logits, *, mean, sigma, active_mask=None):
    """log p_mix(y) with p_mix(y) = (1/|A|) sum_{k in A} N(y; M e_k, sigma^2 I_K).

    log N(y; M e_k, sigma^2 I_K) = -(K/2) log(2 pi sigma^2) - ||y - M e_k||^2 / (2 sigma^2),
    combined with a stable logsumexp over the active k. The distances use the raw finite
    logits y(x) directly (never -inf-masked ones, never the expanded form
    ||y||^2 - 2 M y_k + M^2, which cancels catastrophically near a mode when sigma is tiny).
    The logit-MoG penalty is the negative of this.  logits: [..., K] -> [...].
    """
    num_components = logits.shape[-1]
    centres = mean * jnp.eye(num_components, dtype=logits.dtype)  # row k = M e_k
    sq_dist = jnp.sum(jnp.square(logits[..., None, :] - centres), axis=-1)  # [..., K]
    log_normal = -0.5 * num_components * jnp.log(2 * jnp.pi * sigma**2) - sq_dist / (2 * sigma**2)
    if active_mask is None:
        active_mask = jnp.ones(num_components, bool)
    chex.assert_shape(active_mask, (num_components,))
    log_num_active = jnp.log(jnp.sum(active_mask).astype(logits.dtype))
    return jax.nn.logsumexp(jnp.where(active_mask, log_normal, -jnp.inf), axis=-1) - log_num_active


def categorical_kl(responsibilities, pi, active_mask=None):
    """KL(r || pi) = sum_{k in A} r_k (log r_k - log pi_k), pi renormalised on A.

    Exactly 0 when r == pi; finite (0 log 0 = 0) when r has exact zeros.  [..., K] -> [...].
    """
    chex.assert_equal_shape_suffix([responsibilities, pi], 1)
    if active_mask is not None:
        pi = jnp.where(active_mask, pi, 0.0)
    pi = pi / jnp.sum(pi, axis=-1, keepdims=True)
    return jnp.sum(
        _xlogy(responsibilities, responsibilities) - _xlogy(responsibilities, pi), axis=-1
    )


def gaussian_kl(mean, log_var):
    """KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum_d (mu_d^2 + sigma_d^2 - 1 - log sigma_d^2)."""
    chex.assert_equal_shape([mean, log_var])
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_var) - 1.0 - log_var, axis=-1)


def dirichlet_penalty(pi, alpha, active_mask=None):
    """Dirichlet MAP on pi (up to a constant): -(alpha - 1) sum_{k in A} log pi_k."""
    log_pi = jnp.log(jnp.where(pi > 0, pi, 1.0))
    if active_mask is not None:
        log_pi = jnp.where(active_mask, log_pi, 0.0)
    return -(alpha - 1.0) * jnp.sum(log_pi, axis=-1)


def softplus(v):
    """log(1 + e^v) = max(v, 0) + log1p(e^-|v|), stable for any v; one exp and one log1p per
    element, where jax.nn.softplus is a general logaddexp (README, Speed). Both branches switch
    on the same v >= 0, so the gradient is sigmoid(v) everywhere, 1/2 at v = 0 included."""
    positive = v >= 0
    return jnp.where(positive, v, 0.0) + jnp.log1p(jnp.exp(jnp.where(positive, -v, v)))


def reconstruction_nll(
    x, decoded, *, likelihood, observation_sigma=0.1, sigma_min=0.05, sigma_max=1.0
):
    """-log p(x | x_hat) summed over the P pixels.  x: [..., P], decoded: [..., P (+1)] -> [...].

    bernoulli:       decoded are logits; sum_p softplus(o_p) - x_p o_p.
    gaussian:        mean sigmoid(o), fixed sigma;
                     sum_p (x_p - mu_p)^2 / (2 sigma^2) + log(sqrt(2 pi) sigma).
    heteroscedastic: as gaussian with one sigma per image, clip(sigma_min + softplus(u), sigma_min,
                     sigma_max), u the decoder's last output.
    """
    num_pixels = x.shape[-1]
    outputs = decoded[..., :num_pixels]  # o
    if likelihood == "bernoulli":
        return jnp.sum(softplus(outputs) - x * outputs, axis=-1)
    if likelihood == "gaussian":
        sigma = jnp.asarray(observation_sigma, x.dtype)
    else:
        sigma = jnp.clip(sigma_min + softplus(decoded[..., -1]), sigma_min, sigma_max)[..., None]
    residual = (x - jax.nn.sigmoid(outputs)) / sigma
    return jnp.sum(0.5 * jnp.square(residual) + jnp.log(sigma) + 0.5 * jnp.log(2 * jnp.pi), axis=-1)


# --------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------


class Objective(eqx.Module):
    """The loss's fixed hyperparameters. Python floats are compile-time constants (part of the
    compiled step's cache key); a float given as an array, e.g. [R] per replica of a sweep, is an
    input instead, so that one compiled step serves every value."""

    c_regularizer: str = eqx.field(default="logit_mog", static=True)  # categorical|logit_mog|both
    kl_c_weight: float = 1.0  # w_cat
    prior_weight: float = 1.0  # lambda
    prior_mean: float = 7.0  # M
    prior_sigma: float = 1.0  # sigma
    beta_z: float = 1.0
    dirichlet_alpha: float | None = eqx.field(default=None, static=True)  # None: no Dirichlet term
    dirichlet_weight: float = 1.0
    diversity_weight: float = -50.0  # < 0 rewards diverse usage
    router: str = eqx.field(default="straight_through", static=True)
    consistency_weight: float = 40.0  # w_cons (square images); a Python 0: no view is encoded
    augment_strength: float = 0.15
    # training decodes only each example's top-M channels; None: all
    top_m: int | None = eqx.field(default=None, static=True)
    # separate decoders: rows per channel, as a multiple of B M / K
    top_m_capacity: float = eqx.field(default=2.0, static=True)

    def __check_init__(self):
        _check_choice("c_regularizer", self.c_regularizer, C_REGULARIZERS)
        _check_choice("router", self.router, ROUTERS)


def switched_on(weight) -> bool:
    """Whether a weighted term is computed: always, unless its weight is a Python 0 (an array
    weight, a sweep's, may be nonzero for some replicas)."""
    return not (isinstance(weight, (int, float)) and weight == 0)


def _float32(value):
    return jnp.asarray(value, jnp.float32)


class Schedule(eqx.Module):
    """Per-epoch values, passed as arrays so that changing them never recompiles (built by
    epoch_schedule, below). logit_bias, prior_scale and straight_through carry the curriculum's
    Kick (its temperature enters tau as a floor); their defaults leave the objective as
    stated."""

    c_anneal: jax.Array = eqx.field(converter=_float32)  # a(e), scales both c-terms
    temperature: jax.Array = eqx.field(converter=_float32)  # tau
    active_mask: jax.Array = eqx.field(converter=lambda v: jnp.asarray(v, bool))  # A, [K]
    logit_bias: jax.Array = eqx.field(
        default=0.0, converter=_float32
    )  # b, [K] or a scalar: added to the routing logits
    prior_scale: jax.Array = eqx.field(
        default=1.0, converter=_float32
    )  # multiplies the logit-MoG term
    straight_through: jax.Array = eqx.field(default=True, converter=lambda v: jnp.asarray(v, bool))


class Terms(NamedTuple):
    """Per-example quantities of one forward pass (leading batch axis B)."""

    logits: jax.Array  # y(x), [B, K], raw
    weights: jax.Array  # s, [B, K]
    responsibilities: jax.Array  # r, [B, K]
    nll: jax.Array  # -log p(x | z_k), [B, K]; 0 where not decoded
    decoded_mask: jax.Array  # [B, K] bool: channels whose nll was computed (all, unless top_m)
    kl_z: jax.Array  # KL(q(z_k|x) || N(0, I)), [B, K] (decentralized) or [B] (shared)
    # symmetric KL between softmax over A of y(x) and of y(augment(v)) (v: x or a neighbour of x;
    # no kick bias), [B]; zeros without w_cons or noise
    consistency: jax.Array


def decode_channels(model: MixVAE, z):
    """Decoder outputs of every channel, channel-major: z [B, K, D] (or the shared [B, D], given
    to every channel) -> [K, B, P (+1)]."""
    if model.latent_layout == "shared":
        z = jnp.broadcast_to(z, (model.num_components,) + z.shape)
    else:
        z = jnp.swapaxes(z, 0, 1)
    return model.decoders(z)


def channel_nll(model: MixVAE, x, decoded):
    """-log p(x | x_hat) under the model's likelihood: x [..., P] broadcast against the decoder
    outputs decoded [..., P (+1)] -> [...]; e.g. x [B, P] and decode_channels' [K, B, P] ->
    [K, B]."""
    return reconstruction_nll(
        x,
        decoded,
        likelihood=model.likelihood,
        observation_sigma=model.observation_sigma,
        sigma_min=model.sigma_min,
        sigma_max=model.sigma_max,
    )


def decoded_mean(decoded, num_pixels):
    """The image each channel predicts, in [0, 1]: sigmoid of the pixel outputs."""
    return jax.nn.sigmoid(decoded[..., :num_pixels])


def forward(model: MixVAE, x, key, sched: Schedule, objective: Objective, view=None) -> Terms:
    """Encode, route (on y + the schedule's logit bias), sample z_k = mu_k + sigma_k eps (mu_k when
    key is None), decode every channel (in training with top_m: each example's top-M channels by
    routing score, their weights s renormalised over them); with w_cons > 0 and a key, also encode
    a randomly warped copy of `view` [B, P] (x itself when None; a neighbour of each image with
    --consistency-neighbors) for the routing-consistency term."""
    chex.assert_rank(x, 2)
    logits, mean, log_var = jax.vmap(model.encoder)(x)
    route_key, noise_key = (None, None) if key is None else jax.random.split(key)
    routing = route(
        logits + sched.logit_bias,
        route_key,
        temperature=sched.temperature,
        mode=objective.router,
        active_mask=sched.active_mask,
        hard=sched.straight_through,
    )
    z = mean
    if key is not None:
        z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(noise_key, mean.shape, mean.dtype)
    weights = routing.weights
    if key is not None and objective.top_m is not None and objective.top_m < model.num_components:
        nll, decoded_mask = decode_top_m(
            model, x, z, routing.scores, objective.top_m, objective.top_m_capacity
        )
        weights = restrict(weights, decoded_mask)
    else:
        nll = channel_nll(model, x, decode_channels(model, z)).T
        decoded_mask = jnp.ones(nll.shape, bool)
    consistency = jnp.zeros(x.shape[0])
    if switched_on(objective.consistency_weight) and key is not None:
        augmented_logits, _, _ = jax.vmap(model.encoder)(
            augment(
                x if view is None else view, jax.random.fold_in(key, 1), objective.augment_strength
            )
        )
        consistency = symmetric_kl(logits, augmented_logits, sched.active_mask)
    return Terms(
        logits,
        weights,
        routing.responsibilities,
        nll,
        decoded_mask,
        gaussian_kl(mean, log_var),
        consistency,
    )


def loss_terms(model: MixVAE, terms: Terms, sched: Schedule, objective: Objective):
    """The summands of the loss L (batch means), each as it enters L; L is their sum:

    reconstruction  sum_k s_k l(x, x_hat_k)
    kl_z            beta_z KL_z
    kl_c            a w_cat KL(r || pi)                       (categorical, both; else 0)
    logit_mog       a lambda (-log p_mix(y(x)))               (logit_mog, both; else 0)
    dirichlet       w_dir (-(alpha - 1) sum_k log pi_k)       (alpha set; else 0)
    diversity       w_div H(mean_batch r)
    consistency     w_cons (KL(r || r_aug) + KL(r_aug || r)) / 2   (r_aug: routing of a warped v,
                    v = x, or with --consistency-neighbors one of x's nearest training images)

    KL_z sums over the active channels (decentralized) or is the one shared KL. The logit-MoG
    term is scaled by the schedule's prior_scale, and is zero while |A| = 1: with one open
    channel there is nothing to choose, and the term would only push that one logit up. The
    consistency term compares softmax over A of the raw logits y, without the kick's bias b.
    """
    mask = sched.active_mask
    pi = mixture_weights(model, mask)
    r = terms.responsibilities
    uses_categorical = objective.c_regularizer in ("categorical", "both")
    uses_logit_mog = objective.c_regularizer in ("logit_mog", "both")
    zero = jnp.zeros(())
    k_active = jnp.sum(mask).astype(jnp.float32)
    logit_mog_scale = sched.c_anneal * objective.prior_weight * sched.prior_scale * (k_active > 1)
    neg_log_prior = -logit_mog_log_prior(
        terms.logits, mean=objective.prior_mean, sigma=objective.prior_sigma, active_mask=mask
    )
    return {
        "reconstruction": jnp.mean(jnp.sum(terms.weights * terms.nll, axis=-1)),
        "kl_z": objective.beta_z * jnp.mean(summed_kl_z(model, terms.kl_z, mask)),
        "kl_c": sched.c_anneal * objective.kl_c_weight * jnp.mean(categorical_kl(r, pi, mask))
        if uses_categorical
        else zero,
        "logit_mog": logit_mog_scale * jnp.mean(neg_log_prior) if uses_logit_mog else zero,
        "dirichlet": objective.dirichlet_weight
        * dirichlet_penalty(pi, objective.dirichlet_alpha, mask)
        if objective.dirichlet_alpha is not None
        else zero,
        "diversity": objective.diversity_weight * entropy(jnp.mean(r, axis=0)),
        "consistency": objective.consistency_weight * jnp.mean(terms.consistency),
    }


def summed_kl_z(model: MixVAE, kl_z, mask):
    """KL_z per example: the shared layout's one KL [B], or the sum over the active channels of
    the per-channel KLs [B, K] (decentralized)."""
    if model.latent_layout == "shared":
        return kl_z
    return jnp.sum(jnp.where(mask, kl_z, 0.0), axis=-1)


def neg_elbo(model: MixVAE, terms: Terms, sched: Schedule, objective: Objective):
    """-ELBO of the mixture posterior q(c|x) = r, batch mean:
    E_r[-log p(x|z_c) + KL_z,c] + KL(r || pi); with top_m, E_r over the decoded channels.
    z_c is the forward pass's: one sample in training, the posterior mean mu_c in evaluation
    and validation (no noise) -- there a plug-in value, not a bound on -log p(x): it can fall
    below the IW-NLL when the decoder is sharp around mu (K = 1 at D = 16 on MNIST)."""
    mask = sched.active_mask
    r = terms.responsibilities
    r_decoded = r if objective.top_m is None else restrict(r, terms.decoded_mask)
    shared = model.latent_layout == "shared"
    expected_kl_z = terms.kl_z if shared else jnp.sum(r * terms.kl_z, axis=-1)
    kl_c = categorical_kl(r, mixture_weights(model, mask), mask)
    return jnp.mean(jnp.sum(r_decoded * terms.nll, axis=-1) + expected_kl_z + kl_c)


def usage_stats(usage):
    """From channel usage p_hat = E_x r: k_eff = exp H(p_hat) and #channels with p_hat_k > 1e-3."""
    return jnp.exp(entropy(usage)), jnp.sum(usage > 1e-3).astype(usage.dtype)


def aggregate(model: MixVAE, terms: Terms, sched: Schedule, objective: Objective):
    """The loss L (the sum of loss_terms, batch mean) and the metrics of METRICS."""
    mask = sched.active_mask
    pi = mixture_weights(model, mask)
    r = terms.responsibilities
    summands = loss_terms(model, terms, sched, objective)
    loss = sum(summands.values())
    usage = jnp.mean(r, axis=0)
    k_eff, active_components = usage_stats(usage)
    metrics = {
        "loss": loss,
        **{f"loss_{name}": value for name, value in summands.items()},
        "neg_elbo": neg_elbo(model, terms, sched, objective),
        "reconstruction_loss": summands["reconstruction"],
        "kl_z": jnp.mean(summed_kl_z(model, terms.kl_z, mask)),
        "kl_c": jnp.mean(categorical_kl(r, pi, mask)),
        "kl_c_logit_mog": summands["logit_mog"],
        "consistency": jnp.mean(terms.consistency),
        "dirichlet_penalty": summands["dirichlet"],
        "component_diversity": entropy(usage),
        "component_entropy": jnp.mean(entropy(r)),
        "responsibility_confidence": jnp.mean(jnp.max(r, axis=-1)),
        "k_eff": k_eff,
        "active_components": active_components,
        "pi_entropy": entropy(pi),
        "kl_c_scale": sched.c_anneal,
        "gumbel_temperature": sched.temperature,
        "k_active": jnp.sum(mask).astype(jnp.float32),
        "usage": usage,
    }
    return loss, metrics


METRICS = {
    "loss": "total objective L (minimised), the sum of the loss_* terms",
    "loss_reconstruction": "sum_k s_k (-log p(x | x_hat_k)), as added to L",
    "loss_kl_z": "beta_z KL_z, as added to L",
    "loss_kl_c": "a(e) w_cat KL(r || pi), as added to L",
    "loss_logit_mog": "a(e) lambda (-log p_mix(y(x))), as added to L",
    "loss_dirichlet": "w_dir (-(alpha - 1) sum_k log pi_k), as added to L",
    "loss_diversity": "w_div H(E_batch r), as added to L (< 0 for w_div < 0)",
    "loss_consistency": "w_cons symmetric KL(softmax_A y(x), softmax_A y(warped v)), v = x or a "
    "neighbour of x, as added to L",
    "neg_elbo": "-ELBO with q(c|x) = r (z = mu when evaluating), nats per example: "
    "E_r[-log p(x|z_c) + KL_z,c] + KL(r || pi), r-weighted where reconstruction_loss weights by s",
    "reconstruction_loss": "sum_k s_k (-log p(x | x_hat_k)), routing-weighted",
    "kl_z": "KL(q(z|x) || N(0, I)), summed over active channels",
    "kl_c": "KL(r || pi), unweighted",
    "kl_c_logit_mog": "a(e) * lambda * (-log p_mix(y(x))), exactly as added to L (0 while |A| = 1)",
    "consistency": "symmetric KL between the routing of x and of a randomly warped v, v = x or a "
    "neighbour of x (softmax_A of the raw logits y, without the kick's bias), unweighted "
    "(training)",
    "dirichlet_penalty": "w_dir * (-(alpha - 1) sum_k log pi_k), as added to L",
    "component_diversity": "H(E_batch r), usage entropy",
    "component_entropy": "E[H(r)], per-example routing entropy",
    "responsibility_confidence": "E[max_k r_k]",
    "k_eff": "exp H(p_hat), p_hat = E_x r: effective number of channels used",
    "active_components": "#channels with p_hat_k > 1e-3",
    "pi_entropy": "H(pi)",
    "kl_c_scale": "annealing factor a(e) of both c-terms",
    "gumbel_temperature": "router temperature tau",
    "k_active": "|A|, number of open channels",
}


def loss_fn(model: MixVAE, x, key, sched: Schedule, objective: Objective, view=None):
    """(L, metrics) on one batch x: [B, P]; key=None evaluates without noise; `view`: forward's."""
    return aggregate(model, forward(model, x, key, sched, objective, view), sched, objective)


def summarize(stacked_metrics):
    """Epoch metrics from per-batch metrics stacked on axis 0: batch means, with k_eff and
    active_components recomputed from the epoch's mean usage p_hat."""
    epoch = {name: jnp.mean(value, axis=0) for name, value in stacked_metrics.items()}
    epoch["k_eff"], epoch["active_components"] = usage_stats(epoch["usage"])
    return epoch


def iw_log_likelihood(model: MixVAE, x, key, sched: Schedule, num_samples: int):
    """Importance-weighted estimate of log p(x), p(x) = sum_k pi_k int p(x|z,k) N(z; 0, I) dz:

    log p(x) ~ logsumexp_{s,k} [log pi_k + log p(x|z_sk, k) + log N(z_sk; 0, I) - log q(z_sk|x, k)]
               - log S,
    z_sk ~ q(z|x, k) (one shared z_s for the `shared` layout). Every channel is summed exactly, so
    the estimate never depends on the router; it is a lower bound that tightens as S grows.
    x: [B, P] -> [B].
    """
    chex.assert_rank(x, 2)
    _, mean, log_var = jax.vmap(model.encoder)(x)
    log_pi = jnp.log(mixture_weights(model, sched.active_mask))

    def log_weights(sample_key):
        eps = jax.random.normal(sample_key, mean.shape, mean.dtype)
        z = mean + jnp.exp(0.5 * log_var) * eps
        log_prior_z = -0.5 * jnp.sum(jnp.square(z) + jnp.log(2 * jnp.pi), axis=-1)
        log_q_z = -0.5 * jnp.sum(jnp.square(eps) + log_var + jnp.log(2 * jnp.pi), axis=-1)
        nll = channel_nll(model, x, decode_channels(model, z)).T
        return log_pi - nll + (log_prior_z - log_q_z).reshape(x.shape[0], -1)  # [B, K]

    weights = jax.lax.map(log_weights, jax.random.split(key, num_samples))  # [S, B, K]
    return jax.nn.logsumexp(weights, axis=(0, 2)) - jnp.log(num_samples)


# --------------------------------------------------------------------------------------
# Schedules: the objective's per-epoch values
# --------------------------------------------------------------------------------------


def c_anneal(epoch: int, anneal_epochs: int) -> float:
    """a(e) = min(1, (e + 1) / N), 1 when N = 0: the warm-up of both c-terms (w_cat KL(r || pi)
    and lambda (-log p_mix)), epochs counted from 0."""
    if anneal_epochs == 0:
        return 1.0
    return min(1.0, (epoch + 1) / anneal_epochs)


def router_temperature(epoch: int, start: float, end: float, anneal_epochs: int) -> float:
    """tau(e) = tau_0 (tau_min / tau_0)^min(1, e / N): exponential decay over N epochs."""
    progress = 1.0 if anneal_epochs == 0 else min(1.0, epoch / anneal_epochs)
    return start * (end / start) ** progress


class Kick(NamedTuple):
    """The curriculum's kick, for a few epochs after a channel opens: softer routing (a
    temperature floor, soft rather than straight-through weights), a bias towards the new
    channel, and a weaker logit-MoG term."""

    temperature: float  # the router temperature is at least this
    logit_bias: float  # added to the newest open channel's logit
    prior_scale: float  # multiplies the logit-MoG term


def epoch_schedule(
    epoch: int,
    num_components: int,
    *,
    c_anneal_epochs: int,
    temperature: float,
    temperature_min: float,
    temperature_anneal_epochs: int,
    k_active: int | None = None,
    kick: Kick | None = None,
) -> Schedule:
    """Epoch e's Schedule: a(e), tau(e), the first k_active channels open (all by default), and
    during a kick its softened routing, bias and prior scale."""
    k_active = num_components if k_active is None else k_active
    tau = router_temperature(epoch, temperature, temperature_min, temperature_anneal_epochs)
    logit_bias = [0.0] * num_components  # host values: building a Schedule runs no XLA program
    if kick is not None:
        logit_bias[k_active - 1] = kick.logit_bias
    return Schedule(
        c_anneal=c_anneal(epoch, c_anneal_epochs),
        temperature=tau if kick is None else max(tau, kick.temperature),
        active_mask=[k < k_active for k in range(num_components)],
        logit_bias=logit_bias,
        prior_scale=1.0 if kick is None else kick.prior_scale,
        straight_through=kick is None,
    )


# --------------------------------------------------------------------------------------
# Networks: the layers inside the encoder's trunk and the decoders (MLP and conv)
# --------------------------------------------------------------------------------------


_CONV_CHANNELS = (32, 64)  # conv trunk widths; the transposed-conv decoder mirrors them


def image_side(input_dim: int) -> int:
    """Side of the square image flattened into `input_dim` pixels."""
    side = math.isqrt(input_dim)
    if side * side != input_dim:
        raise ValueError(f"conv layers need square images, got input_dim={input_dim}")
    return side


class ConvTrunk(eqx.Module):
    """Two stride-2 convolutions (side -> side/4) and a dense layer to `width` units."""

    convs: tuple[eqx.nn.Conv2d, ...]
    dense: eqx.nn.Linear
    side: int = eqx.field(static=True)

    def __init__(self, input_dim: int, width: int, *, key):
        self.side = image_side(input_dim)
        k1, k2, k3 = jax.random.split(key, 3)
        c1, c2 = _CONV_CHANNELS
        self.convs = (
            eqx.nn.Conv2d(1, c1, 4, stride=2, padding=1, key=k1),
            eqx.nn.Conv2d(c1, c2, 4, stride=2, padding=1, key=k2),
        )
        reduced = (self.side // 2) // 2
        self.dense = eqx.nn.Linear(c2 * reduced * reduced, width, key=k3)

    def __call__(self, x):
        h = x.reshape(1, self.side, self.side)
        for conv in self.convs:
            h = jax.nn.relu(conv(h))
        return jax.nn.relu(self.dense(h.reshape(-1)))


def dense(layer: eqx.nn.Linear, h):
    """`layer` on the last axis of h [..., in] -> [..., out], one matmul for all leading axes.
    (vmapping eqx.nn.Linear over rows makes XLA emit [out, rows] and transpose it back, which on
    a CPU costs as much as the matmul itself.)"""
    return h @ layer.weight.T + layer.bias


def _decoder_input(z, embedding, *, film):
    """[z, e] for concat conditioning; z alone for FiLM (e modulates) and separate decoders."""
    if film or embedding is None:
        return z
    return jnp.concatenate(
        [z, jnp.broadcast_to(embedding, z.shape[:-1] + embedding.shape[-1:])], axis=-1
    )


def _film(h, film_layer, embedding):
    """Feature-wise modulation h * (1 + gamma(e)) + beta(e), per unit h [..., H] or per map
    h [..., C, S, S]; gamma and beta are computed once per embedding row and broadcast."""
    gamma, beta = jnp.split(dense(film_layer, embedding), 2, axis=-1)
    if h.ndim > embedding.ndim:  # feature maps
        gamma, beta = gamma[..., None, None], beta[..., None, None]
    return h * (1.0 + gamma) + beta


class MLPDecoder(eqx.Module):
    """z (+ channel embedding e) -> hidden -> hidden -> P pixel outputs (+ extra outputs)."""

    layers: tuple[eqx.nn.Linear, ...]
    films: tuple[eqx.nn.Linear, ...] | None

    def __init__(self, latent_dim, input_dim, num_extra, *, width, embed_dim, conditioning, key):
        keys = jax.random.split(key, 5)
        in_dim = latent_dim + (embed_dim if conditioning == "concat" else 0)
        self.layers = (
            eqx.nn.Linear(in_dim, width, key=keys[0]),
            eqx.nn.Linear(width, width, key=keys[1]),
            eqx.nn.Linear(width, input_dim + num_extra, key=keys[2]),
        )
        self.films = (
            tuple(eqx.nn.Linear(embed_dim, 2 * width, key=k) for k in keys[3:])
            if conditioning == "film"
            else None
        )

    def __call__(self, z, embedding=None):
        """z [..., D], embedding [..., E] (broadcastable) -> [..., P (+ extra)]."""
        h = _decoder_input(z, embedding, film=self.films is not None)
        for i, layer in enumerate(self.layers[:-1]):
            h = jax.nn.relu(dense(layer, h))
            if self.films is not None:
                h = _film(h, self.films[i], embedding)
        return dense(self.layers[-1], h)


class ConvDecoder(eqx.Module):
    """z (+ e) -> dense -> [C2, b, b] -> two stride-2 transposed convs -> crop to side x side.

    Extra per-image outputs (the heteroscedastic likelihood's raw scale u) come from the dense
    features.
    """

    dense: eqx.nn.Linear
    deconvs: tuple[eqx.nn.ConvTranspose2d, ...]
    films: tuple[eqx.nn.Linear, ...] | None
    extra: eqx.nn.Linear | None
    side: int = eqx.field(static=True)
    base: int = eqx.field(static=True)

    def __init__(self, latent_dim, input_dim, num_extra, *, width, embed_dim, conditioning, key):
        del width  # the conv decoder's size is set by _CONV_CHANNELS
        self.side = image_side(input_dim)
        self.base = -(-self.side // 4)
        keys = jax.random.split(key, 6)
        c1, c2 = _CONV_CHANNELS
        in_dim = latent_dim + (embed_dim if conditioning == "concat" else 0)
        dense_dim = c2 * self.base * self.base
        self.dense = eqx.nn.Linear(in_dim, dense_dim, key=keys[0])
        self.deconvs = (
            eqx.nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1, key=keys[1]),
            eqx.nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1, key=keys[2]),
        )
        self.films = (
            (
                eqx.nn.Linear(embed_dim, 2 * c2, key=keys[3]),
                eqx.nn.Linear(embed_dim, 2 * c1, key=keys[4]),
            )
            if conditioning == "film"
            else None
        )
        self.extra = eqx.nn.Linear(dense_dim, num_extra, key=keys[5]) if num_extra else None

    def __call__(self, z, embedding=None):
        """z [..., D], embedding [..., E] (broadcastable) -> [..., P (+ extra)]."""
        rows = z.shape[:-1]

        def deconv(layer, h):  # the transposed conv on every row's maps [..., C, S, S]
            out = jax.vmap(layer)(h.reshape((-1,) + h.shape[len(rows) :]))
            return out.reshape(rows + out.shape[1:])

        h = jax.nn.relu(
            dense(self.dense, _decoder_input(z, embedding, film=self.films is not None))
        )
        extra = None if self.extra is None else dense(self.extra, h)
        h = h.reshape(rows + (-1, self.base, self.base))
        if self.films is not None:
            h = _film(h, self.films[0], embedding)
        h = jax.nn.relu(deconv(self.deconvs[0], h))
        if self.films is not None:
            h = _film(h, self.films[1], embedding)
        pixels = deconv(self.deconvs[1], h)[..., 0, : self.side, : self.side].reshape(rows + (-1,))
        return pixels if extra is None else jnp.concatenate([pixels, extra], axis=-1)


# --------------------------------------------------------------------------------------
# The consistency term's second view: a random warp of x, or of one of x's neighbours
# --------------------------------------------------------------------------------------


def augment(x, key, strength=1.0):
    """A random affine warp of each square image of x [B, P]: rotation up to 15 degrees, scale up
    to 10 %, shear up to 0.2 and shift up to 2 pixels, each times `strength`, drawn uniformly;
    bilinear resampling, zero outside. strength 0 is the identity."""
    side = image_side(x.shape[-1])
    centre = (side - 1) / 2.0
    rows, cols = jnp.meshgrid(
        jnp.arange(side, dtype=x.dtype), jnp.arange(side, dtype=x.dtype), indexing="ij"
    )
    grid = jnp.stack([rows.reshape(-1), cols.reshape(-1)]) - centre  # [2, P], centred

    def warp(image, image_key):
        angle, scale, shear, *shift = strength * jax.random.uniform(
            image_key, (5,), minval=-1.0, maxval=1.0
        )
        angle = jnp.deg2rad(15.0) * angle
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        matrix = (
            (1.0 + 0.1 * scale)
            * jnp.array([[cos, -sin], [sin, cos]])
            @ jnp.array([[1.0, 0.2 * shear], [0.0, 1.0]])
        )
        coords = matrix @ grid + centre + 2.0 * jnp.stack(shift)[:, None]
        warped = jax.scipy.ndimage.map_coordinates(
            image.reshape(side, side), list(coords), order=1, mode="constant"
        )
        return warped.reshape(-1)

    return jax.vmap(warp)(x, jax.random.split(key, x.shape[0]))


@jax.jit
def deskew(images):
    """Each square image of `images` [N, P] sheared upright and centred, in [0, 1]: with intensities
    I(r, c), m = sum I, centroid (r_bar, c_bar) and slant alpha = sum I (r - r_bar)(c - c_bar) /
    sum I (r - r_bar)^2 (m and the denominator + 1e-6: a blank image stays blank),

        J(r, c) = I(r_bar + r - o, c_bar + c - o + alpha (r - o)),   o = (side - 1) / 2,

    bilinear, zero outside: J's centroid is the centre o and its row-column covariance 0 (up to the
    resampling)."""
    side = image_side(images.shape[-1])
    centre = (side - 1) / 2.0
    rows, cols = jnp.meshgrid(
        jnp.arange(side, dtype=jnp.float32), jnp.arange(side, dtype=jnp.float32), indexing="ij"
    )

    def upright(image):
        image = image.reshape(side, side)
        mass = jnp.sum(image) + 1e-6
        row_mean, col_mean = jnp.sum(image * rows) / mass, jnp.sum(image * cols) / mass
        row_var = jnp.sum(image * (rows - row_mean) ** 2) / mass + 1e-6
        slant = jnp.sum(image * (rows - row_mean) * (cols - col_mean)) / mass / row_var
        coords = [row_mean + rows - centre, col_mean + cols - centre + slant * (rows - centre)]
        warped = jax.scipy.ndimage.map_coordinates(image, coords, order=1, mode="constant")
        return warped.reshape(-1)

    return jax.lax.map(upright, to_unit_interval(images), batch_size=1024)


@functools.partial(jax.jit, static_argnames=("k", "num_dims", "chunk_size"))
def nearest_neighbors(images, k, num_dims=50, chunk_size=1024):
    """The k nearest other images of each image of `images` [N, P] -> indices [N, k], nearest
    first: Euclidean distance between the projections u_i = V^T (x_i - mean x) on the top
    min(num_dims, P) principal axes V (eigenvectors of sum_i (x_i - mean x)(x_i - mean x)^T).
    ||u_i - u_j||^2 = ||u_i||^2 - 2 u_i . u_j + ||u_j||^2, ranked per row without the constant
    ||u_i||^2; an image is never its own neighbour. No label is read. The consistency term's
    neighbours are those of deskew(images), so that slant does not make them."""
    x = to_unit_interval(images)
    centred = x - jnp.mean(x, axis=0)
    _, axes = jnp.linalg.eigh(centred.T @ centred)  # eigenvalues ascending
    projected = centred @ axes[:, -min(num_dims, x.shape[1]) :]  # [N, d]
    squared_norms = jnp.sum(projected**2, axis=-1)

    def chunk_neighbors(rows, start):
        distances = squared_norms - 2.0 * rows @ projected.T  # [C, N], up to ||u_i||^2
        itself = start + jnp.arange(rows.shape[0])
        distances = distances.at[jnp.arange(rows.shape[0]), itself].set(jnp.inf, mode="drop")
        return jax.lax.top_k(-distances, k)[1]

    return map_in_chunks(chunk_neighbors, projected, chunk_size)


def neighbor_views(neighbors, indices, key):
    """For each image index i of a batch [B], one of its k neighbours neighbors[i] [k], drawn
    uniformly: the images whose warps are the consistency term's second view. -> [B]."""
    column = jax.random.randint(key, indices.shape, 0, neighbors.shape[1])
    return neighbors[indices, column]


# --------------------------------------------------------------------------------------
# Speed: decode only each example's top-M channels (--top-m)
# --------------------------------------------------------------------------------------


def decode_top_m(model: MixVAE, x, z, scores, top_m: int, capacity_factor: float):
    """-log p(x | x_hat_k) for each example's M highest-scoring channels only: x [B, P], z [B, K, D]
    (or shared [B, D]), scores [B, K] -> (nll [B, K], decoded_mask [B, K]), nll 0 where not decoded.

    Separate decoders take at most C = min(B, ceil(capacity_factor B M / K)) rows each (see
    dispatch); a pair past its channel's capacity is not decoded. At M = K
    every channel is decoded for every example, exactly.
    """
    batch, num_components = scores.shape
    _, channels = jax.lax.top_k(scores, top_m)  # [B, M]
    if model.latent_layout == "shared":
        z_rows = jnp.broadcast_to(z[:, None, :], (batch, top_m, z.shape[-1]))
    else:
        z_rows = jnp.take_along_axis(z, channels[..., None], axis=1)
    capacity = min(batch, math.ceil(capacity_factor * batch * top_m / num_components))
    outputs, kept = dispatch(model.decoders, z_rows, channels, capacity)
    nll_rows = channel_nll(model, x[:, None, :], outputs)  # [B, M]
    rows = jnp.arange(batch)[:, None]
    nll = (
        jnp.zeros((batch, num_components), nll_rows.dtype)
        .at[rows, channels]
        .set(jnp.where(kept, nll_rows, 0.0))
    )
    return nll, jnp.zeros((batch, num_components), bool).at[rows, channels].set(kept)


def restrict(weights, decoded_mask):
    """weights [B, K] restricted to the decoded channels and renormalised (0 where none is)."""
    kept = jnp.where(decoded_mask, weights, 0.0)
    total = jnp.sum(kept, axis=-1, keepdims=True)
    return kept / jnp.where(total > 0, total, 1.0)


def dispatch(decoders: ChannelDecoders, z, channels, capacity):
    """decoders on the listed channels only: row n, slot m is decoded by channel channels[n, m].
    z [N, M, D], channels [N, M] -> (outputs [N, M, P (+ extra)], kept [N, M]).

    concat / film: one network on the N M rows with their channels' embeddings (all kept).
    separate: each channel decodes at most `capacity` rows, dispatched in row order (a
    mixture-of-experts dispatch); rows past a channel's capacity are dropped (kept False,
    output 0). With capacity >= N every pair is kept.
    """
    if decoders.embeddings is not None:
        return decoders.network(z, decoders.embeddings[channels]), jnp.ones(channels.shape, bool)
    num_components = decoders.num_components
    flat = channels.reshape(-1)
    one_hot = jax.nn.one_hot(flat, num_components, dtype=jnp.int32)  # [N M, K]
    position = jnp.sum(
        (jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1
    )  # rank within its channel
    kept = position < capacity
    slot = jnp.where(
        kept, flat * capacity + position, num_components * capacity
    )  # dropped: out of range
    source = (
        jnp.zeros(num_components * capacity, jnp.int32)
        .at[slot]
        .set(jnp.arange(flat.size), mode="drop")
    )
    dispatched = z.reshape(flat.size, -1)[source].reshape(num_components, capacity, -1)
    outputs = decoders(dispatched).reshape(num_components * capacity, -1)[jnp.where(kept, slot, 0)]
    outputs = jnp.where(kept[:, None], outputs, 0.0)
    return outputs.reshape(channels.shape + outputs.shape[-1:]), kept.reshape(channels.shape)


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


@functools.cache
def make_optimizer(learning_rate, *, weight_decay=1e-4, clip_norm=10.0):
    """Global-norm clipping, then AdamW. The learning rate lives in the optimizer state
    (optax.inject_hyperparams), so replicas may each have their own: see with_learning_rate.
    The same settings give the same optimizer object: steps that take it as a static argument
    compile once per process."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.inject_hyperparams(
            optax.adamw, static_args=("b1", "b2", "eps", "eps_root", "weight_decay")
        )(learning_rate, weight_decay=weight_decay),
    )


def with_learning_rate(opt_state, learning_rate):
    """opt_state of make_optimizer with its learning rate replaced (an array [R] for stacked
    replicas)."""
    return optax.tree.set(opt_state, learning_rate=jnp.asarray(learning_rate, jnp.float32))


def init_optimizer(optimizer, model):
    return optimizer.init(eqx.filter(model, eqx.is_inexact_array))


def to_unit_interval(images):
    """uint8 pixels -> float32 in [0, 1]; float images are taken as already scaled."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def train_step(model, opt_state, x, key, sched, objective, optimizer, view=None):
    """One gradient step on batch x (`view`: forward's): returns (model, opt_state, metrics + the
    gradient's global norm before clipping, grad_norm)."""
    (_, metrics), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
        model, x, key, sched, objective, view
    )
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (
        eqx.apply_updates(model, updates),
        opt_state,
        {**metrics, "grad_norm": optax.tree.norm(grads)},
    )


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def train_epoch(
    model, opt_state, images, batch_indices, key, sched, objective, optimizer, neighbors=None
):
    """A whole epoch as one compiled call: lax.scan of train_step over the pre-shuffled
    batch indices [S, B] into the device-resident `images` [N, P]. With `neighbors` [N, k]
    (nearest_neighbors), the consistency term warps a random neighbour of each image.
    Returns (model, opt_state, per-step metrics stacked on axis 0)."""
    params, static = eqx.partition(model, eqx.is_array)

    def step(carry, inputs):
        params, opt_state = carry
        indices, step_key = inputs
        x = to_unit_interval(images[indices])
        view = None
        if neighbors is not None:
            view_indices = neighbor_views(neighbors, indices, jax.random.fold_in(step_key, 2))
            view = to_unit_interval(images[view_indices])
        model, opt_state, metrics = train_step(
            eqx.combine(params, static), opt_state, x, step_key, sched, objective, optimizer, view
        )
        return (eqx.filter(model, eqx.is_array), opt_state), metrics

    step_keys = jax.random.split(key, batch_indices.shape[0])
    (params, opt_state), metrics = jax.lax.scan(
        step, (params, opt_state), (batch_indices, step_keys)
    )
    return eqx.combine(params, static), opt_state, metrics


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def train_replicas(
    models, opt_states, images, batch_indices, keys, sched, objective, optimizer, neighbors=None
):
    """train_epoch of R independent replicas (seeds, restarts, a sweep's points) as one compiled
    call, over the stacked models and optimizer states, their batch orders [R, S, B], keys [R] and
    the objective's array hyperparameters [R] (a sweep's; its Python floats are shared, as are the
    images, the neighbour table and schedule). Under a data-sharded batch_indices XLA runs it
    SPMD."""

    def epoch(model, opt_state, replica_batches, key, objective):
        return train_epoch(
            model, opt_state, images, replica_batches, key, sched, objective, optimizer, neighbors
        )

    return over_replicas(epoch, models, opt_states, batch_indices, keys, objective)


def over_replicas(fn, *stacked):
    """fn on each replica of pytrees stacked on a leading axis R, outputs stacked, in one program.

    One replica: a plain call. Several: filter_vmap on an accelerator (one wide program fills it),
    a lax.map over the replicas on a CPU (a vmapped matmul with replica-specific weights is a
    batched matmul that XLA:CPU runs slower than R plain ones, and a vmapped conv is a grouped
    conv on a generic kernel), so that R replicas never cost more than R runs one after another.
    """
    num_replicas = jax.tree.leaves(eqx.filter(stacked, eqx.is_array))[0].shape[0]
    if num_replicas == 1:
        first = jax.tree.map(lambda leaf: leaf[0] if eqx.is_array(leaf) else leaf, stacked)
        return jax.tree.map(lambda leaf: leaf[None] if eqx.is_array(leaf) else leaf, fn(*first))
    if jax.default_backend() != "cpu":
        return eqx.filter_vmap(fn)(*stacked)
    arrays, static = eqx.partition(stacked, eqx.is_array)
    static_out = []  # the outputs' non-array leaves, recorded when lax.map traces the body

    def body(arrays_r):
        out_arrays, out_static = eqx.partition(fn(*eqx.combine(arrays_r, static)), eqx.is_array)
        static_out.append(out_static)
        return out_arrays

    outputs = jax.lax.map(body, arrays)
    return eqx.combine(outputs, static_out[0])


def map_in_chunks(fn, images, chunk_size=256):
    """fn(x, start) on consecutive chunks x [chunk_size, P] of `images` [N, P] scaled to [0, 1],
    as one lax.map (the last chunk zero-padded); results concatenated and cut to N. Call it under
    jit."""
    num = images.shape[0]
    chunk_size = min(chunk_size, num)
    padded = jnp.pad(images, [(0, -num % chunk_size)] + [(0, 0)] * (images.ndim - 1))
    chunks = padded.reshape((-1, chunk_size) + images.shape[1:])
    starts = jnp.arange(chunks.shape[0]) * chunk_size
    out = jax.lax.map(lambda chunk: fn(to_unit_interval(chunk[0]), chunk[1]), (chunks, starts))
    return jax.tree.map(lambda leaf: leaf.reshape((-1,) + leaf.shape[2:])[:num], out)


@eqx.filter_jit
def evaluate(model, images, sched, objective, chunk_size=256):
    """Deterministic forward pass (no noise) over `images` [N, P] in chunks, then the objective
    over the whole split as one batch; one compiled call. Returns (metrics, terms)."""
    terms = map_in_chunks(
        lambda x, _: forward(model, x, None, sched, objective), images, chunk_size
    )
    _, metrics = aggregate(model, terms, sched, objective)
    return metrics, terms


@eqx.filter_jit
def encode_responsibilities(model, images, sched, chunk_size=256):
    """r = softmax(y') (y' = y + the schedule's logit bias b, on A) of every image of `images`
    [N, P] -> [N, K]: evaluate's terms.responsibilities from the encoder alone (no decoder), in
    chunks; one compiled call."""
    return map_in_chunks(
        lambda x, _: jax.nn.softmax(
            mask_logits(jax.vmap(model.encoder)(x)[0] + sched.logit_bias, sched.active_mask), -1
        ),
        images,
        chunk_size,
    )


@eqx.filter_jit
def validate_replicas(models, images, sched, objective):
    """evaluate's metrics of each of R stacked models on the same images, one compiled call (the
    objective's array hyperparameters [R] per replica, as in train_replicas)."""
    return over_replicas(
        lambda model, objective: evaluate(model, images, sched, objective)[0], models, objective
    )


@eqx.filter_jit
def evaluate_iw(model, images, key, sched, num_samples, chunk_size=256):
    """iw_log_likelihood of every image of `images` [N, P], in chunks -> [N]; one compiled call."""
    return map_in_chunks(
        lambda x, start: iw_log_likelihood(
            model, x, jax.random.fold_in(key, start), sched, num_samples
        ),
        images,
        chunk_size,
    )
