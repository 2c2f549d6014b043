"""Train, evaluate and report a mixture VAE.

    python train.py --c-regularizer logit_mog --prior-mean 7
    python train.py --help

Reads top to bottom: command line -> data -> schedules -> training loop -> evaluation ->
artifacts (config.json, history.csv, summary.json, REPORT.md, figures/, checkpoint.eqx).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gzip
import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import tyro
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_digits
from sklearn.metrics import adjusted_rand_score, confusion_matrix, normalized_mutual_info_score
from sklearn.model_selection import train_test_split
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import configs
import mixvae
from configs import Config, ConfigError

matplotlib.use("Agg")  # figures are files; never open a window

# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_config(argv: list[str]) -> Config:
    """tyro flags on top of the defaults of `--preset NAME` (or of Config())."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--preset")
    preset = peek.parse_known_args(argv)[0].preset
    default = configs.PRESETS.get(preset, Config())
    return tyro.cli(Config, args=argv, default=default)


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

# The four standard IDX files of each MNIST-style dataset: mirrors, and the official MD5 of each .gz.
IDX_DATASETS = {
    "mnist": (
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    ),
    "fashion-mnist": (
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    ),
}
IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers: unsigned bytes, 3 and 1 dimensions


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
    """The four files, downloaded first where missing, each checked against its official MD5."""
    mirrors, checksums = IDX_DATASETS[dataset]
    missing = [name for name in checksums if not (data_dir / name).is_file()]
    if missing:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            for name in missing:
                for i, mirror in enumerate(mirrors):
                    try:
                        download(mirror + name, data_dir / name)
                        break
                    except OSError:
                        if i == len(mirrors) - 1:
                            raise
        except OSError as error:
            raise DataError(
                f"{dataset}: {', '.join(missing)} not found in {data_dir} and could not be downloaded "
                f"({error}); download them from {mirrors[0]} into that directory by hand, or pass "
                "--data-dir DIR holding them") from None
    for name, expected in checksums.items():
        digest = hashlib.md5((data_dir / name).read_bytes()).hexdigest()
        if digest != expected:
            raise DataError(f"{data_dir / name}: MD5 {digest} is not the official {expected} (a corrupt or "
                            "truncated file: delete it to download it again)")
    return {name: data_dir / name for name in checksums}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX array of unsigned bytes from a gzip file, its header checked against its contents."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataError(f"{path}: IDX magic number {found} is not {magic}")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    values = np.frombuffer(raw, np.uint8, offset=min(len(raw), 4 + 4 * ndim))
    if values.size != int(np.prod(shape)):
        raise DataError(f"{path}: the header promises shape {shape} ({int(np.prod(shape))} values) but the "
                        f"file holds {values.size}")
    return values.reshape(shape)


def read_idx_split(images_path: Path, labels_path: Path) -> Split:
    images, labels = read_idx(images_path, IDX_IMAGES), read_idx(labels_path, IDX_LABELS)
    if images.shape[1] != images.shape[2] or len(images) != len(labels) or labels.max(initial=0) > 9:
        raise DataError(f"{images_path}: images {images.shape} and labels {labels.shape} (max "
                        f"{labels.max(initial=0)}) are not N square images with N labels in 0..9")
    return Split(images.reshape(len(images), -1), labels.astype(np.int64))


def split_seed(config: Config) -> int:
    return config.seed if config.split_seed is None else config.split_seed


def load_dataset(config: Config) -> Dataset:
    """digits: sklearn's 8x8 digits scaled to [0, 1], split train/val/test (stratified, by the
    split seed).
    mnist, fashion-mnist: the official IDX files as uint8; the official test split; --num-samples
    takes a stratified subset of the training split; validation is held out of the training split."""
    if config.dataset == "digits":
        digits = load_digits()
        images = (digits.data / 16.0).astype(np.float32)
        labels = digits.target.astype(np.int64)
        rest_x, test_x, rest_y, test_y = train_test_split(
            images, labels, test_size=DIGITS_TEST_FRACTION, random_state=split_seed(config), stratify=labels)
        rest, test, side = Split(rest_x, rest_y), Split(test_x, test_y), 8
    else:
        paths = fetch_idx_files(config.dataset, data_dir_of(config))
        rest = read_idx_split(paths["train-images-idx3-ubyte.gz"], paths["train-labels-idx1-ubyte.gz"])
        test = read_idx_split(paths["t10k-images-idx3-ubyte.gz"], paths["t10k-labels-idx1-ubyte.gz"])
        side = mixvae.image_side(rest.images.shape[1])
    if config.num_samples is not None and config.num_samples < len(rest.images):
        x, _, y, _ = train_test_split(rest.images, rest.labels, train_size=config.num_samples,
                                      random_state=split_seed(config), stratify=rest.labels)
        rest = Split(x, y)
    train_x, val_x, train_y, val_y = train_test_split(
        rest.images, rest.labels, test_size=config.val_split, random_state=split_seed(config), stratify=rest.labels)
    data = Dataset(config.dataset, Split(train_x, train_y), Split(val_x, val_y), test, side)
    if config.batch_size > len(data.train.images):
        raise ConfigError(f"--batch-size={config.batch_size} is not allowed: must be at most the "
                          f"{len(data.train.images)} training images of {data.name}")
    return data


