"""Train, evaluate and report a mixture VAE.

    python train.py --c-regularizer logit_mog --prior-mean 7
    python train.py --help

Sections, top to bottom (their headers below):
  Command line          tyro flags -> Config, one-line errors
  Data                  the embedded digits, or MNIST-style IDX files (downloaded, MD5-checked)
  Model, objective and  Config -> mixvae.MixVAE, mixvae.Objective, the epoch's Schedule, the
  schedules             curriculum; the data mesh
  Replicas              seeds, restarts and sweep points as one stacked model
  Training              the epoch loop: one compiled call per epoch, early stopping, the
                        training state (checkpoints, --resume, signals, divergence)
  Evaluation            test metrics, clustering scores, IW-NLL
  Artifacts             config.json, history.csv, summary.json, checkpoint.eqx, run directories
  Figures               one run's figures
  REPORT.md             one run's report
  Seeds and sweep       the mean +- std and sweep reports
  reports
  Many processes        --distributed: process 0 writes
  Main                  run(): validate, load, train or resume, evaluate, report; main()
"""

from __future__ import annotations

import time

IMPORTS_START = time.perf_counter()  # the imports below (JAX, Equinox, tyro, ...) are timed

import argparse
import atexit
import contextlib
import csv
import dataclasses
import datetime
import functools
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import configs
import mixvae
from configs import Config, ConfigError

IMPORTS_SEC = time.perf_counter() - IMPORTS_START

# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_config(argv: list[str]) -> Config:
    """tyro flags on top of the defaults of `--preset NAME` (or of Config()), --help in
    configs.HELP_GROUPS. A parse error is a ConfigError of one line (tyro's message without its
    box); --help prints and exits."""
    typed = [arg[2:].split("=")[0] for arg in argv if arg.startswith("--")]
    twice = sorted({name for name in typed if typed.count(name) > 1})
    if twice:
        raise ConfigError(
            f"--{twice[0]} is given twice"
            + (": list every NAME=V1,V2 after one --sweep" if twice[0] == "sweep" else "")
        )
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--preset")
    preset = peek.parse_known_args(argv)[0].preset
    default = configs.PRESETS.get(preset, Config())
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return configs.to_config(tyro.cli(configs.grouped_flags(default), args=argv))
    except SystemExit as exit_:
        if not exit_.code:
            raise
        # tyro's box: a title line (or a top border holding the title), rules, the message
        lines = [line.strip(" │┃") for line in captured.getvalue().splitlines()]
        lines = [line for line in lines if line][1:]
        is_rule = set("-─━╰╯ ").issuperset
        start = next((i for i, line in enumerate(lines) if not is_rule(line)), len(lines))
        end = next((i for i in range(start, len(lines)) if is_rule(lines[i])), len(lines))
        message = " ".join(" ".join(line.split()) for line in lines[start:end] if line)
        raise ConfigError(message.removeprefix("Error parsing ")) from None


def given_flags(argv: list[str]) -> set[str]:
    """Config fields named on the command line: --prior-mean 7 and --no-overwrite both count."""
    names = {arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    return {name.removeprefix("no_") if name not in FIELDS else name for name in names} & FIELDS


FIELDS = {field.name for field in dataclasses.fields(Config)}


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class Split(NamedTuple):
    images: np.ndarray  # [N, P], uint8 (0..255) or float32 in [0, 1]
    labels: np.ndarray  # [N] int


class Dataset(NamedTuple):
    name: str
    train: Split
    val: Split
    test: Split
    image_side: int


DIGITS_TEST_FRACTION = 0.2

# The four standard IDX files of each MNIST-style dataset: mirrors, and each .gz's official MD5.
IDX_DATASETS = {
    "mnist": (
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": (
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}
IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers: unsigned bytes, 3 and 1 dimensions
DIGITS_SIDE = 8  # sklearn's digits are 8 x 8


class DataError(Exception):
    """A missing, corrupt or malformed data file; its message is one line naming the file."""


def data_dir_of(config: Config) -> Path:
    """--data-dir, else $MIXVAE_DATA_DIR/<dataset>, else ~/.cache/mixvae/data/<dataset>."""
    if config.data_dir is not None:
        return Path(config.data_dir)
    root = os.environ.get("MIXVAE_DATA_DIR")
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return (Path(root) if root else cache_home / "mixvae" / "data") / config.dataset


def download(url: str, path: Path) -> None:
    """Fetch `url` into `path` with a progress bar, atomically."""
    with urllib.request.urlopen(url, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, leave=False) as bar:

            def copy(f):
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))

            atomic_write(path, copy)


def fetch_idx_files(dataset: str, data_dir: Path) -> dict[str, Path]:
    """The four files, downloaded first where missing, each checked against its official MD5.
    Downloads land in a temporary directory; data_dir is created only once all of them arrived."""
    mirrors, checksums = IDX_DATASETS[dataset]
    missing = [name for name in checksums if not (data_dir / name).is_file()]
    if missing:
        try:
            with tempfile.TemporaryDirectory(prefix="mixvae-download-") as staging:
                for name in missing:
                    for i, mirror in enumerate(mirrors):
                        try:
                            download(mirror + name, Path(staging) / name)
                            break
                        except OSError:
                            if i == len(mirrors) - 1:
                                raise
                data_dir.mkdir(parents=True, exist_ok=True)
                for name in missing:
                    shutil.move(Path(staging) / name, data_dir / name)
        except OSError as error:
            raise DataError(
                f"{dataset}: {', '.join(missing)} not found in {data_dir} and could not be "
                "downloaded "
                f"({error}); download them from {mirrors[0]} into that directory by hand, or pass "
                "--data-dir DIR holding them"
            ) from None
    for name, expected in checksums.items():
        digest = hashlib.md5((data_dir / name).read_bytes()).hexdigest()
        if digest != expected:
            raise DataError(
                f"{data_dir / name}: MD5 {digest} is not the official {expected} (a corrupt or "
                "truncated file: delete it to download it again)"
            )
    return {name: data_dir / name for name in checksums}


def read_idx(path: Path, magic: int, header_only: bool = False) -> np.ndarray | tuple[int, ...]:
    """An IDX array of unsigned bytes from a gzip file, its header checked against its contents
    (header_only: the shape its header promises, read without decompressing the rest)."""
    ndim = magic & 0xFF
    try:
        if header_only:
            with gzip.open(path) as f:
                raw = f.read(4 + 4 * ndim)
        else:
            raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataError(f"{path}: IDX magic number {found} is not {magic}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if header_only:
        return shape
    values = np.frombuffer(raw, np.uint8, offset=min(len(raw), 4 + 4 * ndim))
    if values.size != int(np.prod(shape)):
        raise DataError(
            f"{path}: the header promises shape {shape} ({int(np.prod(shape))} values) but the "
            f"file holds {values.size}"
        )
    return values.reshape(shape)


def read_idx_split(images_path: Path, labels_path: Path) -> Split:
    images, labels = read_idx(images_path, IDX_IMAGES), read_idx(labels_path, IDX_LABELS)
    if (
        images.shape[1] != images.shape[2]
        or len(images) != len(labels)
        or labels.max(initial=0) > 9
    ):
        raise DataError(
            f"{images_path}: images {images.shape} and labels {labels.shape} (max "
            f"{labels.max(initial=0)}) are not N square images with N labels in 0..9"
        )
    return Split(images.reshape(len(images), -1), labels.astype(np.int64))


def pixels_per_image(config: Config) -> int:
    """Pixels per image of --dataset, known before the images are read: the digits' 8 x 8, or
    what the header of an IDX dataset's training images says (its files fetched and checked)."""
    if config.dataset == "digits":
        return DIGITS_SIDE**2
    paths = fetch_idx_files(config.dataset, data_dir_of(config))
    _, rows, cols = read_idx(paths["train-images-idx3-ubyte.gz"], IDX_IMAGES, header_only=True)
    return rows * cols


def split_seed(config: Config) -> int:
    return config.seed if config.split_seed is None else config.split_seed


def stratified_split(split: Split, seed: int, **size) -> tuple[Split, Split]:
    """scikit-learn's train_test_split of (images, labels), stratified by the labels: `size` is
    its test_size or train_size."""
    from sklearn.model_selection import train_test_split  # scikit-learn: imported where used

    first_x, second_x, first_y, second_y = train_test_split(
        split.images, split.labels, **size, random_state=seed, stratify=split.labels
    )
    return Split(first_x, first_y), Split(second_x, second_y)


def load_dataset(config: Config) -> Dataset:
    """digits: sklearn's 8x8 digits scaled to [0, 1], split train/val/test (stratified, by the
    split seed).
    mnist, fashion-mnist: the official IDX files as uint8; the official test split; --num-samples
    takes a stratified subset of the training split; validation is held out of the training
    split."""
    seed = split_seed(config)
    if config.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.data / 16.0).astype(np.float32)
        everything = Split(images, digits.target.astype(np.int64))
        rest, test = stratified_split(everything, seed, test_size=DIGITS_TEST_FRACTION)
        side = DIGITS_SIDE
    else:
        paths = fetch_idx_files(config.dataset, data_dir_of(config))
        rest = read_idx_split(
            paths["train-images-idx3-ubyte.gz"], paths["train-labels-idx1-ubyte.gz"]
        )
        test = read_idx_split(
            paths["t10k-images-idx3-ubyte.gz"], paths["t10k-labels-idx1-ubyte.gz"]
        )
        side = mixvae.image_side(rest.images.shape[1])
    if config.num_samples is not None and config.num_samples < len(rest.images):
        rest, _ = stratified_split(rest, seed, train_size=config.num_samples)
    training, validation = stratified_split(rest, seed, test_size=config.val_split)
    data = Dataset(config.dataset, training, validation, test, side)
    if config.batch_size > len(data.train.images):
        raise ConfigError(
            f"--batch-size={config.batch_size} is not allowed: must be at most the "
            f"{len(data.train.images)} training images of {data.name}"
        )
    if warps_neighbours(config) and config.consistency_neighbors >= len(data.train.images):
        raise ConfigError(
            f"--consistency-neighbors={config.consistency_neighbors} is not allowed: must be "
            f"fewer than the {len(data.train.images)} training images of {data.name}"
        )
    return data


# --------------------------------------------------------------------------------------
# Model, objective and schedules from the config
# --------------------------------------------------------------------------------------


def data_mesh(config: Config) -> Mesh:
    """A one-axis ("data") mesh over --devices local devices (default: all of them)."""
    available = jax.devices()
    count = len(available) if config.devices is None else config.devices
    if count > len(available):
        raise ConfigError(f"--devices={count} is not allowed: there are {len(available)} device(s)")
    if config.batch_size % count:
        raise ConfigError(
            f"--batch-size={config.batch_size} is not allowed: it must divide by the {count} "
            "devices (set --devices)"
        )
    return Mesh(np.array(available[:count]), ("data",))


def put(tree, sharding):
    """device_put the arrays of a pytree (an Equinox module, say) with `sharding`; onto other
    processes' devices too (--distributed), from host memory, every process holding the same."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    if not sharding.is_fully_addressable:
        arrays = jax.device_get(arrays)
    return eqx.combine(jax.device_put(arrays, sharding), static)


def model_settings(config: Config) -> tuple[tuple[str, object], ...]:
    """The mixvae.MixVAE keyword arguments that the config sets, as (name, value) pairs."""
    return (
        ("num_components", config.num_components),
        ("latent_dim", config.latent_dim),
        ("latent_layout", config.latent_layout),
        ("encoder", config.encoder),
        ("decoder", config.decoder),
        ("conditioning", config.decoder_conditioning),
        ("likelihood", config.likelihood),
        ("width", config.hidden_dim),
        ("logit_init_scale", config.logit_init_scale),
        ("learnable_pi", config.learnable_pi),
    )


def build_model(config: Config, input_dim: int, key):
    return mixvae.MixVAE(key, input_dim=input_dim, **dict(model_settings(config)))


def build_objective(config: Config):
    return mixvae.Objective(
        c_regularizer=config.c_regularizer,
        kl_c_weight=config.kl_c_weight,
        prior_weight=config.prior_weight,
        prior_mean=config.prior_mean,
        prior_sigma=config.prior_sigma,
        beta_z=config.beta_z,
        dirichlet_alpha=config.dirichlet_alpha,
        dirichlet_weight=config.dirichlet_weight,
        diversity_weight=config.diversity_weight,
        router=config.router,
        consistency_weight=config.consistency_weight,
        augment_strength=config.augment_strength,
        top_m=config.top_m,
        top_m_capacity=config.top_m_capacity,
    )


@dataclasses.dataclass
class Curriculum:
    """Plateau-driven channel unlocking ("pots"). Call `update` once per epoch with the monitored
    validation loss and the validation -ELBO; a channel opens when the loss has not improved by
    min_delta x (-ELBO) for `patience` epochs, and each unlock starts a kick of `kick_epochs`
    epochs. The -ELBO sets the scale because the loss itself can be near zero (the usage-entropy
    reward offsets the -ELBO). Kick epochs train a softened objective, so their losses are
    neither compared nor counted. Unlocking stops at K, or when the plateau after an unlock is no
    better than the plateau before it."""

    num_components: int
    k_active: int
    patience: int
    min_delta: float
    kick_epochs: int
    best: float = float("inf")
    since_best: int = 0
    kick_left: int = 0
    best_before_unlock: float | None = None
    unlock_epochs: list[int] = dataclasses.field(default_factory=list)
    unlocking: bool = True

    @classmethod
    def from_config(cls, config: Config) -> Curriculum | None:
        if not config.curriculum:
            return None
        return cls(
            config.num_components,
            config.curriculum_start,
            config.unlock_patience,
            config.unlock_min_delta,
            config.kick_epochs,
        )

    def update(self, epoch: int, monitored: float, neg_elbo: float) -> bool:
        """Record epoch `epoch` (1-based); return True when a channel opens for the next epoch."""
        if self.kick_left > 0:
            self.kick_left -= 1
            return False

        def improves_on(loss: float, reference: float) -> bool:
            return loss < reference - self.min_delta * abs(neg_elbo)

        if improves_on(monitored, self.best):
            self.best, self.since_best = monitored, 0
        else:
            self.since_best += 1
        if not self.unlocking or self.since_best < self.patience:
            return False
        if self.k_active >= self.num_components or (
            self.best_before_unlock is not None
            and not improves_on(self.best, self.best_before_unlock)
        ):
            self.unlocking = False
            return False
        self.best_before_unlock = self.best
        self.k_active += 1
        self.since_best = 0
        self.kick_left = self.kick_epochs
        self.unlock_epochs.append(epoch)
        return True


def schedule(config: Config, epoch: int, k_active: int | None = None, kick: bool = False):
    """mixvae.epoch_schedule at the config's anneals: the first `k_active` channels open (all by
    default), and the config's kick when `kick`."""
    return mixvae.epoch_schedule(
        epoch,
        config.num_components,
        c_anneal_epochs=config.kl_c_anneal_epochs,
        temperature=config.gumbel_temperature,
        temperature_min=config.gumbel_temperature_min,
        temperature_anneal_epochs=config.gumbel_temperature_anneal_epochs,
        k_active=k_active,
        kick=mixvae.Kick(config.kick_temperature, config.kick_logit_bias, config.kick_prior_scale)
        if kick
        else None,
    )


