"""Clients of the tokenwire server: the `tokenwire` command line."""
