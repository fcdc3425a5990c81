"""asv benchmarks for peftdecl (run with ``asv run``; see asv.conf.json)."""