def anneals_done(config: Config, epoch: int) -> bool:
    """Early stopping compares losses only once a(e) and tau(e) have reached their final values."""
    return epoch + 1 >= max(config.kl_c_anneal_epochs, config.gumbel_temperature_anneal_epochs + 1)


# --------------------------------------------------------------------------------------
# Replicas: seeds, restarts and sweep points, side by side in one compiled epoch
# --------------------------------------------------------------------------------------


def replica_seeds(config: Config) -> tuple[int, ...]:
    """The seeds: --seeds, else --seed alone."""
    return config.seeds or (config.seed,)


def sweep_points(config: Config) -> list[Config]:
    """The config of each --sweep grid point (without --sweep); [config] without a sweep."""
    return [
        dataclasses.replace(config, sweep=(), **point) for point in configs.sweep_grid(config)
    ] or [config]


def warps_neighbours(config: Config) -> bool:
    """Whether the consistency term warps neighbours: k > 0 and a consistency weight > 0 (at one
    --sweep point at least)."""
    weights = [point.consistency_weight for point in sweep_points(config)]
    return config.consistency_neighbors > 0 and max(weights) > 0


def replicas(config: Config) -> list[tuple[int, int]]:
    """The (seed, restart) pairs trained side by side: --restarts candidates per seed, for each
    sweep point (point-major)."""
    pairs = [(seed, j) for seed in replica_seeds(config) for j in range(config.restarts)]
    return pairs * len(sweep_points(config))


def swept_names(config: Config) -> list[str]:
    return list(configs.sweep_grid(config)[0]) if config.sweep else []


def replica_objective(config: Config) -> mixvae.Objective:
    """The objective of the replicas: build_objective(config), each hyperparameter swept by
    --sweep an array [R] of the replicas' values (a point's value for each of its seeds and
    restarts)."""
    swept = {
        name: replica_values(config, name)
        for name in swept_names(config)
        if name in configs.OBJECTIVE_FLOATS
    }
    return dataclasses.replace(build_objective(config), **swept)


def replica_values(config: Config, name: str) -> np.ndarray:
    """Config field `name` of every replica, [R] float32: its sweep point's value, repeated for
    the point's seeds and restarts."""
    points = sweep_points(config)
    repeats = len(replicas(config)) // len(points)
    return np.repeat(np.array([getattr(point, name) for point in points], np.float32), repeats)


def replica_keys(pairs) -> jax.Array:
    """Per (seed s, restart j): key(s), folded with j when j > 0, split into (init, train,
    figures, importance sampling) keys -> [R, 4]. Restart 0 is the plain run of seed s."""
    seeds, restarts = np.array(pairs).reshape(-1, 2).T
    return split_replica_keys(seeds, restarts)


@jax.jit
@jax.vmap
def split_replica_keys(seed, restart):
    key = jax.random.key(seed)
    return jax.random.split(jnp.where(restart > 0, jax.random.fold_in(key, restart), key), 4)


def shuffler(seed: int, restart: int) -> np.random.Generator:
    """The generator of a replica's batch order; restart 0's is the plain run's."""
    return np.random.default_rng(seed if restart == 0 else [seed, restart])


def build_replicas(config: Config, input_dim: int, init_keys):
    """One model per key, stacked on a leading replica axis."""
    program, static = init_program(model_settings(config), input_dim, len(init_keys))
    return eqx.combine(program(init_keys), static)


@functools.cache
def init_program(settings: tuple, input_dim: int, count: int):
    """(compiled initialiser of `count` stacked models: keys [count] -> their arrays, the
    models' non-array parts), once per process for each architecture. Compiled at the lowest
    optimisation level: it runs once, so optimising threefry's unrolled rounds for every
    initialiser would cost more than it saves (README, Speed)."""

    def build(keys):
        model = functools.partial(mixvae.MixVAE, input_dim=input_dim, **dict(settings))
        return eqx.filter_vmap(model)(keys)

    def arrays(keys):
        return eqx.filter(build(keys), eqx.is_array)

    keys = jax.ShapeDtypeStruct((count,), jax.random.key(0).dtype)
    program = (
        jax.jit(arrays).lower(keys).compile(compiler_options={"xla_backend_optimization_level": 0})
    )
    static = eqx.filter(
        eqx.filter_eval_shape(build, keys),
        lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct),
        inverse=True,
    )
    return program, static


def replica(stacked, r: int):
    """Replica r of a pytree stacked on a leading replica axis (one compiled program for every
    r, not one slice per leaf shape)."""
    return take_replica(stacked, jnp.asarray(r))


@eqx.filter_jit
def take_replica(stacked, r):
    arrays, static = eqx.partition(stacked, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a: a[r], arrays), static)


@eqx.filter_jit
def select_replicas(take, new, old):
    """Per replica r: new[r] where take[r], else old[r] (pytrees stacked on axis 0)."""
    arrays, static = eqx.partition(new, eqx.is_array)
    chosen = jax.tree.map(
        lambda n, o: jnp.where(take.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
        arrays,
        eqx.filter(old, eqx.is_array),
    )
    return eqx.combine(chosen, static)


def replica_outcome(result: TrainResult, outcome: Outcome) -> Outcome:
    """How one replica's training ended: the run's outcome, unless the replica diverged on its
    own and stopped while the others trained on."""
    if not result.diverged:
        return outcome
    kept = f"the best model of its {len(result.history)} finite epoch(s), evaluated"
    return Outcome("diverged", result.diverged, kept=kept)


def describe_replicas(config: Config) -> str:
    """e.g. "8 sweep points x 3 seeds x 2 restarts = 48 replicas"."""
    counts = [
        (len(sweep_points(config)), "sweep points"),
        (len(replica_seeds(config)), "seeds"),
        (config.restarts, "restarts"),
    ]
    parts = [f"{count} {what}" for count, what in counts if count > 1]
    total = len(replicas(config))
    return " x ".join(parts) + (f" = {total} replicas" if len(parts) > 1 else "") or "one replica"


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def to_floats(metrics) -> dict[str, float]:
    """The scalar metrics of mixvae.METRICS, in its order, as Python floats."""
    return {name: float(metrics[name]) for name in mixvae.METRICS}


def replica_floats(stacked_metrics) -> list[dict[str, float]]:
    """to_floats of each replica of metrics stacked on a leading replica axis (one transfer)."""
    host = jax.device_get(stacked_metrics)
    return [
        to_floats({name: value[r] for name, value in host.items()})
        for r in range(len(host["loss"]))
    ]


summarize_replicas = jax.jit(jax.vmap(mixvae.summarize))  # epoch metrics of every replica, one call


class TrainResult(NamedTuple):
    """One replica's outcome: its best model and its history (with --restarts, the chosen
    candidate's, and every candidate's monitored validation value at its best epoch)."""

    seed: int
    model: object
    history: list[dict]
    best_epoch: int  # counted from 1: history[best_epoch - 1]
    best_k_active: int
    training_time: float
    compile_time: float
    curriculum: Curriculum | None
    restart: int = 0
    restart_scores: tuple[float, ...] = ()
    restart_recurrence: tuple[float, ...] = ()  # with --restart-choice agreement
    diverged: str = ""  # why this replica stopped early on a non-finite value, or ""


def choose_restarts(
    results: list[TrainResult], restarts: int, monitor: str, recurrence=None
) -> list[TrainResult]:
    """Per seed, one of its `restarts` candidates (consecutive in `results`), without labels:
    the one with the lowest monitored validation value at its best epoch, the criterion that
    already picks each run's best epoch, as k-means keeps the best of its n_init starts by its
    own objective; or, given each candidate's `recurrence` ([len(results)], --restart-choice
    agreement), the one whose clustering recurs most in the other seeds' runs, ties to the lower
    monitored value."""
    chosen = []
    for first in range(0, len(results), restarts):
        candidates = results[first : first + restarts]
        scores = tuple(c.history[c.best_epoch - 1][f"val_{monitor}"] for c in candidates)
        best = int(np.argmin(scores))
        recurring = ()
        if recurrence is not None:
            recurring = tuple(float(value) for value in recurrence[first : first + restarts])
            best = max(range(restarts), key=lambda j: (recurring[j], -scores[j]))
        chosen.append(
            candidates[best]._replace(
                restart=best, restart_scores=scores, restart_recurrence=recurring
            )
        )
    return chosen


def recurrence(channels: list[np.ndarray], seeds: list[int]) -> np.ndarray:
    """How far each candidate's clustering recurs in the other seeds' runs, label-free: for
    candidate i of seed s, the mean over the other seeds t of max_j ARI(channels_i, channels_j),
    j over t's candidates; channels: argmax_k r of the same training images, [N] each. A
    partition that several seeds reach scores high; one that a single start fell into, low."""
    count, seeds, ari = len(channels), np.asarray(seeds), pairwise_ari(channels)
    return np.array(
        [
            np.mean([ari[i, seeds == t].max() for t in np.unique(seeds) if t != seeds[i]])
            for i in range(count)
        ]
    )


def candidates_recurrence(results: list[TrainResult], config: Config, data) -> np.ndarray:
    """recurrence() of every candidate among the candidates of its own sweep point."""
    per_point = len(replica_seeds(config)) * config.restarts
    channels = [
        train_channels(result.model, config, data, result.best_k_active) for result in results
    ]
    return np.concatenate(
        [
            recurrence(
                channels[first : first + per_point],
                [result.seed for result in results[first : first + per_point]],
            )
            for first in range(0, len(results), per_point)
        ]
    )


@dataclasses.dataclass
class TrainState:
    """Everything the training loop carries from one epoch to the next, for R replicas: what a
    checkpoint holds, so that a resumed run continues bit for bit."""

    epoch: int  # epochs completed
    models: object  # replicas stacked on axis 0
    opt_states: object
    keys: jax.Array  # [R] PRNG keys
    best_models: object
    rngs: list  # per replica, the numpy Generator that shuffles its batches
    best_value: np.ndarray  # [R] best monitored validation value
    best_epoch: np.ndarray  # [R] its epoch (0-based), -1 before the anneals end
    since_best: np.ndarray  # [R] epochs without improvement
    running: np.ndarray  # [R] not early-stopped
    best_k_active: int
    curriculum: Curriculum | None
    histories: list  # per replica, one dict per epoch
    training_time: float = 0.0  # seconds spent training, summed over this run's resumptions
    diverged: list = dataclasses.field(default_factory=list)  # per replica: why it stopped, or ""

    def k_active(self, config: Config) -> int:
        """|A|: the channels open now (all of them without a curriculum)."""
        return config.num_components if self.curriculum is None else self.curriculum.k_active

    def track_best(
        self,
        config: Config,
        models,
        monitored,
        epoch: int,
        k_active: int,
        *,
        unlocked: bool,
        kick_active: bool,
    ) -> np.ndarray:
        """Early stopping after `epoch` (0-based), per running replica: an unlock changes the
        objective, so the best value is forgotten; once the anneals are done and outside a kick,
        a lower monitored validation value [R] keeps that replica of `models` as its best; a
        replica stops after --patience epochs without one. Returns the replicas that stop now."""
        if unlocked:
            self.best_value[:], self.since_best[:] = np.inf, 0
        elif anneals_done(config, epoch) and not kick_active:
            improved = self.running & (monitored < self.best_value)
            self.best_models = select_replicas(jnp.asarray(improved), models, self.best_models)
            self.best_value[improved], self.best_epoch[improved] = monitored[improved], epoch
            self.since_best = np.where(improved, 0, self.since_best + 1)
            self.best_k_active = k_active if improved[0] else self.best_k_active
        stopping = np.flatnonzero(
            self.running & (self.since_best >= config.patience) if config.patience else []
        )
        self.running[stopping] = False
        return stopping


@eqx.filter_jit
def init_optimizers(optimizer, models):
    """The optimizer state of each stacked replica."""
    return eqx.filter_vmap(functools.partial(mixvae.init_optimizer, optimizer))(models)


def host_cpu():
    """This process's first CPU device, or None (the default device) where JAX has no CPU
    backend (JAX_PLATFORMS=cuda)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def initial_state(config: Config, input_dim: int) -> TrainState:
    """Fresh replicas, one per (seed, restart): models from their init keys, training keys,
    shufflers. Built on the CPU, also where the training runs on a GPU: the initialiser runs
    once, and compiling it for the GPU costs more than the copy (train() places the state)."""
    pairs = replicas(config)
    with jax.default_device(host_cpu()):
        keys = replica_keys(pairs)  # [R, 4]: init, train, figures, importance sampling
        models = build_replicas(config, input_dim, keys[:, 0])
        opt_states = init_optimizers(mixvae.make_optimizer(config.learning_rate), models)
        if "learning_rate" in swept_names(config):
            values = replica_values(config, "learning_rate")
            opt_states = mixvae.with_learning_rate(opt_states, values)
    count = len(pairs)
    return TrainState(
        0,
        models,
        opt_states,
        keys[:, 1],
        models,
        [shuffler(seed, restart) for seed, restart in pairs],
        np.full(count, np.inf),
        np.full(count, -1),
        np.zeros(count, int),
        np.ones(count, bool),
        config.num_components,
        Curriculum.from_config(config),
        [[] for _ in pairs],
        diverged=["" for _ in pairs],
    )


STATE_FILE = "train_state.ckpt"


def save_state(run_dir: Path, config: Config, state: TrainState) -> None:
    """One file, written atomically: a JSON header (config, counters, shuffler states, curriculum,
    histories) then the arrays (models, optimizer states, keys, best models) as Equinox leaves."""
    header = json.dumps(
        {
            "config": dataclasses.asdict(config),
            "epoch": state.epoch,
            "rngs": [rng.bit_generator.state for rng in state.rngs],
            "best_value": state.best_value.tolist(),
            "best_epoch": state.best_epoch.tolist(),
            "since_best": state.since_best.tolist(),
            "running": state.running.tolist(),
            "best_k_active": state.best_k_active,
            "curriculum": None
            if state.curriculum is None
            else dataclasses.asdict(state.curriculum),
            "histories": state.histories,
            "training_time": state.training_time,
            "diverged": state.diverged,
        }
    ).encode()

    def write(f):
        f.write(len(header).to_bytes(8, "little") + header)
        eqx.tree_serialise_leaves(f, state_arrays(state))

    atomic_write(run_dir / STATE_FILE, write)


def read_state_header(f) -> dict:
    """The JSON header of a train_state.ckpt opened at its start; leaves f at the arrays."""
    return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def saved_epoch(run_dir: Path) -> int:
    """The epoch a train_state.ckpt holds, from its header alone."""
    with open(run_dir / STATE_FILE, "rb") as f:
        return read_state_header(f)["epoch"]


def state_arrays(state: TrainState):
    return (state.models, state.opt_states, jax.random.key_data(state.keys), state.best_models)


def state_shapes(config: Config, input_dim: int):
    """state_arrays of initial_state(config, input_dim) as shapes and dtypes, nothing computed:
    the template load_state reads a saved state into."""

    def arrays(init_keys, train_keys):
        models = eqx.filter_vmap(lambda key: build_model(config, input_dim, key))(init_keys)
        opt_states = init_optimizers(mixvae.make_optimizer(config.learning_rate), models)
        return models, opt_states, jax.random.key_data(train_keys), models

    keys = jax.ShapeDtypeStruct((len(replicas(config)),), jax.random.key(0).dtype)
    return eqx.filter_eval_shape(arrays, keys, keys)


def load_state(run_dir: Path, config: Config, input_dim: int) -> TrainState:
    """The state saved by save_state, checked against `config`; ConfigError when it is missing,
    truncated or from another configuration."""
    path = run_dir / STATE_FILE
    problem = f"--resume={str(run_dir)!r} is not allowed: {path.name}"
    if not path.is_file():
        raise ConfigError(
            f"{problem} is missing (not a run directory, or no checkpoint was written yet)"
        )
    try:
        with open(path, "rb") as f:
            header = read_state_header(f)
            # what may change between a run and its resumption: the flags --resume takes, and
            # where the run lives
            may_change = (RESUME_FLAGS - {"resume"}) | {"out_dir", "name", "overwrite"}
            saved = dataclasses.replace(
                config_from_json(header["config"]),
                **{name: getattr(config, name) for name in may_change},
            )
            if saved != config:
                changed = [
                    k
                    for k, v in dataclasses.asdict(config).items()
                    if dataclasses.asdict(saved)[k] != v
                ]
                raise ConfigError(
                    f"{problem} was written by another configuration "
                    f"({', '.join(configs.flag(k) for k in changed)} differ)"
                )
            models, opt_states, key_data, best_models = eqx.tree_deserialise_leaves(
                f, state_shapes(config, input_dim)
            )
            if f.read(1):
                raise ValueError("trailing bytes")
    except ConfigError:
        raise
    except Exception as error:  # truncated or foreign: json, equinox and numpy raise several kinds
        raise ConfigError(
            f"{problem} is truncated or does not match the run's config ({type(error).__name__})"
        ) from None
    rngs = [np.random.default_rng() for _ in header["rngs"]]
    for rng, rng_state in zip(rngs, header["rngs"], strict=True):
        rng.bit_generator.state = rng_state
    curriculum = None if header["curriculum"] is None else Curriculum(**header["curriculum"])
    return TrainState(
        header["epoch"],
        models,
        opt_states,
        jax.random.wrap_key_data(key_data),
        best_models,
        rngs,
        np.array(header["best_value"]),
        np.array(header["best_epoch"]),
        np.array(header["since_best"]),
        np.array(header["running"]),
        header["best_k_active"],
        curriculum,
        header["histories"],
        header.get("training_time", 0.0),
        header.get("diverged", ["" for _ in replicas(config)]),
    )


class StopRequest:
    """SIGINT / SIGTERM while training: note it and let the current epoch finish (a second
    signal stops at once)."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signal is not None:  # the second one: stop now
            signal.default_int_handler(signum, frame)
        self.signal = signum
        tqdm.write(
            f"{signal.Signals(signum).name}: stopping after this epoch (again to stop at once)"
        )

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Outcome(NamedTuple):
    """How training ended: status finished | interrupted | diverged, one line saying why, and
    (diverged) what the run directory keeps."""

    status: str
    detail: str
    signal: int | None = None
    kept: str = ""


def status_of(outcome: Outcome) -> dict:
    """summary.json's status, status_detail (why) and kept (what a diverged run keeps)."""
    fields = {"status": outcome.status, "status_detail": outcome.detail, "kept": outcome.kept}
    return {name: value for name, value in fields.items() if value}


@jax.jit
def split_keys(keys):
    """Each replica's key [R] split in two: (the next epoch's keys [R], this epoch's [R])."""
    return tuple(jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0))


