"""TEST ONLY: make a training run fail once, from outside the training code.

``fail_once_after(payload, iteration=N)`` is a Ray Train loop that runs the real
``pipeline.train.train_loop_per_worker`` and raises at the first report after iteration N, on the
first attempt only (no checkpoint to resume from yet). Tests put it in place of the real loop:

* in-process: ``monkeypatch.setattr(pipeline.train, "train_loop_per_worker", partial(fail_once_after, iteration=N))``;
* as a job: ``python -m tests.train_faults --fail-after N <jobs.train arguments>`` (needs the repository on the
  cluster's PYTHONPATH, as the test clusters have).
"""

from __future__ import annotations

import functools
import sys


def fail_once_after(payload: dict, *, iteration: int) -> None:
    import ray.train

    from pipeline import train as training

    if ray.train.get_checkpoint() is not None:  # a restarted attempt: run normally
        training.train_loop_per_worker(payload)
        return
    real_report = ray.train.report

    def report(metrics: dict, *args, **kwargs):
        if metrics["iteration"] > iteration:
            raise RuntimeError(f"injected failure at iteration {metrics['iteration']} (tests/train_faults.py)")
        return real_report(metrics, *args, **kwargs)

    ray.train.report = report
    try:
        training.train_loop_per_worker(payload)
    finally:
        ray.train.report = real_report


def main(argv: list[str]) -> int:
    from jobs import train as job
    from jobs.cli import module_main
    from pipeline import train as training

    if len(argv) < 2 or argv[0] != "--fail-after":
        print("usage: python -m tests.train_faults --fail-after N <jobs.train arguments>", file=sys.stderr)
        return 2
    training.train_loop_per_worker = functools.partial(fail_once_after, iteration=int(argv[1]))
    return module_main(job, argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
