"""One error hierarchy for everything normrewrite reports to its users.

Every error a user can cause (bad file, bad option, untraceable model, a rewrite that fails its
numeric check) is a :class:`NormRewriteError`. The CLI prints ``str(error)`` as one line and exits
non-zero; ``--debug`` shows the traceback. Anything else escaping the library is a bug.
"""

from __future__ import annotations


class NormRewriteError(Exception):
    """Base class: an error with a one-line message meant for the user."""

    exit_code = 1

    def __str__(self) -> str:  # keep it to one line whatever the cause said
        text = super().__str__()
        return " ".join(text.split())


class UsageError(NormRewriteError):
    """A bad command-line or API argument: unknown pass, bad option, bad shape spec."""

    exit_code = 2


class LoadError(NormRewriteError):
    """The model could not be loaded: missing/corrupt file, factory raised, unsafe format."""


class TraceError(NormRewriteError):
    """The model could not be turned into a torch.fx graph."""


class PassError(NormRewriteError):
    """A pass could not run (a precondition failed or its output graph is invalid)."""


class VerifyError(NormRewriteError):
    """A rewrite that claims to be exact changed the model's outputs beyond tolerance."""


class EmitError(NormRewriteError):
    """The rewritten model could not be written in the requested format."""


class UnchangedError(NormRewriteError):
    """``fail_if_unchanged`` (``--fail-if-unchanged``): no pass changed the model; nothing is
    written (the outputs would be valid, but a pipeline asked to fail instead)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, white space folded, at most ``limit``
    characters: what a one-line error may quote of a library's (often multi-page) message."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return " ".join(lines[0].split())[:limit] if lines else ""
