"""Cost, energy and hardware figures: the hardware catalog, `jaxscale estimate`, and measured GPU energy."""
