"""What authors write, read and checked: nothing here sends, stores or schedules.

Owns the marked YAML reader (``yaml_source``), the problems it reports (``problems``), the
Cerberus schemas (``schemas``), their verdict in one pass (``fast_schema``: Cerberus runs only
on a document it refuses) and the editor's JSON Schema made from them (``json_schema``),
the rule model (``rule``: dataclasses, no Cerberus or Jinja) and the checks that build it from a
file (``checks``), templates pulled with ``use:`` (``fragments``), the ``rule-tests/`` files
and their checks (``cases``; running them is :mod:`engine.review`'s), ``pushrules.yaml``
settings and secrets by reference (``project``, ``secrets``), trigger math (``schedule``: pure,
no APScheduler), the Jinja dialect authors write (``templating``, ``template_bounds``), the
formatter (``formatting``) and the project loader (``loader``).

May import: :mod:`engine.accengage` (the API's facts) and :mod:`engine.errors`, nothing else of
the engine.
"""
