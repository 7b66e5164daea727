"""``nh-serve score`` / ``eval`` given lab files: .npz and NWB ingested on the fly, phy folders refused
with the ingest command, and the unit-filter line of ``nh-serve ingest``."""

from __future__ import annotations

import json
import os
import shlex
from datetime import datetime, timezone

import numpy as np
import pytest

from nh_serve.cli import main
from nh_serve.data.session import open_session
from nh_serve.data.synth import make_session
from nh_serve.ingest.common import describe_filter
from nh_serve.ingest.on_the_fly import resolve_recordings, sessions_cache_dir

N_UNITS = 12
QUIET = ("q1", "q2")  # one spike each in 150 s: below the default 0.1 Hz


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NH_SERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sessions"


def _spikes(seed: int = 5, duration: float = 150.0):
    d = make_session(seed=seed, n_units=N_UNITS, duration=duration)
    t = np.asarray(d["spike_times"])
    u = np.asarray(d["unit_ids"]).astype(str)[np.asarray(d["unit_index"])]
    t = np.concatenate([t, [12.0, 90.0]])
    u = np.concatenate([u, list(QUIET)])
    order = np.argsort(t, kind="stable")
    return t[order], u[order]


def _npz(path, **kw):
    t, u = _spikes(**kw)
    np.savez(path, spike_times=t, unit_ids=u)
    return path


def _nwb(path):
    """An NWB file with a units table labelled by quality: one unit is noise, two fire too rarely."""
    from pynwb import NWBHDF5IO, NWBFile

    t, u = _spikes(seed=6)
    nwb = NWBFile(
        session_description="test",
        identifier="rec",
        session_start_time=datetime(2024, 1, 2, tzinfo=timezone.utc),
    )
    nwb.add_unit_column(name="quality", description="curation label")
    for i, uid in enumerate(sorted(set(u.tolist()))):
        nwb.add_unit(id=i, spike_times=t[u == uid], quality="noise" if uid == "synth_u000" else "good")
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


def test_describe_filter():
    base = {"min_rate_hz": 0.1, "keep_labels": ["good"], "all_units": False, "labels_used": True}
    s = {
        **base,
        "n_units_source": 20,
        "n_units_kept": 17,
        "n_units_dropped_by_rate": 2,
        "n_units_dropped_by_label": 1,
    }
    assert describe_filter(s) == (
        "units: kept 17 of 20; dropped 2 firing below 0.1 Hz over the recording (--min-rate), 1 not labelled good"
    )
    s = {
        **base,
        "n_units_source": 5,
        "n_units_kept": 5,
        "n_units_dropped_by_rate": 0,
        "n_units_dropped_by_label": 0,
    }
    assert (
        describe_filter(s)
        == "units: kept all 5 (every unit fires at least 0.1 Hz over the recording and is labelled good)"
    )
    assert describe_filter({**s, "all_units": True}) == "units: kept all 5 (--all-units: no filter)"


