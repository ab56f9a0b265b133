"""skinaug: diffusion-based augmentation of dark-skin dermatology images, as a DVC pipeline."""

__version__ = "0.1.0"


class SkinaugError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""
