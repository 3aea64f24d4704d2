"""What a prune adds to a process's memory: a bf16 FLUX-shaped transformer of about 1 GB (width
1536, 4 double + 4 single blocks, random weights), pruned block by block at 50%.

    python benchmarks/memory_bar.py [--methods wanda,sparsegpt,dit] [--backup] [--out FILE.md]

Each method runs in a fresh process (so that one run's freed memory does not hide another's).
Printed per method: the peak resident set the prune added (Linux ``VmHWM``, reset before it),
the peak of live tensor bytes above the weights (:class:`ditprune.memory.LiveBytes`) with its
kinds at that moment, and the seconds, all relative to the weights' bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys
from ditprune.membench import run_memory
print(json.dumps(run_memory(method=sys.argv[1], backup=sys.argv[2] == "1", **json.loads(sys.argv[3]))))
"""


def run(method: str, backup: bool, options: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, method, "1" if backup else "0", json.dumps(options)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="wanda,sparsegpt,dit,dit reconstruct")
    p.add_argument("--backup", action="store_true", help="backup=True (the API's default) instead of False")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    lines = [f"bf16 FLUX-shaped transformer (width 1536, 4 double + 4 single blocks), 50%, backup={args.backup}; "
             "x = times the weights' bytes", "",
             "| method | weights GiB | peak RSS added (x) | live tensor peak above weights (x) | masks | statistics | "
             "workspace | backup | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for label in args.methods.split(","):
        method, options = ("dit", {"reconstruct": True}) if label == "dit reconstruct" else (label, {})
        r = run(method, args.backup, options)
        w = r["weights_bytes"]
        k = {key: v / w for key, v in r["peak_by_kind"].items()}
        lines.append(f"| {label} | {w / 2**30:.2f} | {r['rss_added_bytes'] / w:.3f} | {(r['peak_bytes'] - w) / w:.3f} | "
                     f"{k['masks']:.3f} | {k['statistics']:.3f} | {k['workspace']:.3f} | {k['backup']:.3f} | "
                     f"{r['seconds']:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        from pathlib import Path

        from ditprune._io import atomic_file

        with atomic_file(Path(args.out)) as tmp:
            tmp.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
