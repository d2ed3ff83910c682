"""A minimal benchmark: ``<root>/<split>.csv`` with columns image1, image2 ..., text, label, category."""

from __future__ import annotations

import csv
from pathlib import Path

from visguard.eval import Benchmark, BenchmarkLayoutError, EvalItem
from visguard.eval.benchmarks import resolve_under


class CsvBenchmark(Benchmark):
    """Items from CSV files, one per split; image paths are relative to the root."""

    name = "csv"
    title = "CSV (template plugin)"
    layout = "Expected <root>/<split>.csv with columns image1[, image2 ...], text, label (safe|unsafe), category."

    def available_splits(self, root: Path) -> list[str]:
        return sorted(p.stem for p in root.glob("*.csv"))

    def load_split(self, root: Path, split: str) -> list[EvalItem]:
        path = root / f"{split}.csv"
        if not path.is_file():
            raise BenchmarkLayoutError(f"csv: {path} does not exist. {self.layout}")
        items = []
        with path.open(newline="", encoding="utf-8") as fh:
            for i, row in enumerate(csv.DictReader(fh)):
                where = f"csv: {path.name} row {i + 1}"
                columns = sorted((k for k in row if k and k.startswith("image") and row[k]), key=lambda k: int(k[5:] or 0))
                if not columns or "text" not in row or "label" not in row:
                    raise BenchmarkLayoutError(f"{where}: needs image1, text and label columns. {self.layout}")
                items.append(EvalItem(
                    id=f"{split}/{i}",
                    images=tuple(resolve_under(root, row[k], what=f"{where} {k}") for k in columns),
                    text=row["text"],
                    label=row["label"].strip(),
                    category=(row.get("category") or None),
                    split=split,
                ))
        return items
