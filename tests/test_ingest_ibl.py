"""``nh-serve ingest ibl``: a small ALF cache read through ONE in local mode (no network)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nh_serve.data.session import open_session
from nh_serve.errors import InputError
from nh_serve.ingest.cli import run
from nh_serve.ingest.ibl import make_one, read_ibl

SESSION = "mylab/Subjects/KS001/2024-03-05/001"
BARE = "mylab/Subjects/KS002/2024-03-06/002"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """ONE keeps its settings under ~/.one: point HOME at a temporary folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


def make_cache(root, *, table_trials=True, hash_files=False):
    """Two sessions: SESSION with a probe, wheel and trials; BARE with trials only (no spikes).

    probe00 clusters: 0 good (label 1), 1 not good (0.67), 2 good, 3 good but silent-ish.
    """
    rng = np.random.default_rng(3)
    s = root / SESSION
    probe = s / "alf" / "probe00"
    probe.mkdir(parents=True)
    counts = {0: 300, 1: 200, 2: 100, 3: 2}
    times = np.concatenate([rng.uniform(0.0, 50.0, n) for n in counts.values()])
    clusters = np.concatenate([np.full(n, c) for c, n in counts.items()])
    order = np.argsort(times)
    np.save(probe / "spikes.times.npy", times[order])
    np.save(probe / "spikes.clusters.npy", clusters[order].astype(np.int64))
    pd.DataFrame(
        {
            "cluster_id": [0, 1, 2, 3],
            "label": [1.0, 2 / 3, 1.0, 1.0],
            "amp_median": [1e-4, 2e-4, 3e-4, 4e-4],
            "firing_rate": [6.0, 4.0, 2.0, 0.04],
        }
    ).to_parquet(probe / "clusters.metrics.pqt")
    # wheel: irregular timestamps, position = 0.5 rad/s * t
    wt = np.sort(np.concatenate([[0.0, 50.0], rng.uniform(0, 50, 200)]))
    np.save(s / "alf" / "_ibl_wheel.timestamps.npy", wt)
    np.save(s / "alf" / "_ibl_wheel.position.npy", 0.5 * wt)
    trials = {"intervals_0": [1.0, 10.0, 20.0], "intervals_1": [8.0, 18.0, 29.0], "choice": [1, -1, 0],
              "contrastLeft": [0.25, np.nan, 1.0]}
    if table_trials:
        pd.DataFrame(trials).to_parquet(s / "alf" / "_ibl_trials.table.pqt")
    else:
        np.save(s / "alf" / "_ibl_trials.intervals.npy", np.stack([trials["intervals_0"], trials["intervals_1"]], 1))
        np.save(s / "alf" / "_ibl_trials.choice.npy", np.array(trials["choice"]))
        np.save(s / "alf" / "_ibl_trials.contrastLeft.npy", np.array(trials["contrastLeft"]))
    b = root / BARE / "alf"
    b.mkdir(parents=True)
    pd.DataFrame(trials).to_parquet(b / "_ibl_trials.table.pqt")
    from one.alf.cache import make_parquet_db

    # hash_files=True is what IBL's caches hold (ONE then checks each file's md5 on
    # load); it costs ~0.2 s per file here, so only the main test uses it
    make_parquet_db(root, hash_files=hash_files)
    return times[order], clusters[order]


