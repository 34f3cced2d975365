"""The seeded discrete-event simulator: the real protocol cores on a simulated network
(`overlay` for membership and broadcast, `replica` for replicated maps)."""
