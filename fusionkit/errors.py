"""The errors fusionkit raises for a user's mistake or a fault it detected, under one base class.

Every such error derives from :class:`FusionkitError` (and keeps the built-in base it had before,
so ``except ValueError`` still catches a :class:`~fusionkit.recipes.RecipeError`). Its message is
meant to be read by the person at the terminal: it names the recipe key, the file (and row) or the
expected and the actual value. ``fusionkit.cli.main`` prints it as one line, ``error: <message>``,
and exits with status 2; ``--debug`` (or ``FUSIONKIT_DEBUG=1``) shows the traceback instead.

The families (each defined next to the code that raises it):

====================================================  ============================================
``fusionkit.recipes.RecipeError``                     a recipe that cannot be loaded or built
``fusionkit.experts.pretrained.PretrainedError``      pretrained weights not found / not matching
``fusionkit.data.manifest.ManifestError``             a manifest that cannot be read (file, row)
``fusionkit.data.decode.DecodeError``                 a media file that cannot be decoded
``fusionkit.engine.checkpoint.CheckpointError``       a checkpoint that cannot be read or written,
                                                      a run directory owned by another run
``fusionkit.attention.kernels.BackendError``          a forced attention backend that cannot run
``fusionkit.engine.trainer.NonFiniteLossError``       the loss became NaN / inf
:class:`DataError`                                    too many undecodable clips or skipped steps
:class:`UsageError`                                   a command-line value out of range
====================================================  ============================================

This module imports nothing from fusionkit, so every module can import it.
"""

from __future__ import annotations

import os

DEBUG_ENV = "FUSIONKIT_DEBUG"


class FusionkitError(Exception):
    """Base of the errors that ``fusionkit`` reports as one line (exit status 2) instead of a traceback."""

    exit_code = 2


class UsageError(FusionkitError, ValueError):
    """A command-line or API argument outside its valid range (``--topk 0``); the message names it."""


class DataError(FusionkitError, RuntimeError):
    """The data cannot train or evaluate anything: too many undecodable clips, too many skipped steps."""


def debug_requested() -> bool:
    """Whether ``$FUSIONKIT_DEBUG`` asks for tracebacks (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(message: object) -> str:
    """``message`` on one line: its lines joined with ``; `` (indentation and blank lines dropped)."""
    lines = [part.strip() for part in str(message).splitlines()]
    return "; ".join(part for part in lines if part) or "(no message)"


def describe_os_error(err: OSError) -> str:
    """``No space left on device (ENOSPC): /runs/x/step_4.safetensors`` from an ``OSError``."""
    import errno

    reason = err.strerror or str(err) or type(err).__name__
    code = errno.errorcode.get(err.errno or -1)
    text = f"{reason} ({code})" if code else reason
    files = [str(f) for f in (err.filename, getattr(err, "filename2", None)) if f]
    return f"{text}: {' -> '.join(files)}" if files else text