def non_finite(epoch_metrics, val_metrics, running) -> dict[int, str]:
    """Per running replica whose training (incl. grad_norm) or validation metrics hold a NaN or
    inf: the first such metric's name."""
    broken = {}
    for r in np.flatnonzero(running):
        train_names = [n for n, v in epoch_metrics.items() if not np.all(np.isfinite(v[r]))]
        val_names = [f"val_{n}" for n, v in val_metrics[r].items() if not np.isfinite(v)]
        if train_names or val_names:
            broken[int(r)] = (train_names + val_names)[0]
    return broken


def compile_program(function, *args) -> None:
    """Compile a jitted function for these arguments, ahead of its call: the call then finds the
    program compiled (same shapes, dtypes, shardings and static values)."""
    function.lower(*args).compile()


def in_background(work, *args):
    """Start work(*args) in a daemon thread; returns a function that waits for it and returns
    its result or raises its error. For compilations: XLA compiles without holding the GIL."""
    outcome = {}

    def target():
        try:
            outcome["result"] = work(*args)
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, name=work.__name__, daemon=True)
    thread.start()

    def wait():
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    return wait


def epoch_line(epochs: int, epoch: int, train_metrics, val_metrics, ran, seconds: float) -> str:
    """An epoch's console line: the training loss and the validation metrics, each the mean over
    the replicas that trained this epoch (ran: [R] bool)."""

    def mean(name, rows):
        return float(np.mean([row[name] for row, on in zip(rows, ran, strict=True) if on]))

    return (
        f"epoch {epoch + 1:3d}/{epochs}  loss {mean('loss', train_metrics):9.3f}  "
        f"val_loss {mean('loss', val_metrics):9.3f}  "
        f"val_neg_elbo {mean('neg_elbo', val_metrics):8.3f}  "
        f"val_conf {mean('responsibility_confidence', val_metrics):.3f}  "
        f"val_k_eff {mean('k_eff', val_metrics):5.2f}  {seconds:6.2f}s"
    )


def train(
    config: Config, data: Dataset, state: TrainState, run_dir: Path, neighbors=None
) -> tuple[list[TrainResult], Outcome]:
    """Train the stacked replicas of `state` from its epoch to --epochs, one compiled call per
    epoch, each batch sharded over the data mesh (`neighbors`: the training images' neighbour
    table of --consistency-neighbors, or None); per replica, early stopping on the monitored
    validation metric with its best model kept; the curriculum, when on, opens channels between
    epochs. Each replica's history.csv gains its row as each epoch ends. Saves the state every
    --checkpoint-every epochs and, when training stops (end, early stop, signal, or a metric
    that became non-finite: then the last finite epoch), after the last epoch; the history's
    train_state_saved column marks the epochs the state was saved after."""
    pairs = replicas(config)
    seeds = [seed for seed, _ in pairs]
    directories = replica_dirs(run_dir, config)
    history_paths = [directory / "history.csv" for directory in directories]
    for path in history_paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    for path, history in zip(history_paths, state.histories, strict=True):
        write_history(path, history)  # a resumed run's history up to its checkpoint
    mesh = data_mesh(config)
    replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, None, "data"))
    optimizer = mixvae.make_optimizer(config.learning_rate)
    state.models, state.opt_states, state.best_models, objective = (
        put(tree, replicated)
        for tree in (state.models, state.opt_states, state.best_models, replica_objective(config))
    )
    state.keys = jax.random.wrap_key_data(put(jax.random.key_data(state.keys), replicated))
    train_images = jax.device_put(data.train.images, replicated)
    neighbors = None if neighbors is None else jax.device_put(neighbors, replicated)
    val_images = jax.device_put(data.val.images, replicated)
    num_train, batch_size = len(data.train.images), config.batch_size
    steps = num_train // batch_size
    epoch_times, outcome = [], Outcome("finished", "")
    k_active = state.k_active(config)

    validation_compiled = in_background(
        compile_program,
        mixvae.validate_replicas,
        state.models,
        val_images,
        schedule(config, state.epoch, k_active),
        objective,
    )  # while the main thread compiles the epoch
    start, last_saved_epoch, time_before = time.perf_counter(), state.epoch, state.training_time
    with (
        StopRequest() as stop,
        tqdm(
            total=config.epochs,
            initial=state.epoch,
            desc="epochs",
            unit="epoch",
            leave=False,
            disable=None if jax.process_index() == 0 else True,
        ) as bar,
    ):
        while state.epoch < config.epochs and state.running.any():
            tick, epoch, ran = time.perf_counter(), state.epoch, state.running.copy()
            k_active = state.k_active(config)
            kick_active = state.curriculum is not None and state.curriculum.kick_left > 0
            sched = schedule(config, epoch, k_active, kick_active)
            batches = np.stack(
                [
                    rng.permutation(num_train)[: steps * batch_size].reshape(steps, batch_size)
                    for rng in state.rngs
                ]
            )
            keys, epoch_keys = split_keys(state.keys)
            models, opt_states, step_metrics = mixvae.train_replicas(
                state.models,
                state.opt_states,
                train_images,
                jax.device_put(batches, batch_sharded),
                epoch_keys,
                sched,
                objective,
                optimizer,
                neighbors,
            )
            epoch_metrics = jax.device_get(summarize_replicas(step_metrics))  # [R, ...] on the host
            train_metrics = replica_floats(epoch_metrics)
            validation_compiled()
            val_metrics = replica_floats(
                mixvae.validate_replicas(models, val_images, sched, objective)
            )
            epoch_times.append(time.perf_counter() - tick)
            broken = non_finite(epoch_metrics, val_metrics, state.running)
            if broken and (epoch == 0 or len(broken) == state.running.sum()):
                # every running replica, or one before any finite epoch: keep the last good
                # state, history and checkpoint
                r, name = next(iter(broken.items()))
                where = f" ({directories[r].relative_to(run_dir)})" if len(seeds) > 1 else ""
                outcome = Outcome(
                    "diverged", f"{name}{where} became non-finite in epoch {epoch + 1}"
                )
                break
            if broken:  # those replicas stop, with their last finite state; the others go on
                finite = jnp.asarray([r not in broken for r in range(len(pairs))])
                models = select_replicas(finite, models, state.models)
                opt_states = select_replicas(finite, opt_states, state.opt_states)
                for r, name in broken.items():
                    state.running[r] = False
                    state.diverged[r] = f"{name} became non-finite in epoch {epoch + 1}"
                    tqdm.write(
                        f"diverged ({directories[r].relative_to(run_dir)}): "
                        f"{state.diverged[r]}; it stops, the other replicas train on"
                    )
            state.epoch, state.models, state.opt_states, state.keys = (
                epoch + 1,
                models,
                opt_states,
                keys,
            )
            monitored = np.array([metrics[config.monitor] for metrics in val_metrics])
            unlocked = state.curriculum is not None and state.curriculum.update(
                epoch + 1, monitored[0], val_metrics[0]["neg_elbo"]
            )
            saving = bool(config.checkpoint_every) and state.epoch % config.checkpoint_every == 0
            new_rows = {}
            for r in np.flatnonzero(state.running):
                new_rows[r] = {
                    "epoch": epoch + 1,
                    "seed": seeds[r],
                    **({"restart": pairs[r][1]} if config.restarts > 1 else {}),
                    **train_metrics[r],
                    "grad_norm": float(epoch_metrics["grad_norm"][r]),
                    **{f"val_{k}": v for k, v in val_metrics[r].items()},
                    "unlocked": int(unlocked),
                    "kick_active": int(kick_active),
                    **{f"usage_{k}": float(u) for k, u in enumerate(epoch_metrics["usage"][r])},
                    "train_state_saved": int(saving),
                }
                state.histories[r].append(new_rows[r])
            stopping = state.track_best(
                config,
                models,
                monitored,
                epoch,
                k_active,
                unlocked=unlocked,
                kick_active=kick_active,
            )
            if saving:
                state.training_time = time_before + time.perf_counter() - start
                save_state(run_dir, config, state)
                last_saved_epoch = state.epoch
            for r, row in new_rows.items():
                append_history(history_paths[r], row)
            tqdm.write(
                epoch_line(config.epochs, epoch, train_metrics, val_metrics, ran, epoch_times[-1])
                + (f"  (mean of {ran.sum()} replicas)" if len(seeds) > 1 else "")
                + (f"  k_active {k_active}" if state.curriculum else "")
                + ("  -> unlock" if unlocked else "")
            )
            for r in stopping:
                which = f" ({directories[r].relative_to(run_dir)})" if len(seeds) > 1 else ""
                tqdm.write(
                    f"early stop{which}: no better val_{config.monitor} for {config.patience} "
                    "epochs"
                )
            bar.update()
            if stop.signal is not None:
                outcome = Outcome(
                    "interrupted",
                    f"{signal.Signals(stop.signal).name} after epoch {state.epoch}",
                    stop.signal,
                )
                break
    state.training_time = time_before + time.perf_counter() - start
    if state.epoch > last_saved_epoch:  # the last (finite) epoch, when it was not saved in the loop
        for history in state.histories:
            if history and history[-1]["epoch"] == state.epoch:
                history[-1]["train_state_saved"] = 1
        save_state(run_dir, config, state)
        for path, history in zip(history_paths, state.histories, strict=True):
            write_history(path, history)
    never_improved = state.best_epoch < 0  # stopped before the anneals ended: keep the last model
    best_models = select_replicas(jnp.asarray(never_improved), state.models, state.best_models)
    best_epoch = np.where(never_improved, [len(h) - 1 for h in state.histories], state.best_epoch)
    steady = float(np.median(epoch_times[1:])) if len(epoch_times) > 1 else 0.0
    training_time = state.training_time
    compile_time = max(0.0, epoch_times[0] - steady) if epoch_times else 0.0
    return [
        TrainResult(
            seed,
            replica(best_models, r),
            state.histories[r],
            int(best_epoch[r]) + 1,
            state.best_k_active if state.best_epoch[r] >= 0 else k_active,
            training_time,
            compile_time,
            state.curriculum,
            diverged=state.diverged[r],
        )
        for r, seed in enumerate(seeds)
    ], outcome


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def clustering_scores(channels, labels, training_channels, train_labels) -> dict[str, float]:
    """Clustering accuracy (Hungarian matching of channels to labels), NMI, ARI, and many-to-one
    accuracy (each channel mapped to its majority label on the training split)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, confusion_matrix, normalized_mutual_info_score

    num = max(channels.max(), labels.max(), training_channels.max(), train_labels.max()) + 1
    contingency = confusion_matrix(channels, labels, labels=np.arange(num))  # [channel, label]
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    train_counts = confusion_matrix(training_channels, train_labels, labels=np.arange(num))
    majority = np.argmax(train_counts, axis=1)
    return {
        "cluster_accuracy": float(contingency[rows, cols].sum() / len(labels)),
        "nmi": float(normalized_mutual_info_score(labels, channels)),
        "ari": float(adjusted_rand_score(labels, channels)),
        "many_to_one_accuracy": float(np.mean(majority[channels] == labels)),
    }


def evaluation_inputs(model, config: Config, images, k_active: int) -> tuple:
    """mixvae.evaluate's arguments: the objective's floats as arrays, so that one compiled
    program serves every sweep point."""
    objective = build_objective(config)
    floats = {name: jnp.float32(getattr(objective, name)) for name in configs.OBJECTIVE_FLOATS}
    return (
        model,
        jax.device_put(images),
        schedule(config, config.epochs, k_active),
        dataclasses.replace(objective, **floats),
    )


def iw_inputs(model, config: Config, images, k_active: int, key) -> tuple:
    """mixvae.evaluate_iw's arguments: --eval-iw-samples samples per image."""
    return model, images, key, schedule(config, config.epochs, k_active), config.eval_iw_samples


