"""medgen: diffusion models for synthetic brain-MRI research, from the shell."""

__version__ = "0.1.0"
