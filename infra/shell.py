"""Shell text that ``sr cloud`` generates (commands.sh, run.sh, setup lines): the one
place where a value becomes part of a shell line, and the checks on the names and ids
that reach those files.

A user runs these files as written, so a value must never be able to end a line, close a
quote or start a substitution: every value is quoted by :func:`word` (``shlex.quote``:
single quotes, inside which the shell expands nothing), comments go through
:func:`comment` (one line, printable ASCII), and the names that also become file and
folder names (run names, submission ids, cluster names) are held to an alphabet that
has no path separator and no shell meaning.
"""

from __future__ import annotations

import re
import shlex

from sr_core.errors import shown

PORT = "\0port\0"
"""Stands for the local tunnel port where commands.sh picks one at run time. It holds a
NUL byte, which no command-line argument or YAML string a user passes can contain, so
only the words that we build with it turn into the shell variable."""

_VARIABLES = {PORT: '"${port}"'}

RUN_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
"""Managed-job (run) names: SkyPilot's and GCP's 1-63 lowercase letters, digits, dashes."""

ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""Submission ids and cluster names: letters, digits, ``_``, ``.``, ``-``; no ``/``, so a
folder named after one stays inside its parent."""

BUCKET = re.compile(r"^gs://[a-z0-9]([a-z0-9_.-]{0,220}[a-z0-9])?(/[A-Za-z0-9_.~+=,@-]+)*/?$")
"""``gs://BUCKET[/prefix]``: GCS bucket names are lowercase letters, digits, ``-``, ``_``
and ``.``; the prefix is held to characters with no shell meaning."""

PROJECT = re.compile(r"^([a-z][a-z0-9.-]{0,62}:)?[a-z][a-z0-9-]{0,62}$")
"""GCP project ids: lowercase letters, digits and dashes (``example.com:`` before them for
domain-scoped projects)."""

EMAIL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}@[a-z0-9][a-z0-9.:-]{0,99}\.gserviceaccount\.com$")
"""Service-account emails (``NAME@PROJECT.iam.gserviceaccount.com``, Compute Engine's
``NUMBER-compute@developer.gserviceaccount.com``)."""

LOCATION = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
"""GCP regions and zones (``us-central1``, ``us-central1-a``)."""

def word(value: object) -> str:
    """``value`` as one shell word, expanded by nothing."""
    return shlex.quote(str(value))


def line(words: list[str]) -> str:
    """A command line of ``words``, each quoted by :func:`word`; ``PORT`` inside a word
    becomes ``"${port}"`` there (the rest of that word stays single-quoted)."""
    out = []
    for w in words:
        parts = re.split("(" + "|".join(map(re.escape, _VARIABLES)) + ")", str(w))
        out.append("".join(_VARIABLES.get(p) or word(p) for p in parts if p) or word(""))
    return " ".join(out)


def comment(text: str) -> str:
    """``# text`` on one line: control characters (a newline would end the comment and
    start a command) and non-ASCII are written as backslash escapes."""
    return "# " + text.encode("unicode_escape").decode("ascii")


def check_name(value: str, what: str) -> str:
    """``value`` when it is a run name (:data:`RUN_NAME`), else ValueError naming ``what``."""
    if not RUN_NAME.match(value):
        raise ValueError(f"{what} {shown(value)}: use 1-63 lowercase letters, digits and dashes, "
                         "starting with a letter")
    return value


def check_id(value: str, what: str) -> str:
    """``value`` when it is an id (:data:`ID`), else ValueError naming ``what``."""
    if not ID.match(value):
        raise ValueError(f"{what} {shown(value)}: use 1-128 letters, digits, '_', '.' and '-', "
                         "starting with a letter or digit")
    return value


def check_bucket(value: str, what: str = "--bucket") -> str:
    """``value`` when it is ``gs://BUCKET[/prefix]`` (:data:`BUCKET`) with no ``.``/``..``
    folder, else ValueError naming ``what``."""
    parts = value.removeprefix("gs://").rstrip("/").split("/")
    if not BUCKET.match(value) or any(p in (".", "..") for p in parts[1:]):
        raise ValueError(f"{what} {shown(value)}: give a Google Cloud Storage URL, e.g. gs://my-bucket or "
                         "gs://my-bucket/prefix (bucket: lowercase letters, digits, '-', '_', '.'; "
                         "prefix: letters, digits and -_.~+=,@)")
    return value


def check_match(pattern: re.Pattern, value: str, what: str, example: str) -> str:
    """``value`` when ``pattern`` matches it, else ValueError naming ``what`` with an example."""
    if not pattern.match(value):
        raise ValueError(f"{what} {shown(value)}: not a valid value here, e.g. {example}")
    return value
