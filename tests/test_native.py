"""Native-resolution slices read straight from DICOM files (ichdlib.ingest.native)."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from ichdlib.cnn.data import SliceDataset
from ichdlib.ingest.cache import DECODE_COLUMNS, decode_resized
from ichdlib.ingest.dicom import read_header
from ichdlib.ingest.native import DicomSlices
from ichdlib.phantom.synth import write_ct_dicom


def _catalog(tmp_path, encodings, size=32):
    rng = np.random.default_rng(0)
    recs = []
    for i, enc in enumerate(encodings):
        hu = rng.integers(-1000, 2000, size=(size, size)).astype(np.float64)
        if enc == "big":  # other size: resized on the general path
            hu = rng.integers(-1000, 2000, size=(size + 8, size + 8)).astype(np.float64)
            enc = "signed"
        p = write_ct_dicom(tmp_path / f"s{i}" / f"ID_{i:04d}.dcm", hu, encoding=enc, z=float(i))
        m = read_header(p)
        m["fixes"] = ";".join(m["fixes"])
        recs.append({"path": str(p), "row": 2 * i, **{c: m[c] for c in DECODE_COLUMNS if c != "path"}})
    return pd.DataFrame(recs)


ENCODINGS = ["signed", "unsigned", "unsigned12", "wrap12", "monochrome1", "monochrome1_raw", "big"]


def test_rows_equal_cache_decoding(tmp_path):
    cat = _catalog(tmp_path, ENCODINGS)
    ds = DicomSlices(cat, 32)
    assert ds.shape == (2 * len(ENCODINGS) - 1, 32, 32)
    assert 0 < ds.fast_share < 1  # the plain files take the one-pread path, the quirky ones do not
    for _, r in cat.iterrows():
        want = decode_resized(r["path"], r.to_dict(), 32)
        np.testing.assert_array_equal(ds[int(r["row"])], want, err_msg=r["path"])
    assert not ds[1].any()  # a row not in the catalog reads as zeros, like the cache
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_slice_dataset_reads_batches_from_dicom_and_pickles_small(tmp_path):
    cat = _catalog(tmp_path, ["signed"] * 4)
    ds = DicomSlices(cat, 32)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 20_000
    table = np.array([[0, 0, 2], [0, 2, 4], [2, 4, 6], [4, 6, 6]])
    sd = SliceDataset(clone, table, np.zeros((4, 6), np.float32))
    x, _, _ = sd.__getitems__([3, 1])
    assert x.shape == (2, 3, 32, 32) and x.dtype.__str__() == "torch.int16"
    for j, pos in enumerate([3, 1]):
        for c in range(3):
            np.testing.assert_array_equal(x[j, c].numpy(), ds[int(table[pos, c])])


def test_truncated_file_names_it(tmp_path):
    cat = _catalog(tmp_path, ["signed"])
    path = cat.loc[0, "path"]
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    with pytest.raises(OSError, match="ID_0000.dcm"):
        DicomSlices(cat, 32)[0]


def test_phantom_catalog_rows_equal_the_cache(ingested):
    """On the ingested smoke phantom (quirky encodings: about half take the one-pread path): every slice read from DICOM at the cache
    size equals its cache row; above ingest.size open_slices reads DICOM instead of building a cache."""
    from ichdlib.ingest.cache import cache_path, open_cache
    from ichdlib.ingest.native import open_slices
    from ichdlib.ingest.table import load_catalog

    P = ingested
    cat = load_catalog(P.work_dir)
    cache = open_cache(P.work_dir, P.ingest.size)
    ds = DicomSlices(cat, P.ingest.size, n_rows=len(cache))
    rows = cat["row"].to_numpy()
    np.testing.assert_array_equal(ds[rows], np.asarray(cache[rows]))
    assert isinstance(open_slices(P, P.ingest.size, cat), np.memmap)
    big = open_slices(P, 64, cat)
    assert isinstance(big, DicomSlices) and big.shape[1:] == (64, 64) and 0 < big.fast_share < 1
    assert not cache_path(P.work_dir, 64).exists()
    x, _, _ = SliceDataset.from_catalog(cat.iloc[:5], big, labels=False).__getitems__([0, 4])
    assert tuple(x.shape) == (2, 3, 64, 64)
