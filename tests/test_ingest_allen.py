"""``nh-serve ingest allen``: a small Allen Neuropixels NWB file read by allensdk in ``.venv-allen``.

The file is written inside the Allen environment by ``tests/allen_env/make_allen_nwb.py``
with allensdk's own writer classes, so it has the layout ``EcephysSession.from_nwb_path``
reads. These tests skip only when ``.venv-allen`` does not exist
(``bash scripts/setup_allen_env.sh`` creates it).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from real_data import REAL as REAL_DATA

from nh_serve.data.session import open_session
from nh_serve.errors import InputError
from nh_serve.ingest.allen import allen_python, read_allen
from nh_serve.ingest.cli import run

HERE = Path(__file__).resolve().parent
REAL_NWB = sorted((REAL_DATA / "human_mtl_zheng2022").glob("*.nwb"))


def _env_python() -> Path:
    try:
        return allen_python()
    except InputError as exc:
        pytest.skip(f"the Allen SDK environment is not set up: {exc}")


@pytest.fixture(scope="module")
def allen_nwb(tmp_path_factory):
    py = _env_python()
    folder = tmp_path_factory.mktemp("allen")
    nwb, expected = folder / "session_715093703.nwb", folder / "expected.json"
    proc = subprocess.run(
        [str(py), str(HERE / "allen_env" / "make_allen_nwb.py"), str(nwb), str(expected)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return nwb, json.loads(expected.read_text())


def test_default_filters_running_speed_and_presentations(allen_nwb, tmp_path):
    nwb, exp = allen_nwb
    out = tmp_path / "s.h5"
    assert run(["ingest", "allen", "--nwb", str(nwb), "--out", str(out)]) == 0
    counts = exp["spike_counts"]
    with open_session(out) as s:
        # allensdk drops the noise unit and the one outside the brain; --min-rate 0.1 Hz
        # then drops 951000005 (1 spike in 20 s)
        kept = [u for u in exp["allen_unit_ids"] if counts[u] / exp["duration"] >= 0.1]
        assert sorted(s.unit_ids.tolist()) == sorted(kept) and len(kept) == 3
        t, u = s.spikes(s.start, s.end)
        assert {uid: int(n) for uid, n in zip(s.unit_ids, np.bincount(u, minlength=s.n_units))} == {
            k: counts[k] for k in kept
        }
        assert np.all(np.diff(t) >= 0)
        assert s.start == 0.0 and s.end == pytest.approx(exp["duration"])
        bt, bv = s.behavior(s.start, s.end)
        np.testing.assert_allclose(bt, 0.5 * (np.array(exp["running_start"]) + np.array(exp["running_end"])))
        np.testing.assert_allclose(bv[:, 0], exp["running_velocity"])
        np.testing.assert_allclose(s.trials["start"], exp["presentation_starts"])
        np.testing.assert_allclose(s.trials["end"], exp["presentation_stops"])
        names = s.trials["stimulus_name"].tolist()
        assert names == ["flashes"] * 4 + ["natural_scenes"] * 6
        frames = s.trials["frame"]
        assert np.all(np.isnan(frames[:4])) and frames[4:].tolist() == exp["natural_scene_frames"]
        assert s.units_table["structure_acronym"].tolist() == [
            "VISp" if uid in ("951000001", "951000006") else "CA1" for uid in s.unit_ids
        ]
        prov = s.provenance
    assert prov["source"]["format"] == "allen"
    assert prov["ids"]["ecephys_session_id"] == exp["session_id"]
    assert prov["software"]["allensdk"] == "2.16.2"
    assert prov["n_units_in_file"] == 6
    assert prov["allen_unit_filters"]["allensdk_defaults"] is True


def test_all_units_keeps_every_unit(allen_nwb):
    nwb, exp = allen_nwb
    rec = read_allen(nwb, all_units=True)
    assert sorted(rec.unit_ids.tolist()) == sorted(exp["spike_counts"])
    assert dict(zip(rec.unit_ids.tolist(), np.bincount(rec.unit_index).tolist())) == exp["spike_counts"]


@pytest.mark.real_data
def test_not_an_allen_file(tmp_path):
    _env_python()
    if not REAL_NWB:
        pytest.skip("shared real data not present")
    out = tmp_path / "s.h5"
    with pytest.raises(InputError, match="allensdk cannot read it as an Allen Brain Observatory.*ingest nwb"):
        run(["ingest", "allen", "--nwb", str(REAL_NWB[0]), "--out", str(out)])
    assert not out.exists()


def test_missing_environment_says_how_to_create_it(tmp_path, monkeypatch):
    nwb = tmp_path / "x.nwb"
    nwb.write_bytes(b"")
    monkeypatch.setenv("NH_SERVE_ALLEN_PYTHON", str(tmp_path / "no-env" / "bin" / "python"))
    with pytest.raises(InputError, match=r"Allen SDK environment is missing .*bash scripts/setup_allen_env.sh"):
        run(["ingest", "allen", "--nwb", str(nwb), "--out", str(tmp_path / "s.h5")])
    with pytest.raises(InputError, match="Allen session NWB file .*nope.nwb: not found"):
        run(["ingest", "allen", "--nwb", str(tmp_path / "nope.nwb"), "--out", str(tmp_path / "s.h5")])
    assert not (tmp_path / "s.h5").exists()
