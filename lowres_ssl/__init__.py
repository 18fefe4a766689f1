"""lowres_ssl: self-supervised image representations on one small GPU."""

__version__ = "0.1.0"
