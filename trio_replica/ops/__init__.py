"""Operating a node: the control operations, the metrics and probes endpoint, the
configuration file, the command line's control-client commands."""
