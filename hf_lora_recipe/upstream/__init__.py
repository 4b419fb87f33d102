"""Every reach into a private or undocumented symbol of an upstream library, one module per library.

Each reach is a small function with a line saying why and on which versions it was checked; each has a test in
``tests/test_upstream.py`` that fails loudly when the symbol moves, instead of the reach turning into a no-op.
"""
