"""Side-by-side benchmarks of presets (``grassopt bench``)."""
