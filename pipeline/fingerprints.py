"""Fingerprints of prepared data: a hash of the recipe's code, its preprocessing keys and the raw files' stats.

The shards of one fingerprint live in their own folder (`shard_store.shards_dir`); a change to any of these
rebuilds them.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Keys under `data.` that say where things are or how fast to work, not what the shards contain.
NOT_CONTENT = (
    "root",
    "cache_dir",
    "download",
    "num_proc",
    "num_workers",
    "in_memory",
    "in_memory_budget_gb",
    "on_device",
)
# How the shard folder is laid out, in the fingerprint: a change rebuilds every cache. 2: one DatasetDict
# (dataset_dict.json + a folder per split) that `datasets.load_from_disk(<folder>)` reads; 1: loose splits.
LAYOUT = 2
PROJECT = ("pipeline", "recipes")  # packages whose code can change what prepare() makes (see _reached)


def fingerprint(recipe, cfg: DictConfig) -> str:
    """Hash of the recipe's code, every preprocessing parameter and the raw files (path, size, mtime)."""
    params = {
        k: v
        for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
        if k not in NOT_CONTENT and k not in recipe.transform_keys
    }
    h = hashlib.sha256(
        json.dumps(
            {"recipe": recipe.name, "version": recipe.version, "layout": LAYOUT, "data": params},
            sort_keys=True,
            default=str,
        ).encode()
    )
    h.update(code_hash(recipe).encode())
    stats = raw_stats(recipe, cfg)
    for rel, size, mtime_ns in stats:
        h.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    _FINGERPRINTED[_key(recipe, cfg)] = stats
    return h.hexdigest()[:16]


# The raw files' stats each fingerprint was computed from, so the run's data record (runinfo.data_identity)
# names the very files the shards were made from without walking a million of them a second time.
_FINGERPRINTED: dict[tuple, list] = {}


def _key(recipe, cfg: DictConfig) -> tuple:
    return recipe.name, json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True, default=str)


def fingerprinted_stats(recipe, cfg: DictConfig, walk: bool = True) -> list[tuple[str, int, int]] | None:
    """`raw_stats` as the last fingerprint of this recipe and data config saw them (walked now if none was and
    `walk`; else None: a process that was sent the fingerprint never walks the raw files)."""
    stats = _FINGERPRINTED.get(_key(recipe, cfg))
    if stats is None and walk:
        stats = raw_stats(recipe, cfg)
    return stats


def raw_stats(recipe, cfg: DictConfig) -> list[tuple[str, int, int]]:
    """(path relative to data.root, size, mtime in ns) of each raw file the recipe reads, sorted by path.

    Paths as text in Path's normal form and order, with no Path made for text already in that form: a million
    images are stat'ed before any process can start decoding them."""
    root = str(Path(cfg.data.root))
    # Path.relative_to as a prefix: every relative path is under ".", and an absolute one under no relative root.
    prefix = "" if root == "." else os.path.join(root, "")
    stats = []
    for path in sorted(map(_normal, recipe.raw_files(cfg)), key=_parts):
        stat = os.stat(path)
        rel = path[len(prefix) :] if path.startswith(prefix) else path
        stats.append((rel, stat.st_size, stat.st_mtime_ns))
    return stats


def _normal(path) -> str:
    """str(Path(path)): text with no empty or "." part and no trailing "/" is so already."""
    normal = isinstance(path, str) and path not in ("", ".") and "//" not in path and "/./" not in path
    if normal and not path.startswith("./") and not path.endswith(("/", "/.")):
        return path
    return str(Path(path))


def _parts(path: str) -> list[str]:
    """Path(path).parts of a path in normal form, by which Paths sort: the root ("/", or POSIX's "//") first."""
    root = "//" if path.startswith("//") else "/" if path.startswith("/") else ""
    rest = path[len(root) :]
    return ([root] if root else []) + (rest.split("/") if rest not in ("", ".") else [])


