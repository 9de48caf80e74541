"""Write a batch for cpp_predict: the flat inputs a lattice serving package takes, built from Parquet rows by the
data layer's BatchBuilder with the package's schema (the same validation and ``oov`` rules as
``lattice.serve.Predictor``), saved with ``torch.save`` as a list of tensors in the manifest's ``input_names``
order.

    python examples/cpp_predict/save_batch.py model.pt2 rows.parquet batch.pt [--rows 64] [--domain shop]

The rows must carry the schema's columns (a file the planted world or ``lattice data`` wrote does). A row's
domain comes from the domain column, else from ``--domain``, else from the file's ``lattice.domain`` metadata.
"""
import argparse
from typing import Optional

import pyarrow.parquet as pq
import torch

from lattice.data.builder import BatchBuilder, ChunkContext
from lattice.serve.inputs import flat_inputs, num_rows
from lattice.serve.package import read_package


def save_batch(package: str, parquet: str, out: str, rows: int = 64,
               domain: Optional[str] = None) -> list:
    """Save the flat inputs of the first ``rows`` rows of ``parquet`` for ``package`` to ``out``; returns them."""
    schema, manifest = read_package(package)
    table = pq.read_table(parquet).slice(0, rows)
    if domain is None and schema.domain_column not in table.column_names:
        metadata = pq.read_schema(parquet).metadata or {}
        domain = metadata.get(b"lattice.domain", b"").decode() or None
    ctx = ChunkContext(file=parquet, domain=domain)
    builder = BatchBuilder(schema, zipper="oracle")  # serving: no window is drawn at random
    batch = builder.build(builder.prepare(table, ctx), shared=False)
    inputs = list(flat_inputs(batch, schema, manifest.teacher_embedding_dim))
    if len(inputs) != len(manifest.input_names):
        raise ValueError(f"built {len(inputs)} inputs, but the package takes {manifest.input_names}")
    # one storage per tensor: the builder's tensors share buffers, which torch.save keeps shared
    inputs = [t.clone() for t in inputs]
    torch.save(inputs, out)
    return inputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", help="model.pt2 (with model.schema.yaml and model.manifest.yaml beside it)")
    parser.add_argument("parquet", help="rows to score")
    parser.add_argument("out", help="batch.pt to write")
    parser.add_argument("--rows", type=int, default=64, help="the first ROWS rows (default 64)")
    parser.add_argument("--domain", default=None, help="every row's domain, when the file has no domain column")
    args = parser.parse_args(argv)
    inputs = save_batch(args.package, args.parquet, args.out, args.rows, args.domain)
    print(f"wrote {args.out}: {num_rows(tuple(inputs))} rows")


if __name__ == "__main__":
    main()
