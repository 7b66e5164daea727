"""The network: model configurations (:mod:`~nh_serve.core.config`), rotary attention
(:mod:`~nh_serve.core.rotary`) and NeuroHorizon itself (:mod:`~nh_serve.core.model`)."""
