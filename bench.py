"""Speed benchmark (not a test): compile time, steady epoch time, steps/s, samples/s, peak RSS,
analytic FLOPs of one train step and the achieved fraction of this machine's f32 matmul peak.

    python bench.py         # every case, each in a fresh process; prints a table, writes bench.json
    python bench.py --cases quick quick-top2 --seeds 0 --no-usage-line
    python bench.py --cases --seeds 5   # only: 5 seeds in one run vs 5 runs one after another
    python bench.py --cases --seeds 0 --no-usage-line --sweep   # only: a sweep vs separate runs
    python bench.py --results digits mnist mnist-capacity   # only: the README's results tables

Cases: the default config (digits), the `quick` preset (the seed's quick experiment: K 20, D 2,
separate decoders), the `mnist` preset (shared z, FiLM decoder, consistency views), the quick
preset with conv encoder and decoders, each also with `--top-m 2`. Each case times
`mixvae.train_replicas` (one compiled lax.scan per epoch, as train.py runs it) on data of the right
shape: the embedded digits for `default`, random MNIST-shaped uint8 images otherwise (timing
does not depend on pixel values). The FLOPs are those the step performs, counted from the forward
pass's jaxpr: 2 x the multiply-adds of every matmul and convolution (encoder, its second pass on
the warped view, the decoded channels; with --top-m the dispatched rows, capacity slots
included), times 3 for forward + backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import configs
import mixvae
import train

QUICK_CONV = dataclasses.replace(configs.PRESETS["quick"], encoder="conv", decoder="conv")
# config, and the training images of one timed epoch ("digits" or a count of random MNIST images)
CASES = {
    "default": dict(config=configs.Config(), images="digits"),
    "quick": dict(config=configs.PRESETS["quick"], images=3000),
    "quick-top2": dict(config=dataclasses.replace(configs.PRESETS["quick"], top_m=2), images=3000),
    "mnist": dict(config=configs.PRESETS["mnist"], images=6000),
    "mnist-top2": dict(config=dataclasses.replace(configs.PRESETS["mnist"], top_m=2), images=6000),
    "quick-conv": dict(
        config=QUICK_CONV, images=640
    ),  # 5 steps an epoch: a conv step takes seconds
    "quick-conv-top2": dict(config=dataclasses.replace(QUICK_CONV, top_m=2), images=640),
}


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Best-of-`repeats` f32 GFLOP/s of a jitted size x size matmul."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _count_macs(jaxpr) -> int:
    """Multiply-adds of every dot_general and conv in a jaxpr, sub-jaxprs included (a scan's body
    times its length)."""
    macs = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            macs += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # [out, in / groups, *kernel] in the default layout
            spec = eqn.params["dimension_numbers"].rhs_spec
            kernel = math.prod(rhs[d] for d in spec[2:])
            macs += math.prod(eqn.outvars[0].aval.shape) * rhs[spec[1]] * kernel
        repeats = (
            eqn.params["length"] if eqn.primitive.name == "scan" else 1
        )  # lax.map / scan bodies
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    macs += repeats * _count_macs(getattr(inner, "jaxpr", inner))
    return macs


def train_step_flops(model, sched, objective, batch_size: int, input_dim: int) -> float:
    """2 x the multiply-adds of one batch's forward pass (encoder, and the decoders on every channel
    or, with --top-m, on the dispatched rows), x 3 for the backward."""
    x = jnp.zeros((batch_size, input_dim), jnp.float32)
    jaxpr, _, _ = eqx.filter_make_jaxpr(mixvae.forward)(
        model, x, jax.random.key(0), sched, objective
    )
    return 3 * 2 * _count_macs(jaxpr.jaxpr)


def time_epochs(
    config, images, num_replicas: int, epochs: int
) -> tuple[list[float], object, object]:
    """Wall time of each of `epochs` calls of mixvae.train_replicas on `num_replicas` fresh replicas
    (seeds 0..R-1, as train.py starts them); returns the times, the models and the schedule."""
    config = dataclasses.replace(
        config, seeds=tuple(range(num_replicas)) if num_replicas > 1 else ()
    )
    state = train.initial_state(config, images.shape[1])
    models, opt_states = state.models, state.opt_states
    objective = train.build_objective(config)
    optimizer = mixvae.make_optimizer(config.learning_rate)
    sched = train.schedule(config, 0)
    steps = len(images) // config.batch_size
    batches = np.broadcast_to(
        np.arange(steps * config.batch_size).reshape(1, steps, config.batch_size),
        (num_replicas, steps, config.batch_size),
    )
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        models, opt_states, metrics = mixvae.train_replicas(
            models,
            opt_states,
            images,
            batches,
            jax.random.split(jax.random.key(epoch), num_replicas),
            sched,
            objective,
            optimizer,
        )
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times, models, sched


def run_case(name: str, epochs: int = 4, num_replicas: int = 3) -> dict:
    """Time one case in this process: one replica, then `num_replicas` in one compiled epoch."""
    case = CASES[name]
    config = case["config"]
    if case["images"] == "digits":
        images = train.load_dataset(config).train.images
    else:
        images = np.random.default_rng(0).integers(0, 256, (case["images"], 784), dtype=np.uint8)
    images = jax.device_put(images)
    times, models, sched = time_epochs(config, images, 1, epochs)
    steady = float(np.median(times[1:]))
    replica_times, _, _ = time_epochs(config, images, num_replicas, 3)
    steps = len(images) // config.batch_size
    objective = train.build_objective(config)
    flops = train_step_flops(
        train.replica(models, 0), sched, objective, config.batch_size, images.shape[1]
    )
    peak = matmul_peak_gflops()
    achieved = flops * steps / steady / 1e9
    return {
        "case": name,
        "encoder": config.encoder,
        "decoder": config.decoder,
        "conditioning": config.decoder_conditioning,
        "K": config.num_components,
        "D": config.latent_dim,
        "top_m": config.top_m or config.num_components,
        "batch_size": config.batch_size,
        "steps_per_epoch": steps,
        "compile_time_sec": times[0] - steady,
        "steady_epoch_sec": steady,
        "steps_per_sec": steps / steady,
        "samples_per_sec": steps * config.batch_size / steady,
        "step_gflop": flops / 1e9,
        "achieved_gflops": achieved,
        "peak_matmul_gflops": peak,
        "achieved_over_peak": achieved / peak,
        "replicas": num_replicas,
        "replicas_over_sequential": float(np.median(replica_times[1:])) / (num_replicas * steady),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def usage_line_seconds() -> dict:
    """Wall time of `python train.py --c-regularizer logit_mog --prior-mean 7` as a whole process:
    from a fresh XLA compilation cache (cold), then again with the cache it left (warm)."""
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("cold", "warm"):
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "train.py",
                    "--c-regularizer",
                    "logit_mog",
                    "--prior-mean",
                    "7",
                    "--out-dir",
                    f"{tmp}/{run}",
                ],
                check=True,
                capture_output=True,
                env={**os.environ, "JAX_COMPILATION_CACHE_DIR": f"{tmp}/cache"},
            )
            times[f"{run}_sec"] = time.perf_counter() - start
    return times


def train_processes(runs: list[list[str]], common: list[str], cache: str) -> dict:
    """`train.py *common *args` for each args of `runs`, one process after another, sharing the
    XLA compilation cache `cache` (fresh for a fair count): wall seconds, and the distinct
    programs compiled (the cache's entries; those of the training epoch apart)."""
    start = time.perf_counter()
    for args in runs:
        subprocess.run(
            [sys.executable, "train.py", *common, *args],
            check=True,
            capture_output=True,
            env={**os.environ, "JAX_COMPILATION_CACHE_DIR": cache},
        )
    programs = os.listdir(cache)
    return {
        "sec": time.perf_counter() - start,
        "compiled_programs": len(programs),
        "compiled_train_epochs": sum(p.startswith("jit_train_replicas-") for p in programs),
    }


def seeds_wall_times(num_seeds: int, epochs: int = 40) -> dict:
    """Whole-process wall time of `train.py --seeds 0..N-1` against N runs `--seed s` one after
    another (each side with a fresh, then shared, XLA compilation cache; same epochs, no early
    stop)."""
    common = ["--epochs", str(epochs), "--patience", "0", "--eval-iw-samples", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        seeds = [str(seed) for seed in range(num_seeds)]
        vmapped = train_processes(
            [["--seeds", *seeds, "--split-seed", "0", "--out-dir", f"{tmp}/vmapped"]],
            common,
            f"{tmp}/cache-v",
        )["sec"]
        sequential = train_processes(
            [
                ["--seed", seed, "--split-seed", "0", "--out-dir", f"{tmp}/seed-{seed}"]
                for seed in seeds
            ],
            common,
            f"{tmp}/cache-s",
        )["sec"]
    return {
        "num_seeds": num_seeds,
        "epochs": epochs,
        "vmapped_sec": vmapped,
        "sequential_sec": sequential,
        "speedup": sequential / vmapped,
    }


SWEEP = {"prior_mean": (3, 5, 7, 9), "prior_sigma": (0.5, 1)}


def sweep_wall_times(seeds: int = 3, epochs: int = 40) -> dict:
    """Whole-process wall time and XLA compilations of a 4 x 2 prior grid x `seeds` seeds on
    digits: one `train.py --sweep ... --seeds ...` against one run per point and seed one after
    another (each side with a fresh XLA compilation cache of its own, whose entries count the
    distinct programs compiled; same epochs, no early stop)."""
    common = ["--epochs", str(epochs), "--patience", "0", "--eval-iw-samples", "0"]
    seed_list = [str(seed) for seed in range(seeds)]

    with tempfile.TemporaryDirectory() as tmp:
        grid = [f"{name.replace('_', '-')}={','.join(map(str, v))}" for name, v in SWEEP.items()]
        swept = train_processes(
            [["--sweep", *grid, "--seeds", *seed_list, "--out-dir", f"{tmp}/sweep"]],
            common,
            f"{tmp}/cache-sweep",
        )
        separate = train_processes(
            [
                ["--prior-mean", str(mean), "--prior-sigma", str(sigma), "--seed", seed]
                + ["--split-seed", "0", "--out-dir", f"{tmp}/{mean}-{sigma}-{seed}"]
                for mean in SWEEP["prior_mean"]
                for sigma in SWEEP["prior_sigma"]
                for seed in seed_list
            ],
            common,
            f"{tmp}/cache-separate",
        )
    runs = len(SWEEP["prior_mean"]) * len(SWEEP["prior_sigma"]) * seeds
    return {"runs": runs, "epochs": epochs, "sweep": swept, "separate": separate}


# The results tables: table -> row name -> train.py flags. digits and mnist: each
# c-regularizer with and without the routing consistency (of x's own warps), logit_mog with the
# consistency over warps of x's neighbours, and K = 1 (the same networks as a plain VAE);
# mnist-capacity: the mnist preset at wider latents and decoders, clustering against likelihood
# (README, Likelihood against clustering), and K = 1 at the widest. Each table's base flags come
# first.
RESULT_BASE = {
    "digits": [],
    "mnist": ["--preset", "mnist"],
    "mnist-capacity": ["--preset", "mnist", "--consistency-neighbors", "0"],  # as the table ran
}
CONSISTENCY = ["--consistency-neighbors", "0"]  # on x's own warps (the defaults and the preset)
NO_CONSISTENCY = ["--consistency-weight", "0"]
# (D, width); the first is the preset's before it widened to D = 16, width 256
CAPACITIES = ((4, 128), (8, 128), (16, 128), (16, 256), (16, 400))
RESULT_METRICS = ("cluster_accuracy", "nmi", "ari", "responsibility_confidence", "iw_nll")


def result_rows(table: str) -> dict[str, list[str]]:
    """Row name -> train.py flags (the table's base flags first), for the results table `table`."""
    if table == "mnist-capacity":
        rows = {
            f"D = {dim}, width {width}": ["--latent-dim", str(dim), "--hidden-dim", str(width)]
            for dim, width in CAPACITIES
        }
        widest = list(rows)[-1]
        rows[f"{widest}, K = 1"] = [*rows[widest], "--num-components", "1", *NO_CONSISTENCY]
    else:
        rows, switched = {}, (("", NO_CONSISTENCY), (" + consistency", CONSISTENCY))
        for regularizer in ("logit_mog", "categorical", "both"):
            for consistency, flags in switched:
                rows[regularizer + consistency] = ["--c-regularizer", regularizer, *flags]
        # the consistency over warps of x's neighbours, as the defaults and the mnist preset have it
        rows["logit_mog + consistency over neighbours"] = ["--c-regularizer", "logit_mog"]
        rows["K = 1 (plain VAE)"] = ["--num-components", "1", *NO_CONSISTENCY]
    return {name: [*RESULT_BASE[table], *flags] for name, flags in rows.items()}


def result_row(run_dir: str, seeds: list[int], command: str, wall_sec: float) -> dict:
    """One results-table row from a finished `train.py --seeds ...` run directory: each test
    metric's mean +- sample std over the seeds and its value per seed."""
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    seed_files = [os.path.join(run_dir, f"seed_{seed}", "summary.json") for seed in seeds]
    evaluations = (
        [json.load(open(path))["evaluation"] for path in seed_files]
        if len(seeds) > 1
        else [summary["evaluation"]]
    )
    return {
        "command": command,
        **{metric: summary["evaluation"][metric] for metric in RESULT_METRICS},
        "per_seed": {metric: [e[metric] for e in evaluations] for metric in RESULT_METRICS},
        "wall_sec": wall_sec,
    }


def results_tables(table: str, seeds: list[int], out_dir: str) -> dict:
    """Every row of result_rows(table) as one `train.py --seeds ...` process; writes results-
    <table>.md (the README's table), .json (every number, per seed too) and .png (accuracy
    against IW-NLL, each seed a point) into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    seed_flags = ["--seeds", *map(str, seeds)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, flags) in enumerate(result_rows(table).items()):
            args = [*flags, *seed_flags]
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "train.py", *args, "--out-dir", f"{tmp}/{i}"],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                sys.exit(f"error: row {name!r}: train.py exited with {done.returncode}: {last}")
            wall = time.perf_counter() - start
            rows[name] = result_row(f"{tmp}/{i}", seeds, "python train.py " + " ".join(args), wall)
            print(f"{name}: {rows[name]}", flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, JAX {jax.default_backend()}"
    return write_results(
        out_dir, {"table": table, "seeds": seeds, "machine": machine, "rows": rows}
    )


def write_results(out_dir: str, result: dict) -> dict:
    """results-<table>.md, .json and .png of results_tables' `result`."""
    table, seeds, rows = result["table"], result["seeds"], result["rows"]
    columns = ["accuracy", "NMI", "ARI", "confidence", "IW-NLL"]
    lines = [
        f"Test split, best model per seed; mean ± sample std over seeds "
        f"{', '.join(map(str, seeds))} (one `--seeds` process per row; {result['machine']}).",
        "",
        "| run | " + " | ".join(columns) + " | wall | per seed (accuracy) |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for name, row in rows.items():
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in RESULT_METRICS]
        per_seed = " / ".join(f"{a:.3f}" for a in row["per_seed"]["cluster_accuracy"])
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {row['wall_sec']:.0f} s | {per_seed} |"
        )
    lines += ["", "Commands (`--out-dir` aside):", ""]
    lines += [f"- {name}: `{row['command']}`" for name, row in rows.items()]
    with open(os.path.join(out_dir, f"results-{table}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, f"results-{table}.json"), "w") as f:
        json.dump(result, f, indent=2)
    plt = train.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in rows.items():
        points = ax.scatter(row["per_seed"]["iw_nll"], row["per_seed"]["cluster_accuracy"], s=18)
        ax.scatter(
            row["iw_nll"]["mean"],
            row["cluster_accuracy"]["mean"],
            s=90,
            marker="D",
            color=points.get_facecolor(),
            edgecolor="black",
            label=name,
        )
    ax.set_xlabel("test IW-NLL (nats, lower is better)")
    ax.set_ylabel("test cluster accuracy")
    ax.set_title(f"{table}: each seed a dot, the row's mean a diamond", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"results-{table}.png"), dpi=110)
    plt.close(fig)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument(
        "--seeds", type=int, default=5, help="seeds of the vmapped-vs-sequential timing (0: skip)"
    )
    parser.add_argument(
        "--one", choices=list(CASES), help=argparse.SUPPRESS
    )  # a child process's case
    parser.add_argument("--no-usage-line", action="store_true", help="skip timing the usage line")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also time a 4 x 2 prior grid x 3 seeds as one --sweep against 24 separate runs",
    )
    parser.add_argument("--out", default="bench.json")
    parser.add_argument(
        "--results",
        nargs="+",
        choices=list(RESULT_BASE),
        help="only: regenerate these results tables of the README (five seeds a row)",
    )
    parser.add_argument(
        "--results-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="with --results"
    )
    parser.add_argument(
        "--results-dir",
        default="results",
        help="with --results: where results-<table>.md, .json and .png go",
    )
    args = parser.parse_args()
    if args.results:
        for table in args.results:
            results_tables(table, args.results_seeds, args.results_dir)
        return
    if args.one:
        print(json.dumps(run_case(args.one)))
        return
    rows = []
    for name in args.cases:  # a fresh process each: cold compile, per-case peak RSS
        child = subprocess.run(
            [sys.executable, __file__, "--one", name], check=True, capture_output=True, text=True
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    columns = [
        "case",
        "encoder",
        "conditioning",
        "K",
        "top_m",
        "compile_time_sec",
        "steady_epoch_sec",
        "steps_per_sec",
        "samples_per_sec",
        "step_gflop",
        "achieved_gflops",
        "peak_matmul_gflops",
        "achieved_over_peak",
        "replicas_over_sequential",
        "peak_rss_mb",
    ]
    if rows:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
    for row in rows:
        print(
            "| "
            + " | ".join(
                f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns
            )
            + " |"
        )
    result = {"cases": rows}
    if not args.no_usage_line:
        result["usage_line"] = usage_line_seconds()
        print(
            "usage line (whole process): {cold_sec:.1f} s from a fresh compilation cache, "
            "{warm_sec:.1f} s with it warm".format(**result["usage_line"])
        )
    if args.seeds:
        result["seeds"] = seeds_wall_times(args.seeds)
        print(
            "{num_seeds} seeds x {epochs} epochs, whole processes: vmapped in one run "
            "{vmapped_sec:.1f} s, "
            "one run after another {sequential_sec:.1f} s ({speedup:.1f}x)".format(
                **result["seeds"]
            )
        )
    if args.sweep:
        result["sweep"] = times = sweep_wall_times()
        print(
            f"{times['runs']} runs x {times['epochs']} epochs, whole processes: one --sweep "
            f"{times['sweep']['sec']:.1f} s ({times['sweep']['compiled_train_epochs']} compiled "
            f"epoch, {times['sweep']['compiled_programs']} programs in all), one run after "
            f"another {times['separate']['sec']:.1f} s "
            f"({times['separate']['compiled_train_epochs']} compiled epochs, "
            f"{times['separate']['compiled_programs']} programs)"
        )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
