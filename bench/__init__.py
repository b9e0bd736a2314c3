"""disco-kernels benchmarks: every op and the whole Scion step against the reference
and peers, with the share of the device's peak. Run ``python -m bench --help``."""
