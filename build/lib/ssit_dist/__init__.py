"""ssit-dist: SSiT pretraining for fundus photographs, at scale."""

__version__ = "0.1.0"
