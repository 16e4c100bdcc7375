"""bench/methods_docs.py's two-seed ranking: a method ranks above another only when it is ahead at both
seeds and the pooled 95% intervals are disjoint."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from methods_docs import ranked, ranking  # noqa: E402


def test_ranked_needs_both_seeds_ahead_and_disjoint_pooled_intervals():
    n = 200
    assert ranked((120, 118), (90, 92), n)          # 59.5% vs 45.5% pooled: intervals [54.6, 64.2] and [40.7, 50.4]
    assert not ranked((90, 92), (120, 118), n)      # never both ways
    assert not ranked((170, 95), (100, 100), n)     # pooled 66.2% [61.5, 70.7] clear of 50.0%, but behind at seed 1
    assert not ranked((112, 110), (100, 100), n)    # ahead at both, but 55.5% [50.6, 60.3] vs 50.0% [45.1, 54.9] overlap
    assert not ranked((100, 100), (100, 100), n)


def test_ranking_lists_each_row_against_every_other_once():
    lines = ranking({"a": (120, 118), "b": (112, 110), "c": (90, 92)}, 200)
    assert lines == ["- a (59.5%): above c; not separated from b",
                     "- b (55.5%): above c; not separated from a",
                     "- c (45.5%): above none; not separated from none"]
