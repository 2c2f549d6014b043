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
import json
import os
import sys
import tempfile
import time
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


def load_dataset(config: Config) -> Dataset:
    """digits: sklearn's 8x8 digits scaled to [0, 1]; stratified train/val/test split by seed."""
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, random_state=config.seed, stratify=labels)
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=config.val_split, random_state=config.seed, stratify=rest_y)
    data = Dataset("digits", Split(train_x, train_y), Split(val_x, val_y), Split(test_x, test_y), 8)
    if config.batch_size > len(data.train.images):
        raise ConfigError(f"--batch-size={config.batch_size} is not allowed: must be at most the "
                          f"{len(data.train.images)} training images of {data.name}")
    return data


# --------------------------------------------------------------------------------------
# Model, objective and schedules from the config
# --------------------------------------------------------------------------------------


def build_model(config: Config, input_dim: int, key):
    return mixvae.MixVAE(
        key, input_dim=input_dim, num_components=config.num_components, latent_dim=config.latent_dim,
        latent_layout=config.latent_layout, encoder=config.encoder, decoder=config.decoder,
        conditioning=config.decoder_conditioning, likelihood=config.likelihood,
        width=config.hidden_dim, learnable_pi=config.learnable_pi,
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


def schedule(config: Config, epoch: int):
    return mixvae.Schedule(kl_c_scale=kl_c_scale(config, epoch), temperature=temperature(config, epoch),
                           active_mask=np.ones(config.num_components, bool))


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
    model: object
    history: list[dict]
    best_epoch: int
    training_time: float
    compile_time: float


def train(config: Config, data: Dataset, model, key) -> TrainResult:
    """Epochs of one compiled call each; early stopping on the validation loss, best model kept."""
    objective = build_objective(config)
    optimizer = mixvae.make_optimizer(config.learning_rate)
    opt_state = mixvae.init_optimizer(optimizer, model)
    train_images = jax.device_put(data.train.images)
    val_images = jax.device_put(data.val.images)
    rng = np.random.default_rng(config.seed)
    steps = len(data.train.images) // config.batch_size
    history, epoch_times = [], []
    best = (np.inf, -1, model)  # (val loss, epoch, model)
    since_best = 0
    start = time.perf_counter()
    bar = tqdm(range(config.epochs), desc="epochs", unit="epoch", leave=False, disable=None)
    for epoch in bar:
        tick = time.perf_counter()
        sched = schedule(config, epoch)
        batches = rng.permutation(len(data.train.images))[: steps * config.batch_size]
        key, epoch_key = jax.random.split(key)
        model, opt_state, step_metrics = mixvae.train_epoch(
            model, opt_state, train_images, batches.reshape(steps, config.batch_size), epoch_key,
            sched, objective, optimizer)
        train_metrics = to_floats(mixvae.summarize(step_metrics))
        val_metrics = to_floats(mixvae.evaluate(model, val_images, sched, objective)[0])
        epoch_times.append(time.perf_counter() - tick)
        history.append({"epoch": epoch + 1, **train_metrics, **{f"val_{k}": v for k, v in val_metrics.items()}})
        if not np.isfinite(train_metrics["loss"]):
            raise FloatingPointError(f"the training loss became {train_metrics['loss']} at epoch {epoch + 1}")
        if anneals_done(config, epoch) and val_metrics["loss"] < best[0]:
            best, since_best = (val_metrics["loss"], epoch, model), 0
        elif anneals_done(config, epoch):
            since_best += 1
        tqdm.write(
            f"epoch {epoch + 1:3d}/{config.epochs}  loss {train_metrics['loss']:9.3f}  "
            f"val_loss {val_metrics['loss']:9.3f}  val_conf {val_metrics['responsibility_confidence']:.3f}  "
            f"val_k_eff {val_metrics['k_eff']:5.2f}  {epoch_times[-1]:6.2f}s")
        if config.patience and since_best >= config.patience:
            tqdm.write(f"early stop: no better validation loss for {config.patience} epochs")
            break
    bar.close()
    _, best_epoch, best_model = best if best[1] >= 0 else (None, len(history) - 1, model)
    steady = float(np.median(epoch_times[1:])) if len(epoch_times) > 1 else 0.0
    return TrainResult(best_model, history, best_epoch + 1, time.perf_counter() - start,
                       max(0.0, epoch_times[0] - steady))


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


def evaluate_split(model, config: Config, images):
    metrics, terms = mixvae.evaluate(model, jax.device_put(images), schedule(config, config.epochs),
                                     build_objective(config))
    return metrics, np.asarray(terms.responsibilities)


def evaluation(model, config: Config, data: Dataset):
    """Test-split metrics (ELBO terms, routing statistics, clustering scores) and the test
    responsibilities and usage, for the figures."""
    metrics, responsibilities = evaluate_split(model, config, data.test.images)
    _, train_responsibilities = evaluate_split(model, config, data.train.images)
    channels = responsibilities.argmax(-1)
    scores = clustering_scores(channels, data.test.labels, train_responsibilities.argmax(-1), data.train.labels)
    result = {**to_floats(metrics), **scores, "test_samples": len(channels)}
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
        (run_dir / "figures").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out-dir={str(run_dir)!r} is not allowed: {error.strerror}") from None


def summary_of(config, data, result: TrainResult, evaluation_metrics) -> dict:
    last = result.history[-1]
    training = {f"final_{name}": value for name, value in last.items() if name != "epoch"}
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
    }


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def plot_figures(fig_dir: Path, config: Config, data: Dataset, model, history, responsibilities, usage, key):
    """Write the PNG figures; returns {file name: caption}."""
    matplotlib.use("Agg")

    figures = {}
    epochs = [row["epoch"] for row in history]

    def save(fig, name, caption):
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=110)
        plt.close(fig)
        figures[name] = caption

    curves = ["loss", "reconstruction_loss", "kl_z", "kl_c", "kl_c_logit_mog"]
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2))
    for ax, name in zip(axes, curves):
        ax.plot(epochs, [row[name] for row in history], label="train")
        ax.plot(epochs, [row[f"val_{name}"] for row in history], label="val")
        ax.set_title(name)
        ax.set_xlabel("epoch")
    axes[0].legend()
    save(fig, "loss_curves.png", "Loss and each term, train vs validation")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, name in zip(axes, ["responsibility_confidence", "component_entropy", "k_eff"]):
        ax.plot(epochs, [row[name] for row in history], label="train")
        ax.plot(epochs, [row[f"val_{name}"] for row in history], label="val")
        ax.set_title(name)
        ax.set_xlabel("epoch")
    axes[0].legend()
    save(fig, "routing.png", "Routing peakiness over training: E[max r], E[H(r)], k_eff")

    num_components = config.num_components
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * num_components), 3))
    ax.bar(np.arange(num_components), usage)
    ax.set_xlabel("channel")
    ax.set_ylabel("p_hat = E_x r")
    ax.set_xticks(np.arange(num_components))
    save(fig, "usage.png", "Channel usage on the test split")

    side = data.image_side
    num_pixels = side * side
    images = mixvae.to_unit_interval(jnp.asarray(data.test.images))
    terms = mixvae.forward(model, images, None, schedule(config, config.epochs), config.router)
    channels = np.asarray(terms.responsibilities.argmax(-1))
    _, mean, _ = jax.vmap(model.encoder)(images)
    if config.latent_layout == "shared":
        mean = jnp.broadcast_to(mean[:, None], (len(images), num_components, mean.shape[-1]))
    decoded = np.asarray(mixvae.decoded_mean(jax.vmap(model.decoders)(mean), num_pixels))
    columns = 8
    fig, axes = plt.subplots(num_components, 2 * columns, figsize=(2 * columns * 0.6, num_components * 0.65))
    for k in range(num_components):
        members = np.flatnonzero(channels == k)[:columns]
        for j in range(columns):
            for offset, picture in ((0, np.asarray(images)), (columns, decoded[:, k])):
                ax = axes[k, j + offset]
                ax.axis("off")
                if j < len(members):
                    ax.imshow(picture[members[j]].reshape(side, side), cmap="gray", vmin=0, vmax=1)
        axes[k, 0].set_title(f"{k}", fontsize=7, loc="left")
    fig.suptitle("test images routed to each channel (left) and channel k's reconstruction (right)", fontsize=8)
    save(fig, "reconstructions.png", "One row per channel: test images routed to it, then its reconstructions")

    z = jax.random.normal(key, (columns, num_components, config.latent_dim))
    samples = np.asarray(mixvae.decoded_mean(jax.vmap(model.decoders)(z), num_pixels))
    fig, axes = plt.subplots(num_components, columns, figsize=(columns * 0.6, num_components * 0.65))
    for k in range(num_components):
        for j in range(columns):
            axes[k, j].imshow(samples[j, k].reshape(side, side), cmap="gray", vmin=0, vmax=1)
            axes[k, j].axis("off")
    save(fig, "samples.png", "One row per channel: decoder means at z ~ N(0, I)")

    if config.latent_dim == 2:
        routed_mean = np.asarray(mean)[np.arange(len(channels)), channels]
        fig, ax = plt.subplots(figsize=(5, 4.5))
        scatter = ax.scatter(routed_mean[:, 0], routed_mean[:, 1], c=channels, cmap="tab20", s=6)
        fig.colorbar(scatter, ax=ax, label="channel")
        ax.set_title("latent means of the routed channel (test)")
        save(fig, "latent.png", "Latent means mu_c(x) of each test image's channel, coloured by channel")
    return figures