# --------------------------------------------------------------------------------------
# Model, objective and schedules from the config
# --------------------------------------------------------------------------------------


def replica_seeds(config: Config) -> tuple[int, ...]:
    """The seeds trained side by side: --seeds, else --seed alone."""
    return config.seeds or (config.seed,)


def replica_keys(seeds) -> jax.Array:
    """Per seed s: key(s) split into (init, train, figures, importance sampling) keys -> [R, 4]."""
    return jax.vmap(lambda seed: jax.random.split(jax.random.key(seed), 4))(jnp.asarray(seeds))


def build_replicas(config: Config, input_dim: int, init_keys):
    """One model per key, stacked on a leading replica axis."""
    return eqx.filter_vmap(lambda key: build_model(config, input_dim, key))(init_keys)


def replica(stacked, r: int):
    """Replica r of a pytree stacked on a leading replica axis."""
    arrays, static = eqx.partition(stacked, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a: a[r], arrays), static)


def select_replicas(take, new, old):
    """Per replica r: new[r] where take[r], else old[r] (pytrees stacked on axis 0)."""
    arrays, static = eqx.partition(new, eqx.is_array)
    chosen = jax.tree.map(lambda n, o: jnp.where(take.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
                          arrays, eqx.filter(old, eqx.is_array))
    return eqx.combine(chosen, static)


def data_mesh(config: Config) -> Mesh:
    """A one-axis ("data") mesh over --devices local devices (default: all of them)."""
    available = jax.devices()
    count = len(available) if config.devices is None else config.devices
    if count > len(available):
        raise ConfigError(f"--devices={count} is not allowed: this process sees {len(available)} device(s)")
    if config.batch_size % count:
        raise ConfigError(f"--batch-size={config.batch_size} is not allowed: it must divide by the {count} "
                          "devices (set --devices)")
    return Mesh(np.array(available[:count]), ("data",))


def put(tree, sharding):
    """device_put the arrays of a pytree (an Equinox module, say) with `sharding`."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, sharding), static)


def build_model(config: Config, input_dim: int, key):
    return mixvae.MixVAE(
        key, input_dim=input_dim, num_components=config.num_components, latent_dim=config.latent_dim,
        latent_layout=config.latent_layout, encoder=config.encoder, decoder=config.decoder,
        conditioning=config.decoder_conditioning, likelihood=config.likelihood,
        width=config.hidden_dim, logit_init_scale=config.logit_init_scale, learnable_pi=config.learnable_pi,
    )


def build_objective(config: Config):
    return mixvae.Objective(
        c_regularizer=config.c_regularizer, kl_c_weight=config.kl_c_weight,
        prior_weight=config.prior_weight, prior_mean=config.prior_mean, prior_sigma=config.prior_sigma,
        beta_z=config.beta_z, dirichlet_alpha=config.dirichlet_alpha,
        dirichlet_weight=config.dirichlet_weight, diversity_weight=config.diversity_weight,
        router=config.router,
    )


def kl_c_scale(config: Config, epoch: int) -> float:
    """a(e) = min(1, (e + 1) / kl_c_anneal_epochs), 1 when that is 0."""
    if config.kl_c_anneal_epochs == 0:
        return 1.0
    return min(1.0, (epoch + 1) / config.kl_c_anneal_epochs)


def temperature(config: Config, epoch: int) -> float:
    """tau(e) = tau0 (tau_min / tau0)^min(1, e / N): exponential decay over N epochs."""
    n = config.gumbel_temperature_anneal_epochs
    progress = 1.0 if n == 0 else min(1.0, epoch / n)
    return config.gumbel_temperature * (config.gumbel_temperature_min / config.gumbel_temperature) ** progress


@dataclasses.dataclass
class Curriculum:
    """Plateau-driven channel unlocking ("pots"). Call `update` once per epoch with the monitored
    validation loss; a channel opens when it has not improved (relatively, by min_delta) for
    `patience` epochs, and each unlock starts a kick of `kick_epochs` epochs. Unlocking stops at
    K, or when the plateau after an unlock is no better than the plateau before it."""

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
    def from_config(cls, config: Config) -> "Curriculum | None":
        if not config.curriculum:
            return None
        return cls(config.num_components, config.curriculum_start, config.unlock_patience,
                   config.unlock_min_delta, config.kick_epochs)

    def improves_on(self, loss: float, reference: float) -> bool:
        return reference == float("inf") or loss < reference - self.min_delta * abs(reference)

    def update(self, epoch: int, monitored: float) -> bool:
        """Record epoch `epoch` (1-based); return True when a channel opens for the next epoch."""
        self.kick_left = max(0, self.kick_left - 1)
        if self.improves_on(monitored, self.best):
            self.best, self.since_best = monitored, 0
        else:
            self.since_best += 1
        if not self.unlocking or self.since_best < self.patience:
            return False
        if self.k_active >= self.num_components or (
                self.best_before_unlock is not None and not self.improves_on(self.best, self.best_before_unlock)):
            self.unlocking = False
            return False
        self.best_before_unlock = self.best
        self.k_active += 1
        self.since_best = 0
        self.kick_left = self.kick_epochs
        self.unlock_epochs.append(epoch)
        return True


def schedule(config: Config, epoch: int, k_active: int | None = None, kick: bool = False):
    """The epoch's annealed values; the first `k_active` channels open (all by default); during
    a kick, softened routing, the newest channel's logit bias and a scaled logit-MoG term."""
    num_components = config.num_components
    k_active = num_components if k_active is None else k_active
    logit_bias = np.zeros(num_components, np.float32)
    if kick:
        logit_bias[k_active - 1] = config.kick_logit_bias
    tau = temperature(config, epoch)
    return mixvae.Schedule(
        kl_c_scale=kl_c_scale(config, epoch),
        temperature=max(tau, config.kick_temperature) if kick else tau,
        active_mask=np.arange(num_components) < k_active,
        logit_bias=logit_bias,
        prior_scale=config.kick_prior_scale if kick else 1.0,
        straight_through=not kick,
    )


def anneals_done(config: Config, epoch: int) -> bool:
    """Early stopping compares losses only once a(e) and tau(e) have reached their final values."""
    return epoch + 1 >= max(config.kl_c_anneal_epochs, config.gumbel_temperature_anneal_epochs + 1)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def to_floats(metrics) -> dict[str, float]:
    """The scalar metrics of mixvae.METRICS, in its order, as Python floats."""
    return {name: float(metrics[name]) for name in mixvae.METRICS}


class TrainResult(NamedTuple):
    """One replica's outcome: its best model and its history."""
    seed: int
    model: object
    history: list[dict]
    best_epoch: int
    best_k_active: int
    training_time: float
    compile_time: float
    curriculum: Curriculum | None


def train(config: Config, data: Dataset, models, keys) -> list[TrainResult]:
    """Train the stacked replicas `models` (one per seed, keys [R]) with one compiled call per
    epoch, each batch sharded over the data mesh; per replica, early stopping on the monitored
    validation metric with its best model kept; the curriculum, when on, opens channels between
    epochs."""
    seeds = replica_seeds(config)
    mesh = data_mesh(config)
    replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, None, "data"))
    objective = build_objective(config)
    optimizer = mixvae.make_optimizer(config.learning_rate)
    models = put(models, replicated)
    opt_states = put(eqx.filter_vmap(lambda model: mixvae.init_optimizer(optimizer, model))(models), replicated)
    keys = jax.device_put(keys, replicated)
    train_images = jax.device_put(data.train.images, replicated)
    val_images = jax.device_put(data.val.images, replicated)
    rngs = [np.random.default_rng(seed) for seed in seeds]
    num_train, batch_size = len(data.train.images), config.batch_size
    steps = num_train // batch_size
    histories, epoch_times = [[] for _ in seeds], []
    best_models, best_k_active = models, config.num_components
    best_value, best_epoch = np.full(len(seeds), np.inf), np.full(len(seeds), -1)
    since_best, running = np.zeros(len(seeds), int), np.ones(len(seeds), bool)
    curriculum = Curriculum.from_config(config)

    def mean(name, rows):  # over the replicas still running
        return float(np.mean([row[name] for row, on in zip(rows, running) if on]))

    start = time.perf_counter()
    bar = tqdm(range(config.epochs), desc="epochs", unit="epoch", leave=False, disable=None)
    for epoch in bar:
        tick = time.perf_counter()
        k_active = config.num_components if curriculum is None else curriculum.k_active
        kick_active = curriculum is not None and curriculum.kick_left > 0
        sched = schedule(config, epoch, k_active, kick_active)
        batches = np.stack([rng.permutation(num_train)[: steps * batch_size].reshape(steps, batch_size)
                            for rng in rngs])
        keys, epoch_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
        models, opt_states, step_metrics = mixvae.train_replicas(
            models, opt_states, train_images, jax.device_put(batches, batch_sharded), epoch_keys, sched,
            objective, optimizer)
        epoch_metrics = jax.vmap(mixvae.summarize)(step_metrics)
        train_metrics = [to_floats(replica(epoch_metrics, r)) for r in range(len(seeds))]
        val_metrics = [to_floats(mixvae.evaluate(replica(models, r), val_images, sched, objective)[0])
                       for r in range(len(seeds))]
        epoch_times.append(time.perf_counter() - tick)
        monitored = np.array([metrics[config.monitor] for metrics in val_metrics])
        unlocked = curriculum is not None and curriculum.update(epoch + 1, monitored[0])
        for r in np.flatnonzero(running):
            histories[r].append({
                "epoch": epoch + 1, "seed": seeds[r], **train_metrics[r],
                **{f"val_{k}": v for k, v in val_metrics[r].items()},
                "unlocked": int(unlocked), "kick_active": int(kick_active),
                **{f"usage_{k}": float(u) for k, u in enumerate(epoch_metrics["usage"][r])}})
        losses = np.array([metrics["loss"] for metrics in train_metrics])
        if not np.all(np.isfinite(losses[running])):
            raise FloatingPointError(f"the training loss became {losses} at epoch {epoch + 1}")
        if anneals_done(config, epoch):
            improved = running & (monitored < best_value)
            best_models = select_replicas(jnp.asarray(improved), models, best_models)
            best_value[improved], best_epoch[improved] = monitored[improved], epoch
            since_best = np.where(improved, 0, since_best + 1)
            best_k_active = k_active if improved[0] else best_k_active
        if unlocked:
            since_best[:] = 0  # early stopping restarts at each unlock
        tqdm.write(
            f"epoch {epoch + 1:3d}/{config.epochs}  loss {mean('loss', train_metrics):9.3f}  "
            f"val_loss {mean('loss', val_metrics):9.3f}  val_conf {mean('responsibility_confidence', val_metrics):.3f}  "
            f"val_k_eff {mean('k_eff', val_metrics):5.2f}  {epoch_times[-1]:6.2f}s"
            + (f"  (mean of {running.sum()} seeds)" if len(seeds) > 1 else "")
            + (f"  k_active {k_active}" if curriculum else "")
            + ("  -> unlock" if unlocked else ""))
        if config.patience:
            for r in np.flatnonzero(running & (since_best >= config.patience)):
                tqdm.write(f"early stop{f' (seed {seeds[r]})' if len(seeds) > 1 else ''}: no better "
                           f"val_{config.monitor} for {config.patience} epochs")
                running[r] = False
        if not running.any():
            break
    bar.close()
    never_improved = best_epoch < 0  # stopped before the anneals ended: keep the last model
    best_models = select_replicas(jnp.asarray(never_improved), models, best_models)
    best_epoch = np.where(never_improved, [len(h) - 1 for h in histories], best_epoch)
    steady = float(np.median(epoch_times[1:])) if len(epoch_times) > 1 else 0.0
    training_time, compile_time = time.perf_counter() - start, max(0.0, epoch_times[0] - steady)
    return [TrainResult(seed, replica(best_models, r), histories[r], int(best_epoch[r]) + 1,
                        best_k_active if best_epoch[r] >= 0 else k_active, training_time, compile_time, curriculum)
            for r, seed in enumerate(seeds)]


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def clustering_scores(channels, labels, train_channels, train_labels) -> dict[str, float]:
    """Clustering accuracy (Hungarian matching of channels to labels), NMI, ARI, and many-to-one
    accuracy (each channel mapped to its majority label on the training split)."""
    num = max(channels.max(), labels.max(), train_channels.max(), train_labels.max()) + 1
    contingency = confusion_matrix(channels, labels, labels=np.arange(num))  # [channel, label]
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    train_counts = confusion_matrix(train_channels, train_labels, labels=np.arange(num))
    majority = np.argmax(train_counts, axis=1)
    return {
        "cluster_accuracy": float(contingency[rows, cols].sum() / len(labels)),
        "nmi": float(normalized_mutual_info_score(labels, channels)),
        "ari": float(adjusted_rand_score(labels, channels)),
        "many_to_one_accuracy": float(np.mean(majority[channels] == labels)),
    }


