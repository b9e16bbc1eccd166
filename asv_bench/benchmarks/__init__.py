"""asv benchmarks for sparsemix (see ../asv.conf.json)."""
