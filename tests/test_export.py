"""Export to ONNX and TorchScript: parity through the Predictor, dynamic shapes, metadata, bad artifacts."""

from __future__ import annotations

import base64
import copy
import datetime
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from real_data import REAL

from export import ARTIFACT_FORMAT_VERSION, ParityError, export_model, load_artifact, read_artifact_metadata
from export.cli import main as export_main
from export.parity import compare_predictors, load_recordings
from nh_serve.core.config import get_config
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.features import FeatureNorm
from nh_serve.data.synth import make_session
from nh_serve.errors import CheckpointError, InputError
from nh_serve.inference.artifact import EMBED_KEY, METADATA_KEY, metadata_hash
from nh_serve.inference.backends.parity import compare_backends
from nh_serve.inference.checkpoint import load_checkpoint
from nh_serve.inference.predictor import Predictor

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")



@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, make_tiny_checkpoint):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("ck") / "tiny.safetensors",
        norm_seed=0,
        training={"note": "random weights"},
        metrics={"bits_per_spike": 0.1},
    )


@pytest.fixture(scope="module")
def artifacts(ckpt, tmp_path_factory):
    """Both formats exported through the command line (real-data parity when the data is present)."""
    out = tmp_path_factory.mktemp("art")
    paths = {"onnx": out / "tiny.onnx", "torchscript": out / "tiny.pt"}
    torch.set_num_threads(1)
    for fmt, path in paths.items():
        rc = export_main(
            ["--checkpoint", str(ckpt), "--format", fmt, "--out", str(path), "--real-data", str(REAL)]
        )
        assert rc == 0 and path.is_file()
    return paths


@pytest.fixture(scope="module")
def eager(ckpt):
    return Predictor.load(ckpt, backend="torch")