def test_local_cache_good_units_wheel_trials(tmp_path):
    times, clusters = make_cache(tmp_path / "cache", hash_files=True)
    out = tmp_path / "s.h5"
    assert run(["ingest", "ibl", "--cache-dir", str(tmp_path / "cache"), "--eid", SESSION, "--out", str(out)]) == 0
    with open_session(out) as s:
        # cluster 1 fails IBL's label; cluster 3 is good but fires 2 / 50 s = 0.04 Hz < 0.1 Hz
        assert s.unit_ids.tolist() == ["0", "2"]
        t, u = s.spikes(0, 51)
        keep = np.isin(clusters, [0, 2])
        np.testing.assert_array_equal(t, times[keep])
        np.testing.assert_array_equal(s.unit_ids[u], clusters[keep].astype(str))
        assert s.start == 0.0
        assert s.units_table["amp_median"].tolist() == [1e-4, 3e-4]
        assert s.units_table["label"].tolist() == [1.0, 1.0]
        assert s.units_table["quality"].tolist() == ["good", "good"]
        bt, bv = s.behavior(0, 51)
        assert bt[0] == 0.0 and bt[-1] == pytest.approx(50.0) and bt.size == 5001  # 100 Hz grid
        np.testing.assert_allclose(bv[:, 0], 0.5, rtol=1e-5)  # d(0.5 t)/dt
        assert s.trials["start"].tolist() == [1.0, 10.0, 20.0] and s.trials["end"].tolist() == [8.0, 18.0, 29.0]
        assert s.trials["choice"].tolist() == [1, -1, 0]
        np.testing.assert_array_equal(s.trials["contrastLeft"], [0.25, np.nan, 1.0])
        prov = s.provenance
    assert prov["source"]["format"] == "ibl"
    assert prov["ids"]["probe"] == "probe00" and prov["ids"]["collection"] == "alf/probe00"
    assert len(prov["ids"]["eid"]) == 36  # a UUID
    assert prov["software"]["ONE-api"]
    assert prov["behavior_columns"] == ["wheel_velocity_rad_per_s"]
    assert prov["filters"]["n_units_dropped_by_label"] == 1 and prov["filters"]["n_units_dropped_by_rate"] == 1


def test_eid_as_uuid_all_units_and_attribute_trials(tmp_path):
    make_cache(tmp_path / "cache", table_trials=False)
    one = make_one(cache_dir=tmp_path / "cache")
    eid = str(one.path2eid(tmp_path / "cache" / SESSION))
    rec = read_ibl(one=one, eid=eid)
    assert rec.unit_ids.tolist() == ["0", "1", "2", "3"]
    assert rec.labels.tolist() == ["good", "not_good", "good", "good"]
    assert rec.trials["choice"].tolist() == [1, -1, 0]
    out = tmp_path / "all.h5"
    run(["ingest", "ibl", "--cache-dir", str(tmp_path / "cache"), "--eid", eid, "--all-units", "--out", str(out)])
    with open_session(out) as s:
        assert s.n_units == 4 and s.n_spikes == 602


def test_bad_sessions_and_caches(tmp_path):
    make_cache(tmp_path / "cache")
    out = tmp_path / "s.h5"
    base = ["ingest", "ibl", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    # the ALF session without spikes
    with pytest.raises(InputError, match=r"no spikes \(spikes.times \+ spikes.clusters\) for probe probe00"):
        run(base + ["--eid", BARE])
    with pytest.raises(InputError, match="no spikes .* for probe probe01.*collections with spikes: alf/probe00"):
        run(base + ["--eid", SESSION, "--probe", "probe01"])
    with pytest.raises(InputError, match="--eid 00000000-0000-0000-0000-000000000000: no such session"):
        run(base + ["--eid", "00000000-0000-0000-0000-000000000000"])
    with pytest.raises(InputError, match="pass --eid: ONE finds 2 sessions"):
        run(base)
    with pytest.raises(InputError, match="ONE cache folder .*nowhere: not found"):
        run(["ingest", "ibl", "--cache-dir", str(tmp_path / "nowhere"), "--out", str(out)])
    with pytest.raises(InputError, match="--cache-dir .* or --base-url"):
        run(["ingest", "ibl", "--out", str(out)])
    assert not out.exists()


def test_build_cache_from_plain_alf_folder(tmp_path):
    root = tmp_path / "alf_root"
    make_cache(root)
    for name in ("sessions.pqt", "datasets.pqt"):
        (root / name).unlink()
    out = tmp_path / "s.h5"
    with pytest.raises(InputError, match="no cache tables .*pass --build-cache"):
        run(["ingest", "ibl", "--cache-dir", str(root), "--eid", SESSION, "--out", str(out)])
    run(["ingest", "ibl", "--cache-dir", str(root), "--build-cache", "--eid", SESSION, "--out", str(out)])
    with open_session(out) as s:
        assert s.unit_ids.tolist() == ["0", "2"]
