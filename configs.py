"""Run configuration: one flat dataclass, its `--help` (each field's docstring, the fields in
named groups), its validation, and the named presets. The model's and the objective's defaults
come from mixvae.py, their one source."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import textwrap
import typing
from typing import Annotated, Literal

import tyro

import mixvae

# The model's and the objective's defaults have one source, mixvae.py: whoever calls
# mixvae.MixVAE(key, input_dim=...) and mixvae.Objective() directly trains what train.py trains.
MODEL = {
    name: parameter.default
    for name, parameter in inspect.signature(mixvae.MixVAE).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}
OBJECTIVE = mixvae.Objective()


@dataclasses.dataclass(frozen=True)
class Config:
    """Train a mixture VAE whose channel c is regularised by a logit-space MoG prior."""

    # --- run ----------------------------------------------------------------------
    preset: Literal["quick", "categorical", "plain", "mnist"] | None = None
    """Start from a named preset; flags given beside it override it. quick: the reference note's
    quick experiment (logit_mog M=7 sigma=1, no categorical KL, straight-through router, K=20, D=2,
    no routing consistency, 150 epochs). categorical: the classic categorical KL(r || pi) instead
    of the logit-MoG prior, at the settings that suit it: no usage-entropy term (KL to a uniform pi
    already balances usage), the usual logit-head init (its push towards uniform r breaks the
    symmetry), no routing consistency, 150 epochs. plain: the default model and prior without the
    routing consistency (prior sigma 0.7, 150 epochs), the baseline the consistency is measured
    against (README). mnist: full MNIST, 25 epochs (5-epoch anneals, one shared z of size 16,
    width 256, a FiLM-conditioned decoder, prior sigma 0.7, routing consistency with weight 20
    under random warps at strength 1 of one of each image's 10 nearest training images)."""
    seed: int = 0
    """Seed of the initialisation, the shuffling and the noise (and of the data split, unless
    --split-seed is given)."""
    seeds: tuple[int, ...] = ()
    """Train one replica per seed in one process, one compiled epoch for all of them, e.g.
    --seeds 0 1 2 3 4; every replica uses the data split of --split-seed (default --seed).
    Unset: --seed alone."""
    restarts: int = 1
    """Candidates per seed: train N (their own initialisations, batch orders and noise; the
    first starts as the plain run of the seed) and keep one by --restart-choice: by default the
    one with the best validation --monitor value at its best epoch (the objective), as k-means
    keeps the best of its n_init starts by its objective. No label is used. Costs N x the
    training; every candidate's history stays in restart_<j>/ (MNIST results: README,
    Restarts)."""
    restart_choice: Literal["monitor", "agreement"] = "monitor"
    """How --restarts keeps one candidate per seed, without labels. monitor: the best validation
    --monitor value at its best epoch. agreement: the candidate whose clustering recurs in the
    other seeds' runs: the mean over the other seeds of its highest adjusted Rand index with one
    of their candidates (channels of the training images); needs two or more --seeds, and
    couples the seeds' results (README, Results on MNIST, Seed agreement)."""
    sweep: tuple[str, ...] = ()
    """Train a grid of hyperparameters as replicas of one compiled epoch, e.g. --sweep
    prior-mean=3,5,7,9 prior-sigma=0.5,1: the product of the lists (times --seeds and
    --restarts), each point's runs in a directory of its own, and a sweep report at the top.
    Sweepable: prior-mean, prior-sigma, prior-weight, kl-c-weight, beta-z, diversity-weight,
    consistency-weight, dirichlet-weight, augment-strength, learning-rate."""
    split_seed: int | None = None
    """Seed of the train/validation(/test) split; unset: --seed."""
    name: str | None = None
    """Run name, the suffix of runs/<timestamp>-<name>/; unset: the preset or the c-regularizer."""
    out_dir: str | None = None
    """Run directory; unset: runs/<timestamp>-<name>/. Must not exist, or be empty."""
    validate_only: bool = False
    """Validate the config, build the model and trace the loss; print the parameter count and
    where the run would write; train nothing."""

    # --- optimisation -------------------------------------------------------------
    learning_rate: float = 2e-3
    """AdamW learning rate (> 0)."""
    batch_size: int = 128
    """Training batch size (at most the training set size)."""
    epochs: int = 300
    """Maximum number of epochs."""
    patience: int = 20
    """Early stopping: epochs without a better monitored validation metric, counted once both
    anneals are done (0: never stop early). The best parameters are kept. Under the curriculum the
    count and the best value restart at each unlock, and kick epochs are not compared."""
    monitor: Literal["loss", "neg_elbo"] = "loss"
    """Validation metric for early stopping, the best model and curriculum unlocks. With the
    curriculum, loss rewards each opened channel through the usage entropy (w_div < 0) while
    neg_elbo opens one only when the ELBO pays for it."""

    # --- data ---------------------------------------------------------------------
    dataset: Literal["digits", "mnist", "fashion-mnist"] = "digits"
    """Dataset. digits: scikit-learn's 8x8 handwritten digits (1797 images, shipped, offline).
    mnist, fashion-mnist: the four official IDX files from --data-dir (downloaded when missing,
    MD5-checked); the official 10000-image test split."""
    data_dir: str | None = None
    """Directory of the IDX files; unset: $MIXVAE_DATA_DIR/<dataset>, else
    ~/.cache/mixvae/data/<dataset>."""
    num_samples: int | None = None
    """Use a stratified subset of this many training images (seeded), the validation images held
    out of it; unset: all."""
    val_split: float = 0.1
    """Fraction of the training images held out for validation, in (0, 1)."""

    # --- model --------------------------------------------------------------------
    num_components: int = MODEL["num_components"]
    """K, the number of channels (mixture components)."""
    latent_dim: int = MODEL["latent_dim"]
    """D, the size of each channel's latent z_k."""
    latent_layout: Literal["decentralized", "shared"] = MODEL["latent_layout"]
    """decentralized: one posterior q(z_k|x) per channel; shared: one q(z|x) for all channels."""
    encoder: Literal["mlp", "conv"] = MODEL["encoder"]
    """Encoder trunk."""
    decoder: Literal["mlp", "conv"] = MODEL["decoder"]
    """Decoder network (conv: transposed convolutions)."""
    decoder_conditioning: Literal["concat", "film", "separate"] = MODEL["conditioning"]
    """How a decoder knows its channel: concat or film a learned embedding into one shared
    decoder, or separate decoders (K weight sets)."""
    hidden_dim: int = MODEL["width"]
    """Width of the MLP layers."""
    logit_init_scale: float = MODEL["logit_init_scale"]
    """Multiplier of the channel-logit head's initial weights (> 0): large enough that the first
    routing already depends on the input, so the channels specialise instead of collapsing."""
    likelihood: Literal["bernoulli", "gaussian", "heteroscedastic"] = MODEL["likelihood"]
    """p(x | x_hat): bernoulli (logits), gaussian (fixed sigma 0.1), heteroscedastic (one
    sigma per image, in [0.05, 1])."""
    learnable_pi: bool = MODEL["learnable_pi"]
    """Learn the mixture weights pi; off: pi is fixed uniform."""

    # --- objective ----------------------------------------------------------------
    c_regularizer: Literal["categorical", "logit_mog", "both"] = OBJECTIVE.c_regularizer
    """Regulariser of q(c|x): the categorical KL(r || pi), the logit-MoG prior, or both."""
    prior_mean: float = OBJECTIVE.prior_mean
    """M, the logit-MoG component means M e_k; peakiness grows with M / sigma."""
    prior_sigma: float = OBJECTIVE.prior_sigma
    """sigma, the logit-MoG component standard deviation (> 0)."""
    prior_weight: float = OBJECTIVE.prior_weight
    """lambda, weight of the logit-MoG penalty -log p_mix(y(x)) (logit_mog and both)."""
    kl_c_weight: float = OBJECTIVE.kl_c_weight
    """w_cat, weight of KL(r || pi) (categorical and both)."""
    kl_c_anneal_epochs: int = 10
    """Epochs of linear warm-up a(e) = min(1, (e+1)/N) shared by both c-terms (0: none)."""
    beta_z: float = OBJECTIVE.beta_z
    """beta_z, weight of KL(q(z|x) || N(0, I))."""
    diversity_weight: float = OBJECTIVE.diversity_weight
    """w_div, weight of the usage entropy H(E_batch r); negative rewards diverse usage. Without
    it the logit-MoG prior is minimised by sending every image to one channel (the shared logit
    bias is the quickest way to a mode), so the default rewards balanced usage strongly."""
    consistency_weight: float = OBJECTIVE.consistency_weight
    """w_cons, weight of the routing-consistency term: the symmetric KL between r(x) and the
    routing of a randomly warped copy of x (training only; 0: off). It asks the channel to be
    invariant to slant, size and position, so that channels split by class, not by style."""
    augment_strength: float = OBJECTIVE.augment_strength
    """Scale of that warp (>= 0): at 1, rotation up to 15 degrees, scale 10 %, shear 0.2,
    shift 2 pixels."""
    consistency_neighbors: int = 5
    """k > 0: the consistency term warps, instead of x itself, one of x's k nearest training
    images, drawn anew at each step (Euclidean distance between the deskewed images' projections
    on their first 50 principal axes, computed once per run, no label read), so that the channel
    is also invariant to what separates an image from its nearest neighbours. 0: x itself.
    Unused while --consistency-weight is 0."""
    dirichlet_alpha: float | None = OBJECTIVE.dirichlet_alpha
    """Dirichlet concentration alpha of the MAP penalty on pi (> 0); unset: no penalty."""
    dirichlet_weight: float = OBJECTIVE.dirichlet_weight
    """w_dir, weight of the Dirichlet MAP penalty."""

    # --- router -------------------------------------------------------------------
    router: Literal["softmax", "gumbel", "straight_through"] = OBJECTIVE.router
    """How channel weights s are drawn from the logits: s = softmax(y), a Gumbel-softmax sample,
    or its straight-through one-hot."""
    gumbel_temperature: float = 1.0
    """Initial Gumbel-softmax temperature tau (> 0)."""
    gumbel_temperature_min: float = 0.5
    """Final temperature, reached after the anneal (> 0, <= the initial temperature)."""
    gumbel_temperature_anneal_epochs: int = 20
    """Epochs of exponential temperature decay from the initial to the final value (0: none)."""

    # --- curriculum ---------------------------------------------------------------
    curriculum: bool = False
    """Start with few open channels and unlock the next one whenever the validation loss
    plateaus, so the run discovers how many channels the data needs. It clusters worse than
    the flat run on digits and MNIST (five seeds each: -0.08 and -0.06 accuracy; README)."""
    curriculum_start: int = 1
    """Open channels at the start (1..K)."""
    unlock_patience: int = 5
    """Epochs without an improvement of the validation loss by --unlock-min-delta that unlock
    the next channel. Unlocking stops at K, or when the last unlock did not improve the loss
    within this window. Each channel trains to a plateau first: on digits about 35 epochs a
    channel, so open all ten with --epochs 500."""
    unlock_min_delta: float = 0.002
    """Improvement of the validation loss that counts, as a fraction of the validation -ELBO
    (>= 0; the loss itself can be near zero)."""
    kick_epochs: int = 3
    """Epochs after an unlock during which routing is softened (0: no kick). Their validation
    losses count neither for unlocking nor for the best model."""
    kick_temperature: float = 2.0
    """Router temperature during a kick, at least the scheduled one; straight-through is off."""
    kick_logit_bias: float = 2.0
    """Added to the new channel's routing logit during a kick."""
    kick_prior_scale: float = 0.5
    """Multiplies the logit-MoG term during a kick (>= 0)."""

    # --- checkpoints --------------------------------------------------------------
    checkpoint_every: int = 10
    """Save the full training state (models, optimizer states, keys, shufflers, early-stopping
    and curriculum state, history) every this many epochs, and always at the end or when
    interrupted (0: only then)."""
    resume: str | None = None
    """Continue the run in this directory, in place, up to --epochs in total, from its last
    checkpoint. Its config.json gives every setting but --epochs (this call's), and
    --checkpoint-every, --eval-iw-samples and --figures when this call sets them."""
    overwrite: bool = False
    """Replace an existing run directory given as --out-dir (only one that holds a config.json)."""
    eval_only: bool = False
    """Evaluate the run in --checkpoint again without training, and rewrite its evaluation,
    figures and REPORT.md."""
    checkpoint: str | None = None
    """The run directory that --eval-only evaluates."""
    eval_iw_samples: int = 50
    """Importance samples S of the test -log p(x) estimate (iw_nll in summary.json; 0: skip)."""
    figures: bool = True
    """Draw the PNG figures that REPORT.md shows (--no-figures: the report without them, e.g.
    for the many runs of a sweep)."""

    # --- speed --------------------------------------------------------------------
    top_m: int | None = OBJECTIVE.top_m
    """Training decodes only each image's M channels with the largest routing scores, their weights
    s renormalised over them (1 <= M <= K; M = K is exact; unset: every channel). An approximation:
    the other channels' decoders get no reconstruction gradient from that image, and the router's
    gradient sees only the M decoded losses. Validation, test and figures decode every channel."""
    top_m_capacity: float = OBJECTIVE.top_m_capacity
    """With --top-m and separate decoders: each channel decodes at most
    min(B, ceil(capacity x B M / K)) images of a batch (>= 1); images past it are dropped from that
    channel for the step (the mixture-of-experts capacity factor)."""
    devices: int | None = None
    """Data-parallel devices: each batch is sharded over this many devices (SPMD, parameters
    replicated); unset: all of them (this process's, or every process's with --distributed).
    --batch-size must divide by it."""
    distributed: bool = False
    """Join a multi-process run (several hosts, or several processes on one): each process runs
    the same command with its own --process-id, jax.distributed connects them, and each batch is
    sharded over every process's devices. Process 0 alone writes the run directory. Unset
    --coordinator-address, --num-processes and --process-id are read from the environment
    (SLURM, Open MPI, Kubernetes and Cloud TPU are detected; JAX_COORDINATOR_ADDRESS)."""
    coordinator_address: str | None = None
    """With --distributed: host:port of process 0, where the others connect."""
    num_processes: int | None = None
    """With --distributed: the number of processes."""
    process_id: int | None = None
    """With --distributed: this process's id, 0 .. --num-processes - 1."""


# --help shows Config's fields in these groups, in Config's order: title -> (what the group
# sets, its fields).
HELP_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "run": (
        "What to train, how many times, and where it writes.",
        (
            *("preset", "seed", "seeds", "restarts", "restart_choice", "sweep", "split_seed"),
            *("name", "out_dir"),
            "validate_only",
        ),
    ),
    "optimisation": (
        "AdamW, batches, epochs and early stopping.",
        ("learning_rate", "batch_size", "epochs", "patience", "monitor"),
    ),
    "data": ("The dataset and its splits.", ("dataset", "data_dir", "num_samples", "val_split")),
    "model": (
        "The networks: encoder, channel-logit head, decoders, likelihood, mixture weights.",
        (
            *("num_components", "latent_dim", "latent_layout", "encoder", "decoder"),
            *("decoder_conditioning", "hidden_dim", "logit_init_scale", "likelihood"),
            "learnable_pi",
        ),
    ),
    "objective": (
        "The loss: the c-regulariser and the weight of every term (mixvae.Objective).",
        (
            *("c_regularizer", "prior_mean", "prior_sigma", "prior_weight", "kl_c_weight"),
            *("kl_c_anneal_epochs", "beta_z", "diversity_weight", "consistency_weight"),
            *("augment_strength", "consistency_neighbors", "dirichlet_alpha", "dirichlet_weight"),
        ),
    ),
    "router": (
        "How the channel weights s are drawn from the logits, and the temperature's anneal.",
        (
            *("router", "gumbel_temperature", "gumbel_temperature_min"),
            "gumbel_temperature_anneal_epochs",
        ),
    ),
    "curriculum": (
        "Open the channels one at a time (off by default).",
        (
            *("curriculum", "curriculum_start", "unlock_patience", "unlock_min_delta"),
            *("kick_epochs", "kick_temperature", "kick_logit_bias", "kick_prior_scale"),
        ),
    ),
    "checkpoints": (
        "Checkpoints, resuming, and the evaluation (again, of a finished run).",
        (
            *("checkpoint_every", "resume", "overwrite", "eval_only", "checkpoint"),
            *("eval_iw_samples", "figures"),
        ),
    ),
    "speed": (
        "Approximations and devices that make training faster.",
        (
            *("top_m", "top_m_capacity", "devices", "distributed", "coordinator_address"),
            *("num_processes", "process_id"),
        ),
    ),
}


