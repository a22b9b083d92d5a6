"""The tokenwire server: engine, model store, scheduler and gRPC services."""
