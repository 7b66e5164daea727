"""Recordings and what is computed from them: spike trains (:mod:`~nh_serve.data.spikes`),
session files (:mod:`~nh_serve.data.session`), reference features (:mod:`~nh_serve.data.features`),
synthetic recordings (:mod:`~nh_serve.data.synth`) and the window pipeline
(:mod:`~nh_serve.data.windows`) that turns a recording into model inputs."""