def evaluate_split(model, config: Config, images, k_active: int):
    metrics, terms = mixvae.evaluate(model, jax.device_put(images), schedule(config, config.epochs, k_active),
                                     build_objective(config))
    return metrics, np.asarray(terms.responsibilities)


def iw_nll(model, config: Config, images, k_active: int, key) -> float:
    """Test -log p(x) by importance weighting with --eval-iw-samples samples."""
    log_likelihood = mixvae.evaluate_iw(model, images, key, schedule(config, config.epochs, k_active),
                                        config.eval_iw_samples)
    return float(-jnp.mean(log_likelihood))


def evaluation(model, config: Config, data: Dataset, k_active: int, key):
    """Test-split metrics (ELBO terms, routing statistics, clustering scores) and the test
    responsibilities and usage, for the figures."""
    metrics, responsibilities = evaluate_split(model, config, data.test.images, k_active)
    _, train_responsibilities = evaluate_split(model, config, data.train.images, k_active)
    channels = responsibilities.argmax(-1)
    scores = clustering_scores(channels, data.test.labels, train_responsibilities.argmax(-1), data.train.labels)
    result = {**to_floats(metrics), **scores, "test_samples": len(channels)}
    if config.eval_iw_samples:
        result["iw_nll"] = iw_nll(model, config, data.test.images, k_active, key)
        result["iw_samples"] = config.eval_iw_samples
    return result, responsibilities, np.asarray(metrics["usage"])


