"""Lightning callbacks: EMA weights, sample grids, gradient variance, throughput."""
