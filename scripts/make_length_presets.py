"""Regenerate planner/presets/lengths.json from a real length file.

    .venv/bin/python scripts/make_length_presets.py ../shared/data/wikipedia_lengths.txt

`wikipedia` is the empirical histogram (40 log-spaced bins per decade), `wikipedia-synth`
the lognormal-body + Pareto-tail fit (tail above the 99th percentile, Hill estimator).
`commoncrawl` and `github` are hand-set shapes with heavier tails, as docs/architecture.md describes
web and code corpora; they are not fits.
"""
import json
import sys
from pathlib import Path

from pliant.planner.lengths import build_histogram, fit_long_tail, load_length_file, preset_record

src = load_length_file(sys.argv[1])
hist = build_histogram(src.lengths, "wikipedia")
out = {
    "source": f"{Path(sys.argv[1]).name}: {len(src.lengths)} lengths",
    "long_tail": {
        "wikipedia-synth": {**preset_record(fit_long_tail(src.lengths, "wikipedia-synth", 0.99)),
                            "note": "fit to the Wikipedia lengths"},
        "commoncrawl": {"body_median": 500.0, "body_sigma": 1.3, "tail_start": 8000.0, "tail_alpha": 1.6,
                        "tail_fraction": 0.02, "min_len": 16, "note": "hand-set heavier web-like shape"},
        "github": {"body_median": 800.0, "body_sigma": 1.5, "tail_start": 12000.0, "tail_alpha": 1.3,
                   "tail_fraction": 0.04, "min_len": 16, "note": "hand-set code-like shape, heaviest tail"},
    },
    "histogram": {"wikipedia": {"edges": list(hist.edges), "counts": list(hist.counts)}},
}
path = Path(__file__).resolve().parent.parent / "planner" / "presets" / "lengths.json"
path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
print(f"wrote {path} ({path.stat().st_size} bytes)")
