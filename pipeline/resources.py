"""CPU threads of model actors, shared by the labeling and evaluation jobs."""

from __future__ import annotations

import math
import os


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


def set_torch_threads(threads: int) -> None:
    """Apply :func:`actor_torch_threads`'s answer (or a user's count) inside the actor; 0 leaves torch alone."""
    import torch

    if threads:
        torch.set_num_threads(threads if threads > 0 else os.cpu_count() or 1)