def code_hash(recipe) -> str:
    """Hash of the source that makes the shards: the whole module that defines prepare() (the recipe's, unless
    prepare() is a `functools.partial` of a shared helper), every project function or class it reaches
    (e.g. the shared helpers in recipes/_*.py) and the module-level constants those use, so editing any of them
    rebuilds the shards.

    Source text, not behaviour: a comment or whitespace edit in those places rebuilds them too.
    """
    # A partial of a shared helper (functools' module is its getmodule): that helper and what it reaches only.
    module = None if isinstance(recipe.prepare, functools.partial) else inspect.getmodule(recipe.prepare)
    parts = [inspect.getsource(module)] if module else []
    reached = _reached(recipe.prepare)
    parts += [f"{o.__qualname__}\n{inspect.getsource(o)}" for o in reached]
    parts += _constants(reached, _project(recipe.prepare))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _project(start) -> set[str]:
    """This repo's packages and the one that holds `start` (a recipe kept outside this repo)."""
    start = getattr(start, "func", start)
    return {*PROJECT, (getattr(start, "__module__", None) or "pipeline").split(".")[0]}


def _reached(start) -> list:
    """Project functions and classes that `start` calls, directly or through others, sorted by name.

    The project: `_project(start)`.
    """
    project = _project(start)
    found, todo = {}, [getattr(start, "func", start)]
    while todo:
        obj = todo.pop()
        obj = getattr(obj, "func", obj)  # a functools.partial
        if id(obj) in found or (getattr(obj, "__module__", None) or "").split(".")[0] not in project:
            continue
        if inspect.isclass(obj):
            found[id(obj)] = obj
            # The methods written in the class's file (a dataclass's generated __init__ or __repr__ has no source).
            where = inspect.getsourcefile(obj)
            todo += [v for v in vars(obj).values() if inspect.isfunction(v) and v.__code__.co_filename == where]
        elif inspect.isfunction(obj):
            found[id(obj)] = obj
            names = _names(obj.__code__)
            for value in [obj.__globals__.get(n) for n in names] + [c.cell_contents for c in obj.__closure__ or ()]:
                if inspect.ismodule(value):  # `helpers.image_split`: the attribute names are in co_names too
                    todo += [
                        getattr(value, n)
                        for n in names
                        if value.__name__.split(".")[0] in project and hasattr(value, n)
                    ]
                elif value is not None:
                    todo.append(value)
    return sorted(found.values(), key=lambda o: (o.__module__, o.__qualname__))


def _names(code) -> set[str]:
    """Global and attribute names a code object uses, nested functions and lambdas included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _names(const)
    return names


def _constants(reached: list, project: set[str]) -> list[str]:
    """The module-level assignments (`HEADERS_READ = 10_000`, `load = partial(...)`) that the reached functions
    use, as source text, with the ones those assignments use in turn: a constant shapes the shards as much as the
    function that reads it. Text, like the functions, so a checkout elsewhere or another machine hashes the same.
    """
    texts = {}
    for function in (o for o in reached if inspect.isfunction(o)):
        names = _names(function.__code__)
        used = [function.__globals__.get(n) for n in names]
        modules = [sys.modules.get(function.__module__)]
        modules += [v for v in used if inspect.ismodule(v) and v.__name__.split(".")[0] in project]
        for module in filter(None, modules):
            statements = _assignments(module.__name__)
            todo = [n for n in names if n in statements]
            while todo:
                name = todo.pop()
                if (module.__name__, name) not in texts:
                    text, uses = statements[name]
                    texts[module.__name__, name] = text
                    todo += [n for n in uses if n in statements]
    return sorted(f"{name}\n{text}" for (_, name), text in texts.items())  # the text, not where it lives


@functools.cache
def _assignments(module_name: str) -> dict[str, tuple[str, set[str]]]:
    """A module's top-level assignments by the names they bind: (the statement's text, the names it reads)."""
    source = inspect.getsource(sys.modules[module_name])
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            reads = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
            for target in targets:
                for name in (n.id for n in ast.walk(target) if isinstance(n, ast.Name)):
                    text, earlier = found.get(name, ("", set()))  # a name bound twice keeps both statements
                    found[name] = (text + ast.get_source_segment(source, node), earlier | reads)
    return found
