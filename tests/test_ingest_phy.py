"""``nh-serve ingest phy``: Kilosort / phy output folders built in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest

from nh_serve.data.session import open_session
from nh_serve.errors import InputError
from nh_serve.ingest.cli import run
from nh_serve.ingest.phy import read_phy

FS = 30000.0


def make_phy(folder, *, params=True, labels=True):
    """Clusters 1 (good), 4 (mua, by phy), 5 (noise), 9 (good by KSLabel only), 12 (no label).

    Spikes (samples): cluster 1 at 0, 300, 600, ...; the rest sparser.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    samples = []
    clusters = []
    for cid, n in ((1, 200), (4, 120), (5, 90), (9, 60), (12, 30)):
        samples.append(rng.choice(np.arange(0, int(10 * FS)), size=n, replace=False))
        clusters.append(np.full(n, cid))
    samples = np.concatenate(samples).astype(np.uint64)
    clusters = np.concatenate(clusters).astype(np.int32)
    order = np.argsort(samples)
    np.save(folder / "spike_times.npy", samples[order].reshape(-1, 1))  # Kilosort writes (S, 1)
    np.save(folder / "spike_clusters.npy", clusters[order])
    if params:
        (folder / "params.py").write_text(
            "dat_path = 'raw.bin'\nn_channels_dat = 4\ndtype = 'int16'\noffset = 0\n"
            f"sample_rate = {FS}\nhp_filtered = False\n"
        )
    if labels:
        # Kilosort's automatic labels say 4 is good; phy's curation overrides that with mua
        (folder / "cluster_KSLabel.tsv").write_text(
            "cluster_id\tKSLabel\n1\tgood\n4\tgood\n5\tmua\n9\tgood\n"
        )
        (folder / "cluster_group.tsv").write_text("cluster_id\tgroup\n1\tgood\n4\tmua\n5\tnoise\n")
        (folder / "cluster_ContamPct.tsv").write_text("cluster_id\tContamPct\n1\t2.5\n4\t40.0\n5\t90.0\n9\t5.0\n12\t1.0\n")
    return samples[order], clusters[order]


def test_read_phy_labels_times_and_metrics(tmp_path):
    samples, clusters = make_phy(tmp_path / "ks")
    rec = read_phy(tmp_path / "ks")
    assert rec.unit_ids.tolist() == ["1", "4", "5", "9", "12"]
    assert rec.labels.tolist() == ["good", "mua", "noise", "good", "unsorted"]
    np.testing.assert_array_equal(rec.times, samples.astype(np.float64) / FS)
    assert np.bincount(rec.unit_index).tolist() == [200, 120, 90, 60, 30]
    assert rec.units_extra["ContamPct"].tolist() == [2.5, 40.0, 90.0, 5.0, 1.0]
    assert rec.provenance["sample_rate_hz"] == FS
    assert rec.start == 0.0 and rec.end is None  # raw.bin absent: the end comes from the spikes