# --------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def write_history(path: Path, history: list[dict]) -> None:
    columns = list(history[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def save_checkpoint(run_dir: Path, model, config: Config, epoch: int) -> None:
    atomic_write(run_dir / "checkpoint.eqx", lambda f: eqx.tree_serialise_leaves(f, model))
    write_json(run_dir / "checkpoint.json", {"epoch": epoch, "config": dataclasses.asdict(config)})


def resolve_run_dir(config: Config) -> Path:
    if config.out_dir is not None:
        return Path(config.out_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.name or config.preset or config.c_regularizer}"


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory; refuse one that holds files already."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"--out-dir={str(run_dir)!r} is not allowed: it exists and is not an empty "
                          "directory (choose a new one)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out-dir={str(run_dir)!r} is not allowed: {error.strerror}") from None


def summary_of(config, data, result: TrainResult, evaluation_metrics) -> dict:
    last = result.history[-1]
    training = {f"final_{prefix}{name}": last[f"{prefix}{name}"] for prefix in ("", "val_") for name in mixvae.METRICS}
    curriculum = result.curriculum
    return {
        "training": {
            **training,
            "best_epoch": result.best_epoch,
            "epochs_completed": len(result.history),
            "training_time_sec": round(result.training_time, 3),
            "compile_time_sec": round(result.compile_time, 3),
        },
        "dataset": {
            "name": data.name, "train_samples": len(data.train.images), "val_samples": len(data.val.images),
            "test_samples": len(data.test.images), "input_dim": int(data.train.images.shape[1]),
        },
        "evaluation": evaluation_metrics,
        **({} if curriculum is None else {"curriculum": {
            "unlock_count": len(curriculum.unlock_epochs), "final_k_active": curriculum.k_active,
            "unlock_epochs": curriculum.unlock_epochs, "best_model_k_active": result.best_k_active}}),
    }


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def image_grid(ax, tiles, side: int, title: str) -> None:
    """Draw tiles [rows, columns, side * side] (NaN: empty) as one picture, one row per channel."""
    rows, columns = tiles.shape[:2]
    padded = np.pad(tiles.reshape(rows, columns, side, side), ((0, 0), (0, 0), (0, 1), (0, 1)),
                    constant_values=np.nan)
    canvas = padded.transpose(0, 2, 1, 3).reshape(rows * (side + 1), columns * (side + 1))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks((np.arange(rows) + 0.5) * (side + 1) - 1, labels=[str(k) for k in range(rows)], fontsize=7)
    ax.set_xticks([])
    ax.set_ylabel("channel")
    ax.set_title(title, fontsize=9)


def plot_curriculum(history, curriculum: Curriculum, num_components: int, save) -> None:
    """k_active over epochs with unlocks marked and kicks shaded; per-channel usage over epochs
    with closed channels greyed out."""
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
    image = bottom.imshow(np.ma.masked_where(closed, usage).T, aspect="auto", origin="lower", cmap="viridis",
                          extent=(epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, num_components - 0.5))
    bottom.set_facecolor("0.85")
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("channel (grey: closed)")
    fig.colorbar(image, ax=[top, bottom], label="training usage E_x r", shrink=0.5)
    save(fig, "curriculum.png", "Open channels over epochs (unlocks dashed, kicks shaded) and per-channel usage",
         tight=False)


def plot_figures(fig_dir: Path, config: Config, data: Dataset, result: TrainResult, responsibilities, usage, key):
    """Write the PNG figures; returns {file name: caption}."""
    model, history, curriculum = result.model, result.history, result.curriculum
    matplotlib.use("Agg")

    figures = {}
    fig_dir.mkdir(exist_ok=True)
    epochs = [row["epoch"] for row in history]

    def save(fig, name, caption, tight=True):
        if tight:
            fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=110)
        plt.close(fig)
        figures[name] = caption

    def train_vs_val(metrics, name, caption):
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
        for ax, metric in zip(axes, metrics):
            ax.plot(epochs, [row[metric] for row in history], label="train")
            ax.plot(epochs, [row[f"val_{metric}"] for row in history], label="val")
            ax.set_title(metric)
            ax.set_xlabel("epoch")
        axes[0].legend()
        save(fig, name, caption)

    train_vs_val(["loss", "reconstruction_loss", "kl_z", "kl_c", "kl_c_logit_mog"], "loss_curves.png",
                 "Loss and each term, train vs validation")
    train_vs_val(["responsibility_confidence", "component_entropy", "k_eff"], "routing.png",
                 "Routing peakiness over training: E[max r], E[H(r)], k_eff")

    num_components = config.num_components
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * num_components), 3))
    ax.bar(np.arange(num_components), usage)
    ax.set_xlabel("channel")
    ax.set_ylabel("p_hat = E_x r")
    ax.set_xticks(np.arange(num_components))
    save(fig, "usage.png", "Channel usage on the test split")

    channels = responsibilities.argmax(-1)
    num_labels = int(data.test.labels.max()) + 1
    contingency = confusion_matrix(channels, data.test.labels, labels=np.arange(max(num_components, num_labels)))
    contingency = contingency[:num_components, :num_labels]
    fig, ax = plt.subplots(figsize=(5.5, 0.3 * num_components + 1.5))
    image = ax.imshow(contingency, cmap="Blues", aspect="auto")
    for (k, label), count in np.ndenumerate(contingency):
        if count:
            ax.text(label, k, str(count), ha="center", va="center", fontsize=6,
                    color="white" if count > contingency.max() / 2 else "black")
    ax.set_xticks(np.arange(num_labels))
    ax.set_yticks(np.arange(num_components))
    ax.set_xlabel("true label")
    ax.set_ylabel("channel (argmax r)")
    fig.colorbar(image, ax=ax, label="test images")
    save(fig, "contingency.png", "Channel-by-label counts on the test split")

    if curriculum is not None:
        plot_curriculum(history, curriculum, num_components, save)

    side = data.image_side
    num_pixels = side * side
    columns = 8
    shown = [np.flatnonzero(channels == k)[:columns] for k in range(num_components)]
    rows = np.concatenate(shown)  # only the images on the grid are decoded
    images = mixvae.to_unit_interval(jnp.asarray(data.test.images[rows]))
    _, mean, _ = jax.vmap(model.encoder)(images)
    decoded = np.asarray(mixvae.decoded_mean(mixvae.decode_channels(model, mean), num_pixels))
    tiles = np.full((num_components, 2 * columns + 1, num_pixels), np.nan)  # a blank column between
    start = 0
    for k, members in enumerate(shown):
        tiles[k, : len(members)] = np.asarray(images)[start:start + len(members)]
        tiles[k, columns + 1: columns + 1 + len(members)] = decoded[start:start + len(members), k]
        start += len(members)
    fig, ax = plt.subplots(figsize=(9, 0.5 * num_components + 0.8))
    image_grid(ax, tiles, side, "test images routed to each channel (left), that channel's reconstructions (right)")
    save(fig, "reconstructions.png", "One row per channel: test images routed to it, then its reconstructions")

    z = jax.random.normal(key, (columns, num_components, config.latent_dim))
    samples = np.asarray(mixvae.decoded_mean(jax.vmap(model.decoders)(z), num_pixels))
    fig, ax = plt.subplots(figsize=(4.5, 0.5 * num_components + 0.8))
    image_grid(ax, samples.swapaxes(0, 1), side, "decoder means at z ~ N(0, I)")
    save(fig, "samples.png", "One row per channel: decoder means at z ~ N(0, I)")

    if config.latent_dim == 2:
        images = mixvae.to_unit_interval(jnp.asarray(data.test.images))
        _, mean, _ = jax.vmap(model.encoder)(images)
        routed_mean = np.asarray(mean if mean.ndim == 2 else mean[np.arange(len(channels)), channels])
        fig, ax = plt.subplots(figsize=(5, 4.5))
        scatter = ax.scatter(routed_mean[:, 0], routed_mean[:, 1], c=channels, cmap="tab20", s=6)
        fig.colorbar(scatter, ax=ax, label="channel")
        ax.set_title("latent means of the routed channel (test)")
        save(fig, "latent.png", "Latent means mu_c(x) of each test image's channel, coloured by channel")
    return figures


