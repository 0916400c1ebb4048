"""A rule plus what it fired on -> the exact request bodies: pure, no clock, store or network.

Owns the compiler (``compiler``): Jinja rendered, templates merged, ``for_each`` expanded,
targets cut by 100, the API's last check.

May import: :mod:`engine.rules`, :mod:`engine.accengage`, :mod:`engine.errors`.
"""
