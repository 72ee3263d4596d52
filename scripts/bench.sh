#!/usr/bin/env bash
# Runs the benchmarks and prints each figure next to its baseline, as a ratio.
# Usage: ./scripts/bench.sh   (results also land in target/criterion/)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p idem-runtime --bench overhead -- --noplot "$@"
python3 - <<'PY'
import json, pathlib
root = pathlib.Path("target/criterion/memory")
def ns(name):
    est = json.loads((root / name / "new" / "estimates.json").read_text())
    return est["mean"]["point_estimate"]
plain, floor, fresh, replay = (ns(n) for n in ("plain", "floor", "fresh", "replay"))
print()
print(f"{'memory store':<12} {'mean':>10} {'added to plain call':>20} {'ratio to floor':>15}")
for name, v in (("plain", plain), ("floor", floor), ("fresh", fresh), ("replay", replay)):
    print(f"{name:<12} {v:>8.0f}ns {v - plain:>18.0f}ns {v / floor:>14.2f}x")
PY
