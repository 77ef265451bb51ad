"""Notebook 01's helpers on the ingested smoke phantom."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichdlib.ingest.cache import open_cache
from ichdlib.ingest.table import load_catalog
from ichdlib.review.explore import catalog_summary, neighbours, study_browser, subtype_examples


def test_summary_counts_match_the_catalog(ingested):
    cat = load_catalog(ingested.work_dir)
    q = pd.read_csv(ingested.work_dir / "quarantine.csv")
    s = catalog_summary(cat, q)
    assert s["counts"]["slices"].sum() == len(cat)
    assert s["prevalence"].loc["any", "positive slices"] == int(cat.loc[cat.split == "train", "any"].sum())
    assert s["quarantine"]["files"].sum() == len(q)
    assert set(s["folds"].index) == set(range(ingested.ingest.folds))


def test_neighbours_are_the_adjacent_z_slices(ingested):
    cat = load_catalog(ingested.work_dir)
    cache = open_cache(ingested.work_dir, ingested.ingest.size)
    study = cat[cat.study_uid == cat.study_uid.iloc[0]]
    i = cat.index.get_loc(study.index[3])
    prev, cur, nxt = neighbours(cat, i, cache)
    np.testing.assert_array_equal(prev, cache[study.row.iloc[2]])
    np.testing.assert_array_equal(nxt, cache[study.row.iloc[4]])
    picks = subtype_examples(cat)
    assert (cat.iloc[picks.position][picks.subtype.tolist()].to_numpy().diagonal() == 1).all()


def test_study_browser_state_follows_its_controls(ingested):
    cat = load_catalog(ingested.work_dir)
    cache = open_cache(ingested.work_dir, ingested.ingest.size)
    box = study_browser(cat, cache)
    c = box.controls
    first = c["image"].value
    c["slider"].value = 1 if c["slider"].value > 1 else 2  # slices numbered 1..n, as notebook 06's viewer
    assert c["image"].value != first and f"slice {c['slider'].value}/" in c["caption"].value
    before = c["image"].value
    c["window"].value = "bone"
    assert c["image"].value != before
    c["study"].value = c["study"].options[-1]
    assert c["slider"].max == (cat.study_uid == c["study"].value).sum() and c["slider"].min == 1
    # a test study is captioned as unlabelled, not as "no hemorrhage"
    test_uid = cat.loc[cat.split == "test", "study_uid"].iloc[0]
    c["study"].value = test_uid
    assert "unlabelled" in c["caption"].value and "no hemorrhage" not in c["caption"].value
    train_neg = cat[(cat.split == "train")].groupby("study_uid")["any"].max()
    if (train_neg == 0).any():
        c["study"].value = train_neg[train_neg == 0].index[0]
        assert "no hemorrhage" in c["caption"].value
    # native pixels at most 4x: a 48 px cache row is shown 192 px wide, not stretched to the page
    assert c["image"].layout.width == f"{min(400, 4 * cache.shape[-1])}px"
