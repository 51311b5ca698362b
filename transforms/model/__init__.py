"""The model: finding and loading it (`loading`, `default_model`), its device
(`device`), pre- and postprocessing, the RunInference handlers, and the
speed-ups that rewrite a loaded model (`speedups`)."""