def iw_nll(model, config: Config, images, k_active: int, key) -> float:
    """Test -log p(x) by importance weighting with --eval-iw-samples samples."""
    log_likelihood = mixvae.evaluate_iw(*iw_inputs(model, config, images, k_active, key))
    return float(-jnp.mean(log_likelihood))


def train_responsibilities_inputs(model, config: Config, data: Dataset, k_active: int) -> tuple:
    """mixvae.encode_responsibilities's arguments for the training split."""
    return model, jax.device_put(data.train.images), schedule(config, config.epochs, k_active)


def compile_evaluation(model, config: Config, data: Dataset) -> None:
    """Compile the test evaluation's programs for `model`'s shapes: mixvae.evaluate on the test
    split, the training split's responsibilities and the IW-NLL (run() does it in a thread while
    the training runs). The open channels and the key are arrays: any value compiles the program
    the calls use."""
    k = config.num_components
    compile_program(mixvae.evaluate, *evaluation_inputs(model, config, data.test.images, k))
    compile_program(
        mixvae.encode_responsibilities, *train_responsibilities_inputs(model, config, data, k)
    )
    if config.eval_iw_samples:
        key = jax.random.key(config.seed)
        compile_program(mixvae.evaluate_iw, *iw_inputs(model, config, data.test.images, k, key))


def evaluation(model, config: Config, data: Dataset, k_active: int):
    """Test-split metrics (ELBO terms, routing statistics, clustering scores, and the
    many-to-one accuracy, which maps each channel to its majority label on the training split),
    the test responsibilities and usage, for the figures, and the training images' channels
    argmax_k r, for the seeds' agreement."""
    metrics, terms = mixvae.evaluate(*evaluation_inputs(model, config, data.test.images, k_active))
    responsibilities = np.asarray(terms.responsibilities)
    channels = responsibilities.argmax(-1)
    training_channels = train_channels(model, config, data, k_active)
    scores = clustering_scores(channels, data.test.labels, training_channels, data.train.labels)
    result = {**to_floats(metrics), **scores, "test_samples": len(channels)}
    return result, responsibilities, np.asarray(metrics["usage"]), training_channels


def train_channels(model, config: Config, data: Dataset, k_active: int) -> np.ndarray:
    """Each training image's channel argmax_k r, [N]."""
    responsibilities = mixvae.encode_responsibilities(
        *train_responsibilities_inputs(model, config, data, k_active)
    )
    return np.asarray(responsibilities).argmax(-1)


def pairwise_ari(channels: list[np.ndarray]) -> np.ndarray:
    """The adjusted Rand index of every pair of clusterings of the same images ([N] channels
    each), [n, n] with ones on the diagonal: 1 for the same partition whatever the channels'
    order, about 0 for partitions as alike as chance."""
    from sklearn.metrics import adjusted_rand_score

    ari = np.eye(len(channels))
    for i, j in itertools.combinations(range(len(channels)), 2):
        ari[i, j] = ari[j, i] = adjusted_rand_score(channels[i], channels[j])
    return ari


def seed_agreement(channels: list[np.ndarray]) -> dict[str, float]:
    """How far the seeds' clusterings agree, label-free: the mean and minimum of pairwise_ari
    over every pair of seeds' channels of the same training images (argmax_k r). A run
    collapsed into one channel agrees trivially: read it beside the confidence and k_eff."""
    pairs = pairwise_ari(channels)[np.triu_indices(len(channels), k=1)]
    return {"mean": float(np.mean(pairs)), "min": float(np.min(pairs)), "pairs": len(pairs)}


# --------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # as a plain open() would leave it, not mkstemp's 0o600
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(
        path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
    )


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv of one replica, whole (nothing when the history is empty)."""
    if history:
        atomic_write(path, lambda f: f.write(history_csv(history, header=True).encode()))


def append_history(path: Path, row: dict) -> None:
    """Add one epoch's row to history.csv (the header first, into a new file); flushed on
    return, so `tail -f` shows each epoch as it ends."""
    with open(path, "a") as f:
        f.write(history_csv([row], header=f.tell() == 0))


def history_csv(rows: list[dict], header: bool) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def save_checkpoint(run_dir: Path, model, config: Config, epoch: int) -> None:
    atomic_write(run_dir / "checkpoint.eqx", lambda f: eqx.tree_serialise_leaves(f, model))
    write_json(run_dir / "checkpoint.json", {"epoch": epoch, "config": dataclasses.asdict(config)})


RUN_FILES = {
    *("config.json", "history.csv", "summary.json", "REPORT.md", "figures"),
    *("sweep.csv", "sweep_points.csv"),
    *("checkpoint.eqx", "checkpoint.json", STATE_FILE),
}
PROCESS_FLAGS = {"distributed", "coordinator_address", "num_processes", "process_id"}
EVALUATION_FLAGS = {"eval_iw_samples", "figures"}  # how a run is evaluated: --eval-only may redo it
NOT_IN_RUN_NAME = {  # where and how a run is kept, not what it trains
    *("preset", "name", "out_dir", "overwrite", "resume", "checkpoint", "eval_only"),
    *("validate_only", "checkpoint_every", "data_dir", "devices"),
    *EVALUATION_FLAGS,
    *PROCESS_FLAGS,
}


def run_name(config: Config) -> str:
    """--name, else the preset or the c-regularizer and each flag that differs from the preset's
    (or the global) defaults, e.g. logit_mog-seed1-prior-mean9 or mnist-seeds0_1_2."""
    if config.name is not None:
        return config.name
    default = configs.PRESETS.get(config.preset, configs.DEFAULT)
    parts = [config.preset or config.c_regularizer]
    for field in dataclasses.fields(Config):
        value = getattr(config, field.name)
        if field.name in NOT_IN_RUN_NAME or value == getattr(default, field.name):
            continue
        if field.name == "c_regularizer" and config.preset is None:
            continue  # already the name's first part
        if field.name == "sweep":
            parts.append("sweep-" + "-".join(configs.flag(n)[2:] for n in swept_names(config)))
            continue
        text = (
            "_".join(map(str, value))
            if isinstance(value, tuple)
            else f"{value:g}"
            if (isinstance(value, float))
            else str(value)
        )
        parts.append(field.name.replace("_", "-") + text)
    return re.sub(r"[^A-Za-z0-9._+-]", "", "-".join(parts))[:96]


def claim_run_dir(config: Config) -> tuple[Path, Path | None]:
    """Create this run's directory, and its config.json, each by an exclusive create, so that N
    runs started together get N directories. Default: runs/<timestamp>-<run name>, then -2, -3,
    ... when taken. --out-dir must be new or empty; with --overwrite, a previous run directory
    holding only files this program writes is moved aside to .<name>.replaced-<pid> (returned:
    `run` deletes it once the new run has trained an epoch, and puts it back otherwise)."""
    replaced = None
    if config.out_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        for attempt in itertools.count(1):
            run_dir = Path("runs") / (f"{stamp}-{run_name(config)}" + f"-{attempt}" * (attempt > 1))
            try:
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
            except OSError as error:
                raise ConfigError(
                    f"cannot create the run directory {run_dir} ({error.strerror}); "
                    "give --out-dir DIR"
                ) from None
    else:
        run_dir = Path(config.out_dir)
        problem = f"--out-dir={str(run_dir)!r} is not allowed"
        if refusal := out_dir_refusal(config):
            raise ConfigError(refusal)
        if run_dir.exists() and any(run_dir.iterdir()):  # a previous run, to --overwrite
            replaced = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
            run_dir.rename(replaced)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{problem}: cannot create it ({error.strerror})") from None
    try:
        fd = os.open(run_dir / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as error:
        if replaced is not None:
            replaced.rename(run_dir)
        taken = isinstance(error, FileExistsError)
        raise ConfigError(
            f"--out-dir={str(run_dir)!r} is not allowed: "
            + (
                "another run has just started in it"
                if taken
                else f"cannot write in it ({error.strerror})"
            )
        ) from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return run_dir, replaced


def out_dir_refusal(config: Config) -> str:
    """Why --out-dir cannot take a new run ("" when it can): it exists and is not an empty
    directory, unless --overwrite names a previous run directory that holds only files this
    program writes."""
    if config.out_dir is None:
        return ""
    run_dir = Path(config.out_dir)
    problem = f"--out-dir={str(run_dir)!r} is not allowed"
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return ""
    if not (config.overwrite and (run_dir / "config.json").is_file()):
        return (
            f"{problem}: it exists and is not an empty directory (choose a new one, or "
            "--overwrite a previous run directory)"
        )
    foreign = sorted(
        entry.name
        for entry in run_dir.iterdir()
        if entry.name not in RUN_FILES
        and not entry.name.startswith((".", "seed_"))
        and not (entry / "config.json").is_file()  # a sweep point's directory
    )
    if foreign:
        return (
            f"{problem}: --overwrite would delete {', '.join(foreign)}, which this program did "
            "not write (move them away first)"
        )
    return ""


def point_dirs(run_dir: Path, config: Config) -> list[Path]:
    """Where each sweep point's runs go: <run dir>/<point name>/, or the run directory itself
    without --sweep."""
    if not config.sweep:
        return [run_dir]
    return [run_dir / configs.point_name(point) for point in configs.sweep_grid(config)]


def seed_dirs(run_dir: Path, config: Config) -> list[Path]:
    """Where each seed's files go: its point's directory, or seed_<s>/ inside it per seed with
    --seeds."""
    seeds = replica_seeds(config)
    return [
        directory if len(seeds) == 1 else directory / f"seed_{seed}"
        for directory in point_dirs(run_dir, config)
        for seed in seeds
    ]


def seed_configs(config: Config) -> list[Config]:
    """The config of each seed of each sweep point, as a single run of it would be given."""
    return [
        replica_config(point, seed)
        for point in sweep_points(config)
        for seed in replica_seeds(point)
    ]


def replica_dirs(run_dir: Path, config: Config) -> list[Path]:
    """Where each replica's history goes while it trains: its seed's directory, or with
    --restarts N, restart_<j>/ inside it."""
    if config.restarts == 1:
        return seed_dirs(run_dir, config)
    return [d / f"restart_{j}" for d in seed_dirs(run_dir, config) for j in range(config.restarts)]


def replica_config(config: Config, seed: int) -> Config:
    """The config of one seed of a --seeds run, as a single run of that seed would be given
    (the config itself for a single-seed run)."""
    if not config.seeds:
        return config
    return dataclasses.replace(config, seed=seed, seeds=(), split_seed=split_seed(config))


def summary_of(config, data, result: TrainResult, evaluation_metrics, outcome: Outcome) -> dict:
    """status (finished | interrupted | diverged, with status_detail), training, dataset,
    evaluation, curriculum."""
    last = result.history[-1]
    training = {
        f"final_{prefix}{name}": last[f"{prefix}{name}"]
        for prefix in ("", "val_")
        for name in mixvae.METRICS
    }
    curriculum = result.curriculum
    return {
        **status_of(outcome),
        **(
            {
                "restarts": {
                    "chosen": result.restart,
                    "choice": config.restart_choice,
                    f"val_{config.monitor}": list(result.restart_scores),
                    **(
                        {"recurrence": list(result.restart_recurrence)}
                        if result.restart_recurrence
                        else {}
                    ),
                }
            }
            if result.restart_scores
            else {}
        ),
        "training": {
            **training,
            "best_epoch": result.best_epoch,
            "val_at_best_epoch": {
                name: result.history[result.best_epoch - 1][f"val_{name}"]
                for name in ("loss", "neg_elbo", "responsibility_confidence", "k_eff")
            },
            "epochs_completed": len(result.history),
            "training_time_sec": round(result.training_time, 3),
            "compile_time_sec": round(result.compile_time, 3),
        },
        "dataset": {
            "name": data.name,
            "train_samples": len(data.train.images),
            "val_samples": len(data.val.images),
            "test_samples": len(data.test.images),
            "input_dim": int(data.train.images.shape[1]),
        },
        "evaluation": evaluation_metrics,
        **(
            {}
            if curriculum is None
            else {
                "curriculum": {
                    "unlock_count": len(curriculum.unlock_epochs),
                    "final_k_active": curriculum.k_active,
                    "unlock_epochs": curriculum.unlock_epochs,
                    "best_model_k_active": result.best_k_active,
                }
            }
        ),
    }


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend (figures are files; no window ever opens), imported
    on the first figure: a run without figures, --help or a refused flag do not load it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def image_grid(ax, tiles, side: int, title: str, labels) -> None:
    """Draw tiles [rows, columns, side * side] (NaN: empty) as one picture, one row per channel,
    each row labelled."""
    rows, columns = tiles.shape[:2]
    padded = np.pad(
        tiles.reshape(rows, columns, side, side),
        ((0, 0), (0, 0), (0, 1), (0, 1)),
        constant_values=np.nan,
    )
    canvas = padded.transpose(0, 2, 1, 3).reshape(rows * (side + 1), columns * (side + 1))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks((np.arange(rows) + 0.5) * (side + 1) - 1, labels=labels, fontsize=7)
    ax.set_xticks([])
    ax.set_ylabel("channel (its test images), in contingency order")
    ax.set_title(title, fontsize=9)


def plot_curriculum(history, curriculum: Curriculum, num_components: int, save) -> None:
    """k_active over epochs with unlocks marked and kicks shaded; per-channel usage over epochs
    with closed channels greyed out."""
    plt = pyplot()
    epochs = np.array([row["epoch"] for row in history])
    k_active = np.array([row["k_active"] for row in history])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.step(epochs, k_active, where="mid", color="k", label="open channels")
    for row in history:
        if row["kick_active"]:
            top.axvspan(row["epoch"] - 0.5, row["epoch"] + 0.5, color="orange", alpha=0.3, lw=0)
    for epoch in curriculum.unlock_epochs:
        top.axvline(epoch + 0.5, color="tab:red", ls="--", lw=1)
    top.set_ylabel("k_active")
    top.set_title("curriculum: unlocks (dashed), kicks (shaded)")
    usage = np.array([[row[f"usage_{k}"] for k in range(num_components)] for row in history])
    closed = np.arange(num_components)[None, :] >= k_active[:, None]
    image = bottom.imshow(
        np.ma.masked_where(closed, usage).T,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        extent=(epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, num_components - 0.5),
    )
    bottom.set_facecolor("0.85")
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("channel (grey: closed)")
    fig.colorbar(image, ax=[top, bottom], label="training usage E_x r", shrink=0.5)
    save(
        fig,
        "curriculum.png",
        "Open channels over epochs (unlocks dashed, kicks shaded) and per-channel usage",
        tight=False,
    )


@eqx.filter_jit
def figure_decodes(model, images, z):
    """The figures' decoder means, one compiled call: every channel's reconstruction of each of
    `images` [N, P] from its posterior mean -> [K, N, P], and every channel's decode of z
    [K, C, D] -> [K, C, P]."""
    _, mean, _ = jax.vmap(model.encoder)(mixvae.to_unit_interval(images))
    num_pixels = images.shape[-1]
    reconstructions = mixvae.decoded_mean(mixvae.decode_channels(model, mean), num_pixels)
    return reconstructions, mixvae.decoded_mean(model.decoders(z), num_pixels)


@eqx.filter_jit
def posterior_means(model, images):
    """mu(x) of each image of `images` [N, P] -> [N, D] (shared) or [N, K, D]."""
    return jax.vmap(model.encoder)(mixvae.to_unit_interval(images))[1]


UNITS = {
    "responsibility_confidence": "probability",
    "component_entropy": "nats",
    "k_eff": "channels",
}
MAX_CHANNEL_ROWS = 24  # image figures show at most this many channels (the most used)


def plot_curves(ax, series: dict[str, tuple[list, list]], title: str, ylabel: str) -> None:
    """One panel: each named (epochs, values) series, with a legend and a light grid."""
    for label, (epochs, values) in series.items():
        ax.plot(epochs, values, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def panel_grid(count: int, columns: int = 3, width: float = 3.7, height: float = 2.8):
    """A figure of `count` panels, `columns` to a row (unused panels hidden)."""
    plt = pyplot()
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes.flat[:count]


def channel_order(contingency) -> tuple[list[int], dict[int, int]]:
    """The channels that received a test image, in Hungarian order (those matched to a label,
    by label; then the unmatched, by their majority label), and the matching {channel: label}."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(contingency, maximize=True)
    used = contingency.sum(axis=1) > 0
    matched = {int(k): int(label) for k, label in zip(rows, cols, strict=True) if used[k]}
    order = sorted(matched, key=matched.get)
    unmatched = [k for k in np.flatnonzero(used) if k not in matched]
    return order + sorted(unmatched, key=lambda k: contingency[k].argmax()), matched


