"""The passes over the data that turn a plan into scales: activations (two-pass driver, shards,
resumable state) and weights, each tensor through its calibrator."""
