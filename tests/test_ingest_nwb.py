"""``nh-serve ingest nwb``: the real human MTL file and small files written with pynwb."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest
from real_data import REAL as REAL_DATA

from nh_serve.data.session import open_session
from nh_serve.errors import InputError
from nh_serve.ingest.cli import run
from nh_serve.ingest.nwb import read_nwb

REAL = REAL_DATA / "human_mtl_zheng2022"


def _real_nwb() -> Path:
    files = sorted(REAL.glob("*.nwb"))
    if not files:
        pytest.skip(f"shared real data not present ({REAL})")
    return files[0]


@pytest.mark.real_data
def test_real_human_file_matches_flat_spikes(tmp_path):
    nwb = _real_nwb()
    flat = np.load(REAL / "spikes_flat.npz")
    out = tmp_path / "human.h5"
    run(["ingest", "nwb", str(nwb), "--all-units", "--trials-table", "recognition_table", "--out", str(out)])
    with open_session(out) as s:
        assert s.n_units == 35 == np.unique(flat["unit_ids"]).size
        assert s.n_spikes == 214278 == flat["spike_times"].size
        assert s.unit_ids.tolist() == [str(i) for i in range(35)]  # the units table's ids
        t, u = s.spikes(s.start, s.end)
        np.testing.assert_array_equal(t, flat["spike_times"])
        np.testing.assert_array_equal(np.bincount(u, minlength=35), np.bincount(flat["unit_ids"], minlength=35))
        assert len(s.trials["start"]) == 180
        assert s.trials["frameName"][0] == "SB_5_frameB_foil.png"
        prov = s.provenance
    assert prov["source"]["format"] == "nwb" and prov["source"]["nwb_version"] == "2.4.0"
    assert prov["ids"]["identifier"] == "TWH103_CBID4"
    assert prov["trials_from"] == "intervals/recognition_table"


@pytest.mark.real_data
def test_real_file_has_no_trials_table_by_default():
    rec = read_nwb(_real_nwb())
    assert rec.trials is None
    with pytest.raises(InputError, match=r"no interval table /intervals/nope \(tables here: encoding_table"):
        read_nwb(_real_nwb(), trials_table="nope")


def _write_nwb(path, *, units=True):
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries

    nwb = NWBFile(
        session_description="test",
        identifier="rec-1",
        session_start_time=datetime(2024, 1, 2, tzinfo=timezone.utc),
        session_id="s1",
    )
    if units:
        nwb.add_unit_column(name="quality", description="curation label")
        nwb.add_unit_column(name="depth", description="um")
        for uid, times, q, depth in (
            (11, [0.5, 1.5, 2.5, 3.5], "good", 100.0),
            (12, [1.0], "noise", 200.0),
            (13, [0.25, 3.0], "good", 300.0),
        ):
            nwb.add_unit(id=uid, spike_times=times, quality=q, depth=depth)
    nwb.add_trial_column(name="contrast", description="stimulus contrast")
    nwb.add_trial(start_time=0.2, stop_time=1.2, contrast=0.5)
    nwb.add_trial(start_time=2.0, stop_time=3.9, contrast=1.0)
    beh = nwb.create_processing_module(name="behavior", description="behaviour")
    beh.add(TimeSeries(name="speed", data=np.array([0.0, 1.0, 2.0, 3.0]), unit="m/s", starting_time=0.0, rate=1.0))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


def test_small_nwb_units_labels_trials_behaviour(tmp_path):
    path = tmp_path / "rec.nwb"
    _write_nwb(path)
    out = tmp_path / "s.h5"
    run(["ingest", "nwb", str(path), "--behavior-series", "processing/behavior/speed", "--out", str(out)])
    with open_session(out) as s:
        assert s.unit_ids.tolist() == ["11", "13"]  # 12 is labelled noise
        t, u = s.spikes(0, 10)
        assert t.tolist() == [0.25, 0.5, 1.5, 2.5, 3.0, 3.5] and u.tolist() == [1, 0, 0, 0, 1, 0]
        assert s.units_table["depth"].tolist() == [100.0, 300.0]
        assert s.units_table["quality"].tolist() == ["good", "good"]
        assert s.trials["start"].tolist() == [0.2, 2.0] and s.trials["contrast"].tolist() == [0.5, 1.0]
        bt, bv = s.behavior(0, 10)
        assert bt.tolist() == [0.0, 1.0, 2.0, 3.0] and bv[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert s.start == 0.0 and s.end > 3.9  # the extent covers spikes, trials and behaviour
        assert s.provenance["ids"]["session_id"] == "s1"
    out2 = tmp_path / "all.h5"
    run(["ingest", "nwb", str(path), "--all-units", "--out", str(out2)])
    with open_session(out2) as s:
        assert s.unit_ids.tolist() == ["11", "12", "13"] and s.behavior_dim == 0


def test_bad_nwb_files(tmp_path):
    no_units = tmp_path / "no_units.nwb"
    _write_nwb(no_units, units=False)
    out = tmp_path / "s.h5"
    with pytest.raises(InputError, match=r"no_units.nwb: no units table \(/units\)"):
        run(["ingest", "nwb", str(no_units), "--out", str(out)])
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(InputError, match="not an NWB file"):
        read_nwb(tmp_path / "plain.h5")
    (tmp_path / "text.nwb").write_text("hello")
    with pytest.raises(InputError, match="not an HDF5 file"):
        read_nwb(tmp_path / "text.nwb")
    with pytest.raises(InputError, match="NWB file .*missing.nwb: not found"):
        read_nwb(tmp_path / "missing.nwb")
    path = tmp_path / "rec.nwb"
    _write_nwb(path)
    with pytest.raises(InputError, match="no TimeSeries with a `data` dataset at /processing/nope"):
        read_nwb(path, behavior_series="processing/nope")
    assert not out.exists() and list(tmp_path.glob("*.h5")) == [tmp_path / "plain.h5"]
