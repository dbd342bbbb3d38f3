"""A plugin whose import fails: the core must list it and keep working."""

raise ImportError("tub_broken needs the package 'nonexistent_dependency'")