def empty_note(empty: list[int]) -> str:
    """'channels 3, 7 received no test image' (or how many, when there are many)."""
    if not empty:
        return "every channel received a test image"
    if len(empty) <= 12:
        return (
            f"channel{'s' * (len(empty) > 1)} {', '.join(map(str, empty))} received no test image"
        )
    return f"{len(empty)} channels received no test image"


def plot_figures(
    fig_dir: Path, config: Config, data: Dataset, result: TrainResult, responsibilities, usage, key
):
    """Write the PNG figures; returns {file name: caption}. Panels in grids with y-axis units and
    a legend each; channel figures in Hungarian order, listing the channels that received no
    test image rather than drawing empty rows, sized by K (at most MAX_CHANNEL_ROWS image rows)."""
    from sklearn.metrics import confusion_matrix

    plt = pyplot()
    model, history, curriculum = result.model, result.history, result.curriculum
    figures = {}
    fig_dir.mkdir(exist_ok=True)
    epochs = [row["epoch"] for row in history]

    def save(fig, name, caption, tight=True):
        if tight:
            fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=110)
        plt.close(fig)
        figures[name] = caption

    def train_and_val(metric):
        return {
            "train": (epochs, [row[metric] for row in history]),
            "val": (epochs, [row[f"val_{metric}"] for row in history]),
        }

    terms = [
        name
        for name in mixvae.METRICS
        if name.startswith("loss_") and any(row[name] or row[f"val_{name}"] for row in history)
    ]
    fig, axes = panel_grid(2 + len(terms))
    plot_curves(axes[0], train_and_val("loss"), "loss L = the sum of the terms", "nats")
    plot_curves(axes[1], train_and_val("neg_elbo"), "-ELBO", "nats per example")
    for ax, name in zip(axes[2:], terms, strict=True):
        plot_curves(ax, train_and_val(name), f"term {name[5:]} (weighted)", "nats")
    save(
        fig,
        "loss_curves.png",
        "The loss, the -ELBO and each nonzero term of the loss as it enters it (weighted), "
        "train vs validation",
    )
    fig, axes = panel_grid(3)
    for ax, name in zip(axes, UNITS, strict=True):
        plot_curves(ax, train_and_val(name), name, UNITS[name])
    save(fig, "routing.png", "Routing peakiness over training: E[max r], E[H(r)], k_eff")

    num_components = config.num_components
    channels = responsibilities.argmax(-1)
    counts = np.bincount(channels, minlength=num_components)
    step = max(1, num_components // 16)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(min(12, 4 + 0.15 * num_components), 5), sharex=True
    )
    for ax, values, uniform, ylabel in (
        (top, counts, len(channels) / num_components, "test images (argmax r)"),
        (bottom, usage, 1 / num_components, "E_x r"),
    ):
        ax.bar(np.arange(num_components), values)
        ax.axhline(uniform, color="tab:red", ls="--", lw=1, label="uniform")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    top.set_title(
        f"channel usage on the test split ({empty_note(list(np.flatnonzero(counts == 0)))})",
        fontsize=9,
    )
    bottom.set_xlabel("channel")
    bottom.set_xticks(np.arange(0, num_components, step))
    save(fig, "usage.png", "Channel usage on the test split: argmax counts and mean responsibility")

    num_labels = int(data.test.labels.max()) + 1
    contingency = confusion_matrix(
        channels, data.test.labels, labels=np.arange(max(num_components, num_labels))
    )[:num_components, :num_labels]
    order, matched = channel_order(contingency)
    shown = contingency[order]
    fig, ax = plt.subplots(figsize=(5.5 + 0.2 * num_labels, 0.3 * len(order) + 1.8))
    image = ax.imshow(shown, cmap="Blues", aspect="auto")
    for (row, label), count in np.ndenumerate(shown):
        if count:
            color = "white" if count > shown.max() / 2 else "black"
            ax.text(label, row, str(count), ha="center", va="center", fontsize=6, color=color)
    ax.set_xticks(np.arange(num_labels))
    ax.set_yticks(
        np.arange(len(order)),
        labels=[f"{k} → {matched[k]}" if k in matched else f"{k}" for k in order],
        fontsize=7,
    )
    ax.set_xlabel("true label")
    ax.set_ylabel("channel → matched label")
    empty = [k for k in range(num_components) if k not in order]
    ax.set_title(f"Hungarian order; {empty_note(empty)}", fontsize=8)
    fig.colorbar(image, ax=ax, label="test images")
    save(
        fig,
        "contingency.png",
        "Channel-by-label counts on the test split, channels in Hungarian order",
    )

    if curriculum is not None:
        plot_curriculum(history, curriculum, num_components, save)

    side = data.image_side
    num_pixels = side * side
    columns = 8
    busiest = set(sorted(order, key=lambda k: -counts[k])[:MAX_CHANNEL_ROWS])
    rows_shown = [k for k in order if k in busiest]  # still in Hungarian order
    members = [np.flatnonzero(channels == k)[:columns] for k in rows_shown]
    picked = np.concatenate(members)  # only the images on the grid are decoded, padded
    picked = np.pad(picked, (0, len(rows_shown) * columns - len(picked)))
    z = np.random.default_rng(np.asarray(jax.random.key_data(key))).standard_normal(
        (num_components, columns, config.latent_dim), dtype=np.float32
    )  # drawn by numpy: jax.random.normal would compile a program for this one draw
    decoded, samples = figure_decodes(model, jnp.asarray(data.test.images[picked]), z)
    images = np.asarray(mixvae.to_unit_interval(data.test.images[picked]))
    tiles = np.full((len(rows_shown), 2 * columns + 1, num_pixels), np.nan)  # blank column between
    start = 0
    for row, (k, routed) in enumerate(zip(rows_shown, members, strict=True)):
        tiles[row, : len(routed)] = images[start : start + len(routed), :num_pixels]
        tiles[row, columns + 1 : columns + 1 + len(routed)] = decoded[
            k, start : start + len(routed)
        ]
        start += len(routed)
    labels = [f"{k} ({counts[k]})" for k in rows_shown]
    note = empty_note(empty) + (
        f"; {len(order) - len(rows_shown)} less used channels not shown"
        if len(order) > len(rows_shown)
        else ""
    )
    height = 0.5 * len(rows_shown) + 1.0
    fig, ax = plt.subplots(figsize=(9, height))
    image_grid(
        ax,
        tiles,
        side,
        f"test images routed to each channel (left), its reconstructions (right)\n{note}",
        labels,
    )
    save(
        fig,
        "reconstructions.png",
        "One row per channel (its test images in brackets): test images routed to it, then its "
        "reconstructions",
    )
    fig, ax = plt.subplots(figsize=(4.8, height))
    image_grid(
        ax, np.asarray(samples)[rows_shown], side, f"decoder means at z ~ N(0, I)\n{note}", labels
    )
    save(fig, "samples.png", "One row per channel: decoder means at z ~ N(0, I)")

    if config.latent_dim == 2:
        mean = posterior_means(model, jnp.asarray(data.test.images))
        routed_mean = mean if mean.ndim == 2 else mean[np.arange(len(channels)), channels]
        fig, ax = plt.subplots(figsize=(5, 4.5))
        scatter = ax.scatter(routed_mean[:, 0], routed_mean[:, 1], c=channels, cmap="tab20", s=6)
        fig.colorbar(scatter, ax=ax, label="channel")
        ax.set_title("latent means of the routed channel (test)")
        save(
            fig,
            "latent.png",
            "Latent means mu_c(x) of each test image's channel, coloured by channel",
        )
    return figures


# --------------------------------------------------------------------------------------
# REPORT.md
# --------------------------------------------------------------------------------------


HEADLINE = (
    "responsibility_confidence",
    "component_entropy",
    "k_eff",
    "cluster_accuracy",
    "nmi",
    "ari",
    "neg_elbo",
    "iw_nll",
)


