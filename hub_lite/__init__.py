"""hub_lite."""
