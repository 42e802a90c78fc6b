"""airun: a self-hosted Workers AI with its own PyTorch inference engine."""

__version__ = "0.1.0"
