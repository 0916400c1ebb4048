"""A rule plus what it fired on -> the exact request bodies: pure, no clock, store or network.

Owns the compiler (``compiler``): Jinja rendered, templates merged, ``for_each`` expanded,
targets cut by 100, the API's last check, at once or in steps (``compile_steps``, so the
daemon's event loop answers others during a 100,000-target fire); and the preview page
(``preview``, with its template ``preview.html.j2``): compiled requests drawn as each app's
push on a lock screen.

May import: :mod:`engine.rules`, :mod:`engine.accengage`, :mod:`engine.errors`.
"""