def test_cli_keeps_good_by_default_mua_on_request_all_units(tmp_path):
    samples, clusters = make_phy(tmp_path / "ks")
    # a raw file of 10.5 s x 4 channels of int16 gives the recording's length
    (tmp_path / "ks" / "raw.bin").write_bytes(b"\0" * int(10.5 * FS) * 4 * 2)
    out = tmp_path / "good.h5"
    assert run(["ingest", "phy", str(tmp_path / "ks"), "--out", str(out)]) == 0
    with open_session(out) as s:
        assert s.unit_ids.tolist() == ["1", "9"]
        assert s.n_spikes == 260
        assert s.start == 0.0 and s.end == pytest.approx(10.5)
        t, u = s.spikes(0, 11)
        keep = np.isin(clusters, [1, 9])
        np.testing.assert_array_equal(t, samples[keep] / FS)
        assert s.units_table["quality"].tolist() == ["good", "good"]
        assert s.units_table["ContamPct"].tolist() == [2.5, 5.0]
        prov = s.provenance
    assert prov["source"]["format"] == "phy"
    assert prov["label_files"] == ["cluster_group.tsv", "cluster_KSLabel.tsv"]
    assert prov["filters"]["n_units_source"] == 5 and prov["filters"]["n_units_dropped_by_label"] == 3

    out2 = tmp_path / "mua.h5"
    run(["ingest", "phy", str(tmp_path / "ks"), "--include-mua", "--out", str(out2)])
    with open_session(out2) as s:
        assert s.unit_ids.tolist() == ["1", "4", "9"]

    # rates over 10.5 s: 19.0, 11.4, 8.6, 5.7, 2.9 Hz; --min-rate 6 drops 9 (good, 5.7 Hz)
    out3 = tmp_path / "rate.h5"
    run(["ingest", "phy", str(tmp_path / "ks"), "--min-rate", "6", "--out", str(out3)])
    with open_session(out3) as s:
        assert s.unit_ids.tolist() == ["1"]

    out4 = tmp_path / "all.h5"
    run(["ingest", "phy", str(tmp_path / "ks"), "--all-units", "--min-rate", "100", "--out", str(out4)])
    with open_session(out4) as s:
        assert s.unit_ids.tolist() == ["1", "4", "5", "9", "12"] and s.n_spikes == 500


def test_unlabelled_folder_keeps_all_and_templates_fallback(tmp_path):
    samples, clusters = make_phy(tmp_path / "ks", labels=False)
    (tmp_path / "ks" / "spike_clusters.npy").rename(tmp_path / "ks" / "spike_templates.npy")
    rec = read_phy(tmp_path / "ks")
    assert rec.labels is None
    assert rec.provenance["units_from"] == "spike_templates.npy"
    out = tmp_path / "s.h5"
    run(["ingest", "phy", str(tmp_path / "ks"), "--out", str(out)])
    with open_session(out) as s:
        assert s.n_units == 5


def test_sample_rate_missing_or_overridden(tmp_path):
    make_phy(tmp_path / "ks", params=False)
    with pytest.raises(InputError, match=r"cannot find the sampling rate: params.py is missing; pass --sample-rate"):
        read_phy(tmp_path / "ks")
    (tmp_path / "ks" / "params.py").write_text("dtype = 'int16'\n")
    with pytest.raises(InputError, match=r"params.py: cannot find the sampling rate"):
        run(["ingest", "phy", str(tmp_path / "ks"), "--out", str(tmp_path / "s.h5")])
    assert not (tmp_path / "s.h5").exists()
    rec = read_phy(tmp_path / "ks", sample_rate=20000.0)
    samples = np.load(tmp_path / "ks" / "spike_times.npy").reshape(-1)
    np.testing.assert_array_equal(rec.times, samples / 20000.0)


def test_bad_folders(tmp_path):
    with pytest.raises(InputError, match="phy folder .*nope: not found"):
        read_phy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no spike_times.npy"):
        read_phy(tmp_path / "empty")
    make_phy(tmp_path / "ks")
    np.save(tmp_path / "ks" / "spike_clusters.npy", np.zeros(7, dtype=np.int32))
    out = tmp_path / "s.h5"
    with pytest.raises(InputError, match=r"spike_times.npy has 500 spikes but spike_clusters.npy has 7"):
        run(["ingest", "phy", str(tmp_path / "ks"), "--out", str(out)])
    assert list(tmp_path.glob("*.h5")) == [] and list(tmp_path.glob(".*tmp")) == []


def test_existing_output_needs_overwrite(tmp_path):
    make_phy(tmp_path / "ks")
    out = tmp_path / "s.h5"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="file exists; pass --overwrite"):
        run(["ingest", "phy", str(tmp_path / "ks"), "--out", str(out)])
    assert out.read_bytes() == b"keep me"
    run(["ingest", "phy", str(tmp_path / "ks"), "--out", str(out), "--overwrite"])
    with open_session(out) as s:
        assert s.n_units == 2
