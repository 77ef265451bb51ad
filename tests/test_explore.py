"""Notebook 01's helpers on the ingested smoke phantom."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichdlib.ingest.cache import open_cache
from ichdlib.ingest.catalog import load_catalog
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
    c["slider"].value = 0 if c["slider"].value else 1
    assert c["image"].value != first and f"slice {c['slider'].value}/" in c["caption"].value
    before = c["image"].value
    c["window"].value = "bone"
    assert c["image"].value != before
    c["study"].value = c["study"].options[-1]
    assert c["slider"].max == (cat.study_uid == c["study"].value).sum() - 1