def field_help(cls: type) -> dict[str, str]:
    """Each field's docstring (the string after it in the class body) as one paragraph."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        field.target.id: " ".join(doc.value.value.split())
        for field, doc in itertools.pairwise(body)
        if isinstance(field, ast.AnnAssign)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
    }


def grouped_flags(default: Config) -> type:
    """The command line as tyro reads it: one dataclass per HELP_GROUPS entry (flag names without
    a group prefix), each field's default from `default`; `to_config` turns a parsed one into a
    Config. An optional field shows its type, not `{None}|`; an unset one "(default: unset)"."""
    types = typing.get_type_hints(Config)
    helps = field_help(Config)

    def annotated(name: str) -> object:
        kind, hint = types[name], {}
        if type(None) in typing.get_args(kind):
            (inner,) = [t for t in typing.get_args(kind) if t is not type(None)]
            choices = typing.get_args(inner)
            metavar = "{" + ",".join(choices) + "}" if choices else inner.__name__.upper()
            hint = {"metavar": metavar}
        if getattr(default, name) in (None, ()):
            hint["help_behavior_hint"] = "(default: unset)"
        return Annotated[kind, tyro.conf.arg(help=helps[name], **hint)]

    groups = {}
    for title, (about, names) in HELP_GROUPS.items():
        fields = [(n, annotated(n), dataclasses.field(default=getattr(default, n))) for n in names]
        group = dataclasses.make_dataclass(title.capitalize(), fields, frozen=True)
        group.__doc__ = about
        groups[title] = group
    flags = dataclasses.make_dataclass(
        "Flags",
        [
            (title, Annotated[group, tyro.conf.OmitArgPrefixes], dataclasses.field(default=group()))
            for title, group in groups.items()
        ],
        frozen=True,
    )
    flags.__doc__ = Config.__doc__
    return flags


def to_config(flags: object) -> Config:
    """A parsed `grouped_flags` instance as the flat Config."""
    return Config(
        **{
            name: getattr(getattr(flags, title), name)
            for title, (_, names) in HELP_GROUPS.items()
            for name in names
        }
    )


PRESETS: dict[str, Config] = {
    "quick": Config(
        preset="quick",
        c_regularizer="logit_mog",
        prior_mean=7.0,
        prior_sigma=1.0,
        prior_weight=1.0,
        kl_c_weight=0.0,
        router="straight_through",
        num_components=20,
        latent_dim=2,
        consistency_weight=0.0,
        consistency_neighbors=0,
        epochs=150,
    ),
    "categorical": Config(
        preset="categorical",
        c_regularizer="categorical",
        diversity_weight=0.0,
        logit_init_scale=1.0,
        consistency_weight=0.0,
        consistency_neighbors=0,
        epochs=150,
    ),
    "plain": Config(
        preset="plain",
        prior_sigma=0.7,
        consistency_weight=0.0,
        consistency_neighbors=0,
        epochs=150,
    ),
    "mnist": Config(
        preset="mnist",
        dataset="mnist",
        latent_dim=16,
        hidden_dim=256,
        latent_layout="shared",
        decoder_conditioning="film",
        prior_sigma=0.7,
        consistency_weight=20.0,
        augment_strength=1.0,
        consistency_neighbors=10,
        epochs=25,
        kl_c_anneal_epochs=5,
        gumbel_temperature_anneal_epochs=5,
    ),
}


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the flag."""