def config_table(config: Config) -> list[str]:
    """The flags that differ from the defaults (of --preset, when one is given); config.json
    holds them all."""
    default = configs.PRESETS.get(config.preset, configs.DEFAULT)
    changed = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(Config)
        if getattr(config, field.name) != getattr(default, field.name) or field.name == "preset"
    }
    changed = {k: v for k, v in changed.items() if v is not None}
    if not changed:
        return ["## Config", "", "Every flag at its default; `config.json` holds every setting."]
    return [
        "## Config",
        "",
        "Flags that differ from the defaults"
        + (f" of `--preset {config.preset}`" if config.preset else "")
        + "; `config.json` holds every setting.",
        "",
        "| flag | value |",
        "|---|---|",
        *[f"| `{configs.flag(k)}` | `{v}` |" for k, v in changed.items()],
    ]


TRAINING_ONLY = ("kl_c_scale", "gumbel_temperature", "k_active", "consistency")


def reported_metrics(evaluation: dict) -> list[str]:
    """The evaluation metrics a report's table shows: the headline first, then the rest, without
    the training-only ones, the loss's terms (in summary.json) and an unused Dirichlet term.
    `evaluation` maps a name to a value, or to {mean, std} over seeds."""

    def unused(value):
        return value == 0 if not isinstance(value, dict) else value["mean"] == value["std"] == 0

    rest = [
        name
        for name, value in evaluation.items()
        if name not in HEADLINE
        and name not in TRAINING_ONLY
        and not name.startswith("loss_")
        and not (name == "dirichlet_penalty" and unused(value))
    ]
    return [name for name in HEADLINE if name in evaluation] + rest


def number(value: float, spec: str = ".4g") -> str:
    """value formatted by `spec`, never as a negative zero (-0.000 reads as 0.000)."""
    text = f"{value:{spec}}"
    return text.removeprefix("-") if float(text) == 0 else text


def what_happened(config: Config, summary: dict) -> str:
    """One line: how training ended, which epoch's model is evaluated and why, the headline test
    metrics and the number of warnings."""
    training, evaluation = summary["training"], summary["evaluation"]
    done, best = training["epochs_completed"], training["best_epoch"]
    status = summary.get("status", "finished")
    if status != "finished":
        ended = f"{status} ({summary['status_detail']})"
    elif done < config.epochs:
        ended = (
            f"stopped early after epoch {done} (no better val {config.monitor} for "
            f"{config.patience} epochs)"
        )
    else:
        ended = f"finished all {done} epochs" if done > 1 else "finished its one epoch"
    if "restarts" in summary:
        restarts = summary["restarts"]
        chosen, scores = restarts["chosen"], restarts[f"val_{config.monitor}"]
        if restarts.get("choice", "monitor") == "agreement":
            recurrence = restarts["recurrence"][chosen]
            by = f"its clustering recurs most in the other seeds' runs: {recurrence:.3f}"
        else:
            by = f"the lowest val {config.monitor}: {number(scores[chosen])}"
        ended += f"; candidate {chosen} of {len(scores)} kept ({by})"
    if anneals_done(config, best - 1):
        why = f"the lowest val {config.monitor} once the anneals had ended" + (
            ", kick epochs excluded, within one set of open channels" if config.curriculum else ""
        )
    else:
        why = "the last epoch: the anneals of a(e) and tau(e) never ended"
    metrics = [
        f"test accuracy {number(evaluation['cluster_accuracy'], '.3f')}",
        f"NMI {number(evaluation['nmi'], '.3f')}",
    ]
    if "iw_nll" in evaluation:
        metrics.append(f"IW-NLL {number(evaluation['iw_nll'], '.2f')} nats")
    warnings = len(summary.get("warnings", []))
    return (
        f"**What happened:** {ended}; the model of epoch {best} is evaluated ({why}); "
        + ", ".join(metrics)
        + f"; {warnings or 'no'} warning{'s' * (warnings != 1)}."
    )


def write_report(run_dir: Path, config: Config, summary: dict, figures: dict[str, str]) -> None:
    training = summary["training"]
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        what_happened(config, summary),
        "",
        *[f"**Warning: {warning}.**\n" for warning in summary.get("warnings", [])],
        f"Objective: c-regularizer `{config.c_regularizer}`; "
        f"{summary['training']['epochs_completed']} "
        f"epoch(s), best epoch {training['best_epoch']}; the epochs took "
        f"{training['training_time_sec']:.1f} s, summed over any resumptions "
        f"(compile {training['compile_time_sec']:.1f} s).",
        "",
        *(
            [
                f"**Status: {summary['status']}** ({summary['status_detail']}): the tables below "
                "describe the epochs before it.",
                "",
            ]
            if summary["status"] != "finished"
            else []
        ),
        "**Test split:** "
        + ", ".join(
            f"{name} {number(summary['evaluation'][name], '.3f')}"
            for name in HEADLINE
            if name in summary["evaluation"]
        )
        + ".",
        "",
        *config_table(config),
    ]
    lines += ["", "## Dataset", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["dataset"].items()]

    def row(name, meaning):
        return (
            f"| `{name}` | {number(training[f'final_{name}'])} | "
            f"{number(training[f'final_val_{name}'])} | {meaning.replace('|', '&#124;')} |"
        )

    terms = [name for name in mixvae.METRICS if name.startswith("loss_")]
    lines += [
        "",
        "## The objective, term by term (last epoch)",
        "",
        "Each term as it enters the loss (weighted); `loss` is their sum. The -ELBO is what a "
        "likelihood comparison uses; the loss also holds the usage and consistency terms.",
        "",
        "| term | train | val | meaning |",
        "|---|---|---|---|",
        *(row(name, mixvae.METRICS[name]) for name in [*terms, "loss", "neg_elbo"]),
        "",
        "## Training metrics (last epoch)",
        "",
        "| metric | train | val | meaning |",
        "|---|---|---|---|",
        *(
            row(name, meaning)
            for name, meaning in mixvae.METRICS.items()
            if name not in terms and name not in ("loss", "neg_elbo")
        ),
    ]
    lines += [
        "",
        "## Evaluation (test split, best model, no noise)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    evaluation = summary["evaluation"]
    lines += [
        f"| `{k}` | {number(evaluation[k])} |"
        if isinstance(evaluation[k], float)
        else f"| `{k}` | {evaluation[k]} |"
        for k in reported_metrics(evaluation)
    ]
    if "curriculum" in summary:
        c = summary["curriculum"]
        lines += [
            "",
            "## Curriculum",
            "",
            f"Started with {config.curriculum_start} open channel(s); {c['unlock_count']} "
            "unlock(s) at the end "
            f"of epoch(s) {c['unlock_epochs'] or 'none'}; {c['final_k_active']} of "
            f"{config.num_components} open "
            f"at the end; the best model (evaluated above) had {c['best_model_k_active']} open. "
            "See `curriculum.png`: unlocks dashed, kick windows shaded, closed channels grey.",
        ]
    if "timing_sec" in summary:
        lines += timing_table(summary["timing_sec"])
    lines += ["", "## Figures", ""]
    lines += [f"**{caption}**\n\n![{name}](figures/{name})\n" for name, caption in figures.items()]
    lines += [] if figures else ["None drawn (--no-figures)."]
    atomic_write(run_dir / "REPORT.md", lambda f: f.write("\n".join(lines).encode()))


# --------------------------------------------------------------------------------------
# Seeds and sweep reports
# --------------------------------------------------------------------------------------


def timing_table(timing: dict[str, float]) -> list[str]:
    """REPORT.md's section on where the time went: one row per phase."""
    lines = ["", "## Where the time went (seconds, this process)", "", "| phase | s |", "|---|---|"]
    lines += [f"| {phase} | {seconds:.2f} |" for phase, seconds in timing.items()]
    return [*lines, "", "`compile` is part of `training` (its first epoch minus a steady one)."]


def write_group_reports(
    run_dir: Path, config: Config, summaries: list[dict], seed_channels: list[np.ndarray]
) -> None:
    """After each seed's own report: the mean +- std report of each point with several seeds
    (with the seeds' agreement), then the sweep's report."""
    per_point = len(replica_seeds(config))
    starts = range(0, len(summaries), per_point)
    groups = [summaries[i : i + per_point] for i in starts]
    agreements = [
        seed_agreement(seed_channels[i : i + per_point]) if per_point > 1 else None for i in starts
    ]
    if per_point > 1:
        for directory, point, group, agreement in zip(
            point_dirs(run_dir, config), sweep_points(config), groups, agreements, strict=True
        ):
            write_seeds_report(directory, point, group, agreement)
    if config.sweep:
        write_sweep_report(run_dir, config, groups, agreements)


def seeds_summary(config: Config, summaries: list[dict], agreement: dict) -> dict:
    """Mean and sample standard deviation (ddof=1) of every numeric test metric over the seeds,
    and the seeds' agreement (seed_agreement)."""
    metrics = [
        name for name, value in summaries[0]["evaluation"].items() if isinstance(value, float)
    ]
    values = {
        name: np.array([summary["evaluation"][name] for summary in summaries]) for name in metrics
    }
    return {
        "seeds": list(config.seeds),
        "evaluation": {
            name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))}
            for name, v in values.items()
        },
        "seed_agreement": agreement,
        "per_seed": {str(seed): f"seed_{seed}/summary.json" for seed in config.seeds},
        "training": {
            "training_time_sec": summaries[0]["training"]["training_time_sec"],
            "compile_time_sec": summaries[0]["training"]["compile_time_sec"],
            "best_epoch": [summary["training"]["best_epoch"] for summary in summaries],
        },
        "dataset": summaries[0]["dataset"],
        "timing_sec": {  # the shared phases once, each seed's evaluation phases added up
            phase: round(
                sum(summary["timing_sec"][phase] for summary in summaries)
                if phase in EVALUATION_PHASES
                else seconds,
                3,
            )
            for phase, seconds in summaries[0]["timing_sec"].items()
        },
    }


