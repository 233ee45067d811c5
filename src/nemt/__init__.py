"""nemt: fast, verifiable explanations for medical image models."""
__version__ = "0.1.0"