# --------------------------------------------------------------------------------------
# REPORT.md
# --------------------------------------------------------------------------------------


def write_report(run_dir: Path, config: Config, summary: dict, figures: dict[str, str]) -> None:
    training = summary["training"]
    lines = [f"# Run report: {run_dir.name}", "",
             f"Objective: c-regularizer `{config.c_regularizer}`; {summary['training']['epochs_completed']} "
             f"epochs, best epoch {training['best_epoch']}; training {training['training_time_sec']:.1f} s "
             f"(compile {training['compile_time_sec']:.1f} s).", "",
             "## Config", "", "| flag | value |", "|---|---|"]
    lines += [f"| `{configs.flag(k)}` | `{v}` |" for k, v in dataclasses.asdict(config).items()]
    lines += ["", "## Dataset", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["dataset"].items()]
    lines += ["", "## Training (last epoch)", "", "| metric | train | val | meaning |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {training[f'final_{name}']:.4g} | {training[f'final_val_{name}']:.4g} | "
              f"{meaning.replace('|', '&#124;')} |"
              for name, meaning in mixvae.METRICS.items()]
    lines += ["", "## Evaluation (test split, best model, no noise)", "", "| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
              for k, v in summary["evaluation"].items()]
    lines += ["", "## Figures", ""]
    lines += [f"**{caption}**\n\n![{name}](figures/{name})\n" for name, caption in figures.items()]
    atomic_write(run_dir / "REPORT.md", lambda f: f.write("\n".join(lines).encode()))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def validate_only(config: Config, data: Dataset, run_dir: Path) -> None:
    model = build_model(config, data.train.images.shape[1], jax.random.key(config.seed))
    x = jax.ShapeDtypeStruct((config.batch_size, data.train.images.shape[1]), jnp.float32)
    loss, _ = eqx.filter_eval_shape(mixvae.loss_fn, model, x, jax.random.key(0), schedule(config, 0),
                                    build_objective(config))
    params = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    print(f"config ok: {data.name}, {len(data.train.images)} training images, K={config.num_components}, "
          f"D={config.latent_dim}, c-regularizer {config.c_regularizer}")
    print(f"model: {params:,} parameters; loss traces to {loss.shape} {loss.dtype}")
    print(f"would write the run to {run_dir}/ (nothing trained, nothing written)")


