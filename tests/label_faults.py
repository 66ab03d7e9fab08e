"""TEST ONLY: a labeling model actor that dies mid-job, from outside the labeling code.

``exiting_labeler(at_call=N, marker=path)`` is a subclass of the real ``pipeline.label_model.Labeler``
whose process exits (``os._exit``, as a crash or an OOM kill would end it) at the start of its N-th
batch, once per marker file: Ray restarts the actor and retries the batch, and the marker tells the
test that the exit happened. Tests pass it to ``run_label(cfg, labeler=...)``.
"""

from __future__ import annotations

import os

import pyarrow as pa

from pipeline.label_model import Labeler


def exiting_labeler(at_call: int, marker: str) -> type[Labeler]:
    """A Labeler class whose actor exits on its ``at_call``-th batch, unless ``marker`` exists (then it writes it)."""

    class ExitingLabeler(Labeler):
        calls = 0

        def __call__(self, batch: pa.Table) -> pa.Table:
            self.calls += 1
            if self.calls == at_call and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    return ExitingLabeler
