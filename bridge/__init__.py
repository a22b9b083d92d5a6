"""The HTTP bridge: SSE, OpenAI-compatible and web-page endpoints in front of the gRPC server.

It holds no model and no state of its own; every request becomes one gRPC call.
"""
