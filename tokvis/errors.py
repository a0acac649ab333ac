"""Typed errors raised by tokvis.

Every error derives from :class:`TokvisError` and from the matching built-in
(``ValueError``, ``TypeError``, ...) so that generic ``except ValueError`` code
keeps working.  Messages say what was wrong and what to do about it.
"""

from __future__ import annotations


class TokvisError(Exception):
    """Base class of every error tokvis raises on purpose."""


class UnsupportedModelError(TokvisError, TypeError):
    """The model (or one of its blocks / attention layers) cannot be patched."""


class ScheduleError(TokvisError, ValueError):
    """keep_rate / r / locations are invalid for this model."""


class UnknownMethodError(TokvisError, ValueError):
    """No reduction method is registered under that name."""


class MethodOptionError(TokvisError, ValueError):
    """A method option is out of range or not understood."""


class ImageSizeError(TokvisError, ValueError):
    """Input images do not fit the model (size, channels, dtype)."""


class TraceFileError(TokvisError, ValueError):
    """A saved trace file is missing, corrupt, truncated or of an unknown version."""


class TraceMismatchError(TokvisError, ValueError):
    """Traces (or batches of one recording) cannot be combined or compared."""


class WeightsError(TokvisError, RuntimeError):
    """Model weights could not be found, read or converted."""


class DataError(TokvisError, ValueError):
    """An input image or dataset could not be read."""


class ImageValueError(ImageSizeError):
    """Input images hold NaN or infinite pixel values (a kind of :class:`ImageSizeError`: a bad image)."""


class ArgumentTypeError(TokvisError, TypeError):
    """An argument of a public function has the wrong type (a string where a list is meant, ...)."""


class ArgumentValueError(TokvisError, ValueError):
    """An argument of a public function has a value out of its range, or not one of its choices."""


class BlockIndexError(TokvisError, IndexError):
    """A block (layer) index outside the model's blocks."""


class AnalysisOptionError(TokvisError, ValueError):
    """An analysis option is not one tokvis knows (e.g. ``convention=``) or does not apply to the inputs."""


class MissingDependencyError(TokvisError, ImportError):
    """An optional package a feature needs is not installed (the message names the extra to install)."""
