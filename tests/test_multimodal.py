"""Multimodal end to end: synthetic behaviour + images -> brief training -> serving with and without them.

Whether the inputs improve predictions is measured by ``python -m
training.multimodal_check`` (docs/multimodal.md): after brief training the gain
is not yet beyond run-to-run noise, so it is reported there, not asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nh_serve.errors import InputError
from nh_serve.predictor import Predictor
from nh_serve.session import open_session
from training.multimodal_check import train_pair


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    n = torch.get_num_threads()
    root = tmp_path_factory.mktemp("multimodal")
    ckpts = train_pair(root, steps=40)
    yield {"root": root, "ckpts": ckpts}
    torch.set_num_threads(n)


def test_serving_with_and_without_behaviour_and_images(runs):
    path = sorted((runs["root"] / "heldout").glob("*.h5"))[0]
    with open_session(path) as s:
        ref_t, ref_u = s.spikes(0.0, 60.0)
        ids = s.unit_ids
        onsets, _ = s.image_events(s.start, s.end)
        c = float(onsets[(onsets > 70.0)][0]) + 0.1 - 1.0  # an image 100 ms before the context end
        ctx_t, ctx_u = s.spikes(c, c + 1.0)
        behavior = s.behavior(c, c + 1.0)
        images = s.image_events(c, c + 1.0)
    p = Predictor.load(runs["ckpts"]["multimodal"], backend="torch")
    assert p.cfg.behavior_dim == 2 and p.cfg.image_dim == 32
    token = p.register(ref_t, ids[ref_u], reference_window=(0.0, 60.0), units=ids)
    kw = {"context_start": c}
    bare = p.predict(token, ctx_t, ids[ctx_u], **kw)
    both = p.predict(token, ctx_t, ids[ctx_u], behavior=behavior, images=images, **kw)
    img_only = p.predict(token, ctx_t, ids[ctx_u], images=images, **kw)
    for pred in (bare, both, img_only):
        assert pred.rates_hz.shape == (len(ids), 50)
        assert np.all(np.isfinite(pred.rates_hz)) and np.all(pred.rates_hz > 0)
        np.testing.assert_allclose(pred.bin_edges[0], c + 1.0)
    assert np.abs(both.rates_hz - bare.rates_hz).max() > 1e-4
    assert np.abs(img_only.rates_hz - bare.rates_hz).max() > 1e-4
    # An image presented outside the context is refused with a message saying what to send.
    with pytest.raises(InputError, match="outside the context"):
        p.predict(token, ctx_t, ids[ctx_u], images=(images[0] + 2.0, images[1]), **kw)
    # The model trained without them says so instead of silently ignoring them.
    plain = Predictor.load(runs["ckpts"]["plain"], backend="torch")
    tok = plain.register(ref_t, ids[ref_u], reference_window=(0.0, 60.0), units=ids)
    with pytest.raises(InputError, match="takes no behavior"):
        plain.predict(tok, ctx_t, ids[ctx_u], behavior=behavior, **kw)
