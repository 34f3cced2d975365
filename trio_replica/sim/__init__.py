"""The seeded discrete-event simulator: the real protocol cores on a simulated network
(`overlay` runs the nodes over `network`, with the layers of `stack` and `broadcast`;
`graph` measures the overlay; `replica` for replicated maps)."""
