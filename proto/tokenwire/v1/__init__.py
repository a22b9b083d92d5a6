"""Generated stubs of the tokenwire.v1 API (do not edit; run `make proto`)."""
