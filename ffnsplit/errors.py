"""User-facing errors: every failure a user can cause is one of these, shown as one line by the CLI."""

from __future__ import annotations


class FFNSplitError(Exception):
    """A failure the user can fix. The message is one line: what went wrong and what to do."""

    exit_code = 2


class UnsupportedModelError(FFNSplitError):
    """The model's architecture (or its FFN type) is not supported."""


class CorpusError(FFNSplitError):
    """A corpus is missing, empty or too small."""


class CheckpointError(FFNSplitError):
    """A profile, plan or checkpoint is corrupt, truncated, of another model or of a newer format."""


class OptionError(FFNSplitError):
    """An option value is out of range or incompatible with another."""


class NumericalError(FFNSplitError):
    """NaN or Inf found in weights or activations."""