# The float hyperparameters that --sweep trains side by side in one compiled epoch: the
# objective's (arrays per replica, see mixvae.Objective) and the learning rate (per replica in
# the optimizer state).
OBJECTIVE_FLOATS = (
    *("prior_mean", "prior_sigma", "prior_weight", "kl_c_weight", "beta_z"),
    *("diversity_weight", "consistency_weight", "dirichlet_weight", "augment_strength"),
)
SWEEPABLE = (*OBJECTIVE_FLOATS, "learning_rate")


def sweep_grid(config: Config) -> list[dict[str, float]]:
    """--sweep NAME=V1,V2,... [NAME=...] as the product of its lists, the first name varying
    slowest: one {field: value} per grid point ([] without --sweep). ConfigError names the
    first bad entry; each point must be a valid config in its own right."""
    lists = {}
    for entry in config.sweep:
        problem = f"--sweep {entry!r} is not allowed"
        name, equals, values = entry.partition("=")
        field = name.strip().replace("-", "_")
        if not equals or not name.strip():
            raise ConfigError(f"{problem}: write NAME=V1,V2,... (e.g. prior-mean=3,5,7)")
        if field not in SWEEPABLE:
            known = field in {f.name for f in dataclasses.fields(Config)}
            why = (
                "not a flag"
                if not known
                else "swept by --seeds S1 S2 ..."
                if field == "seed"
                else "not sweepable in one compiled program (run one process per value)"
            )
            raise ConfigError(
                f"{problem}: {name.strip()} is {why} (sweepable: "
                + ", ".join(flag(f)[2:] for f in SWEEPABLE)
                + ")"
            )
        if field in lists:
            raise ConfigError(f"{problem}: {flag(field)[2:]} is swept twice")
        if not values.strip():
            raise ConfigError(f"{problem}: it lists no values")
        try:
            numbers = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ConfigError(
                f"{problem}: its values must be numbers, comma-separated without spaces"
            ) from None
        if len(set(numbers)) != len(numbers):
            raise ConfigError(f"{problem}: a value is listed twice")
        lists[field] = numbers
    idle = {  # swept name -> why every point would train the same run
        "kl_c_weight": config.c_regularizer == "logit_mog" and "with --c-regularizer logit_mog",
        "prior_mean": config.c_regularizer == "categorical" and "with --c-regularizer categorical",
        "prior_sigma": config.c_regularizer == "categorical" and "with --c-regularizer categorical",
        "prior_weight": config.c_regularizer == "categorical"
        and "with --c-regularizer categorical",
        "dirichlet_weight": config.dirichlet_alpha is None and "without --dirichlet-alpha",
        "augment_strength": config.consistency_weight == 0
        and "consistency_weight" not in lists
        and "while --consistency-weight is 0",
    }
    for field in lists:
        if idle.get(field):
            raise ConfigError(f"--sweep {flag(field)[2:]}=... has no effect {idle[field]}")
    grid = [dict(zip(lists, point, strict=True)) for point in itertools.product(*lists.values())]
    names = [point_name(point) for point in grid]
    if len(set(names)) < len(names):
        raise ConfigError(
            f"--sweep is not allowed: two points share the name {max(names, key=names.count)} "
            "(their values differ past 6 significant digits)"
        )
    for point in grid:
        try:
            validate(dataclasses.replace(config, sweep=(), **point))
        except ConfigError as error:
            raise ConfigError(f"--sweep point {point_name(point)}: {error}") from None
    return grid


