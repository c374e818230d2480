"""Benchmark inputs written chunk by chunk with pyarrow's streaming writers (never all rows at once).

    python -m tests.benchmarks.data OUT.parquet --rows 10000000 [--wide-kb 3]

Columns: ``id`` ("r000000042"), ``prompt`` (distinct per row), and with ``--wide-kb K`` three
carried-through text columns ``ctx1..3`` of about K/3 KB each.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import time
from pathlib import Path

CHUNK_ROWS = 50_000
_WORDS = "river lantern quartz meadow falcon copper glacier orchid summit willow harbor ember".split()


def prompt_of(i: int) -> str:
    return f"Prompt {i}: write one line about {_WORDS[i % len(_WORDS)]}"


def write_input(path: Path, rows: int, wide_kb: float = 0.0, chunk_rows: int = CHUNK_ROWS) -> dict[str, object]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fmt = "csv" if path.suffix.lower() == ".csv" else "parquet"
    fields = [pa.field("id", pa.string()), pa.field("prompt", pa.string())]
    width = int(wide_kb * 1024 / 3)
    if width:
        fields += [pa.field(f"ctx{j}", pa.string()) for j in (1, 2, 3)]
    schema = pa.schema(fields)
    # Wide cells are random base64 text, different in every row: neither dictionary encoding nor
    # compression shrinks them much, so the file on disk is about as wide as the rows in memory.
    rng = random.Random(5)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    started = time.monotonic()
    writer = (
        pacsv.CSVWriter(tmp, schema) if fmt == "csv" else pq.ParquetWriter(tmp, schema, compression="zstd")
    )
    try:
        for lo in range(0, rows, chunk_rows):
            hi = min(rows, lo + chunk_rows)
            cols = {
                "id": pa.array([f"r{i:09d}" for i in range(lo, hi)], pa.string()),
                "prompt": pa.array([prompt_of(i) for i in range(lo, hi)], pa.string()),
            }
            if width:
                for j in (1, 2, 3):
                    raw = base64.b64encode(rng.randbytes(width * (hi - lo) * 3 // 4 + 3)).decode("ascii")
                    cols[f"ctx{j}"] = pa.array([raw[k * width : (k + 1) * width] for k in range(hi - lo)], pa.string())
            writer.write_table(pa.table(cols, schema=schema))
    finally:
        writer.close()
    tmp.replace(path)
    return {"path": str(path), "rows": rows, "bytes": path.stat().st_size, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--wide-kb", type=float, default=0.0)
    args = ap.parse_args(argv)
    print(json.dumps(write_input(args.out, args.rows, args.wide_kb)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