def run(config: Config) -> Path:
    configs.validate(config)
    data = load_dataset(config)
    run_dir = resolve_run_dir(config)
    if config.validate_only:
        validate_only(config, data, run_dir)
        return run_dir
    prepare_run_dir(run_dir)
    write_json(run_dir / "config.json", dataclasses.asdict(config))
    init_key, train_key, figure_key = jax.random.split(jax.random.key(config.seed), 3)
    model = build_model(config, data.train.images.shape[1], init_key)
    print(f"run directory: {run_dir}")
    result = train(config, data, model, train_key)
    write_history(run_dir / "history.csv", result.history)
    save_checkpoint(run_dir, result.model, config, result.best_epoch)
    evaluation_metrics, responsibilities, usage = evaluation(result.model, config, data)
    summary = summary_of(config, data, result, evaluation_metrics)
    write_json(run_dir / "summary.json", summary)
    figures = plot_figures(run_dir / "figures", config, data, result.model, result.history, responsibilities,
                           usage, figure_key)
    write_report(run_dir, config, summary, figures)
    ev = evaluation_metrics
    print(f"test: cluster_accuracy {ev['cluster_accuracy']:.3f}  nmi {ev['nmi']:.3f}  ari {ev['ari']:.3f}  "
          f"responsibility_confidence {ev['responsibility_confidence']:.3f}  neg_elbo {ev['neg_elbo']:.2f}")
    print(f"report: {run_dir / 'REPORT.md'}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    try:
        run(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
