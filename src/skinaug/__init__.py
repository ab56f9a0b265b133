"""skinaug: diffusion-based augmentation of dark-skin dermatology images, as a DVC pipeline."""

__version__ = "0.1.0"


class SkinaugError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""


def first_line(e: Exception) -> str:
    """An exception as one line of a message: library errors can run to dozens of lines."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
