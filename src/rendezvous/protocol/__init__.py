"""The I/O-free core: request-head parsing, routing decisions and response bytes.

Nothing here imports asyncio, socket or ssl; the server feeds bytes in and writes bytes out.
"""
