"""An offline calibration corpus built from text that ships with Python itself.

The project's default calibration data must work on a machine with no network and no shared data
folder. Every CPython install carries a large amount of English prose in the docstrings of its
standard library, so the ``builtin`` corpus is assembled from them: the module docstring and the
docstrings of the public classes, functions and methods defined in a fixed, sorted list of
standard-library modules.

The text is deterministic for a given Python version (docstrings change between releases, so the
calibration windows of two Python versions differ; the data module's fingerprint records that).
Modules that cannot be imported on a particular build (a Python without ``sqlite3``, say) are skipped.
With CPython 3.10-3.13 the corpus holds about half a million characters, enough for 128 windows of 512
tokens with common tokenizers.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from typing import Any

# Pure-Python, widely available modules with substantial prose docstrings. Sorted; never reorder
# (that would change the corpus). Modules that need a GUI (turtle/tkinter) are left out on purpose.
BUILTIN_MODULES: tuple[str, ...] = (
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "logging.handlers",
    "mailbox",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "typing",
    "unittest",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
)


def _own_doc(obj: object) -> str | None:
    """The object's own docstring, cleaned; None when it has none (no inheritance from bases)."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return inspect.cleandoc(doc)


def _module_documents(module_name: str) -> list[str]:
    """Docstrings of one module, its public classes/functions and their public methods, in name order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules and attributes (e.g. typing.io) warn on access
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return []
        return _collect(module_name, module)


def _collect(module_name: str, module: Any) -> list[str]:
    """The documents of an imported module (see :func:`_module_documents`)."""
    docs: list[str] = []
    head = _own_doc(module)
    if head:
        docs.append(f"{module_name}\n\n{head}")
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = vars(module)[name]
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported from elsewhere: documented where it is defined
        doc = _own_doc(obj)
        if doc:
            docs.append(f"{module_name}.{name}\n\n{doc}")
        if inspect.isclass(obj):
            for method_name in sorted(vars(obj)):
                if method_name.startswith("_"):
                    continue
                method = vars(obj)[method_name]
                if inspect.isfunction(method):
                    method_doc = _own_doc(method)
                    if method_doc:
                        docs.append(f"{module_name}.{name}.{method_name}\n\n{method_doc}")
    return docs


@functools.lru_cache(maxsize=1)
def builtin_documents() -> tuple[str, ...]:
    """All documents of the builtin corpus, in a fixed order (one docstring each)."""
    docs: list[str] = []
    for module_name in BUILTIN_MODULES:
        docs.extend(_module_documents(module_name))
    return tuple(docs)


def builtin_text() -> str:
    """The builtin corpus as one string, documents separated by blank lines."""
    return "\n\n".join(builtin_documents())
