"""`make demo`'s world whose truth is known: blob images (each class a fixed colour; ebseg_core/data/synthetic.py).

    demo_world.py write OUT_DIR     # OUT_DIR/labelled (generic layout: trains), OUT_DIR/lake (images to
                                    # label; its labels/ folder is the hidden truth, which
                                    # `ebseg evaluate --labels L --dataset generic --root OUT_DIR/lake` scores)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    from pipeline.selftrain import CLASS_NAMES, SelfTrainConfig, write_world

    if len(argv) == 2 and argv[0] == "write":
        world = write_world(argv[1], SelfTrainConfig(argv[1], labelled=8, lake=48, held_out=0))
        print(f"demo: {world['labelled']} (8 labelled images), {world['lake']}/images (48 to label); "
              f"classes {', '.join(CLASS_NAMES)}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
