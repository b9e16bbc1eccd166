"""Write the seed data sets (nested.csv, crossed.csv) to the directory given as argv[1].

Used only to regenerate the lme4 reference fixtures; see README.md in this directory.
"""

import sys
from pathlib import Path

from sparsemix.datasets import seed_datasets


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nested, crossed = seed_datasets()
    for name, df in (("nested", nested), ("crossed", crossed)):
        df[["y", "group1", "group2"]].to_csv(out / f"{name}.csv", index=False, float_format="%.17g")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python export_data.py OUT_DIR")
    main(sys.argv[1])
