"""Generic-rDNS classifier on the tuning set: precision, recall, F1, misses.

Reads tests/data/rdns_labelled.tsv — the names the classifier was tuned on,
so these figures are in-sample and say little about new names; the
held-out figures come from bench/detection_eval.py (tests/data/rdns_eval.tsv)
— classifies every name as the rDNS source does (with the ICANN Public
Suffix List domain), and prints the confusion counts, precision/recall/F1
overall and per confirmation state, every misclassified name with its
evidence, and the classifier's cost per name. Measured, not asserted
(tests/test_rdns_generic.py holds the floors). No network.

    python bench/rdns_precision.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smtpguard.core.rdns import classify  # noqa: E402
from smtpguard.sources.rdns import registrable_domain  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "rdns_labelled.tsv")


def load() -> list[tuple[str, str, bool, bool, str]]:
    rows = []
    with open(DATA, encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, ip, confirmed, label, note = line.rstrip("\n").split("\t")
                rows.append((name, ip, confirmed == "yes", label == "generic", note))
    return rows


def scores(pairs: list[tuple[bool, bool]]) -> tuple[int, int, int, int, float, float, float]:
    tp = sum(g and e for g, e in pairs)
    fp = sum(g and not e for g, e in pairs)
    fn = sum(e and not g for g, e in pairs)
    tn = len(pairs) - tp - fp - fn
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return tp, fp, fn, tn, p, r, f1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer timing rounds")
    args = ap.parse_args()
    rows = load()
    domains = {name: registrable_domain(name) or None for name, *_ in rows}
    results = []
    for name, ip, confirmed, expected, note in rows:
        v = classify(name, ip, confirmed=confirmed, domain=domains[name])
        results.append((name, ip, confirmed, expected, note, v))

    generic = sum(r[3] for r in rows)
    print(f"tuning set (in-sample; held-out figures: bench/detection_eval.py): {len(rows)} names "
          f"({generic} generic, {len(rows) - generic} server)")
    for title, subset in (("all", results),
                          ("confirmed", [r for r in results if r[2]]),
                          ("unconfirmed", [r for r in results if not r[2]])):
        tp, fp, fn, tn, p, r, f1 = scores([(x[5].generic, x[3]) for x in subset])
        print(f"  {title:12s} n={len(subset):3d}  tp={tp} fp={fp} fn={fn} tn={tn}  "
              f"precision {p:.3f}  recall {r:.3f}  F1 {f1:.3f}")

    wrong = [x for x in results if x[5].generic != x[3]]
    print(f"misclassified: {len(wrong)}")
    for name, ip, confirmed, expected, note, v in wrong:
        kind = "missed generic" if expected else "false generic"
        print(f"  {kind:14s} {name} [{ip}{'' if confirmed else ', unconfirmed'}] "
              f"score {v.score} ({' '.join(v.reasons) or 'no evidence'}) - {note}")

    rounds = 5 if args.quick else 25
    per_name = []
    for _ in range(rounds):
        start = time.perf_counter()
        for name, ip, confirmed, _e, _n in rows:
            classify(name, ip, confirmed=confirmed, domain=domains[name])
        per_name.append((time.perf_counter() - start) / len(rows) * 1e6)
    start = time.perf_counter()
    for name, *_ in rows:
        registrable_domain(name)
    psl_us = (time.perf_counter() - start) / len(rows) * 1e6
    print(f"cost: classify median {statistics.median(per_name):.1f} us/name "
          f"(max of {rounds} rounds {max(per_name):.1f}); PSL lookup {psl_us:.1f} us/name")
    return 0


if __name__ == "__main__":
    sys.exit(main())
