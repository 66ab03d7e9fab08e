"""Entry points: ``ebseg <command>`` / ``python -m jobs.<command>`` (see ``jobs/cli.py``)."""
