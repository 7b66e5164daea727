"""Shared ingest logic: unit ids, spike assembly, filters, behaviour, writing."""

from __future__ import annotations

import numpy as np
import pytest

from nh_serve.data.session import open_session
from nh_serve.errors import InputError
from nh_serve.ingest.common import (
    Recording,
    UnitFilter,
    check_output_path,
    clean_columns,
    filter_units,
    format_unit_ids,
    recording_extent,
    spikes_from_ids,
    spikes_from_ragged,
    velocity_from_position,
    write_recording,
)


def test_format_unit_ids():
    assert format_unit_ids(np.array([3, 10, 2], dtype=np.uint32)).tolist() == ["3", "10", "2"]
    assert format_unit_ids(np.array([3.0, 7.0])).tolist() == ["3", "7"]
    assert format_unit_ids(np.array([b"a1", b" b "], dtype=object)).tolist() == ["a1", "b"]
    assert format_unit_ids(np.array([0.5])).tolist() == ["0.5"]


def test_spikes_from_ids_sorts_by_time_and_indexes_sorted_ids():
    times, idx, ids = spikes_from_ids([0.3, 0.1, 0.2, 0.1], [7, 2, 7, 10], name="x")
    assert ids.tolist() == ["2", "7", "10"]  # numeric order of the distinct ids
    assert times.tolist() == [0.1, 0.1, 0.2, 0.3]
    # stable: the two spikes at 0.1 keep their order (unit 2 first, then unit 10)
    assert idx.tolist() == [0, 2, 1, 1]


def test_spikes_from_ids_with_unit_table_and_missing_unit():
    times, idx, ids = spikes_from_ids([0.1, 0.2], ["b", "a"], name="x", unit_ids=["c", "a", "b"])
    assert ids.tolist() == ["c", "a", "b"]
    assert idx.tolist() == [2, 1]
    with pytest.raises(InputError, match="missing from the unit table"):
        spikes_from_ids([0.1], ["z"], name="x", unit_ids=["a"])
    with pytest.raises(InputError, match="2 spike times but 1 unit ids"):
        spikes_from_ids([0.1, 0.2], [1], name="x")


def test_spikes_from_ragged():
    times, idx, ids = spikes_from_ragged([np.array([0.5, 0.9]), np.array([]), np.array([0.1])], [4, 5, 6], name="x")
    assert times.tolist() == [0.1, 0.5, 0.9]
    assert idx.tolist() == [2, 0, 0]
    assert ids.tolist() == ["4", "5", "6"]


def test_velocity_from_position_linear_and_quadratic():
    t = np.array([0.0, 0.3, 1.1, 2.0])
    grid, v = velocity_from_position(t, 2.0 * t + 1.0, rate=10.0, name="wheel")
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(2.0) and grid.size == 21
    assert v.shape == (21, 1) and v.dtype == np.float32
    np.testing.assert_allclose(v[:, 0], 2.0, rtol=1e-6)
    # x = t^2 sampled on the grid itself: central differences are exact in the interior
    tq = np.arange(0, 1.0001, 0.1)
    _, vq = velocity_from_position(tq, tq**2, rate=10.0, name="wheel")
    np.testing.assert_allclose(vq[1:-1, 0], 2 * tq[1:-1], atol=1e-5)
    with pytest.raises(InputError, match="at least 2 samples"):
        velocity_from_position([1.0], [1.0], rate=10.0, name="wheel")


def _rec(labels=None):
    # units a (4 spikes), b (1 spike), c (2 spikes) over [0, 2) s
    times = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 1.0, 1.5])
    idx = np.array([0, 0, 2, 0, 1, 0, 2])
    return Recording(
        times=times,
        unit_index=idx,
        unit_ids=np.array(["a", "b", "c"]),
        labels=labels,
        units_extra={"depth": np.array([10.0, 20.0, 30.0]), "firing rate": np.array([1.0, 2.0, 3.0])},
        start=0.0,
        end=2.0,
        provenance={"source": {"format": "test", "path": "mem"}},
    )


