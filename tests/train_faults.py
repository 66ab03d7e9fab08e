"""TEST ONLY: make a training run fail once, or check what its loader does, from outside the training code.

:class:`FailOnceTrainer` is the real ``pipeline.train.Trainer`` except that its report after iteration
``fail_after`` raises, on the first attempt only (an attempt that resumed from a checkpoint runs
normally). Tests install it through ``train``'s ``trainer`` argument:

* in-process: ``train(cfg, trainer=functools.partial(FailOnceTrainer, fail_after=N))``;
* as a job: ``python -m tests.train_faults --fail-after N <jobs.train arguments>`` (needs the repository on the
  cluster's PYTHONPATH, as the test clusters have).
"""

from __future__ import annotations

import functools
import sys

from pipeline.train import Trainer


class FailOnceTrainer(Trainer):
    def __init__(self, payload: dict, *, fail_after: int):
        super().__init__(payload)
        self.fail_after = fail_after

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if self.resumed_from is None and metrics["iteration"] > self.fail_after:
            raise RuntimeError(f"injected failure at iteration {metrics['iteration']} (tests/train_faults.py)")
        super().report(metrics, checkpoint_dir)


class LoaderCheckingTrainer(Trainer):
    """The real Trainer, except that its run fails unless the data loader reads ignore pixels as
    ``expect_unknown`` says (label Parquet: unknown, skipped by the losses; truth datasets: official)."""

    def __init__(self, payload: dict, *, expect_unknown: bool):
        super().__init__(payload)
        self.expect_unknown = expect_unknown

    def _loader(self):
        loader = super()._loader()
        if loader.dataset.ignore_is_unknown != self.expect_unknown:
            raise AssertionError(f"the loader's ignore_is_unknown is {loader.dataset.ignore_is_unknown}, "
                                 f"expected {self.expect_unknown} (tests/train_faults.py)")
        return loader


def main(argv: list[str]) -> int:
    from jobs import train as job
    from jobs.cli import module_main
    from pipeline import train as training

    if len(argv) < 2 or argv[0] != "--fail-after":
        print("usage: python -m tests.train_faults --fail-after N <jobs.train arguments>", file=sys.stderr)
        return 2
    trainer = functools.partial(FailOnceTrainer, fail_after=int(argv[1]))
    training.train = functools.partial(training.train, trainer=trainer)  # jobs.train looks it up at run time
    return module_main(job, argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
