"""The package version, one place for the package metadata and the files that record it."""

__version__ = "0.1.0"
