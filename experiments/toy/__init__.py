"""The toy world's lab: its experiment and trade-off study (lab/), probes (probes/) and committed results."""
