"""Measuring predictions: metrics, causal baselines, the sliding-window evaluation of a
recording, the quality benchmark (``nh-serve eval``), the demo, batch scoring
(``nh-serve score``) and the Markdown report writer."""
