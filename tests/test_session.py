"""Tests for nh_serve.data.session: layout compatibility with temporaldata, lazy windows, validation, atomic writes."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import temporaldata as td
from real_data import REAL

from nh_serve.data.session import Session, open_session, write_session
from nh_serve.errors import InputError, SessionFileError


def _spikes(n=5000, n_units=7, duration=100.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, duration, n))
    u = rng.integers(0, n_units, n)
    return t, u


def _write(path, *, n=5000, n_units=7, duration=100.0, **kw):
    t, u = _spikes(n, n_units, duration)
    write_session(
        path,
        spike_times=t,
        unit_index=u,
        unit_ids=[f"u{i}" for i in range(n_units)],
        start=0.0,
        end=duration,
        **kw,
    )
    return t, u


def _td_file(path, *, timestamps, unit_index, ids, start=0.0, end=100.0):
    """A file written directly by temporaldata (not by our writer)."""
    data = td.Data(
        spikes=td.IrregularTimeSeries(
            timestamps=np.asarray(timestamps, dtype=np.float64),
            unit_index=np.asarray(unit_index),
            domain=td.Interval(start=start, end=end),
        ),
        units=td.ArrayDict(id=np.asarray(ids)),
        domain=td.Interval(start=start, end=end),
    )
    with h5py.File(path, "w") as f:
        data.to_hdf5(f)


# --------------------------------------------------------------------------- round trips


def test_our_writer_reads_in_temporaldata(tmp_path):
    p = tmp_path / "s.h5"
    rng = np.random.default_rng(1)
    bt = np.arange(0, 100, 0.01)
    bv = rng.normal(size=(bt.size, 2)).astype(np.float32)
    it = np.array([1.0, 2.5, 40.0])
    iv = rng.normal(size=(3, 32)).astype(np.float32)
    rates = rng.uniform(0, 20, size=(5000, 7)).astype(np.float32)
    t, u = _write(
        p,
        units_extra={"snr": np.arange(7.0), "region": np.array(["CA1"] * 7)},
        behavior=(bt, bv),
        image_embeddings=(it, iv),
        trials={"start": np.array([1.0, 5.0]), "end": np.array([2.0, 6.0]), "kind": np.array(["a", "b"])},
        true_rates=(rates, 0.02),
        provenance={"source": "unit-test", "subject": "m1"},
    )
    with h5py.File(p, "r") as f:
        data = td.Data.from_hdf5(f, lazy=True)
        np.testing.assert_array_equal(data.spikes.timestamps, t)
        np.testing.assert_array_equal(data.spikes.unit_index, u)
        assert data.units.id.tolist() == [f"u{i}" for i in range(7)]
        assert data.units.region.tolist() == ["CA1"] * 7
        assert data.domain.start[0] == 0.0 and data.domain.end[-1] == 100.0
        np.testing.assert_array_equal(data.behavior.values, bv)
        np.testing.assert_array_equal(data.image_embeddings.embedding, iv)
        np.testing.assert_array_equal(data.true_rates.rates, rates)
        assert data.true_rates.sampling_rate == pytest.approx(50.0)
        assert data.trials.kind.tolist() == ["a", "b"]
        prov = json.loads(data.provenance)
        assert prov["source"] == "unit-test" and prov["written_by"]["package"] == "nh-serve"
    # lazy slicing in temporaldata works on our file
    with h5py.File(p, "r") as f:
        sl = td.Data.from_hdf5(f, lazy=True).slice(10.0, 11.0)
        m = (t >= 10.0) & (t < 11.0)
        np.testing.assert_allclose(sl.spikes.timestamps, t[m] - 10.0)
        np.testing.assert_array_equal(sl.spikes.unit_index, u[m])
        assert sl.true_rates.rates.shape == (50, 7)
        np.testing.assert_array_equal(sl.true_rates.rates, rates[500:550])


def test_our_reader_reads_temporaldata_file(tmp_path):
    p = tmp_path / "td.h5"
    t, u = _spikes(3000, 5, 50.0, seed=3)
    _td_file(p, timestamps=t, unit_index=u, ids=np.array(["a", "b", "c", "d", "e"]), start=0.0, end=50.0)
    with open_session(p) as s:
        assert s.unit_ids.tolist() == ["a", "b", "c", "d", "e"]
        assert s.n_units == 5 and s.n_spikes == 3000
        assert (s.start, s.end, s.duration) == (0.0, 50.0, 50.0)
        tt, uu = s.spikes(0.0, 50.0)
        np.testing.assert_array_equal(tt, t)
        np.testing.assert_array_equal(uu, u)
        assert tt.dtype == np.float64 and uu.dtype == np.int64
        assert s.behavior(0, 1) is None and s.behavior_dim == 0
        assert s.image_events(0, 1) is None and s.image_dim == 0
        assert s.true_rates(0, 1) is None and s.trials is None
        assert s.provenance == {}
        assert s.units_table["id"].tolist() == ["a", "b", "c", "d", "e"]


def test_integer_unit_ids_become_strings(tmp_path):
    p = tmp_path / "ints.h5"
    t, u = _spikes(100, 3, 10.0)
    write_session(p, spike_times=t, unit_index=u, unit_ids=[10, 11, 12], start=0.0, end=10.0)
    with open_session(p) as s:
        assert s.unit_ids.tolist() == ["10", "11", "12"]
    # and a temporaldata file with integer ids
    p2 = tmp_path / "ints_td.h5"
    _td_file(p2, timestamps=t, unit_index=u, ids=np.array([4, 5, 6]), end=10.0)
    with open_session(p2) as s:
        assert s.unit_ids.tolist() == ["4", "5", "6"]


def test_optional_members_and_provenance(tmp_path):
    p = tmp_path / "s.h5"
    rng = np.random.default_rng(2)
    bt = np.arange(0, 100, 0.01)
    bv = rng.normal(size=(bt.size, 2)).astype(np.float32)
    it = np.array([1.0, 2.5, 40.0])
    iv = rng.normal(size=(3, 32)).astype(np.float32)
    rates = rng.uniform(0, 20, size=(5000, 7)).astype(np.float32)
    _write(
        p,
        behavior=(bt, bv),
        image_embeddings=(it, iv),
        trials={"start": np.array([1.0, 5.0]), "end": np.array([2.0, 6.0]), "image_index": np.array([3, 4])},
        true_rates=(rates, 0.02),
        units_extra={"snr": np.arange(7.0)},
        provenance={"source": "unit-test"},
    )
    with open_session(p) as s:
        assert s.behavior_dim == 2 and s.image_dim == 32
        bt2, bv2 = s.behavior(1.0, 1.05)
        np.testing.assert_allclose(bt2, [1.0, 1.01, 1.02, 1.03, 1.04])
        np.testing.assert_array_equal(bv2, bv[100:105])
        et, ev = s.image_events(2.0, 40.0)  # half-open: 40.0 excluded
        np.testing.assert_array_equal(et, [2.5])
        np.testing.assert_array_equal(ev, iv[1:2])
        starts, r = s.true_rates(1.0, 2.0)
        assert r.shape == (50, 7)
        np.testing.assert_allclose(starts, 1.0 + 0.02 * np.arange(50))
        np.testing.assert_array_equal(r, rates[50:100])
        starts, r = s.true_rates(1.01, 1.05)  # bins starting at 1.02 and 1.04
        np.testing.assert_allclose(starts, [1.02, 1.04])
        assert s.true_rate_bin_size == pytest.approx(0.02)
        assert s.trials["image_index"].tolist() == [3, 4]
        np.testing.assert_array_equal(s.trials["start"], [1.0, 5.0])
        np.testing.assert_array_equal(s.units_table["snr"], np.arange(7.0))
        assert s.provenance["source"] == "unit-test"
        wb = s.provenance["written_by"]
        assert wb["package"] == "nh-serve" and wb["version"] and "created" in wb


def test_default_extent_contains_last_spike(tmp_path):
    p = tmp_path / "s.h5"
    t = np.array([2.0, 3.0, 7.5])
    write_session(p, spike_times=t, unit_index=[0, 1, 0], unit_ids=["a", "b"])
    with open_session(p) as s:
        assert s.start == 2.0 and s.end > 7.5
        tt, _ = s.spikes(s.start, s.end)
        np.testing.assert_array_equal(tt, t)


# --------------------------------------------------------------------------- lazy windows


def test_window_slicing_matches_numpy(tmp_path):
    # more spikes than the search stride so the coarse index and block reads are exercised
    p = tmp_path / "big.h5"
    rng = np.random.default_rng(5)
    n = 50_000
    t = np.sort(np.round(rng.uniform(0, 200, n), 3))  # rounding creates exact ties and exact edges
    u = rng.integers(0, 13, n)
    write_session(p, spike_times=t, unit_index=u, unit_ids=np.arange(13), start=0.0, end=200.0)
    windows = [
        (0.0, 1.0),
        (10.0, 10.0),
        (t[100], t[100]),
        (t[5000], t[9000]),
        (199.5, 200.0),
        (-5.0, 0.5),
        (150.0, 400.0),
        (-10.0, -1.0),
        (300.0, 301.0),
        (0.0, 200.0),
    ]
    windows += [tuple(sorted(rng.uniform(-1, 201, 2))) for _ in range(30)]
    windows += [
        (float(a), float(a) + 1.0) for a in t[rng.integers(0, n, 20)]
    ]  # windows starting exactly at a spike
    with open_session(p, full_check=False) as s:
        for a, b in windows:
            tt, uu = s.spikes(a, b)
            m = (t >= a) & (t < b)
            np.testing.assert_array_equal(tt, t[m], err_msg=f"window [{a}, {b})")
            np.testing.assert_array_equal(uu, u[m])
    # same through the chunked index of a temporaldata-written file
    p2 = tmp_path / "td.h5"
    _td_file(p2, timestamps=t, unit_index=u, ids=np.arange(13).astype(str), end=200.0)
    with open_session(p2) as s:
        for a, b in windows[:15]:
            tt, uu = s.spikes(a, b)
            m = (t >= a) & (t < b)
            np.testing.assert_array_equal(tt, t[m])
            np.testing.assert_array_equal(uu, u[m])


def test_empty_window_shapes(tmp_path):
    p = tmp_path / "s.h5"
    _write(p)
    with open_session(p) as s:
        tt, uu = s.spikes(500.0, 501.0)
        assert tt.shape == (0,) and uu.shape == (0,)
        assert tt.dtype == np.float64 and uu.dtype == np.int64


@pytest.mark.parametrize("bad", [(2.0, 1.0), (float("nan"), 1.0), (0.0, float("inf")), ("a", 1.0)])
def test_bad_window_is_input_error(tmp_path, bad):
    p = tmp_path / "s.h5"
    _write(p)
    with open_session(p) as s, pytest.raises(InputError, match="window"):
        s.spikes(*bad)


def test_closed_session_raises_input_error(tmp_path):
    p = tmp_path / "s.h5"
    _write(p)
    s = open_session(p)
    s.close()
    s.close()  # idempotent
    with pytest.raises(InputError, match="closed"):
        s.spikes(0, 1)


def test_session_pickles_by_path(tmp_path):
    import pickle

    p = tmp_path / "s.h5"
    t, _ = _write(p)
    with open_session(p) as s:
        s2 = pickle.loads(pickle.dumps(s))
    assert isinstance(s2, Session)
    np.testing.assert_array_equal(s2.spikes(0, 10)[0], t[t < 10])
    s2.close()


# --------------------------------------------------------------------------- bad files


def _raw_session(path, *, timestamps, unit_index, ids, domain=(0.0, 100.0), drop=()):
    """Write the layout with plain h5py, allowing broken content."""
    with h5py.File(path, "w") as f:
        if "spikes" not in drop:
            g = f.create_group("spikes")
            g.attrs["object"] = "IrregularTimeSeries"
            g.create_dataset("timestamps", data=np.asarray(timestamps, dtype=np.float64))
            g.create_dataset("unit_index", data=np.asarray(unit_index, dtype=np.int64))
        if "units" not in drop:
            g = f.create_group("units")
            g.attrs["object"] = "ArrayDict"
            g.create_dataset("id", data=np.asarray(ids).astype("S"))
        d = f.create_group("domain")
        d.attrs["object"] = "Interval"
        d.create_dataset("start", data=np.array([domain[0]]))
        d.create_dataset("end", data=np.array([domain[1]]))


def _assert_session_error(path, field, match=None, **kw):
    with pytest.raises(SessionFileError) as ei:
        s = open_session(path, **kw)
        s.validate()
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert field in msg, msg
    assert ei.value.field == field
    if match:
        assert match in msg, msg
    assert isinstance(ei.value, InputError)


def test_missing_file(tmp_path):
    _assert_session_error(tmp_path / "nope.h5", "file", "not found")


def test_folder_instead_of_file(tmp_path):
    _assert_session_error(tmp_path, "file", "folder")


def test_not_hdf5(tmp_path):
    p = tmp_path / "random.h5"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_session_error(p, "file", "not an HDF5 file")


def test_truncated_hdf5(tmp_path):
    p = tmp_path / "s.h5"
    _write(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(SessionFileError) as ei:
        open_session(p)
    assert str(p) in str(ei.value)


def test_hdf5_without_spikes(tmp_path):
    p = tmp_path / "nospikes.h5"
    _raw_session(p, timestamps=[1.0], unit_index=[0], ids=["a"], drop=("spikes",))
    _assert_session_error(p, "spikes", "not a session file")


def test_hdf5_without_units(tmp_path):
    p = tmp_path / "nounits.h5"
    _raw_session(p, timestamps=[1.0], unit_index=[0], ids=["a"], drop=("units",))
    _assert_session_error(p, "units", "not a session file")


def test_unsorted_timestamps(tmp_path):
    p = tmp_path / "unsorted.h5"
    _raw_session(p, timestamps=[1.0, 3.0, 2.0, 4.0], unit_index=[0, 0, 1, 1], ids=["a", "b"])
    _assert_session_error(p, "spikes/timestamps", "not sorted")


def test_unsorted_timestamps_found_by_validate_on_large_file(tmp_path):
    # one swapped pair, invisible to the coarse index; full_check=False skips the pass at open
    p = tmp_path / "unsorted_big.h5"
    t = np.arange(20_000) * 0.001
    t[12_345], t[12_346] = t[12_346], t[12_345]
    _raw_session(p, timestamps=t, unit_index=np.zeros(t.size, int), ids=["a"])
    s = open_session(p, full_check=False)
    with pytest.raises(SessionFileError, match="spikes/timestamps"):
        s.validate()
    with pytest.raises(SessionFileError, match="not sorted"):
        s.spikes(12.0, 13.0)  # the slice containing the swap is checked too
    s.close()


def test_nan_timestamps(tmp_path):
    p = tmp_path / "nan.h5"
    _raw_session(p, timestamps=[1.0, np.nan, 4.0], unit_index=[0, 0, 1], ids=["a", "b"])
    _assert_session_error(p, "spikes/timestamps", "finite")


def test_inf_last_timestamp(tmp_path):
    p = tmp_path / "inf.h5"
    _raw_session(p, timestamps=[1.0, 2.0, np.inf], unit_index=[0, 0, 1], ids=["a", "b"])
    _assert_session_error(p, "spikes/timestamps", "finite", full_check=False)


def test_unit_index_out_of_range(tmp_path):
    p = tmp_path / "range.h5"
    _raw_session(p, timestamps=[1.0, 2.0, 3.0], unit_index=[0, 2, 1], ids=["a", "b"])
    _assert_session_error(p, "spikes/unit_index", "outside [0, 2)")


def test_negative_unit_index(tmp_path):
    p = tmp_path / "neg.h5"
    _raw_session(p, timestamps=[1.0, 2.0, 3.0], unit_index=[0, -1, 1], ids=["a", "b"])
    _assert_session_error(p, "spikes/unit_index", "-1")


def test_no_spikes(tmp_path):
    p = tmp_path / "empty.h5"
    _raw_session(p, timestamps=[], unit_index=[], ids=["a", "b"])
    _assert_session_error(p, "spikes/timestamps", "empty recording")


def test_zero_units(tmp_path):
    p = tmp_path / "nounits0.h5"
    _raw_session(p, timestamps=[1.0], unit_index=[0], ids=np.array([], dtype="S1"))
    _assert_session_error(p, "units/id", "zero units")


def test_duplicate_unit_ids(tmp_path):
    p = tmp_path / "dup.h5"
    _raw_session(p, timestamps=[1.0, 2.0], unit_index=[0, 1], ids=["a", "b", "a"])
    _assert_session_error(p, "units/id", "duplicate")


def test_mismatched_lengths(tmp_path):
    p = tmp_path / "len.h5"
    _raw_session(p, timestamps=[1.0, 2.0, 3.0], unit_index=[0, 1], ids=["a", "b"])
    _assert_session_error(p, "spikes/unit_index", "mismatched lengths")


def test_mismatched_unit_column(tmp_path):
    p = tmp_path / "col.h5"
    _raw_session(p, timestamps=[1.0, 2.0], unit_index=[0, 1], ids=["a", "b"])
    with h5py.File(p, "a") as f:
        f["units"].create_dataset("snr", data=np.ones(3))
    _assert_session_error(p, "units/snr", "mismatched lengths")


def test_missing_domain(tmp_path):
    p = tmp_path / "nodomain.h5"
    _raw_session(p, timestamps=[1.0, 2.0], unit_index=[0, 1], ids=["a", "b"])
    with h5py.File(p, "a") as f:
        del f["domain"]
    _assert_session_error(p, "domain", "missing")


def test_unit_index_range_attribute_checked_without_full_pass(tmp_path):
    p = tmp_path / "attr.h5"
    _write(p)
    with h5py.File(p, "a") as f:
        ds = f["spikes/unit_index"]
        ds[3] = 99
        ds.attrs["max_value"] = 99
    _assert_session_error(p, "spikes/unit_index", "outside", full_check=False)


def test_bad_behavior_member(tmp_path):
    p = tmp_path / "beh.h5"
    _write(p, behavior=(np.arange(10.0), np.zeros((10, 2))))
    with h5py.File(p, "a") as f:
        del f["behavior/values"]
        f["behavior"].create_dataset("values", data=np.zeros((9, 2)))
    _assert_session_error(p, "behavior/values", "mismatched lengths")


# --------------------------------------------------------------------------- writer validation and atomicity


def _no_leftovers(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spike_times": [2.0, 1.0], "unit_index": [0, 0]}, "not sorted"),
        ({"spike_times": [1.0, np.nan], "unit_index": [0, 0]}, "finite"),
        ({"spike_times": [1.0, 2.0], "unit_index": [0, 5]}, "outside"),
        ({"spike_times": [], "unit_index": []}, "no spikes"),
        ({"spike_times": [1.0, 2.0], "unit_index": [0]}, "unit indices"),
        ({"unit_ids": ["a", "a"]}, "duplicate"),
        ({"unit_ids": []}, "zero units"),
        ({"unit_ids": ["a", "ü"]}, "ASCII"),
        ({"end": 1.5}, "outside the window"),
        ({"units_extra": {"snr": [1.0]}}, "rows"),
        ({"behavior": (np.array([0.0, 1.0]), np.zeros((3, 2)))}, "one row per time"),
        ({"behavior": (np.array([1.0, 0.0]), np.zeros((2, 2)))}, "not sorted"),
        ({"true_rates": (np.ones((10, 3)), 0.02)}, "true_rates"),
        ({"true_rates": (np.ones((10, 2)), 0.0)}, "bin_size"),
        ({"trials": {"start": [1.0]}}, "trials"),
        ({"provenance": {"x": object()}}, "JSON"),
    ],
)
def test_failing_write_leaves_nothing(tmp_path, kwargs, match):
    p = tmp_path / "out.h5"
    args = {"spike_times": [1.0, 2.0], "unit_index": [0, 1], "unit_ids": ["a", "b"], "start": 0.0, "end": 3.0}
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        write_session(p, **args)
    assert _no_leftovers(tmp_path) == []


def test_error_during_hdf5_write_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "out.h5"

    def boom(self, file, serialize_fn_map=None):
        file.create_group("spikes")
        raise RuntimeError("disk exploded")

    monkeypatch.setattr(td.Data, "to_hdf5", boom)
    with pytest.raises(RuntimeError, match="disk exploded"):
        write_session(p, spike_times=[1.0], unit_index=[0], unit_ids=["a"])
    assert _no_leftovers(tmp_path) == []


def test_failed_overwrite_keeps_old_file(tmp_path):
    p = tmp_path / "out.h5"
    t, u = _write(p)
    with pytest.raises(InputError):
        write_session(p, spike_times=[2.0, 1.0], unit_index=[0, 0], unit_ids=["a"])
    assert _no_leftovers(tmp_path) == ["out.h5"]
    with open_session(p) as s:
        np.testing.assert_array_equal(s.spikes(0, 100)[0], t)


def test_missing_folder_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_session(tmp_path / "nope" / "x.h5", spike_times=[1.0], unit_index=[0], unit_ids=["a"])


# --------------------------------------------------------------------------- real recordings

REAL_SETS = ["ibl_brainbox_fixture", "human_mtl_zheng2022", "rat_ca1_linear_track"]


@pytest.mark.real_data
@pytest.mark.parametrize("name", REAL_SETS)
def test_real_recording_round_trip(tmp_path, name):
    flat = REAL / name / "spikes_flat.npz"
    if not flat.exists():
        pytest.skip(f"real data not available at {flat}")
    z = np.load(flat)
    times, ids = z["spike_times"], z["unit_ids"]
    known, index = np.unique(ids, return_inverse=True)
    p = tmp_path / f"{name}.h5"
    write_session(p, spike_times=times, unit_index=index, unit_ids=known, provenance={"source": name})
    rng = np.random.default_rng(0)
    with open_session(p) as s:
        assert s.n_spikes == times.size and s.unit_ids.tolist() == [str(k) for k in known]
        for a in rng.uniform(s.start, s.end - 1.0, 10):
            tt, uu = s.spikes(a, a + 1.0)
            m = (times >= a) & (times < a + 1.0)
            np.testing.assert_array_equal(tt, times[m])
            np.testing.assert_array_equal(s.unit_ids[uu], known[index[m]].astype(str))


@pytest.mark.real_data
def test_nwb_file_is_not_a_session_file():
    nwb = REAL / "human_mtl_zheng2022" / "sub-4_ses-4_ecephys+image.nwb"
    if not nwb.exists():
        pytest.skip(f"real data not available at {nwb}")
    with pytest.raises(SessionFileError) as ei:
        open_session(nwb)
    assert str(nwb) in str(ei.value) and "not a session file" in str(ei.value)


def test_links_to_other_files_are_not_followed(tmp_path):
    """An external link (or an external / virtual dataset) is refused at open, before anything is read."""
    good = tmp_path / "good.h5"
    _write(good)
    # spikes/timestamps replaced by an external link into another session file
    linked = tmp_path / "linked.h5"
    _write(linked)
    with h5py.File(linked, "a") as f:
        del f["spikes/timestamps"]
        f["spikes/timestamps"] = h5py.ExternalLink(str(good), "/spikes/timestamps")
    _assert_session_error(linked, "spikes/timestamps", "external link")
    # a whole group linked out
    group = tmp_path / "group.h5"
    _write(group)
    with h5py.File(group, "a") as f:
        del f["spikes"]
        f["spikes"] = h5py.ExternalLink(str(good), "/spikes")
    _assert_session_error(group, "spikes", "external link")
    # a dataset whose raw bytes live in another file
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.arange(3, dtype="<f8").tobytes())
    ext = tmp_path / "external.h5"
    _write(ext)
    with h5py.File(ext, "a") as f:
        f.create_dataset("extra", shape=(3,), dtype="<f8", external=[(str(raw), 0, 24)])
    _assert_session_error(ext, "extra", "other files")
    # a virtual dataset mapping another file's spikes
    virt = tmp_path / "virtual.h5"
    _write(virt)
    with h5py.File(good, "r") as g:
        n = g["spikes/timestamps"].shape[0]
    layout = h5py.VirtualLayout(shape=(n,), dtype="<f8")
    layout[:] = h5py.VirtualSource(str(good), "spikes/timestamps", shape=(n,))
    with h5py.File(virt, "a") as f:
        del f["spikes/timestamps"]
        f.create_virtual_dataset("spikes/timestamps", layout)
    _assert_session_error(virt, "spikes/timestamps", "other files")
    assert open_session(good).n_spikes == 5000  # the file itself is fine
