"""An embedded default corpus: English text that ships with Python itself.

:func:`default_corpus` needs no download. Its documents are, in this order:

1. the topics of the Python language reference that ``help()`` shows
   (``pydoc_data/topics.py``, one document per topic, sorted by name);
2. the docstrings of a fixed, sorted list of pure-Python standard-library
   modules and packages (one document per source file: the module docstring,
   then every class and function docstring headed by its qualified name).

Nothing is imported: files are read with ``ast.parse`` and
``ast.get_docstring``/``ast.literal_eval``, so no module side effects run.
Files a distribution leaves out are skipped, so the result is the same on
every machine with the same Python minor version (about 1.5 MB on 3.11).

Parsing the sources takes one to three CPU-seconds, so the result is kept in a
JSON file, ``$LLM_MP_CACHE`` (default ``~/.cache/llm_mp``, under
``$XDG_CACHE_HOME`` when set) ``/stdlib_corpus-<key>.json``, whose key hashes
the Python version, the standard library's path and this module's source: every
later process (a CLI command, a notebook kernel) reads it instead. An unreadable
cache file is rebuilt; an unwritable cache directory only costs the parse.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig

from llm_mp.data.files import write_atomic

# Top-level modules and package directories, relative to the stdlib directory.
# Chosen for long English docstrings; none of them is split off by Linux
# distributions (unlike tkinter, idlelib, distutils, lib2to3, venv, ensurepip).
MODULES = tuple(
  sorted(
    f"{m}.py"
    for m in (
      "argparse",
      "ast",
      "base64",
      "bdb",
      "bisect",
      "calendar",
      "cmd",
      "code",
      "codecs",
      "configparser",
      "contextlib",
      "copy",
      "csv",
      "dataclasses",
      "datetime",
      "difflib",
      "dis",
      "doctest",
      "enum",
      "filecmp",
      "fileinput",
      "fnmatch",
      "fractions",
      "ftplib",
      "functools",
      "getopt",
      "gettext",
      "glob",
      "graphlib",
      "gzip",
      "heapq",
      "hmac",
      "imaplib",
      "inspect",
      "ipaddress",
      "locale",
      "mailbox",
      "mimetypes",
      "netrc",
      "numbers",
      "operator",
      "optparse",
      "os",
      "pathlib",
      "pdb",
      "pickle",
      "pickletools",
      "pkgutil",
      "platform",
      "plistlib",
      "poplib",
      "pprint",
      "profile",
      "pstats",
      "pydoc",
      "queue",
      "random",
      "reprlib",
      "sched",
      "secrets",
      "selectors",
      "shelve",
      "shlex",
      "shutil",
      "smtplib",
      "socket",
      "socketserver",
      "statistics",
      "string",
      "subprocess",
      "tarfile",
      "tempfile",
      "textwrap",
      "threading",
      "timeit",
      "tokenize",
      "trace",
      "traceback",
      "tracemalloc",
      "types",
      "typing",
      "uuid",
      "warnings",
      "weakref",
      "zipfile",
    )
  )
)
PACKAGES = (
  "asyncio",
  "collections",
  "concurrent",
  "email",
  "http",
  "importlib",
  "json",
  "logging",
  "multiprocessing",
  "unittest",
  "urllib",
  "xml",
  "xmlrpc",
)
TOPICS = "pydoc_data/topics.py"
_SKIP_DIRS = ("test", "tests", "__pycache__")


def _package_files(stdlib: str, package: str) -> list[str]:
  """Relative paths of a package's ``.py`` files, sorted, tests excluded."""
  found = []
  for root, dirs, names in os.walk(os.path.join(stdlib, package)):
    dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
    found += [os.path.relpath(os.path.join(root, n), stdlib) for n in names if n.endswith(".py")]
  return sorted(p.replace(os.sep, "/") for p in found)


def _read_tree(path: str) -> ast.Module | None:
  try:
    with open(path, encoding="utf-8") as f:
      return ast.parse(f.read())
  except (OSError, SyntaxError, UnicodeDecodeError):
    return None  # missing from this distribution or not parseable: skipped


def _topics(stdlib: str) -> list[str]:
  """The language-reference topics as documents, sorted by topic name."""
  tree = _read_tree(os.path.join(stdlib, TOPICS))
  for node in tree.body if tree else ():
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
      topics = ast.literal_eval(node.value)
      return [topics[name] for name in sorted(topics)]
  return []


def _docstrings(tree: ast.Module, module: str) -> str:
  """A source file's docstrings as one document, each headed by its qualified name."""
  parts = []
  doc = ast.get_docstring(tree)
  if doc:
    parts.append(f"{module}\n{doc}")

  def visit(node: ast.AST, prefix: str) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        name = f"{prefix}.{child.name}"
        doc = ast.get_docstring(child)
        if doc:
          parts.append(f"{name}\n{doc}")
        visit(child, name)

  visit(tree, module)
  return "\n\n".join(parts)


def _build(stdlib: str) -> tuple[str, ...]:
  """The documents, parsed from the standard library at ``stdlib``."""
  docs = _topics(stdlib)
  files = list(MODULES) + [f for p in PACKAGES for f in _package_files(stdlib, p)]
  for rel in files:
    tree = _read_tree(os.path.join(stdlib, rel))
    module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    text = _docstrings(tree, module) if tree else ""
    if text:
      docs.append(text)
  return tuple(docs)


def cache_path(stdlib: str) -> str:
  """Where the corpus of the standard library at ``stdlib`` is cached (see the module
  docstring)."""
  root = os.environ.get("LLM_MP_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llm_mp"
  )
  with open(__file__, "rb") as f:
    key = hashlib.sha256(f"{sys.version}\n{stdlib}\n".encode() + f.read()).hexdigest()
  return os.path.join(root, f"stdlib_corpus-{key[:16]}.json")


def _read_cache(path: str) -> tuple[str, ...] | None:
  try:
    with open(path, encoding="utf-8") as f:
      docs = json.load(f)
  except (OSError, ValueError):
    return None  # absent or unreadable: built again
  if isinstance(docs, list) and docs and all(isinstance(d, str) for d in docs):
    return tuple(docs)
  return None


def _write_cache(path: str, docs: tuple[str, ...]) -> None:
  """Writes ``docs`` to ``path`` atomically (a concurrent reader sees the whole file or
  none); an unwritable directory is skipped."""
  try:
    write_atomic(path, lambda f: f.write(json.dumps(list(docs), ensure_ascii=False).encode()))
  except OSError:
    pass


@functools.lru_cache(maxsize=1)
def _cached(stdlib: str) -> tuple[str, ...]:
  path = cache_path(stdlib)
  docs = _read_cache(path)
  if docs is None:
    docs = _build(stdlib)
    _write_cache(path, docs)
  return docs


def default_corpus() -> list[str]:
  """The embedded corpus: ~1.5 MB of English text from the Python standard library.

  Returns:
    Documents (uncleaned ``str``), in a fixed order. The list is read from the
    cache file (or built and written to it) once per process and copied on
    each call.
  """
  return list(_cached(sysconfig.get_paths()["stdlib"]))
