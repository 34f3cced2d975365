"""Operating a node: the control operations, the metrics and probes endpoint, the
configuration file."""
