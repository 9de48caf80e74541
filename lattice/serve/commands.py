"""``lattice export`` and ``lattice predict --package`` (``lattice.cli.main`` routes them here).

- ``lattice export --config CFG [--config CFG2 ...] [--ckpt_path CKPT] --out model.pt2 [--quantize int8]``:
  rebuild the trained module from its configs and checkpoint, export its serving model (its embedding tables
  int8 row-wise with ``--quantize int8``) and compile it with AOTInductor
  (:func:`lattice.serve.export.export_package`).
- ``lattice predict --package model.pt2 --data PATH [--data PATH ...] --out predictions.parquet``: score
  Parquet files (or folders of them) with the package (:class:`lattice.serve.Predictor`) and write
  ``example_id`` and one probability column per task.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from lattice.serve.tables import QUANTIZATIONS

__all__ = ["run_export", "run_predict", "is_package_predict"]


def is_package_predict(argv: Sequence[str]) -> bool:
    """Is ``argv`` (``predict ...``) a ``lattice predict --package`` call (rather than LightningCLI's predict)?"""
    return bool(argv) and argv[0] == "predict" and any(a == "--package" or a.startswith("--package=") for a in argv)


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lattice export", description="Export a trained model to a serving package "
                                "(torch.export + AOTInductor): model.pt2, model.schema.yaml, model.manifest.yaml.")
    p.add_argument("--config", action="append", required=True,
                   help="training config(s) of the checkpoint, stacked like lattice fit's")
    p.add_argument("--ckpt_path", default=None, help="the trained Lightning checkpoint (default: the best one the "
                   "configs' monitored ModelCheckpoint kept, e.g. by val/mean_auc)")
    p.add_argument("--out", required=True, help="the .pt2 package to write (schema and manifest go beside it)")
    p.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                   help="embedding table format in the package: none (as trained) or int8 (row-wise, fp32 "
                        "accumulation; about 0.28x the fp32 bytes at D=64)")
    return p


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lattice predict --package",
                                description="Score Parquet rows with a serving package; write Parquet.")
    p.add_argument("--package", required=True, help="model.pt2 written by lattice export")
    p.add_argument("--data", action="append", required=True, help="a Parquet file or a folder of them (repeatable)")
    p.add_argument("--out", required=True, help="the Parquet file to write")
    p.add_argument("--batch_size", type=int, default=4096, help="rows per call of the package")
    return p


def run_export(argv: Sequence[str]) -> Path:
    """``lattice export ...`` (``argv`` without the leading ``export``)."""
    args = _export_parser().parse_args(list(argv))
    if args.ckpt_path is None:
        from lattice.train.loading import parse_config
        from lattice.train.resume import default_ckpt_path

        args.ckpt_path = default_ckpt_path(parse_config(args.config).get("trainer"), "export")
    if not Path(args.ckpt_path).is_file():
        raise SystemExit(f"lattice export: checkpoint {args.ckpt_path!r} does not exist")
    if Path(args.out).suffix != ".pt2":
        raise SystemExit(f"lattice export: --out must name a .pt2 file, got {args.out!r}")
    from lattice.serve.export import export_package
    from lattice.train.loading import load_from_config

    module, _ = load_from_config(args.config, args.ckpt_path, seed=False)
    path, _ = export_package(module.eval(), args.out, quantization=args.quantize)
    return path


def run_predict(argv: Sequence[str]) -> Path:
    """``lattice predict --package ...`` (``argv`` without the leading ``predict``)."""
    args = _predict_parser().parse_args(list(argv))
    import pyarrow.parquet as pq

    from lattice.serve.predictor import Predictor

    predictor = Predictor.from_package(args.package, batch_size=args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with pq.ParquetWriter(out, predictor.output_schema()) as writer:
        for source in args.data:
            for table in predictor.predict_batches(source):
                writer.write_table(table)
                rows += table.num_rows
    print(f"wrote {rows} predictions ({', '.join(predictor.task_names)}) to {out}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``lattice export ...`` or ``lattice predict --package ...`` (``argv`` with the command word)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        run_export(argv[1:])
    elif is_package_predict(argv):
        run_predict(argv[1:])
    else:
        raise SystemExit(f"lattice.serve.commands: expected 'export ...' or 'predict --package ...', got {argv[:2]}")
