"""Inference speed-ups applied to a loaded model, each checked against the
model's own output: static padding, batch-norm folding, int8, torch.compile."""