def write_seeds_report(
    run_dir: Path, config: Config, summaries: list[dict], agreement: dict
) -> None:
    """summary.json and REPORT.md of a --seeds run: mean +- std over seeds, every seed, and the
    seeds' agreement."""
    summary = seeds_summary(config, summaries, agreement)
    write_json(run_dir / "summary.json", summary)
    seeds = config.seeds
    lines = [
        f"# Run report: {run_dir.name} ({len(seeds)} seeds)",
        "",
        f"Objective: c-regularizer `{config.c_regularizer}`; seeds {', '.join(map(str, seeds))} "
        "trained as replicas of one compiled epoch in one process "
        f"({summary['training']['training_time_sec']:.1f} s, shared by every replica), all on the "
        "data split of "
        f"seed {split_seed(config)}. Each seed's own report: "
        + ", ".join(f"[seed {seed}](seed_{seed}/REPORT.md)" for seed in seeds)
        + ".",
        "",
        "## Evaluation (test split, best model per seed; std is the sample std, ddof=1)",
        "",
        "| metric | mean ± std | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for name in reported_metrics(summary["evaluation"]):
        stats = summary["evaluation"][name]
        lines.append(
            f"| `{name}` | {number(stats['mean'])} ± {number(stats['std'], '.2g')} | "
            + " | ".join(number(s["evaluation"][name]) for s in summaries)
            + " |"
        )
    lines += [
        "",
        f"Seed agreement (label-free): {agreement['mean']:.3f} (lowest pair "
        f"{agreement['min']:.3f}), the mean adjusted Rand index between the {len(seeds)} seeds' "
        f"channels of the same {summary['dataset']['train_samples']} training images: 1 when "
        "every seed finds the same partition.",
    ]
    if config.figures:
        plot_seed_curves(run_dir, seeds)
        lines += ["", "![per-seed validation curves](figures/seeds.png)"]
    lines += [*timing_table(summary["timing_sec"]), "", *config_table(config)]
    atomic_write(run_dir / "REPORT.md", lambda f: f.write("\n".join(lines).encode()))
    print(
        f"seed agreement (label-free, mean ARI of the seeds' channels of the training images): "
        f"{agreement['mean']:.3f}, lowest pair {agreement['min']:.3f}"
    )
    print(f"report ({len(seeds)} seeds): {run_dir / 'REPORT.md'}")


def plot_seed_curves(run_dir: Path, seeds) -> None:
    """figures/seeds.png: each seed's validation loss, -ELBO, confidence and k_eff per epoch,
    from seed_<s>/history.csv."""
    plt = pyplot()
    histories = {}
    for seed in seeds:
        with open(run_dir / f"seed_{seed}" / "history.csv") as f:
            histories[seed] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    panels = {
        "val_loss": "nats",
        "val_neg_elbo": "nats per example",
        "val_responsibility_confidence": "probability",
        "val_k_eff": "channels",
    }
    fig, axes = panel_grid(len(panels), columns=2, width=5, height=3.2)
    for ax, (name, unit) in zip(axes, panels.items(), strict=True):
        series = {
            f"seed {seed}": ([row["epoch"] for row in rows], [row[name] for row in rows])
            for seed, rows in histories.items()
        }
        plot_curves(ax, series, name, unit)
    (run_dir / "figures").mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(run_dir / "figures" / "seeds.png", dpi=110)
    plt.close(fig)


SWEEP_METRICS = {  # summary key -> column name; the last is label-free, as is the seed agreement
    "cluster_accuracy": "accuracy",
    "nmi": "NMI",
    "ari": "ARI",
    "responsibility_confidence": "confidence",
    "k_eff": "k_eff",
    "neg_elbo": "test -ELBO",
    "iw_nll": "IW-NLL",
    "val_neg_elbo": "val -ELBO (best epoch)",
}


def sweep_metrics(groups: list[list[dict]]) -> dict[str, str]:
    """SWEEP_METRICS that the runs have (IW-NLL only with --eval-iw-samples)."""
    evaluated = groups[0][0]["evaluation"]
    return {k: v for k, v in SWEEP_METRICS.items() if k in evaluated or k.startswith("val_")}


def sweep_rows(
    config: Config, groups: list[list[dict]], agreements: list[dict | None]
) -> tuple[list[dict], list[dict]]:
    """One row per point x seed, and one per point (mean and sample std over seeds, ddof=1, and
    with several seeds their agreement: seed_agreement's mean and min)."""
    rows, point_rows, metrics = [], [], sweep_metrics(groups)
    for point, point_config, group, agreement in zip(
        configs.sweep_grid(config), sweep_points(config), groups, agreements, strict=True
    ):
        seed_rows = [
            {
                **point,
                "seed": seed_config.seed,
                **{
                    name: summary["training"]["val_at_best_epoch"]["neg_elbo"]
                    if name == "val_neg_elbo"
                    else summary["evaluation"][name]
                    for name in metrics
                },
                "best_epoch": summary["training"]["best_epoch"],
                "status": summary.get("status", "finished"),
            }
            for summary, seed_config in zip(group, seed_configs(point_config), strict=True)
        ]
        rows += seed_rows
        stats = {}
        for name in metrics:
            values = np.array([row[name] for row in seed_rows])
            stats[f"{name}_mean"] = float(np.mean(values))
            stats[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        if agreement is not None:
            stats |= {"seed_agreement": agreement["mean"], "seed_agreement_min": agreement["min"]}
        point_rows.append({**point, "dir": configs.point_name(point), **stats})
    return rows, point_rows


def write_sweep_report(
    run_dir: Path, config: Config, groups: list[list[dict]], agreements: list[dict | None]
) -> None:
    """The sweep's summary.json, sweep.csv (point x seed), sweep_points.csv (mean and std per
    point), figures/sweep.png and REPORT.md, from each point's seed summaries."""
    rows, point_rows = sweep_rows(config, groups, agreements)
    names, metrics = swept_names(config), sweep_metrics(groups)
    write_json(
        run_dir / "summary.json",
        {
            "sweep": list(config.sweep),
            "seeds": list(replica_seeds(config)),
            "points": point_rows,
            "runs": rows,
        },
    )
    for file, table in (("sweep.csv", rows), ("sweep_points.csv", point_rows)):
        atomic_write(run_dir / file, lambda f, t=table: f.write(history_csv(t, True).encode()))
    if config.figures:
        plot_sweep(run_dir / "figures", names, metrics, rows, point_rows)
    seeds = replica_seeds(config)
    agreeing = int(len(seeds) > 1)  # the seed agreement's column
    lines = [
        f"# Sweep report: {run_dir.name}",
        "",
        f"{len(point_rows)} grid points ({' x '.join(config.sweep)}), "
        f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
        + (
            f", one of {config.restarts} restarts each kept by {config.restart_choice}"
            if config.restarts > 1
            else ""
        )
        + f": {len(replicas(config))} replicas trained side by side in one compiled epoch "
        f"({groups[0][0]['training']['training_time_sec']:.1f} s of training). Test metrics of "
        "each run's best model"
        + (", mean ± sample std over the seeds" if len(seeds) > 1 else "")
        + (
            "; the last two columns are label-free, the ones to choose a point by: how well the "
            "model fits (validation -ELBO) and how reproducible its clustering is (seed "
            "agreement: the mean, and lowest, adjusted Rand index between two seeds' channels of "
            "the same training images)."
            if agreeing
            else "; the last column is label-free, the one to choose a point by."
        ),
        "",
        "| "
        + " | ".join(
            [*(configs.flag(n) for n in names), *metrics.values()]
            + ["seed agreement (lowest)"] * agreeing
        )
        + " |",
        "|" + "---|" * (len(names) + len(metrics) + agreeing),
    ]
    for row in point_rows:
        cells = [
            f"[{row[n]:g}]({row['dir']}/REPORT.md)" if i == 0 else f"{row[n]:g}"
            for i, n in enumerate(names)
        ]
        cells += [
            number(row[f"{name}_mean"], ".3f")
            + (f" ± {number(row[f'{name}_std'], '.3f')}" if len(seeds) > 1 else "")
            for name in metrics
        ]
        if agreeing:
            cells.append(f"{row['seed_agreement']:.3f} ({row['seed_agreement_min']:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![sweep](figures/sweep.png)"] if config.figures else []
    lines += [
        "",
        "Per run: `sweep.csv`; per point: `sweep_points.csv`; each point's directory is laid out "
        "as a run of its flags (with several seeds, `seed_<s>/` each and their mean ± std).",
        "",
        *config_table(config),
    ]
    atomic_write(run_dir / "REPORT.md", lambda f: f.write("\n".join(lines).encode()))
    print(f"report ({len(point_rows)} sweep points): {run_dir / 'REPORT.md'}")


def plot_sweep(
    fig_dir: Path, names: list[str], metrics: dict, rows: list[dict], point_rows: list[dict]
) -> None:
    """figures/sweep.png: each metric (mean +- std over seeds) against the first swept value, or
    against M / sigma when both are swept, one line per value of the other swept names; and,
    with the IW-NLL, the trade of clustering against likelihood: each run's test accuracy
    against its IW-NLL, one colour per point."""
    plt = pyplot()
    fig_dir.mkdir(exist_ok=True)
    ratio = {"prior_mean", "prior_sigma"} <= set(names)
    x_name = "M / sigma" if ratio else configs.flag(names[0])

    def x_of(row):
        return row["prior_mean"] / row["prior_sigma"] if ratio else row[names[0]]

    others = [n for n in names if n not in (("prior_mean", "prior_sigma") if ratio else names[:1])]
    series = {}
    for row in point_rows:
        series.setdefault(tuple(row[n] for n in others), []).append(row)
    trade = "iw_nll" in metrics
    fig, axes = plt.subplots(3, 3, figsize=(12, 9.6))
    for ax in axes.flat[len(metrics) + trade :]:
        ax.set_visible(False)
    for ax, (name, label) in zip(axes.flat, metrics.items(), strict=False):
        for values, points in series.items():
            points = sorted(points, key=x_of)
            ax.errorbar(
                [x_of(row) for row in points],
                [row[f"{name}_mean"] for row in points],
                yerr=[row[f"{name}_std"] for row in points],
                marker="o",
                capsize=3,
                label=", ".join(
                    f"{configs.flag(n)[2:]} {v:g}" for n, v in zip(others, values, strict=True)
                )
                or None,
            )
        ax.set_title(label)
        ax.set_xlabel(x_name)
        ax.set_ylabel("nats" if "ELBO" in label or "NLL" in label else label)
        ax.grid(alpha=0.3)
    if others:
        axes.flat[0].legend(fontsize=8)
    if trade:
        ax = axes.flat[len(metrics)]
        for point in point_rows:
            runs = [row for row in rows if all(row[n] == point[n] for n in names)]
            ax.scatter(
                [row["iw_nll"] for row in runs],
                [row["cluster_accuracy"] for row in runs],
                label=point["dir"],
                s=18,
            )
        ax.set_title("each run: accuracy against IW-NLL")
        ax.set_xlabel("test IW-NLL (nats)")
        ax.set_ylabel("test cluster accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(fig_dir / "sweep.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Many processes (--distributed): process 0 writes
# --------------------------------------------------------------------------------------


def join_processes(config: Config) -> None:
    """--distributed: connect this process to the others (jax.distributed, CPU collectives over
    gloo); a process other than 0 prints nothing but errors."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            config.coordinator_address, config.num_processes, config.process_id
        )
    except (RuntimeError, ValueError) as error:
        text = str(error).strip()
        message = text.splitlines()[0] if text else type(error).__name__
        raise ConfigError(
            f"--distributed could not connect the processes ({message}): give "
            "--coordinator-address, --num-processes and --process-id, or start it under SLURM, "
            "Open MPI or Kubernetes"
        ) from None
    if jax.process_index() > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)


def claim_for_all_processes(config: Config) -> tuple[Path, Path | None]:
    """claim_run_dir, by process 0 alone in a --distributed run: the other processes write into
    a private scratch directory (deleted at exit), and raise process 0's refusal, if any, as
    their own."""
    if jax.process_count() == 1:
        return claim_run_dir(config)
    claimed, refusal = (None, None), ""
    if jax.process_index() == 0:
        try:
            claimed = claim_run_dir(config)
        except ConfigError as error:
            refusal = str(error)
    raise_refusal_of_process_zero(refusal)
    return claimed if jax.process_index() == 0 else (scratch_dir(), None)


def raise_refusal_of_process_zero(refusal: str) -> None:
    """Raise process 0's refusal ("" for none) as a ConfigError on every process (a collective
    in a --distributed run: every process calls it; the others' `refusal` is not read)."""
    if jax.process_count() > 1:
        refusal = text_from_process_zero(refusal)
    if refusal:
        raise ConfigError(refusal)


def scratch_dir() -> Path:
    """A private directory for a process other than 0 to write into, deleted at exit."""
    path = Path(tempfile.mkdtemp(prefix=f"mixvae-process{jax.process_index()}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def text_from_process_zero(text: str, size: int = 4096) -> str:
    """Process 0's `text` on every process (a collective: every process calls it)."""
    raw = np.zeros(size, np.uint8)
    encoded = text.encode()[:size]
    raw[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    shared = multihost_utils.broadcast_one_to_all(raw)
    return bytes(np.asarray(shared)).rstrip(b"\0").decode(errors="replace")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def validate_only(config: Config, data: Dataset, mesh: Mesh, run_dir: Path | None) -> None:
    """Build the model and trace the loss on one batch, abstractly (shapes only: nothing runs)."""
    input_dim = data.train.images.shape[1]

    def trace(key):
        model = build_model(config, input_dim, key)
        x = jnp.zeros((config.batch_size, input_dim), jnp.float32)
        loss, _ = mixvae.loss_fn(model, x, key, schedule(config, 0), build_objective(config))
        return eqx.filter(model, eqx.is_inexact_array), loss

    params, loss = jax.eval_shape(trace, jax.random.key(config.seed))
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(
        f"config ok: {data.name}, {len(data.train.images)} training images, "
        f"K={config.num_components}, "
        f"D={config.latent_dim}, c-regularizer {config.c_regularizer}"
    )
    print(f"model: {num_params:,} parameters; loss traces to {loss.shape} {loss.dtype}")
    print(
        f"seeds {' '.join(map(str, replica_seeds(config)))} ({describe_replicas(config)}); each "
        f"batch sharded over {mesh.size} device(s)"
    )
    if config.sweep:
        names = [configs.point_name(point) for point in configs.sweep_grid(config)]
        print(f"sweep points, a directory each: {', '.join(names)}")
    where = run_dir or config.out_dir or f"runs/<timestamp>-{run_name(config)}"
    print(f"would write the run to {where}/ (nothing trained, nothing written)")


RESUME_FLAGS = {"resume", "epochs", "checkpoint_every", *EVALUATION_FLAGS, *PROCESS_FLAGS}


def resumed_config(config: Config, given: set[str]) -> Config:
    """--resume RUN_DIR: the run's saved config, with this call's --epochs (default: the run's
    own), --checkpoint-every, --eval-iw-samples and --figures where given. Any other flag is
    refused by name: a resumed run keeps its configuration."""
    problem = f"--resume={config.resume!r} is not allowed"
    other = sorted(given - RESUME_FLAGS)
    if other:
        raise ConfigError(
            f"{problem} with {', '.join(configs.flag(name) for name in other)}: a resumed run "
            "keeps its config.json; only "
            + ", ".join(
                configs.flag(name) for name in sorted(RESUME_FLAGS - PROCESS_FLAGS - {"resume"})
            )
            + " and the --distributed flags change"
        )
    try:
        saved = config_from_json(json.loads((Path(config.resume) / "config.json").read_text()))
    except OSError:
        raise ConfigError(f"{problem}: not a run directory (no config.json)") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{problem}: config.json does not parse ({error})") from None
    changes = {name: getattr(config, name) for name in given & RESUME_FLAGS - {"resume"}}
    return configs.validate(dataclasses.replace(saved, **changes))


def check_resumable(run_dir: Path, config: Config, state: TrainState, given: set[str]) -> None:
    """Refuse a resumption that would train nothing."""
    done = state.epoch
    if not state.running.any():
        raise ConfigError(
            f"--resume={str(run_dir)!r} is not allowed: it stopped early after epoch {done} (no "
            f"better val_{config.monitor} for {config.patience} epochs); nothing to continue"
        )
    if config.epochs <= done:
        if "epochs" in given:
            raise ConfigError(
                f"--epochs={config.epochs} is not allowed with --resume: the run has trained "
                f"{done} epochs already; give more"
            )
        raise ConfigError(
            f"--resume={str(run_dir)!r} is not allowed: the run finished its {done} epochs; "
            f"give --epochs N (N > {done}) to train on"
        )


def run(config: Config, given: set[str] = frozenset()) -> tuple[Path, Outcome]:
    """The program: validate, load, train (or resume), then evaluate and write every artifact.
    `given`: the flags typed (for --resume, which accepts only a few)."""
    configs.validate(config)
    both = [name for name in swept_names(config) if name in given]
    if both:
        raise ConfigError(
            f"{configs.flag(both[0])} is not allowed with --sweep {both[0].replace('_', '-')}=...: "
            "give its values in the sweep only"
        )
    if config.eval_only:
        return reevaluate(config), Outcome("finished", "")
    resuming = config.resume is not None
    run_dir = Path(config.resume) if resuming else None
    config = resumed_config(config, given) if resuming else config
    timings = {"imports": IMPORTS_SEC}
    fresh = not resuming and not config.validate_only
    building = None
    if fresh:  # a taken --out-dir is refused before any work (claim_run_dir checks it again)
        raise_refusal_of_process_zero(out_dir_refusal(config) if jax.process_index() == 0 else "")
    try:
        with timed(timings, "data"):
            if fresh:  # the replicas are built (their initialiser compiled) while the data loads
                building = in_background(initial_state, config, pixels_per_image(config))
            data = load_dataset(config)
        with timed(timings, "backend"):
            mesh = data_mesh(config)
    except BaseException:
        if building is not None:  # no thread left compiling when the error ends the process
            with contextlib.suppress(Exception):
                building()
        raise
    seeds = replica_seeds(config)
    if config.validate_only:
        validate_only(config, data, mesh, run_dir)
        return run_dir, Outcome("finished", "")
    replaced = None
    if resuming:
        with timed(timings, "initialisation"):
            state = load_state(run_dir, config, data.train.images.shape[1])
        check_resumable(run_dir, config, state, given)
        if jax.process_index() > 0:  # read the run directory, write a scratch copy of it
            shutil.copytree(run_dir, run_dir := scratch_dir(), dirs_exist_ok=True)
        write_json(run_dir / "config.json", dataclasses.asdict(config))
        print(f"resuming {run_dir} after epoch {state.epoch}, up to epoch {config.epochs}")
    else:
        with timed(timings, "initialisation"):  # what of it outlasted the data's loading
            state = building()
        run_dir, replaced = claim_for_all_processes(config)
        for directory, point in zip(point_dirs(run_dir, config), sweep_points(config), strict=True):
            if config.sweep:  # each point a directory of its own, as a run of it writes it
                directory.mkdir()
                write_json(directory / "config.json", dataclasses.asdict(point))
        if len(seeds) > 1:  # each seed a run directory of its own, as a single-seed run writes it
            for directory, seed_config in zip(
                seed_dirs(run_dir, config), seed_configs(config), strict=True
            ):
                directory.mkdir()
                write_json(directory / "config.json", dataclasses.asdict(seed_config))
    print(f"run directory: {run_dir} ({describe_replicas(config)})")
    placed = put(replica(state.models, 0), NamedSharding(mesh, P()))  # as train() places it
    evaluation_compiled = in_background(compile_evaluation, placed, config, data)
    if config.figures:
        in_background(pyplot)  # matplotlib loads while the training runs
    neighbors = None
    if warps_neighbours(config):  # each process computes it from the same training images
        with timed(timings, "neighbours"):
            neighbors = jax.block_until_ready(
                mixvae.nearest_neighbors(
                    mixvae.deskew(data.train.images), config.consistency_neighbors
                )
            )
    try:
        with timed(timings, "training"):
            results, outcome = train(config, data, state, run_dir, neighbors)
        timings["compile"] = results[0].compile_time  # included in training
        evaluation_compiled()
    finally:
        if replaced is not None:
            settle_overwrite(run_dir, replaced, trained=state.epoch > 0)
    if outcome.status == "diverged":
        outcome = outcome._replace(kept=kept_after_divergence(state, results, replaced))
    if config.restarts > 1 and results[0].history:
        recurring = None
        if config.restart_choice == "agreement":
            recurring = candidates_recurrence(results, config, data)
        results = choose_restarts(results, config.restarts, config.monitor, recurring)
        for result, directory in zip(results, seed_dirs(run_dir, config), strict=True):
            write_history(directory / "history.csv", result.history)
    if not results[0].history:  # stopped within the first epoch: nothing to evaluate
        if replaced is not None:  # the previous run is back in run_dir
            return run_dir, outcome
        write_json(
            run_dir / "summary.json",
            status_of(outcome),
        )
        return run_dir, outcome
    summaries, seed_channels = [], []
    seed_keys = replica_keys([(result.seed, 0) for result in results])
    for result, directory, seed_config, (_, _, figure_key, iw_key) in zip(
        results, seed_dirs(run_dir, config), seed_configs(config), seed_keys, strict=True
    ):
        save_checkpoint(directory, result.model, seed_config, result.best_epoch)
        if result.diverged:
            print(f"warning ({directory}): diverged: {result.diverged}", file=sys.stderr)
        summary, channels = evaluate_and_report(
            directory,
            seed_config,
            data,
            result,
            replica_outcome(result, outcome),
            iw_key,
            figure_key,
            timings,
        )
        summaries.append(summary)
        seed_channels.append(channels)
    write_group_reports(run_dir, config, summaries, seed_channels)
    return run_dir, outcome


def settle_overwrite(run_dir: Path, replaced: Path, trained: bool) -> None:
    """--overwrite: delete the previous run once the new one has trained an epoch; otherwise put
    the previous run back where it was."""
    if trained:
        shutil.rmtree(replaced)
        return
    shutil.rmtree(run_dir)
    replaced.rename(run_dir)


def kept_after_divergence(
    state: TrainState, results: list[TrainResult], replaced: Path | None
) -> str:
    """What a diverged run's directory holds, in words (for stderr and summary.json)."""
    if state.epoch == 0 and replaced is not None:
        return "nothing finite to keep: the previous run is back in the run directory as it was"
    if state.epoch == 0:
        return "nothing finite to keep: the run directory holds config.json and summary.json"
    best = ", ".join(str(result.best_epoch) for result in results)
    return (
        f"the run directory holds history.csv and train_state.ckpt of the {state.epoch} finite "
        f"epoch(s) (--resume continues from epoch {state.epoch}), the best model checkpoint.eqx "
        f"(epoch {best}) and its evaluation in summary.json and REPORT.md"
    )


EVALUATION_PHASES = ("test_evaluation", "iw_nll", "figures", "report")  # per run directory


@contextlib.contextmanager
def timed(timings: dict[str, float], phase: str):
    """Add the block's wall time to timings[phase], in seconds."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


def evaluate_and_report(
    run_dir: Path,
    config: Config,
    data: Dataset,
    result: TrainResult,
    outcome: Outcome,
    iw_key,
    figure_key,
    timings: dict[str, float],
):
    """Test evaluation of the best model, then the figures, summary.json and REPORT.md; returns
    the summary and the training images' channels. `timings`: the seconds of the phases before
    (imports, data, ...), to which this adds its own."""
    timings = dict(timings)
    with timed(timings, "test_evaluation"):
        evaluation_metrics, responsibilities, usage, training_channels = evaluation(
            result.model, config, data, result.best_k_active
        )
    if config.eval_iw_samples:
        print(
            f"test IW-NLL: {config.eval_iw_samples} importance samples for each of the "
            f"{len(data.test.images)} test images (--eval-iw-samples 0 skips it)",
            flush=True,
        )
        with timed(timings, "iw_nll"):
            evaluation_metrics["iw_nll"] = iw_nll(
                result.model, config, data.test.images, result.best_k_active, iw_key
            )
        evaluation_metrics["iw_samples"] = config.eval_iw_samples
    summary = summary_of(config, data, result, evaluation_metrics, outcome)
    summary["warnings"] = failure_warnings(
        result, evaluation_metrics, responsibilities, data.test.labels
    )
    for warning in summary["warnings"] if jax.process_index() == 0 else []:
        print(f"warning ({run_dir}): {warning}", file=sys.stderr)
    figures = {}
    if config.figures:
        with timed(timings, "figures"):
            figures = plot_figures(
                run_dir / "figures", config, data, result, responsibilities, usage, figure_key
            )
    summary["timing_sec"] = {phase: round(seconds, 3) for phase, seconds in timings.items()}
    with timed(timings, "report"):
        write_report(run_dir, config, summary, figures)
        write_json(run_dir / "summary.json", summary)
    print(
        f"test (seed {config.seed}): "
        + "  ".join(
            f"{name} {number(evaluation_metrics[name], '.3f')}"
            for name in HEADLINE
            if name in evaluation_metrics
        )
    )
    print(f"report: {run_dir / 'REPORT.md'}")
    return summary, training_channels


def failure_warnings(result: TrainResult, metrics: dict, responsibilities, labels) -> list[str]:
    """Signs of a failed run, one line each: with more than one open channel, (nearly) every
    test image in one channel, or confident routing with a clustering accuracy near chance
    (below 1.5 x the largest class's share); a validation -ELBO that never fell below its first
    epoch's value; a curriculum that ran out of epochs while still unlocking."""
    warnings = []
    counts = np.bincount(responsibilities.argmax(-1), minlength=responsibilities.shape[-1])
    if result.best_k_active > 1 and counts.max() >= 0.99 * counts.sum():
        warnings.append(
            f"collapsed: {counts.max()} of {counts.sum()} test images are routed to channel "
            f"{counts.argmax()}"
        )
    chance = np.bincount(labels).max() / len(labels)
    confidence, accuracy = metrics["responsibility_confidence"], metrics["cluster_accuracy"]
    if result.best_k_active > 1 and confidence > 0.9 and accuracy < 1.5 * chance:
        warnings.append(
            f"confident routing (E[max r] = {confidence:.3f}) but cluster accuracy "
            f"{accuracy:.3f}, near chance ({chance:.3f})"
        )
    val_neg_elbo = [row["val_neg_elbo"] for row in result.history]
    if len(val_neg_elbo) > 1 and min(val_neg_elbo[1:]) >= val_neg_elbo[0]:
        warnings.append(
            f"the validation -ELBO never fell below its first epoch's {val_neg_elbo[0]:.2f}"
        )
    curriculum = result.curriculum
    if curriculum and curriculum.unlocking and curriculum.k_active < curriculum.num_components:
        warnings.append(
            f"the curriculum ran out of epochs with {curriculum.k_active} of "
            f"{curriculum.num_components} channels open: give more --epochs"
        )
    return warnings


def evaluation_flags(config: Config) -> dict:
    """This call's --eval-iw-samples and --figures, which --eval-only applies to a saved run."""
    return {name: getattr(config, name) for name in EVALUATION_FLAGS}


def config_from_json(saved: dict) -> Config:
    tuples = {name: tuple(saved.get(name, ())) for name in ("seeds", "sweep")}
    return Config(**{**saved, **tuples})


def reevaluate(config: Config) -> Path:
    """--eval-only --checkpoint RUN_DIR: evaluate the saved best model(s) again (with this call's
    --eval-iw-samples and --figures) and rewrite the run's evaluation, figures and REPORT.md; no
    training. A --seeds run or a sweep is re-evaluated seed by seed, then its mean +- std and
    sweep reports are rewritten."""
    run_dir = Path(config.checkpoint)
    if (run_dir / STATE_FILE).is_file() and not any(run_dir.rglob("checkpoint.eqx")):
        raise ConfigError(
            f"--checkpoint={str(run_dir)!r} is not allowed: the run stopped before its evaluation "
            f"({STATE_FILE} holds epoch {saved_epoch(run_dir)}); continue it with: python train.py "
            f"--resume {run_dir}"
        )
    try:
        saved = config_from_json(json.loads((run_dir / "config.json").read_text()))
    except (OSError, TypeError, ValueError):
        saved = None  # reevaluate_run names what is missing
    if saved is None:
        reevaluate_run(run_dir, config)
        return run_dir
    saved = dataclasses.replace(saved, **evaluation_flags(config))
    summaries, seed_channels = zip(
        *(reevaluate_run(directory, config) for directory in seed_dirs(run_dir, saved)), strict=True
    )
    write_group_reports(run_dir, saved, list(summaries), list(seed_channels))
    return run_dir


def reevaluate_run(run_dir: Path, config: Config) -> tuple[dict, np.ndarray]:
    """Re-evaluate one seed's run directory; returns its new summary and the training images'
    channels."""
    needed = ["checkpoint.eqx", "checkpoint.json", "summary.json", "history.csv"]
    if not all((run_dir / name).is_file() for name in needed):
        raise ConfigError(
            f"--checkpoint={str(run_dir)!r} is not allowed: not a run directory (it needs "
            f"{', '.join(needed)})"
        )
    try:
        saved = config_from_json(json.loads((run_dir / "checkpoint.json").read_text())["config"])
        saved = configs.validate(dataclasses.replace(saved, **evaluation_flags(config)))
        summary = json.loads((run_dir / "summary.json").read_text())
        with open(run_dir / "history.csv") as f:
            history = [
                {name: float(value) for name, value in row.items()} for row in csv.DictReader(f)
            ]
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(
            f"--checkpoint={str(run_dir)!r} is not allowed: its files do not parse ({error})"
        ) from None
    data = load_dataset(saved)
    _, _, figure_key, iw_key = replica_keys([(saved.seed, 0)])[0]
    skeleton = eqx.filter_eval_shape(
        build_model, saved, data.train.images.shape[1], jax.random.key(0)
    )
    try:
        model = eqx.tree_deserialise_leaves(run_dir / "checkpoint.eqx", skeleton)
    except Exception as error:  # equinox raises several kinds for a mismatched or truncated file
        raise ConfigError(
            f"--checkpoint={str(run_dir)!r} is not allowed: checkpoint.eqx does not match its "
            f"config ({type(error).__name__})"
        ) from None
    curriculum = Curriculum.from_config(saved)
    if curriculum is not None:
        curriculum.k_active = summary["curriculum"]["final_k_active"]
        curriculum.unlock_epochs = summary["curriculum"]["unlock_epochs"]
    training = summary["training"]
    best_k_active = summary.get("curriculum", {}).get("best_model_k_active", saved.num_components)
    result = TrainResult(
        saved.seed,
        model,
        history,
        training["best_epoch"],
        best_k_active,
        training["training_time_sec"],
        training["compile_time_sec"],
        curriculum,
        **(
            {
                "restart": summary["restarts"]["chosen"],
                "restart_scores": tuple(summary["restarts"][f"val_{saved.monitor}"]),
                "restart_recurrence": tuple(summary["restarts"].get("recurrence", ())),
            }
            if "restarts" in summary
            else {}
        ),
    )
    outcome = Outcome(
        summary.get("status", "finished"),
        summary.get("status_detail", ""),
        kept=summary.get("kept", ""),
    )
    timing = summary.get("timing_sec", {})
    timings = {k: v for k, v in timing.items() if k not in EVALUATION_PHASES}
    return evaluate_and_report(run_dir, saved, data, result, outcome, iw_key, figure_key, timings)


def enable_compilation_cache() -> None:
    """Keep XLA executables on disk (as JAX_COMPILATION_CACHE_DIR would), so a rerun of the same
    shapes skips compilation (README, Speed: the usage line cold and warm)."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        jax.config.update("jax_compilation_cache_dir", str(cache_home / "mixvae" / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = configs.validate(parse_config(argv))
        if config.distributed:
            join_processes(config)
        enable_compilation_cache()
        run_dir, outcome = run(config, given_flags(argv))
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second signal: stopped at once
        print("error: interrupted; the run directory keeps its last checkpoint", file=sys.stderr)
        return 130
    if outcome.status == "interrupted":
        print(
            f"interrupted ({outcome.detail}); continue with: python train.py --resume {run_dir}",
            file=sys.stderr,
        )
        return 128 + outcome.signal
    if outcome.status == "diverged":
        print(f"error: diverged: {outcome.detail}; {outcome.kept}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    # output piped into a reader that closes early (`--help | head`): exit quietly
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