@pytest.fixture(scope="module")
def real_recordings():
    recs = load_recordings(REAL, limit=3)
    if not recs:
        pytest.skip(f"no real recordings under {REAL}")
    return recs


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("fmt, backend", [("onnx", "onnxruntime"), ("torchscript", "torchscript")])
def test_artifact_through_predictor_matches_eager(artifacts, eager, real_recordings, fmt, backend):
    p = Predictor.load(artifacts[fmt])
    assert p.backend_name == backend
    assert p.model_hash == eager.model_hash  # the artifact reports its source checkpoint
    assert p.cfg == eager.cfg
    # Random windows at several sizes (embeddings and forward graph separately) ...
    report = compare_backends(eager._backend, p._backend, eager.cfg)
    assert report.ok and report.max_error < 1e-4, report.summary()
    # ... and real recordings end to end (reference features, tokenization, padding of batches).
    report = compare_predictors(eager, p, real_recordings, kind="recording")
    assert len(report.cases) == len(real_recordings)
    assert report.ok and report.max_error < 1e-4, report.summary()

    # One real window by hand: identical unit order, bin edges and rates within 1e-4.
    name, t, ids = real_recordings[0]
    t0 = float(t[0])
    m = t < t0 + 30.0
    tok_a = eager.register(t[m], ids[m], reference_window=(t0, t0 + 30.0), fit="none")
    tok_b = p.register(t[m], ids[m], reference_window=(t0, t0 + 30.0))  # an artifact registers zero-shot
    assert p.session(tok_b).fit["mode"] == "none"
    c = t0 + 31.0
    w = (t >= c) & (t < c + 1.0)
    a = eager.predict(tok_a, t[w], ids[w], context_start=c)
    b = p.predict(tok_b, t[w], ids[w], context_start=c)
    assert list(a.unit_ids) == list(b.unit_ids)
    np.testing.assert_array_equal(a.bin_edges, b.bin_edges)
    np.testing.assert_allclose(b.rates_hz, a.rates_hz, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_dynamic_shapes(artifacts, eager, fmt):
    """Unit, token and batch counts unlike the export example (B=2, U=7): 1 unit, 61 units, 5 windows."""
    p = Predictor.load(artifacts[fmt])
    for n_units, n_windows in ((1, 1), (61, 5)):
        d = make_session(seed=n_units, n_units=n_units, duration=75.0)
        ids = np.asarray(d["unit_ids"]).astype(str)[d["unit_index"]]
        t = d["spike_times"]
        m = t < 60.0
        tok_a = eager.register(t[m], ids[m], reference_window=(0.0, 60.0), units=np.asarray(d["unit_ids"]), fit="none")
        tok_b = p.register(t[m], ids[m], reference_window=(0.0, 60.0), units=np.asarray(d["unit_ids"]))
        windows = []
        for c in 60.0 + 2.3 * np.arange(n_windows):
            w = (t >= c) & (t < c + 1.0)
            windows.append({"spike_times": t[w], "unit_ids": ids[w], "context_start": float(c)})
        assert len({w["spike_times"].size for w in windows}) == n_windows  # token counts differ (padding)
        pa = eager.predict_batch(tok_a, windows)
        pb = p.predict_batch(tok_b, windows)
        for x, y in zip(pa, pb):
            assert y.rates_hz.shape == (n_units, 50)
            np.testing.assert_allclose(y.rates_hz, x.rates_hz, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_metadata_round_trip(artifacts, ckpt, fmt):
    md = read_artifact_metadata(artifacts[fmt])
    ck = load_checkpoint(ckpt)
    assert md["artifact_format_version"] == ARTIFACT_FORMAT_VERSION and md["format"] == fmt
    assert md["config"] == get_config("nh-tiny").to_dict()
    assert md["feature_norm"] == ck.feature_norm
    assert md["source"]["content_hash"] == ck.content_hash and md["source"]["file"] == "tiny.safetensors"
    assert md["source"]["training"] == {"note": "random weights"}
    assert md["versions"]["torch"] == torch.__version__
    exported = datetime.datetime.fromisoformat(md["exported"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - exported).total_seconds()) < 3600
    assert md["parity"]["status"] == "passed" and md["parity"]["max_relative_error"] <= 1e-4
    kinds = {c["kind"] for c in md["parity"]["cases"]}
    assert "random" in kinds and kinds & {"recording", "synthetic"}
    # The loaded artifact carries the same config and norm; the Predictor reports the source.
    art = load_artifact(artifacts[fmt])
    assert art.cfg == get_config("nh-tiny")
    np.testing.assert_allclose(art.feature_norm.mean, ck.feature_norm["mean"])
    info = Predictor.load(artifacts[fmt]).info()
    assert info["hash"] == ck.short_hash and info["training"] == {"note": "random weights"}
    assert info["provenance"]["artifact"]["format"] == fmt


@pytest.mark.slow
@pytest.mark.real_data
def test_adaptation_needs_gradients(artifacts):
    d = make_session(seed=5, n_units=6, duration=60.0)
    ids = np.asarray(d["unit_ids"]).astype(str)[d["unit_index"]]
    p = Predictor.load(artifacts["onnx"])
    with pytest.raises(InputError, match="adapt"):
        p.register(d["spike_times"], ids, reference_window=(0.0, 60.0), adapt_steps=2)
    # A TorchScript artifact keeps autograd: adaptation runs.
    p = Predictor.load(artifacts["torchscript"])
    tok = p.register(d["spike_times"], ids, reference_window=(0.0, 60.0), adapt_steps=2)
    assert p.session(tok).adaptation["steps"] == 2


@pytest.mark.slow
@pytest.mark.real_data
def test_artifact_backend_mismatch(artifacts):
    with pytest.raises(InputError, match="onnxruntime"):
        Predictor.load(artifacts["onnx"], backend="torch")
    with pytest.raises(InputError, match="torchscript"):
        Predictor.load(artifacts["torchscript"], backend="onnxruntime")


# ----------------------------------------------------------------------------- bad artifacts


def _copy_truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_missing_empty_truncated_artifacts(artifacts, tmp_path, fmt, suffix):
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor.load(tmp_path / f"nope{suffix}")
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        Predictor.load(tmp_path / f"empty{suffix}")
    bad = _copy_truncated(artifacts[fmt], tmp_path / f"half{suffix}")
    with pytest.raises(CheckpointError):
        Predictor.load(bad)


def _onnx_with(src: Path, dst: Path, edit) -> Path:
    import onnx

    m = onnx.load(str(src))
    props = {p.key: p.value for p in m.metadata_props}
    edit(m, props)
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, props)
    onnx.save(m, str(dst))
    return dst


def _bump_version(props):
    doc = json.loads(props[METADATA_KEY])
    doc["artifact_format_version"] = ARTIFACT_FORMAT_VERSION + 1
    doc["metadata_hash"] = metadata_hash(doc)
    props[METADATA_KEY] = json.dumps(doc)


@pytest.mark.slow
@pytest.mark.real_data
def test_onnx_wrong_version_tampering_and_foreign_files(artifacts, tmp_path):
    src = artifacts["onnx"]
    p = _onnx_with(src, tmp_path / "v.onnx", lambda m, props: _bump_version(props))
    v = ARTIFACT_FORMAT_VERSION
    with pytest.raises(CheckpointError, match=f"format version {v + 1} but this nh-serve reads version {v}"):
        Predictor.load(p)

    def edit_config(m, props):
        doc = json.loads(props[METADATA_KEY])
        doc["config"]["n_bins"] = 10  # without updating the hash
        props[METADATA_KEY] = json.dumps(doc)

    with pytest.raises(CheckpointError, match="changed after export"):
        Predictor.load(_onnx_with(src, tmp_path / "c.onnx", edit_config))

    def edit_weights(m, props):
        init = max(m.graph.initializer, key=lambda i: len(i.raw_data))
        raw = bytearray(init.raw_data)
        raw[0] ^= 0x40
        init.raw_data = bytes(raw)

    with pytest.raises(CheckpointError, match="damaged"):
        Predictor.load(_onnx_with(src, tmp_path / "w.onnx", edit_weights))

    def edit_embed(m, props):
        props[EMBED_KEY] = base64.b64encode(b"garbage").decode()

    with pytest.raises(CheckpointError, match="embed_units graph is damaged"):
        Predictor.load(_onnx_with(src, tmp_path / "e.onnx", edit_embed))

    def strip(m, props):
        props.clear()

    with pytest.raises(CheckpointError, match="no nh-serve metadata"):
        Predictor.load(_onnx_with(src, tmp_path / "s.onnx", strip))
    (tmp_path / "text.onnx").write_text("not a model at all")
    with pytest.raises(CheckpointError, match="not a readable ONNX file"):
        Predictor.load(tmp_path / "text.onnx")


@pytest.mark.slow
@pytest.mark.real_data
def test_torchscript_wrong_version_and_tampered_weights(artifacts, tmp_path):
    src = artifacts["torchscript"]
    extra = {"nh_serve.json": ""}
    module = torch.jit.load(str(src), _extra_files=extra)
    doc = json.loads(extra["nh_serve.json"])

    bumped = dict(doc, artifact_format_version=ARTIFACT_FORMAT_VERSION + 1)
    bumped["metadata_hash"] = metadata_hash(bumped)
    torch.jit.save(module, str(tmp_path / "v.pt"), _extra_files={"nh_serve.json": json.dumps(bumped)})
    with pytest.raises(CheckpointError, match=f"format version {ARTIFACT_FORMAT_VERSION + 1}"):
        Predictor.load(tmp_path / "v.pt")

    with torch.no_grad():
        next(module.parameters()).add_(1e-3)
    torch.jit.save(module, str(tmp_path / "w.pt"), _extra_files={"nh_serve.json": extra["nh_serve.json"]})
    with pytest.raises(CheckpointError, match="weights are damaged"):
        Predictor.load(tmp_path / "w.pt")

    torch.jit.save(module, str(tmp_path / "plain.pt"))
    with pytest.raises(CheckpointError, match="no nh-serve metadata"):
        Predictor.load(tmp_path / "plain.pt")


def test_unknown_format_and_bad_output_path(ckpt, tmp_path, capsys):
    model = NeuroHorizon(get_config("nh-tiny"))
    with pytest.raises(InputError, match="unknown export format 'tflite'"):
        export_model(model, fmt="tflite", out=tmp_path / "m.tflite", feature_norm=FeatureNorm.identity(model.cfg.n_features))
    with pytest.raises(InputError, match="must end in .onnx"):
        export_model(model, fmt="onnx", out=tmp_path / "m.pt", feature_norm=FeatureNorm.identity(model.cfg.n_features))
    rc = export_main(["--checkpoint", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert rc == 2 and "unknown export format" in capsys.readouterr().err
    rc = export_main(
        [
            "--checkpoint",
            str(tmp_path / "missing.safetensors"),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "m.onnx"),
        ]
    )
    assert rc == 2 and "missing.safetensors" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_exits_nonzero_and_writes_nothing(ckpt, tmp_path, monkeypatch, capsys):
    import export.torchscript as ts

    real_script = ts.script_model

    def perturbed(model):
        scripted = real_script(copy.deepcopy(model))  # a scripted module shares the model's tensors
        with torch.no_grad():
            scripted.head.out.bias.add_(1e-2)  # rates off by 1%
        return scripted

    monkeypatch.setattr(ts, "script_model", perturbed)
    out = tmp_path / "m.pt"
    out.write_bytes(b"previous good file")
    rc = export_main(
        ["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out), "--synthetic-only"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert (
        "does not match eager PyTorch" in err and "tolerance 0.0001" in err and "nothing was written" in err
    )
    assert out.read_bytes() == b"previous good file"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left

    model = NeuroHorizon(get_config("nh-tiny"))
    with pytest.raises(ParityError):
        export_model(
            model,
            fmt="torchscript",
            out=tmp_path / "n.pt",
            feature_norm=FeatureNorm.identity(model.cfg.n_features),
            recordings=None,
        )
    assert not (tmp_path / "n.pt").exists()


def test_multimodal_export_takes_the_optional_inputs(tmp_path):
    """A multimodal config exports its behaviour / image inputs as required graph inputs."""
    torch.manual_seed(1)
    model = NeuroHorizon(get_config("nh-tiny", behavior_dim=2))
    res = export_model(
        model, fmt="torchscript", out=tmp_path / "mm.pt", feature_norm=FeatureNorm.identity(model.cfg.n_features), recordings=None
    )
    assert res.metadata["graphs"]["forward_with_embeddings"]["inputs"][-6:] == [
        "behavior_times",
        "behavior_values",
        "behavior_mask",
        "history_rates",
        "unit_readout",
        "unit_bins",
    ]
    assert res.parity.ok
    p = Predictor.load(res.path)
    eager = Predictor(model=model, feature_norm=FeatureNorm.identity(model.cfg.n_features), backend="torch")
    d = make_session(seed=2, n_units=9, duration=70.0, multimodal=True)
    ids = np.asarray(d["unit_ids"]).astype(str)[d["unit_index"]]
    t = d["spike_times"]
    m = t < 60.0
    ta = eager.register(t[m], ids[m], reference_window=(0.0, 60.0))
    # an exported artifact cannot fit read-outs itself (zero-shot by default); it takes the eager registration's
    with pytest.raises(InputError, match="fit='none'"):
        p.register(t[m], ids[m], reference_window=(0.0, 60.0), fit="reference")
    tb = p.register(t[m], ids[m], reference_window=(0.0, 60.0))
    p.session(tb).take_fit(eager.session(ta))
    bt, bv = d["behavior"]
    w, wb = (t >= 62.0) & (t < 63.0), (bt >= 62.0) & (bt < 63.0)
    a = eager.predict(ta, t[w], ids[w], context_start=62.0, behavior=(bt[wb], bv[wb]))
    b = p.predict(tb, t[w], ids[w], context_start=62.0, behavior=(bt[wb], bv[wb]))
    np.testing.assert_allclose(b.rates_hz, a.rates_hz, rtol=1e-5)
