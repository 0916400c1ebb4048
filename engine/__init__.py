"""pushrules: YAML notification rules, validated against the Accengage API, compiled and sent."""

__version__ = "0.1.0"
