"""``nh-serve ingest npz``: synthetic archives and two real recordings in flat form."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from real_data import REAL

from nh_serve.data.session import open_session
from nh_serve.errors import InputError
from nh_serve.ingest.cli import run
from nh_serve.ingest.npz import read_npz


def test_full_archive_round_trip(tmp_path):
    path = tmp_path / "rec.npz"
    np.savez(
        path,
        spike_times=np.array([2.0, 1.0, 3.0, 1.5, 2.5]),
        unit_ids=np.array(["u2", "u1", "u2", "u3", "u1"]),
        units=np.array(["u1", "u2", "u3", "silent"]),
        units_label=np.array(["good", "good", "mua", "good"]),
        units_depth=np.array([100.0, 200.0, 300.0, 400.0]),
        start=0.0,
        end=4.0,
        behavior_times=np.array([0.0, 1.0, 2.0, 3.0]),
        behavior_values=np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]),
        behavior_names=np.array(["x", "y"]),
        trials_start=np.array([0.5, 2.5]),
        trials_end=np.array([1.5, 3.5]),
        trials_contrast=np.array([0.25, 1.0]),
    )
    out = tmp_path / "s.h5"
    run(["ingest", "npz", str(path), "--min-rate", "0", "--out", str(out)])
    with open_session(out) as s:
        # mua u3 dropped by its label; "silent" is good and kept by --min-rate 0
        assert s.unit_ids.tolist() == ["u1", "u2", "silent"]
        t, u = s.spikes(0, 4)
        assert t.tolist() == [1.0, 2.0, 2.5, 3.0] and u.tolist() == [0, 1, 0, 1]
        assert (s.start, s.end) == (0.0, 4.0)
        assert s.units_table["depth"].tolist() == [100.0, 200.0, 400.0]
        bt, bv = s.behavior(0, 4)
        assert bt.tolist() == [0.0, 1.0, 2.0, 3.0] and bv.shape == (4, 2)
        assert s.trials["contrast"].tolist() == [0.25, 1.0]
        assert s.provenance["behavior_columns"] == ["x", "y"]
    # the default rate filter (0.1 Hz over 4 s) drops the silent unit too
    out2 = tmp_path / "s2.h5"
    run(["ingest", "npz", str(path), "--out", str(out2), "--include-mua"])
    with open_session(out2) as s:
        assert s.unit_ids.tolist() == ["u1", "u2", "u3"]


def test_bad_archives(tmp_path):
    with pytest.raises(InputError, match="npz file .*missing.npz: not found"):
        read_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "a.npz", spike_times=np.array([1.0]))
    with pytest.raises(InputError, match=r"missing array\(s\) unit_ids \(found: spike_times\)"):
        read_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", spike_times=np.array([1.0, 2.0]), unit_ids=np.array([1]))
    with pytest.raises(InputError, match="2 spike times but 1 unit ids"):
        run(["ingest", "npz", str(tmp_path / "b.npz"), "--out", str(tmp_path / "b.h5")])
    np.savez(tmp_path / "c.npz", spike_times=np.array([1.0]), unit_ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="Python objects"):
        read_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", spike_times=np.array([1.0]), unit_ids=np.array([1]), units_depth=np.array([1.0]))
    with pytest.raises(InputError, match="no `units` array"):
        read_npz(tmp_path / "d.npz")
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read it as a numpy .npz"):
        read_npz(tmp_path / "e.npz")
    np.savez(tmp_path / "f.npz", spike_times=np.array([-1.0, 2.0]), unit_ids=np.array([1, 1]))
    with pytest.raises(InputError, match="negative"):
        run(["ingest", "npz", str(tmp_path / "f.npz"), "--all-units", "--out", str(tmp_path / "f.h5")])
    assert list(tmp_path.glob("*.h5")) == []


@pytest.mark.real_data
@pytest.mark.skipif(not (REAL / "ibl_brainbox_fixture").is_dir(), reason="shared real data not present")
def test_real_ibl_pickle_via_npz(tmp_path):
    with open(REAL / "ibl_brainbox_fixture" / "ephys_test.p", "rb") as fh:
        d = pickle.load(fh)  # a known fixture file from ibllib's tests
    np.savez(tmp_path / "ibl.npz", spike_times=d["spike_times"], unit_ids=d["spike_clusters"])
    out = tmp_path / "ibl.h5"
    run(["ingest", "npz", str(tmp_path / "ibl.npz"), "--all-units", "--out", str(out)])
    clusters, counts = np.unique(d["spike_clusters"], return_counts=True)
    with open_session(out) as s:
        assert s.n_units == 289 == clusters.size
        assert s.n_spikes == 124905 == d["spike_times"].size
        assert s.unit_ids.tolist() == [str(c) for c in clusters]
        t, u = s.spikes(s.start, s.end)
        np.testing.assert_array_equal(t, d["spike_times"])
        np.testing.assert_array_equal(np.bincount(u, minlength=289), counts)
    # README: 144 clusters fire above 1 Hz over the 120 s
    out1 = tmp_path / "ibl1.h5"
    run(["ingest", "npz", str(tmp_path / "ibl.npz"), "--min-rate", "1", "--out", str(out1)])
    with open_session(out1) as s:
        assert s.n_units == 144
        assert s.n_spikes == int(counts[counts >= 120].sum())


def _matclust_units(path) -> list[np.ndarray]:
    """Parse MatClust's nested cells as the data set's README does."""
    from scipy.io import loadmat

    mat = loadmat(path, squeeze_me=True)
    units = []
    for array in mat["spikes"]:
        cells = array if array.size > 1 else ([array] if array.size == 1 else [])
        for cell in cells:
            if cell.size == 0:
                continue
            t = np.atleast_1d(cell["time"].ravel()[0])
            if t.size:
                units.append(t.astype(np.float64))
    return units


@pytest.mark.real_data
@pytest.mark.skipif(not (REAL / "rat_ca1_linear_track").is_dir(), reason="shared real data not present")
def test_real_rat_ca1_matclust_via_flat_npz(tmp_path):
    units = _matclust_units(REAL / "rat_ca1_linear_track" / "spikes.mat")
    out = tmp_path / "rat.h5"
    run(["ingest", "npz", str(REAL / "rat_ca1_linear_track" / "spikes_flat.npz"), "--all-units", "--out", str(out)])
    with open_session(out) as s:
        assert s.n_units == len(units) == 31
        assert s.n_spikes == sum(u.size for u in units) == 28829
        t, u = s.spikes(s.start, s.end)
        np.testing.assert_allclose(t, np.sort(np.concatenate(units)))
        assert sorted(np.bincount(u).tolist()) == sorted(x.size for x in units)
        assert s.start == pytest.approx(min(x.min() for x in units))
