"""Write a few sample photos shipped with scikit-image into a folder, as input for `make demo-photos`."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from skimage import data

SAMPLES = ("astronaut", "coffee", "chelsea", "rocket")


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        Image.fromarray(getattr(data, name)()).save(out / f"{name}.jpg", quality=92)
    print(f"demo: {len(SAMPLES)} sample images in {out}/ ({', '.join(SAMPLES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out/demo-photos/images"))
