"""Tools that measure tvserve from outside: the benchmark, its load generator, the soak, the stock
TorchServe baseline, in-process runs of an archive's handler, and checkpoint evaluation."""