def test_filter_units_rate_and_labels():
    rec = _rec(labels=np.array(["good", "good", "MUA"]))
    # rates: a 2 Hz, b 0.5 Hz, c 1 Hz
    res = filter_units(rec, UnitFilter(min_rate=0.6), start=0.0, end=2.0)
    assert res.unit_ids.tolist() == ["a"]
    assert res.summary["n_units_dropped_by_label"] == 1 and res.summary["n_units_dropped_by_rate"] == 1
    res = filter_units(rec, UnitFilter(min_rate=0.6, keep_labels=("good", "mua")), start=0.0, end=2.0)
    assert res.unit_ids.tolist() == ["a", "c"]
    assert res.times.tolist() == [0.1, 0.2, 0.3, 0.4, 1.0, 1.5]
    assert res.unit_index.tolist() == [0, 0, 1, 0, 0, 1]
    res = filter_units(rec, UnitFilter(min_rate=100.0, all_units=True), start=0.0, end=2.0)
    assert res.unit_ids.tolist() == ["a", "b", "c"] and res.times.size == 7
    with pytest.raises(InputError, match="no units left.*below --min-rate 100 Hz.*--all-units"):
        filter_units(rec, UnitFilter(min_rate=100.0), start=0.0, end=2.0)


def test_recording_extent():
    rec = _rec()
    assert recording_extent(rec) == (0.0, 2.0)
    rec.start, rec.end = None, None
    s, e = recording_extent(rec)
    assert s == 0.1 and e > 1.5 and e == np.nextafter(1.5, np.inf)
    rec.end = 1.5
    with pytest.raises(InputError, match="at or after the recording end"):
        recording_extent(rec)


def test_clean_columns():
    out = clean_columns({"firing rate": np.array([1.0]), "id": np.array([2]), "naïve": np.array(["é"])})
    assert set(out) == {"firing_rate", "id_", "na_ve"}
    assert out["na_ve"].tolist() == ["\\xe9"]


def test_write_recording_round_trip(tmp_path):
    rec = _rec(labels=np.array(["good", "noise", "good"]))
    rec.behavior = (np.array([0.0, 0.5, 1.0, 1.5]), np.array([[1.0], [np.nan], [3.0], [4.0]]))
    rec.behavior_names = ["speed"]
    rec.trials = {"start": np.array([0.2, 1.2]), "end": np.array([0.8, 1.8]), "choice": np.array(["l", "r"])}
    out = write_recording(rec, tmp_path / "s.h5", flt=UnitFilter(min_rate=0.0))
    with open_session(out) as s:
        assert s.unit_ids.tolist() == ["a", "c"]
        assert (s.start, s.end) == (0.0, 2.0)
        t, u = s.spikes(0.0, 2.0)
        assert t.tolist() == [0.1, 0.2, 0.3, 0.4, 1.0, 1.5] and u.tolist() == [0, 0, 1, 0, 0, 1]
        assert s.units_table["quality"].tolist() == ["good", "good"]
        assert s.units_table["depth"].tolist() == [10.0, 30.0]
        assert s.units_table["firing_rate"].tolist() == [1.0, 3.0]
        bt, bv = s.behavior(0.0, 2.0)
        assert bt.tolist() == [0.0, 1.0, 1.5] and bv[:, 0].tolist() == [1.0, 3.0, 4.0]  # NaN sample dropped
        assert s.trials["choice"].tolist() == ["l", "r"]
        prov = s.provenance
    assert prov["source"]["format"] == "test"
    assert prov["filters"]["n_units_source"] == 3 and prov["filters"]["n_units_kept"] == 2
    assert prov["behavior_columns"] == ["speed"]
    assert "created" in prov["written_by"]


def test_check_output_path(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"")
    with pytest.raises(InputError, match="file exists; pass --overwrite"):
        check_output_path(tmp_path / "x.h5", overwrite=False)
    assert check_output_path(tmp_path / "x.h5", overwrite=True) == tmp_path / "x.h5"
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "x.h5", overwrite=False)
    with pytest.raises(InputError, match="is a folder"):
        check_output_path(tmp_path, overwrite=True)
