"""What a run writes beside the QDQ model: the scales file, serving checkpoints, the report file
and the summary printed at the end."""