def test_ingest_prints_kept_and_dropped(tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert main(["ingest", "npz", str(_npz(tmp_path / "x.npz")), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"wrote {out}: {N_UNITS} units (of {N_UNITS + 2})")
    assert (
        printed[1]
        == f"units: kept {N_UNITS} of {N_UNITS + 2}; dropped 2 firing below 0.1 Hz over the recording (--min-rate)"
    )


def test_score_npz_ingests_on_the_fly(tmp_path, cache, capsys, make_tiny_checkpoint, one_thread):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    npz = _npz(tmp_path / "x.npz")
    argv = [
        "score",
        str(npz),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(tmp_path / "out"),
        "--backend",
        "torch",
    ]
    argv += ["--no-plots", "--quiet", "--max-windows", "20"]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(
        "nh-serve score: x.npz: ingested on the fly with nh-serve ingest npz's default unit filter"
    )
    assert "(units firing at least 0.1 Hz over the recording)" in err[0]
    assert err[1] == (
        f"nh-serve score: x.npz: units: kept {N_UNITS} of {N_UNITS + 2}; "
        "dropped 2 firing below 0.1 Hz over the recording (--min-rate)"
    )
    assert f"nh-serve ingest npz {shlex.quote(str(npz))} --out x.h5" in err[2]
    doc = json.loads((tmp_path / "out" / "scores.json").read_text())
    (rec,) = doc["recordings"]
    assert rec["name"] == "x" and rec["recording"]["n_units"] == N_UNITS
    assert not set(QUIET) & set(rec["units"]["id"])
    cached = sorted(cache.rglob("*.h5"))
    assert [str(p) for p in cached] == [rec["path"]]
    with open_session(cached[0]) as s:
        assert s.provenance["source"]["format"] == "npz"

    # Again: the cached session file is used and the recording is not scored again.
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "ingested on the fly earlier" in cap.err and "1 already scored" in cap.out

    # The source changes: ingested again into the same place, so the recording is scored again.
    _npz(npz, seed=9)
    os.utime(npz, ns=(0, 10**18))
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "x.npz: ingested on the fly with" in cap.err and "1 to score" in cap.out
    assert sorted(cache.rglob("*.h5")) == cached


def test_eval_npz_and_nwb(tmp_path, cache, capsys, make_tiny_checkpoint, one_thread):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    npz, nwb = _npz(tmp_path / "x.npz"), _nwb(tmp_path / "y.nwb")
    out = tmp_path / "eval.json"
    argv = ["eval", str(npz), str(nwb), "--checkpoint", str(ckpt), "--no-progress", "--max-windows", "10"]
    assert main([*argv, "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "nh-serve eval: y.nwb: ingested on the fly with nh-serve ingest nwb's default unit filter " in err
    assert "(units labelled good that fire at least 0.1 Hz over the recording)" in err
    assert (
        f"nh-serve eval: y.nwb: units: kept {N_UNITS - 1} of {N_UNITS + 2}; dropped 2 firing below 0.1 Hz "
        "over the recording (--min-rate), 1 not labelled good" in err
    )
    res = json.loads(out.read_text())
    assert [(r["recording"], r["units"]) for r in res["recordings"]] == [
        (f"{tmp_path.name}/x.h5", N_UNITS),
        (f"{tmp_path.name}/y.h5", N_UNITS - 1),
    ]
    assert str(npz) in res["command"]  # the command as given, with the source files


def test_phy_folder_gives_the_ingest_command(tmp_path, cache, capsys):
    ks = tmp_path / "kilosort out"
    ks.mkdir()
    np.save(ks / "spike_times.npy", np.arange(100) * 300)
    np.save(ks / "spike_clusters.npy", np.zeros(100, dtype=np.int64))
    (ks / "params.py").write_text("sample_rate = 30000.0\n")
    for cmd in (["score", str(ks), "--out", str(tmp_path / "o")], ["eval", str(ks)]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        assert err.startswith(f"nh-serve {cmd[0]}: error: {ks}: is a Kilosort/phy folder, not a session file")
        assert err.endswith(
            f"nh-serve ingest phy {shlex.quote(str(ks))} --out 'kilosort out.h5', then nh-serve {cmd[0]} 'kilosort out.h5'"
        )
    assert not cache.exists() and not (tmp_path / "o").exists()


def test_other_inputs_pass_through(tmp_path, cache):
    paths = [str(tmp_path / "a.h5"), str(tmp_path / "missing.npz"), str(tmp_path)]
    assert resolve_recordings(paths, command="nh-serve score") == paths
    assert sessions_cache_dir() == cache


def test_bad_npz_says_what_to_fix(tmp_path, cache, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, times=np.arange(3.0))
    assert main(["score", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing array(s) spike_times, unit_ids" in err
    quiet = tmp_path / "quiet.npz"
    np.savez(quiet, spike_times=np.array([1.0, 500.0]), unit_ids=np.array([1, 2]))
    assert main(["eval", str(quiet)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no units left after filtering 2 unit(s)" in err
    assert err.endswith(f"(options of: nh-serve ingest npz {shlex.quote(str(quiet))} --out quiet.h5)")
