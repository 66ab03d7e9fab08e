"""Query, sample, summarise, export and report pseudo-labels written by `ebseg label` (local or s3://)."""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """
examples:
  ebseg curate classes s3://bucket/labels/                      # the vocabulary (names and synonyms)
  ebseg curate stats s3://bucket/labels/                        # totals, errors by kind, per-class table
  ebseg curate query s3://bucket/labels/ --class grass --min-fraction 0.05 --min-mean-confidence 0.6
  ebseg curate query s3://bucket/labels/ --class car --without road --sample 20 --seed 1 --format uris
  ebseg curate query s3://bucket/labels/ --status error --error-kind not_image --format jsonl
  ebseg curate export s3://bucket/labels/ --to ./train_set --format generic \\
        --per-class 200 --keep-classes grass,tree,road --min-pixel-confidence 0.5
  ebseg curate export s3://bucket/labels/ --to ./coco.json --format coco --class car
  ebseg curate export s3://bucket/labels/ --to ./review --format label-studio --class car \\
        --max-mean-confidence 0.6 --sample 200 --min-pixel-confidence 0.4
  ebseg curate report s3://bucket/labels/ --out report.html

Class names match the vocabulary's names or any synonym, case-insensitively. Several --class flags
must all be present; the fraction/confidence bounds apply to each of them. --without excludes images
containing a class. See docs/curation.md.
"""


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("labels", metavar="LABELS", help="label dataset: a Parquet file or a directory/prefix of them")
    g = p.add_argument_group("selection")
    g.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME",
                   help="keep images containing this class (name or synonym; repeatable = all required)")
    g.add_argument("--without", action="append", default=[], metavar="NAME",
                   help="drop images containing this class (repeatable)")
    g.add_argument("--min-fraction", type=float, metavar="F", help="each --class covers at least F of the image (0-1)")
    g.add_argument("--max-fraction", type=float, metavar="F", help="each --class covers at most F of the image (0-1)")
    g.add_argument("--min-mean-confidence", type=float, metavar="C",
                   help="each --class has mean pixel confidence >= C (0-1)")
    g.add_argument("--max-mean-confidence", type=float, metavar="C",
                   help="each --class has mean pixel confidence <= C (0-1): find doubtful labels")
    g.add_argument("--status", choices=["ok", "error", "all"], default=None,
                   help="row status (default: ok when class filters are given, else all)")
    g.add_argument("--error-kind", dest="error_kinds", action="append", default=[], metavar="KIND",
                   help="only error rows of this kind (repeatable), e.g. not_image, truncated, read")
    g.add_argument("--sample", type=int, metavar="N", help="random sample of N matching images")
    g.add_argument("--per-class", type=int, metavar="N",
                   help="stratified sample: up to N matching images per class (per --class class if given)")
    g.add_argument("--seed", type=int, default=0, help="random seed of --sample/--per-class (default 0)")
    g.add_argument("--limit", type=int, metavar="N", help="stop after N matching rows (before sampling)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="curate_command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("classes", help="list the vocabulary of a label dataset", formatter_class=fmt,
                       description="Print class id, name and synonyms from the label files' metadata.")
    p.add_argument("labels", metavar="LABELS")

    p = sub.add_parser("stats", help="totals, errors by kind and per-class statistics", formatter_class=fmt,
                       description="Per-class images, pixels and mean confidence, read from the summary "
                                   "columns only (no mask decoding). Selection flags restrict the rows.")
    _add_selection(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p = sub.add_parser("query", help="list images matching class/status filters", formatter_class=fmt,
                       description="Select label rows; print a table, URIs, ids or JSON lines.",
                       epilog=EXAMPLES)
    _add_selection(p)
    p.add_argument("--format", choices=["table", "uris", "ids", "jsonl"], default="table",
                   help="output: table (default), uris (one per line), ids, jsonl (summary columns)")
    p.add_argument("--output", metavar="FILE", help="write to FILE (local or s3://) instead of stdout")

    p = sub.add_parser("export", help="export a selection: training layout, COCO, Label Studio, masks, overlays",
                       formatter_class=fmt, epilog=EXAMPLES,
                       description="generic: images/<id>.<ext> + labels/<id>.png + class_names.txt (+dataset.json), "
                                   "readable by `ebseg train` (data layout 'generic'); coco: one JSON with RLE "
                                   "masks per (image, class), for pycocotools, FiftyOne and CVAT; label-studio: "
                                   "tasks.json with brush pre-annotations + labeling_config.xml, for review in "
                                   "Label Studio; masks: label/confidence PNGs (+index.jsonl); overlays: colour "
                                   "overlays with a legend.")
    _add_selection(p)
    p.add_argument("--to", required=True, metavar="DEST", help="output directory (coco: .json file or directory)")
    p.add_argument("--format", choices=["generic", "coco", "label-studio", "masks", "overlays"], default="generic")
    p.add_argument("--keep-classes", metavar="A,B,...",
                   help="classes to keep in labels (others become ignore); ids renumbered 0..K-1 in vocabulary "
                        "order unless --no-remap")
    p.add_argument("--min-pixel-confidence", type=float, metavar="C",
                   help="pixels with confidence below C become ignore (255, or 65535 past 255 classes)")
    p.add_argument("--no-remap", action="store_true", help="keep the original class ids when using --keep-classes")
    p.add_argument("--class-masks", action="store_true", help="masks format: also one binary PNG per (image, class)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlays: colour opacity 0-1 (default 0.5)")
    p.add_argument("--image-root", metavar="URL",
                   help="coco/label-studio: image names are relative to this folder/prefix (default: the folder "
                        "common to the selected images)")
    p.add_argument("--image-url-prefix", metavar="PREFIX",
                   help="label-studio: data.image = PREFIX + the name relative to --image-root, e.g. "
                        "'/data/local-files/?d=lake/' (default: the image URI, e.g. s3://... for a project "
                        "with that bucket as source storage)")

    p = sub.add_parser("report", help="self-contained offline HTML report", formatter_class=fmt,
                       description="One HTML file (inline CSS/SVG, images embedded): totals, errors by kind, "
                                   "per-class charts and a grid of sample overlays per class.")
    p.add_argument("labels", metavar="LABELS")
    p.add_argument("--out", required=True, metavar="FILE", help="report file (local path or s3://)")
    p.add_argument("--max-classes", type=int, default=12, help="classes charted and sampled (default 12)")
    p.add_argument("--samples-per-class", type=int, default=4, help="overlays per class (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-pixel-confidence", type=float, metavar="C",
                   help="leave pixels below this confidence uncoloured in overlays")


def _query_from(args):
    from pipeline import curate as C

    bounds = dict(min_fraction=args.min_fraction, max_fraction=args.max_fraction,
                  min_confidence=args.min_mean_confidence, max_confidence=args.max_mean_confidence)
    if not args.classes and any(v is not None for v in bounds.values()):
        raise C.CurationError("--min/--max-fraction and --min/--max-mean-confidence need a --class")
    for flag in ("sample", "per_class", "limit"):
        v = getattr(args, flag)
        if v is not None and v < 0:
            raise C.CurationError(f"--{flag.replace('_', '-')} must be >= 0, got {v}")
    return C.Query(classes=[C.ClassFilter(n, **bounds) for n in args.classes], without=list(args.without),
                   status=args.status, error_kinds=list(args.error_kinds), limit=args.limit)


def _select(ds, args, columns=None):
    from pipeline import curate as C

    return C.select(ds, _query_from(args), args.sample, args.per_class, args.seed, columns or C.LIGHT_COLUMNS)


def _summary(classes, limit: int = 4) -> str:
    top = sorted(classes or [], key=lambda c: -c["pixel_fraction"])[:limit]
    more = len(classes or []) - len(top)
    text = ", ".join(f"{c['name']} {100 * c['pixel_fraction']:.0f}%" for c in top)
    return text + (f", +{more}" if more > 0 else "")


def _cmd_classes(ds) -> int:
    for i, syns in enumerate(ds.meta.synonyms or [[n] for n in ds.names]):
        print(f"{i}\t{syns[0]}" + (f"\t({', '.join(syns[1:])})" if len(syns) > 1 else ""))
    return 0


def _cmd_stats(ds, args) -> int:
    from pipeline import curate as C

    q = _query_from(args)
    use_q = q if (q.classes or q.without or q.status or q.error_kinds or q.limit) else None
    if args.sample is not None or args.per_class is not None:
        raise C.CurationError("stats summarise a selection; --sample/--per-class apply to query and export")
    st = C.stats(ds, use_q)
    if args.json:
        print(json.dumps(st.to_dict(), indent=2, allow_nan=False, default=str))
        return 0
    print(f"{st.url}: {st.rows} rows, {st.ok} labelled, {st.errors} errors, {st.pixels / 1e6:.1f} megapixels")
    for kind, n in sorted(st.errors_by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  error {kind}: {n}")
    print(f"{'id':>4}  {'class':<24}{'images':>8}{'area %':>9}{'mean conf':>11}")
    for c in sorted(st.classes, key=lambda c: (-c.images, c.id)):
        if c.images:
            print(f"{c.id:>4}  {c.name[:23]:<24}{c.images:>8}{100 * c.pixels / max(st.pixels, 1):>9.2f}"
                  f"{c.mean_confidence:>11.3f}")
    unseen = [c.name for c in st.classes if not c.images]
    if unseen:
        print(f"never predicted ({len(unseen)}): {', '.join(unseen[:20])}{' ...' if len(unseen) > 20 else ''}")
    if st.runs:
        print(f"labeling runs ({len(st.runs)}, from _runs.json):")
        print(f"  {'finished (UTC)':<26}{'new':>8}{'changed':>9}{'deleted':>9}{'unchanged':>11}{'labeled':>9}"
              f"{'errors':>8}  model")
        for r in st.runs:
            listed = r.get("new") is not None
            cells = [r.get(k) if listed else "-" for k in ("new", "changed", "deleted", "unchanged")]
            print(f"  {r.get('finished_at', ''):<26}{cells[0]:>8}{cells[1]:>9}{cells[2]:>9}{cells[3]:>11}"
                  f"{r.get('labeled', 0):>9}{sum((r.get('errors') or {}).values()):>8}  {r.get('model_id', '')}"
                  f"{'' if r.get('complete') else '  (incomplete)'}")
    return 0


def _cmd_query(ds, args) -> int:
    table = _select(ds, args)
    rows = table.to_pylist()
    lines = []
    if args.format == "uris":
        lines = [r["uri"] for r in rows]
    elif args.format == "ids":
        lines = [r["image_id"] for r in rows]
    elif args.format == "jsonl":
        lines = [json.dumps({k: v for k, v in r.items()}, default=str) for r in rows]
    else:
        for r in rows:
            if r["status"] == "ok":
                desc = f"{r['width']}x{r['height']}  {_summary(r['classes'])}"
            else:
                desc = f"ERROR {r['error_kind']}: {(r['error'] or '')[:80]}"
            lines.append(f"{r['image_id'][:12]}  {r['uri']}  {desc}")
    text = "".join(line + "\n" for line in lines)
    if args.output:
        from ebseg_core.storage import write_bytes_atomic

        write_bytes_atomic(args.output, text.encode())
        print(f"{len(rows)} rows written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
        if args.format == "table":
            print(f"{len(rows)} rows", file=sys.stderr)
    return 0


def _cmd_export(ds, args) -> int:
    from pipeline import curate as C

    keep = [k.strip() for k in args.keep_classes.split(",") if k.strip()] if args.keep_classes else None
    lf = C.make_label_filter(ds, keep, args.min_pixel_confidence, remap=not args.no_remap)
    if args.format != "masks" and args.class_masks:
        raise C.CurationError("--class-masks applies to --format masks only")
    if args.format not in ("coco", "label-studio") and args.image_root:
        raise C.CurationError("--image-root applies to --format coco and label-studio only")
    if args.format != "label-studio" and args.image_url_prefix is not None:
        raise C.CurationError("--image-url-prefix applies to --format label-studio only")
    if not 0.0 <= args.alpha <= 1.0:
        raise C.CurationError(f"--alpha must be in [0, 1], got {args.alpha}")
    table = _select(ds, args)
    n_ok = sum(1 for s in table.column("status").to_pylist() if s == "ok")
    if n_ok == 0:
        print("nothing to export: the selection has no labelled images", file=sys.stderr)
        return 1
    if args.format == "generic":
        res = C.export_generic(ds, table, args.to, lf)
    elif args.format == "coco":
        res = C.export_coco(ds, table, args.to, lf, image_root=args.image_root)
    elif args.format == "label-studio":
        res = C.export_label_studio(ds, table, args.to, lf, image_root=args.image_root,
                                    image_url_prefix=args.image_url_prefix)
    elif args.format == "masks":
        res = C.export_masks(ds, table, args.to, lf, per_class=args.class_masks)
    else:
        res = C.export_overlays(ds, table, args.to, lf if (keep or args.min_pixel_confidence is not None) else None,
                                alpha=args.alpha)
    print(f"exported {res.written} images ({args.format}) to {args.to}")
    for uri, why in res.skipped[:20]:
        print(f"  skipped {uri}: {why}", file=sys.stderr)
    if len(res.skipped) > 20:
        print(f"  ... and {len(res.skipped) - 20} more skipped", file=sys.stderr)
    return 0 if res.written else 1


def _cmd_report(args) -> int:
    from pipeline import curate as C
    from pipeline.report import ReportOptions, write_report

    if args.max_classes < 0 or args.samples_per_class < 0:
        raise C.CurationError("--max-classes and --samples-per-class must be >= 0")
    size = write_report(args.labels, args.out, ReportOptions(
        max_classes=args.max_classes, samples_per_class=args.samples_per_class, seed=args.seed,
        min_pixel_confidence=args.min_pixel_confidence))
    print(f"report written to {args.out} ({size / 1024:.0f} KiB)")
    return 0


def run(args: argparse.Namespace) -> int:
    from pipeline import curate as C
    from pipeline.schema import LabelSchemaError

    try:
        if args.curate_command == "report":
            return _cmd_report(args)
        ds = C.open_labels(args.labels)
        if args.curate_command == "classes":
            return _cmd_classes(ds)
        if args.curate_command == "stats":
            return _cmd_stats(ds, args)
        if args.curate_command == "query":
            return _cmd_query(ds, args)
        return _cmd_export(ds, args)
    except (C.CurationError, LabelSchemaError, FileNotFoundError, PermissionError) as e:
        print(f"ebseg curate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # storage unreachable, credentials, full disk
        print(f"ebseg curate: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from jobs.cli import module_main

    sys.exit(module_main(sys.modules[__name__]))
