"""Keep one `mkd compare` result as a benchmark record (run by hand; not a test).

    .venv/bin/python benchmarks/comparison_record.py COMPARE_FOLDER --out benchmarks/results/NAME \
        --command "the mkd compare command" --trained-at COMMIT [--config TEXT] [--machine TEXT]

``COMPARE_FOLDER`` is the ``--out`` of a finished ``mkd compare`` (``comparison.md`` and ``comparison.json``).
Writes ``NAME.md`` (the standard header, then ``comparison.md`` as it is) and ``NAME.json`` (``{"header": ...}``,
then ``comparison.json``'s keys: every row's per-seed numbers, the paired differences, the tuning). The header's
commit is the one the runs were **trained** at (``--trained-at``), not the scoring checkout's; its machine line
says how loaded the cores were while they trained (``--machine``), which the scoring process cannot see.
"""

import argparse
import json
from pathlib import Path

from paired_runs import write_record


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", metavar="COMPARE_FOLDER")
    parser.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    parser.add_argument("--command", required=True, help="the mkd compare command that wrote the folder")
    parser.add_argument("--trained-at", required=True, help="the commit the runs were trained at")
    parser.add_argument("--config", default="", help="the runs' data and settings, for the header")
    parser.add_argument("--machine", required=True, help="cores and load while the runs trained")
    args = parser.parse_args()
    folder = Path(args.folder)
    for name in ("comparison.md", "comparison.json"):
        if not (folder / name).is_file():
            raise SystemExit(f"error: {folder / name}: not found (run mkd compare --out {folder} first)")
    body = (folder / "comparison.md").read_text(encoding="utf-8").splitlines()
    data = json.loads((folder / "comparison.json").read_text(encoding="utf-8"))
    write_record(args.out, args.config, body, data, args.trained_at, args.command, args.machine)
    print(f"{args.out}.md, {args.out}.json")


if __name__ == "__main__":
    main()
