"""File-system safety shared by every writer and reader: atomic writes, output paths that can
never overwrite an input, and loading the user's own Python functions."""