# --------------------------------------------------------------------------------------
# REPORT.md
# --------------------------------------------------------------------------------------


HEADLINE = ("responsibility_confidence", "component_entropy", "k_eff", "cluster_accuracy", "nmi", "ari",
            "neg_elbo", "iw_nll")


def config_table(config: Config) -> list[str]:
    return ["## Config", "", "| flag | value |", "|---|---|",
            *[f"| `{configs.flag(k)}` | `{v}` |" for k, v in dataclasses.asdict(config).items()]]


def write_report(run_dir: Path, config: Config, summary: dict, figures: dict[str, str]) -> None:
    training = summary["training"]
    lines = [f"# Run report: {run_dir.name}", "",
             f"Objective: c-regularizer `{config.c_regularizer}`; {summary['training']['epochs_completed']} "
             f"epochs, best epoch {training['best_epoch']}; training {training['training_time_sec']:.1f} s "
             f"(compile {training['compile_time_sec']:.1f} s).", "",
             "**Test split:** " + ", ".join(f"{name} {summary['evaluation'][name]:.3f}" for name in HEADLINE
                                           if name in summary["evaluation"]) + ".",
             "",
             *config_table(config)]
    lines += ["", "## Dataset", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["dataset"].items()]
    lines += ["", "## Training (last epoch)", "", "| metric | train | val | meaning |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {training[f'final_{name}']:.4g} | {training[f'final_val_{name}']:.4g} | "
              f"{meaning.replace('|', '&#124;')} |"
              for name, meaning in mixvae.METRICS.items()]
    lines += ["", "## Evaluation (test split, best model, no noise)", "", "| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
              for k, v in summary["evaluation"].items()]
    if "curriculum" in summary:
        c = summary["curriculum"]
        lines += ["", "## Curriculum", "",
                  f"Started with {config.curriculum_start} open channel(s); {c['unlock_count']} unlock(s) at the end "
                  f"of epoch(s) {c['unlock_epochs'] or 'none'}; {c['final_k_active']} of {config.num_components} open "
                  f"at the end; the best model (evaluated above) had {c['best_model_k_active']} open. "
                  "See `curriculum.png`: unlocks dashed, kick windows shaded, closed channels grey."]
    lines += ["", "## Figures", ""]
    lines += [f"**{caption}**\n\n![{name}](figures/{name})\n" for name, caption in figures.items()]
    atomic_write(run_dir / "REPORT.md", lambda f: f.write("\n".join(lines).encode()))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def validate_only(config: Config, data: Dataset, mesh: Mesh, run_dir: Path) -> None:
    model = build_model(config, data.train.images.shape[1], jax.random.key(config.seed))
    x = jax.ShapeDtypeStruct((config.batch_size, data.train.images.shape[1]), jnp.float32)
    loss, _ = eqx.filter_eval_shape(mixvae.loss_fn, model, x, jax.random.key(0), schedule(config, 0),
                                    build_objective(config))
    params = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    print(f"config ok: {data.name}, {len(data.train.images)} training images, K={config.num_components}, "
          f"D={config.latent_dim}, c-regularizer {config.c_regularizer}")
    print(f"model: {params:,} parameters; loss traces to {loss.shape} {loss.dtype}")
    print(f"seeds {' '.join(map(str, replica_seeds(config)))}; each batch sharded over {mesh.size} device(s)")
    print(f"would write the run to {run_dir}/ (nothing trained, nothing written)")


