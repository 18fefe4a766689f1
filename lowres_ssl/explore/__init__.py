"""What a backbone learned about a folder of images: nearest neighbours, groups,
near-duplicates and a 2-D map, as files and one static page (docs/explore.md)."""

from .task import default_groups, explore, summary_line

__all__ = ["default_groups", "explore", "summary_line"]
