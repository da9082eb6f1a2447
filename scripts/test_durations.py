"""Write tests/durations.json (seconds per test node id) from a pytest log made with ``--durations=N``.

tests/conftest.py orders test modules by these numbers, slowest first, so xdist workers finish together.
Usage: ``python scripts/test_durations.py LOG`` (e.g. ``make test > LOG``; setup + call + teardown are summed).
"""

import json
import re
import sys
from pathlib import Path

durations: dict[str, float] = {}
for line in Path(sys.argv[1]).read_text().splitlines():
    m = re.match(r"^([0-9.]+)s (call|setup|teardown)\s+(\S+)", line)
    if m:
        durations[m.group(3)] = round(durations.get(m.group(3), 0.0) + float(m.group(1)), 1)
if not durations:
    sys.exit(f"no '--durations' lines in {sys.argv[1]}")
out = Path(__file__).resolve().parents[1] / "tests" / "durations.json"
out.write_text(json.dumps(dict(sorted(durations.items())), indent=0) + "\n")
print(f"{len(durations)} durations -> {out}")