def run(config: Config) -> Path:
    configs.validate(config)
    if config.eval_only:
        return reevaluate(config)
    data = load_dataset(config)
    mesh = data_mesh(config)
    run_dir = resolve_run_dir(config)
    if config.validate_only:
        validate_only(config, data, mesh, run_dir)
        return run_dir
    prepare_run_dir(run_dir)
    write_json(run_dir / "config.json", dataclasses.asdict(config))
    seeds = replica_seeds(config)
    keys = replica_keys(seeds)  # [R, 4]: init, train, figures, importance sampling
    models = build_replicas(config, data.train.images.shape[1], keys[:, 0])
    print(f"run directory: {run_dir}" + (f" ({len(seeds)} seeds, vmapped)" if len(seeds) > 1 else ""))
    results = train(config, data, models, keys[:, 1])
    summaries = []
    for result, (_, _, figure_key, iw_key) in zip(results, keys):
        seed_dir, seed_config = run_dir, config
        if len(seeds) > 1:  # each seed a run directory of its own, as a single-seed run writes it
            seed_dir = run_dir / f"seed_{result.seed}"
            seed_dir.mkdir()
            seed_config = dataclasses.replace(config, seed=result.seed, seeds=(), split_seed=split_seed(config))
            write_json(seed_dir / "config.json", dataclasses.asdict(seed_config))
        write_history(seed_dir / "history.csv", result.history)
        save_checkpoint(seed_dir, result.model, seed_config, result.best_epoch)
        summaries.append(evaluate_and_report(seed_dir, seed_config, data, result, iw_key, figure_key))
    if len(seeds) > 1:
        write_seeds_report(run_dir, config, summaries)
    return run_dir


