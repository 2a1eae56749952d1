"""The recipe YAML files of fusionkit, installed as the data package ``fusionkit._recipes``.

pyproject.toml maps ``fusionkit._recipes`` onto this folder; ``fusionkit.recipes`` reads it through
importlib.resources. No code lives here (this file only makes the folder a package, which an
editable install needs to find it).
"""
