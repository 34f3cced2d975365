"""Named replicated state on top of the runtime's replica driver: the replicated map and
its SQLite store, the host directory, and the built-ins (registry, leaders, shard,
reminders) that ride on maps."""
