"""The Accengage ``sendInstantMessage`` API in one place: its facts, its checks, its fake.

Owns the API's fields, enums, limits, macros and return codes (``api``), what Accengage would
answer to a request body (``request_check``) and the sandbox endpoint that answers it over HTTP
for tests, benchmarks and trials (``sandbox``).

May import: nothing of the engine but :mod:`engine.errors`; every other package may use it.
"""
