"""Convert a raw benchmark download (ADE20K, PASCAL VOC/Context, COCO-Stuff) for `ebseg evaluate`."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
datasets and what --raw must be:
  ade150   the unpacked ADEChallengeData2016/ (images/, annotations/) from the SceneParsing release
  voc20    VOCdevkit/VOC2012/ (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/val.txt);
           for --split train also SegmentationClassAug/ and trainaug.txt
  coco171  the COCO folder with val2017/ (or train2017/) images and stuffthingmaps/ from
           stuffthingmaps_trainval2017.zip
  pc59     VOCdevkit/VOC2010/ (JPEGImages/ and trainval_merged.json, the PASCAL in Detail
           annotations); the split is the json's phase
  pc459    the same VOC2010/ plus trainval/*.mat from PASCAL Context's trainval.tar.gz
  ade847   the unpacked ADE20K_2021_17_01/ (index_ade20k.pkl, images/ADE/...); images and labels
           are shrunk to a short side of 512 as in MaskFormer's preparation

examples:
  ebseg prepare-data ade150 --raw ~/downloads/ADEChallengeData2016 --out ./datasets
  ebseg prepare-data voc20 --raw ~/VOCdevkit/VOC2012 --out s3://data/datasets
  ebseg prepare-data coco171 --raw ~/coco --out ./datasets --split val
  ebseg prepare-data pc459 --raw ~/VOCdevkit/VOC2010 --out ./datasets
  ebseg evaluate --dataset ade150,voc20 --root ./datasets --checkpoint EBSeg_base.pth

labels hold contiguous class ids (0..C-1): PNGs with 255 for ignored pixels, or for pc459 and ade847
16-bit TIFFs with 65535; images are copied unchanged (ade847: resized and re-encoded). Rerunning
overwrites the same files.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ebseg prepare-data` flags."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("dataset", metavar="NAME", help="ade150, ade847, pc59, pc459, voc20 or coco171")
    parser.add_argument("--raw", required=True, metavar="DIR", help="the raw download (see below)")
    parser.add_argument("--out", required=True, metavar="DIR_OR_URL",
                        help="datasets root to write into (what `ebseg evaluate --root` takes)")
    parser.add_argument("--split", default="val", choices=["val", "train"], help="default: %(default)s")
    parser.add_argument("--limit", type=int, metavar="N", help="convert only the first N pairs (a quick check)")


def run(args: argparse.Namespace) -> int:
    """Convert; 0 on success, 2 when the raw input is not as expected."""
    from ebseg_core.data import BenchmarkError
    from pipeline.prepare_data import PrepareError, prepare_dataset

    try:
        prepare_dataset(args.dataset, args.raw, args.out, split=args.split, limit=args.limit)
    except (PrepareError, BenchmarkError) as exc:
        print(f"ebseg prepare-data: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from jobs.cli import module_main

    sys.exit(module_main(sys.modules[__name__]))
