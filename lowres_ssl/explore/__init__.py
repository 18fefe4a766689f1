"""What a backbone learned about a folder of images: nearest neighbours, groups,
near-duplicates and a 2-D map, as files and one static page (docs/explore.md)."""

from .explorer import default_groups, exploration_line, explore

__all__ = ["default_groups", "exploration_line", "explore"]
