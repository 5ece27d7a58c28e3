"""Put the headline table of a bench run into README.md, between ``<!-- bench:begin -->`` and
``<!-- bench:end -->``.

    python benchmarks/readme_tables.py benchmarks/results/h100-80gb-hbm3_2026-12-07/bench.json [--readme README.md]

Refuses (exit 2) when the README lacks either marker: it never guesses where the table goes. Links in the
block are relative to the README's folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from fastdit.bench.report import readme_tables, replace_readme_block


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench_json", help="the bench.json of a `fastdit bench` run")
    p.add_argument("--readme", default="README.md", help="the README to update (default README.md)")
    args = p.parse_args(argv)
    readme = Path(args.readme)
    if not readme.is_file():
        print(f"readme_tables: error: no README at {readme}", file=sys.stderr)
        return 2
    if not Path(args.bench_json).is_file():
        print(f"readme_tables: error: no bench.json at {args.bench_json}", file=sys.stderr)
        return 2
    text = readme.read_text()
    try:
        updated = replace_readme_block(text, readme_tables(args.bench_json, relative_to=readme.resolve().parent))
    except ValueError as err:
        print(f"readme_tables: error: {readme}: {err}", file=sys.stderr)
        return 2
    if updated != text:
        readme.write_text(updated)
    print(f"updated {readme} from {args.bench_json}" if updated != text else f"{readme} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
