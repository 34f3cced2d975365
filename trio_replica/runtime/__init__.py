"""The runtime: links and their handshake, flow control, the supervised components that
drive the protocol cores, the replica driver, keys and trust. Imports only `core` and
`errors` from the package (ARCHITECTURE.md)."""
