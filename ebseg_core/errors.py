"""The one base class of mistakes a user can fix (a bad flag, a missing file, a config that does not fit).

The ``ebseg`` command prints these as one line (``ebseg <command>: error: <message>``, exit status 2) and
shows a traceback for everything else, so a real bug is never mistaken for a user's mistake. It derives
from ValueError so that library callers catching ValueError keep working.
"""


class UserError(ValueError):
    """A mistake the user can fix; the message says what is wrong and what to do."""