def evaluate_and_report(run_dir: Path, config: Config, data: Dataset, result: TrainResult, iw_key, figure_key):
    """Test evaluation of the best model, then summary.json, the figures and REPORT.md; returns
    the summary."""
    evaluation_metrics, responsibilities, usage = evaluation(result.model, config, data, result.best_k_active, iw_key)
    summary = summary_of(config, data, result, evaluation_metrics)
    write_json(run_dir / "summary.json", summary)
    figures = plot_figures(run_dir / "figures", config, data, result, responsibilities, usage, figure_key)
    write_report(run_dir, config, summary, figures)
    print(f"test (seed {config.seed}): " + "  ".join(f"{name} {evaluation_metrics[name]:.3f}" for name in HEADLINE
                                                    if name in evaluation_metrics))
    print(f"report: {run_dir / 'REPORT.md'}")
    return summary


def seeds_summary(config: Config, summaries: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1) of every numeric test metric over the seeds."""
    metrics = [name for name, value in summaries[0]["evaluation"].items() if isinstance(value, float)]
    values = {name: np.array([summary["evaluation"][name] for summary in summaries]) for name in metrics}
    return {
        "seeds": list(config.seeds),
        "evaluation": {name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))} for name, v in values.items()},
        "per_seed": {str(seed): f"seed_{seed}/summary.json" for seed in config.seeds},
        "training": {"training_time_sec": summaries[0]["training"]["training_time_sec"],
                     "compile_time_sec": summaries[0]["training"]["compile_time_sec"],
                     "best_epoch": [summary["training"]["best_epoch"] for summary in summaries]},
        "dataset": summaries[0]["dataset"],
    }


def write_seeds_report(run_dir: Path, config: Config, summaries: list[dict]) -> None:
    """summary.json and REPORT.md of a --seeds run: mean +- std over seeds, and every seed."""
    summary = seeds_summary(config, summaries)
    write_json(run_dir / "summary.json", summary)
    seeds = config.seeds
    lines = [f"# Run report: {run_dir.name} ({len(seeds)} seeds)", "",
             f"Objective: c-regularizer `{config.c_regularizer}`; seeds {', '.join(map(str, seeds))} trained as vmapped "
             f"replicas in one process ({summary['training']['training_time_sec']:.1f} s), all on the data split of "
             f"seed {split_seed(config)}. Each seed's own report: "
             + ", ".join(f"[seed {seed}](seed_{seed}/REPORT.md)" for seed in seeds) + ".", "",
             "## Evaluation (test split, best model per seed; std is the sample std, ddof=1)", "",
             "| metric | mean ± std | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    lines += [f"| `{name}` | {stats['mean']:.4g} ± {stats['std']:.2g} | "
              + " | ".join(f"{s['evaluation'][name]:.4g}" for s in summaries) + " |"
              for name, stats in summary["evaluation"].items()]
    lines += ["", *config_table(config)]
    atomic_write(run_dir / "REPORT.md", lambda f: f.write("\n".join(lines).encode()))
    print(f"report ({len(seeds)} seeds): {run_dir / 'REPORT.md'}")


def config_from_json(saved: dict) -> Config:
    return Config(**{**saved, "seeds": tuple(saved.get("seeds", ()))})


def reevaluate(config: Config) -> Path:
    """--eval-only --checkpoint RUN_DIR: evaluate the saved best model(s) again (with this call's
    --eval-iw-samples) and rewrite the run's evaluation, figures and REPORT.md; no training. A
    --seeds run is re-evaluated seed by seed, then its mean +- std report is rewritten."""
    run_dir = Path(config.checkpoint)
    try:
        saved = config_from_json(json.loads((run_dir / "config.json").read_text()))
    except (OSError, TypeError, ValueError):
        saved = None  # reevaluate_run names what is missing
    if saved is None or len(saved.seeds) <= 1:
        reevaluate_run(run_dir, config)
        return run_dir
    summaries = [reevaluate_run(run_dir / f"seed_{seed}", config) for seed in saved.seeds]
    write_seeds_report(run_dir, dataclasses.replace(saved, eval_iw_samples=config.eval_iw_samples), summaries)
    return run_dir


def reevaluate_run(run_dir: Path, config: Config) -> dict:
    """Re-evaluate one seed's run directory; returns its new summary."""
    needed = ["checkpoint.eqx", "checkpoint.json", "summary.json", "history.csv"]
    if not all((run_dir / name).is_file() for name in needed):
        raise ConfigError(f"--checkpoint={str(run_dir)!r} is not allowed: not a run directory (it needs "
                          f"{', '.join(needed)})")
    try:
        saved = config_from_json(json.loads((run_dir / "checkpoint.json").read_text())["config"])
        saved = configs.validate(dataclasses.replace(saved, eval_iw_samples=config.eval_iw_samples))
        summary = json.loads((run_dir / "summary.json").read_text())
        with open(run_dir / "history.csv") as f:
            history = [{name: float(value) for name, value in row.items()} for row in csv.DictReader(f)]
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"--checkpoint={str(run_dir)!r} is not allowed: its files do not parse ({error})") from None
    data = load_dataset(saved)
    _, _, figure_key, iw_key = jax.random.split(jax.random.key(saved.seed), 4)
    skeleton = build_model(saved, data.train.images.shape[1], jax.random.key(0))
    try:
        model = eqx.tree_deserialise_leaves(run_dir / "checkpoint.eqx", skeleton)
    except Exception as error:  # equinox raises several kinds for a mismatched or truncated file
        raise ConfigError(f"--checkpoint={str(run_dir)!r} is not allowed: checkpoint.eqx does not match its "
                          f"config ({type(error).__name__})") from None
    curriculum = Curriculum.from_config(saved)
    if curriculum is not None:
        curriculum.k_active = summary["curriculum"]["final_k_active"]
        curriculum.unlock_epochs = summary["curriculum"]["unlock_epochs"]
    training = summary["training"]
    best_k_active = summary.get("curriculum", {}).get("best_model_k_active", saved.num_components)
    result = TrainResult(saved.seed, model, history, training["best_epoch"], best_k_active, training["training_time_sec"],
                         training["compile_time_sec"], curriculum)
    return evaluate_and_report(run_dir, saved, data, result, iw_key, figure_key)


def enable_compilation_cache() -> None:
    """Keep XLA executables on disk (as JAX_COMPILATION_CACHE_DIR would), so a rerun of the same
    shapes skips compilation: the usage line takes ~18 s instead of ~30 s from its second run."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        jax.config.update("jax_compilation_cache_dir", str(cache_home / "mixvae" / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    enable_compilation_cache()
    try:
        run(config)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
