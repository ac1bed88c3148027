"""yeastar-archiver: archive call recordings from a Yeastar P-Series PBX."""

__version__ = "0.1.0"
