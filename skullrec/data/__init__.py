"""On-disk data sets: layout, in-memory cache, procedural skulls, defects, resampling, building."""
