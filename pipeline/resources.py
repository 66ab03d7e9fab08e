"""Ray plumbing shared by the jobs that run a model actor pool (label, evaluate): joining or starting
Ray, and sizing the pool from plain numbers.

Why one place: both jobs start an embedded Ray the same way (logical CPUs above the cores, so the
actors never starve the read tasks) and size their actors by the same rules; the copies had drifted.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from ebseg_core.errors import UserError


class ResourceError(UserError):
    """The actor sizes asked for do not fit the cluster."""


def ensure_ray(quiet: bool = True) -> None:
    """Join ``RAY_ADDRESS`` when set (a cluster, ``ray job submit``), else start an embedded local Ray.

    ``quiet``: our own progress line replaces Ray Data's progress bars and per-run INFO lines (its
    warnings still show).
    """
    import ray

    if quiet:
        # Ray Data reconfigures its "ray.data" logger per run; these module loggers keep their level.
        logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled, to enable..."
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:  # embedded local Ray; logical CPUs > cores so actors never starve the read tasks
        cpus = os.cpu_count() or 2
        ray.init(address="local", num_cpus=max(4, 2 * cpus), include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING)


@dataclass(frozen=True)
class ActorPool:
    """How many model actors and what each reserves."""

    num_actors: int
    gpus: float  # per actor
    cpus: float  # per actor
    torch_threads: int  # per actor, see actor_torch_threads


def actor_pool(cluster_gpus: float, cluster_cpus: float, num_actors: int | None = None,
               gpus_per_actor: float | None = None, cpus_per_actor: float | None = None,
               max_actors: int | None = None, use_gpus: bool = True) -> ActorPool:
    """Size the model actor pool: by default one actor per GPU (1 GPU, 1 CPU each), or on a CPU-only
    cluster one actor with a CPU share that leaves a logical CPU to the read/encode tasks.

    ``max_actors`` caps the default and the given count (no more actors than work items);
    ``use_gpus=False`` puts the actors on CPU whatever the cluster has (a predictor without a model).
    """
    g = gpus_per_actor if gpus_per_actor is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    if g > 0 and g > cluster_gpus:
        raise ResourceError(f"--num-gpus-per-actor {g:g} asks for {g:g} GPU per model actor, but the Ray cluster "
                            f"has {cluster_gpus:g} GPUs ({cluster_cpus:g} CPUs); leave the flag out to run on CPU")
    if not use_gpus:
        g = 0.0
    n = num_actors or (max(1, int(cluster_gpus // g)) if g > 0 else 1)
    if max_actors is not None:
        n = max(1, min(n, max_actors))
    if cpus_per_actor is not None:
        c = cpus_per_actor
    elif g > 0:
        c = 1.0
    else:  # leave at least one logical CPU to the read/encode tasks
        c = max(0.25, min(1.0, (cluster_cpus - 1.0) / n))
    return ActorPool(n, g, c, actor_torch_threads(g, n, c, default_share=cpus_per_actor is None))


def cluster_actor_pool(**kwargs) -> ActorPool:
    """:func:`actor_pool` for the connected Ray cluster's GPUs and CPUs."""
    import ray

    res = ray.cluster_resources()
    return actor_pool(float(res.get("GPU", 0)), float(res.get("CPU", 1)), **kwargs)


def actor_torch_threads(gpus_per_actor: float, num_actors: int, cpus_per_actor: float, default_share: bool) -> int:
    """torch threads for a model actor: 0 on GPU (torch's default), -1 (every core of its machine) for a
    lone CPU actor with the default CPU share, else its CPU share rounded up.

    Why: Ray sets OMP_NUM_THREADS to an actor's CPU share (1 for our default), so without this a lone
    CPU actor runs the model on one core while reading and encoding, which are light, leave the rest idle.
    """
    if gpus_per_actor > 0:
        return 0
    if num_actors == 1 and default_share:
        return -1
    return max(1, math.ceil(cpus_per_actor))