def point_name(point: dict[str, float]) -> str:
    """A sweep point as flags and values, e.g. prior-mean3-prior-sigma0.5."""
    return "-".join(f"{flag(field)[2:]}{value:g}" for field, value in point.items())


DEFAULT = Config()


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def validate(config: Config) -> Config:
    """Raise ConfigError naming the first bad value and what is allowed; return the config."""
    c = config
    checks = [
        ("num_components", c.num_components >= 1, "an integer >= 1"),
        ("latent_dim", c.latent_dim >= 1, "an integer >= 1"),
        ("hidden_dim", c.hidden_dim >= 1, "an integer >= 1"),
        ("logit_init_scale", c.logit_init_scale > 0, "> 0"),
        ("val_split", 0.0 < c.val_split < 1.0, "a fraction in (0, 1)"),
        ("eval_iw_samples", c.eval_iw_samples >= 0, "an integer >= 0"),
        (
            "num_samples",
            c.num_samples is None or c.num_samples >= 20,
            "an integer >= 20 (or unset)",
        ),
        ("gumbel_temperature", c.gumbel_temperature > 0, "> 0"),
        ("gumbel_temperature_min", c.gumbel_temperature_min > 0, "> 0"),
        # the pair's bound names the flag that moved away from its default
        (
            "gumbel_temperature_min",
            c.gumbel_temperature_min <= c.gumbel_temperature
            or c.gumbel_temperature_min == DEFAULT.gumbel_temperature_min,
            f"at most --gumbel-temperature={c.gumbel_temperature}",
        ),
        (
            "gumbel_temperature",
            c.gumbel_temperature >= c.gumbel_temperature_min,
            f"at least --gumbel-temperature-min={c.gumbel_temperature_min} (lower that too)",
        ),
        ("gumbel_temperature_anneal_epochs", c.gumbel_temperature_anneal_epochs >= 0, ">= 0"),
        ("kl_c_anneal_epochs", c.kl_c_anneal_epochs >= 0, ">= 0"),
        ("kl_c_weight", c.kl_c_weight >= 0, ">= 0"),
        ("prior_sigma", c.prior_sigma > 0, "> 0"),
        ("prior_weight", c.prior_weight >= 0, ">= 0"),
        ("beta_z", c.beta_z >= 0, ">= 0"),
        ("consistency_weight", c.consistency_weight >= 0, ">= 0"),
        ("augment_strength", c.augment_strength >= 0, ">= 0"),
        ("consistency_neighbors", c.consistency_neighbors >= 0, "an integer >= 0"),
        (
            "top_m",
            c.top_m is None or 1 <= c.top_m <= c.num_components,
            f"in [1, --num-components={c.num_components}] (or unset)",
        ),
        ("top_m_capacity", c.top_m_capacity >= 1, ">= 1"),
        ("dirichlet_alpha", c.dirichlet_alpha is None or c.dirichlet_alpha > 0, "> 0 (or unset)"),
        ("learning_rate", c.learning_rate > 0, "> 0"),
        ("batch_size", c.batch_size >= 1, "an integer >= 1"),
        ("epochs", c.epochs >= 1, "an integer >= 1"),
        ("patience", c.patience >= 0, ">= 0"),
        ("checkpoint_every", c.checkpoint_every >= 0, ">= 0"),
        ("seeds", len(set(c.seeds)) == len(c.seeds), "distinct integers"),
        (
            "seeds",
            len(c.seeds) <= 1 or not c.curriculum,
            "a single seed with --curriculum (its unlocks are per run)",
        ),
        ("devices", c.devices is None or c.devices >= 1, "an integer >= 1 (or unset)"),
        ("restarts", c.restarts >= 1, "an integer >= 1"),
        ("num_processes", c.num_processes is None or c.num_processes >= 1, "an integer >= 1"),
        (
            "process_id",
            c.process_id is None or 0 <= c.process_id < (c.num_processes or c.process_id + 1),
            f"in [0, --num-processes={c.num_processes})",
        ),
        ("restarts", c.restarts == 1 or not c.curriculum, "1 with --curriculum"),
        (
            "restart_choice",
            c.restart_choice == "monitor" or (c.restarts > 1 and len(c.seeds) > 1),
            "'monitor' unless --restarts >= 2 and two or more --seeds are given (agreement "
            "compares a candidate's clustering with the other seeds' candidates)",
        ),
        (
            "devices",
            c.devices is None or c.batch_size % c.devices == 0,
            f"a divisor of --batch-size={c.batch_size} (each device takes an equal share of a "
            "batch)",
        ),
        (
            "curriculum_start",
            1 <= c.curriculum_start <= c.num_components,
            f"in [1, --num-components={c.num_components}]",
        ),
        ("unlock_patience", c.unlock_patience >= 1, "an integer >= 1"),
        ("unlock_min_delta", c.unlock_min_delta >= 0, ">= 0"),
        ("kick_epochs", c.kick_epochs >= 0, ">= 0"),
        ("kick_temperature", c.kick_temperature > 0, "> 0"),
        ("kick_prior_scale", c.kick_prior_scale >= 0, ">= 0"),
    ]
    process_flags = ("coordinator_address", "num_processes", "process_id")
    for name in process_flags:
        if getattr(c, name) is not None and not c.distributed:
            raise ConfigError(f"{flag(name)} is not allowed without --distributed")
    if c.eval_only and c.checkpoint is None:
        raise ConfigError("--eval-only needs --checkpoint RUN_DIR, the run directory to evaluate")
    if c.data_dir is not None and c.dataset == "digits":
        raise ConfigError(
            f"--data-dir={c.data_dir!r} is not allowed with --dataset=digits (shipped with "
            "scikit-learn): it is for --dataset mnist or fashion-mnist"
        )
    for field in dataclasses.fields(Config):
        value = getattr(c, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"{flag(field.name)}={value!r} is not allowed: must be a finite number"
            )
    for field, ok, allowed in checks:
        if not ok:
            raise ConfigError(
                f"{flag(field)}={getattr(c, field)!r} is not allowed: must be {allowed}"
            )
    if c.sweep:
        if c.curriculum:
            raise ConfigError("--sweep is not allowed with --curriculum (its unlocks are per run)")
        sweep_grid(c)
    return config
