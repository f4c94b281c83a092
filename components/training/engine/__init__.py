"""The training engine every algorithm runs on (see components/training/__init__.py for the map)."""
