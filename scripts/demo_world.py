"""`make demo`'s world whose truth is known: blob images (each class a fixed colour; ebseg_core/data/synthetic.py).

    demo_world.py write OUT_DIR     # OUT_DIR/labelled (generic layout: trains), OUT_DIR/lake (images to
                                    # label; its labels/ folder is the hidden truth)
    demo_world.py score LABELS TRUTH_DIR   # mIoU of label Parquet against TRUTH_DIR/labels/*.png
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    from pipeline.selftrain import CLASS_NAMES, SelfTrainConfig, score_labels, write_world

    if len(argv) == 2 and argv[0] == "write":
        world = write_world(argv[1], SelfTrainConfig(argv[1], labelled=8, lake=48, held_out=0))
        print(f"demo: {world['labelled']} (8 labelled images), {world['lake']}/images (48 to label); "
              f"classes {', '.join(CLASS_NAMES)}")
        return 0
    if len(argv) == 3 and argv[0] == "score":
        miou = score_labels(argv[1], argv[2], len(CLASS_NAMES))
        print(f"demo: mIoU of the labels in {argv[1]} against the hidden truth in {argv[2]}/labels: {miou:.1f}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
