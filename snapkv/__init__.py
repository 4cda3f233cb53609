"""SnapKV Serve core: SnapKV compression, model loading, the in-process engine and configs."""

__version__ = "0.1.0"
