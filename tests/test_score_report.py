"""The plots of nh-serve score's report: the heatmap's time slice and shared colour scale, the per-unit
plot's point sizes, and the captions report.html gives them."""

from __future__ import annotations

import io

import numpy as np
import pytest

from nh_serve.data.session import write_session
from nh_serve.data.synth import make_session
from nh_serve.evaluation.score import ScoreSettings, run_score
from nh_serve.evaluation.score.report import (
    HEATMAP_MAX_HZ,
    heatmap_figure,
    heatmap_png,
    spike_marker_size,
    units_figure,
)

BS = 0.02


def _heatmap_inputs(rates_hz: list[float], *, n: int = 20):
    """A record and heatmap sample whose units are predicted at constant ``rates_hz`` and never fire."""
    U, T = len(rates_hz), 50
    pred = np.broadcast_to(np.asarray(rates_hz)[None, :, None] * BS, (n, U, T)).copy()
    record = {
        "name": "rec",
        "units": {"ref_rate_hz": list(rates_hz)},
        "windows": {"first_prediction_s": 61.0, "last_prediction_s": 178.0},
    }
    sample = {
        "pred": pred,
        "obs": np.zeros_like(pred),
        "t_now": 110.0 + np.arange(n, dtype=np.float64),
        "stride_s": 1.0,
        "bin_size_s": BS,
    }
    return record, sample


def _pixels(png: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(png), format="png")


def test_heatmap_says_its_time_slice():
    record, sample = _heatmap_inputs([10.0, 5.0])
    title = heatmap_figure(record, sample)._suptitle.get_text()
    assert "prediction times 110.0-130.0 s" in title
    assert "the middle of the scored 61.0-179.0 s" in title


def test_heatmap_colour_scale_is_the_same_for_every_recording():
    """A unit predicted at 10 Hz has the same colour whatever the other units of its recording do."""
    a = _pixels(heatmap_png(*_heatmap_inputs([10.0, 10.0])))
    b = _pixels(heatmap_png(*_heatmap_inputs([30.0, 10.0])))
    assert a.shape == b.shape
    diff = np.any(np.abs(a - b) > 1e-6, axis=-1)
    rows, cols = np.nonzero(diff)
    assert rows.size  # the first unit's row differs (10 vs 30 Hz) ...
    r0, r1 = rows.min(), rows.max()
    r, c = r1 + (r1 - r0) // 2, (cols.min() + cols.max()) // 2
    # ... the second unit's row, right below it, is 10 Hz in both and coloured alike, not white.
    np.testing.assert_allclose(a[r, c], b[r, c])
    assert not np.allclose(a[r, c, :3], 1.0)
    fig = heatmap_figure(*_heatmap_inputs([10.0, 80.0]))
    (img,) = fig.axes[1].get_images()
    assert (img.norm.vmin, img.norm.vmax) == (0.0, HEATMAP_MAX_HZ)
    assert fig.axes[-1].get_ylabel().endswith(f"0-{HEATMAP_MAX_HZ:g} Hz in every recording)")


def test_units_plot_point_size_follows_spike_counts():
    d = np.sqrt(spike_marker_size([1, 10, 100, 1000, 10000]))
    np.testing.assert_allclose(np.diff(d), d[1] - d[0])  # the same step per tenfold
    assert d[-1] / d[1] > 2.5  # visibly different
    rng = np.random.default_rng(0)
    n_spikes = np.array([0, 3, 30, 300, 3000, 30000], dtype=float)
    names = ["model", "reference_rate", "persistence", "exp_smooth"]
    record = {
        "name": "rec",
        "units": {"n_spikes": n_spikes.tolist()},
        "best_baseline": "exp_smooth",
        "predictors": {
            n: {"per_unit": {"bits_per_spike": rng.normal(0, 0.1, n_spikes.size).tolist()}} for n in names
        },
    }
    fig = units_figure(record)
    right = fig.axes[1]
    sizes = right.collections[0].get_sizes()
    np.testing.assert_allclose(sizes, spike_marker_size(n_spikes[1:]))  # units with spikes, by count
    legend = right.get_legend()
    assert "spikes scored" in legend.get_title().get_text()
    assert [t.get_text() for t in legend.get_texts()] == ["1", "100", "10,000"]
    assert "point size" in fig._suptitle.get_text()


@pytest.mark.usefixtures("one_thread")
def test_report_captions(tmp_path, make_tiny_checkpoint):
    d = make_session(seed=4, n_units=10, duration=100.0)
    keys = ("spike_times", "unit_index", "unit_ids", "start", "end", "true_rates")
    path = write_session(tmp_path / "rec.h5", **{k: d[k] for k in keys})
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    settings = ScoreSettings(backend="torch", reference_s=30.0, max_windows=30)
    report = run_score(
        [path], out=tmp_path / "out", checkpoint=ckpt, settings=settings, progress=False, echo=lambda s: None
    )
    page = report.paths["report.html"].read_text()
    assert "the title gives the time slice" in page
    assert f"One colour scale for every recording&#x27;s heatmap: 0-{HEATMAP_MAX_HZ:g} Hz" in page
    assert "then the true rate (synthetic ground truth)" in page
    assert "Point size grows with the unit&#x27;s number of spikes in the scored horizons" in page
