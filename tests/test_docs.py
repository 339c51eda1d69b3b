"""The docs as a user meets them: links and anchors resolve, the config keys they name exist and the
pipeline's own keys are all documented, README commands parse, and the cheap ones run."""

from __future__ import annotations

import re
import shlex
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from conftest import ROOT, TEST_DATA, cli
from omegaconf import DictConfig

from pipeline import cli as pipeline_cli
from pipeline import config, recipe_contract

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = ("data", "trainer", "optimizer", "scheduler", "model", "loss", "checkpoint", "tracking", "debug")
# `<section>.<key>`, alone in backticks or before `=`; a file name such as `model.safetensors` is not a key.
KEY = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)(?==|$|\s|`)")
FILE_SUFFIXES = (".safetensors", ".bin", ".py", ".yaml", ".json", ".jsonl", ".csv", ".png", ".md")
LAUNCHER_FLAGS = {  # flags every launcher built on pipeline.cli.main takes
    "train": {"--help", "--print-config", "--config"},
    "prepare": {"--help", "--print-config", "--config", "--verify", "--rebuild"},
    "evaluate": {"--help"},
    "predict": {"--help"},
}
# Keys of evaluate/predict that name what to evaluate, not config keys.
RUN_KEYS = {"run", "input", "output", "weights", "split"}


def prose_and_code(path: Path) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside fenced blocks, and each fenced block as (language, lines)."""
    prose, blocks, block = [], [], None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block = (line[3:].strip(), [])
            else:
                blocks.append(block)
                block = None
        elif block is not None:
            block[1].append(line)
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    names, counts = set(), {}
    for line in prose_and_code(path)[0]:
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            names.add(f"{base}-{counts[base]}" if base in counts else base)
            counts[base] = counts.get(base, 0) + 1
    return names


def links(path: Path) -> list[str]:
    """Relative link targets in the prose (inline code left out)."""
    found = []
    for line in prose_and_code(path)[0]:
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"[a-z]+:", target):
                found.append(target)
    return found


def named_keys(path: Path) -> set[str]:
    """Config keys named in backticks in the prose and in every fenced block."""
    prose, blocks = prose_and_code(path)
    spans = [s for line in prose for s in re.findall(r"`([^`]+)`", line)]
    spans += [line for _, lines in blocks for line in lines]
    return {k for span in spans for k in KEY.findall(span) if not k.endswith(FILE_SUFFIXES)}


def leaf_keys(node, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in node.items():
        key = f"{prefix}{name}"
        keys |= leaf_keys(value, f"{key}.") if isinstance(value, DictConfig) else {key}
    return keys


def schema_keys() -> set[str]:
    """Every key some recipe's config has: the pipeline's and each recipe's own."""
    recipes = (recipe_contract.load_recipe(name) for name in recipe_contract.names())
    return set().union(*(leaf_keys(config.schema(recipe)) for recipe in recipes))


def pipeline_keys(cls=config.Config, prefix: str = "") -> set[str]:
    """The keys of the pipeline's own dataclasses (recipe keys under data/model/loss come from recipes)."""
    keys = set()
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys |= pipeline_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def readme_commands() -> list[tuple[str, list[str]]]:
    """(launcher, arguments) for each `launch/*.py` command in README.md's fenced bash blocks."""
    commands = []
    for lang, lines in prose_and_code(ROOT / "README.md")[1]:
        if lang != "bash":
            continue
        for command in re.split(r"&&|;|\|", "\n".join(lines).replace("\\\n", " ")):
            for line in command.splitlines():
                words = shlex.split(line, comments=True)
                scripts = [i for i, w in enumerate(words) if re.fullmatch(r"(\S*/)?launch/\w+\.py", w)]
                if scripts:
                    i = scripts[0]
                    commands.append((Path(words[i]).stem, words[i + 1 :]))
    return commands


def test_readme_is_a_front_door():
    """Short enough to read; the rest lives in docs/ pages, each of which the README's map links."""
    readme = ROOT / "README.md"
    assert len(readme.read_bytes()) < 15000
    assert {f"docs/{p.name}" for p in DOCS[1:]} <= set(links(readme))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_and_anchors_resolve(path):
    broken = []
    for target in links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{path.name}: broken links: {broken}"


def test_every_image_in_docs_is_linked():
    linked = {(ROOT / "docs" / t).resolve() for p in DOCS[1:] for t in links(p)}
    images = set((ROOT / "docs").glob("*.png"))
    assert images <= linked, f"images no page shows: {sorted(p.name for p in images - linked)}"


def test_config_keys_the_docs_name_exist():
    known = schema_keys()
    unknown = {
        f"{p.name}: {k}"
        for p in DOCS
        for k in named_keys(p)
        if k not in known and not any(known_key.startswith(k + ".") for known_key in known)
    }
    assert not unknown, f"keys the docs name that no recipe's config has: {sorted(unknown)}"


def test_every_pipeline_key_is_documented_in_configuration_md():
    documented = named_keys(ROOT / "docs" / "configuration.md") | set(
        re.findall(r"`([a-z_]+)`", (ROOT / "docs" / "configuration.md").read_text())
    )
    missing = sorted(pipeline_keys() - documented)
    assert not missing, f"docs/configuration.md does not name: {missing}"


def test_readme_commands_parse():
    commands = readme_commands()
    assert {"train", "predict"} <= {launcher for launcher, _ in commands}
    known = schema_keys()
    for launcher, args in commands:
        flags = {a.split("=")[0] for a in args if a.startswith("--") and "=" not in a}
        assert flags <= LAUNCHER_FLAGS.get(launcher, set()), f"{launcher}: unknown flags {flags}"
        overrides = [a for a in args if not a.startswith("--")]
        if launcher in ("train", "prepare"):
            pipeline_cli.parse([a for a in args if a != "--print-config"])
        else:
            keys = {a.split("=")[0] for a in overrides} - RUN_KEYS
            assert keys <= known, f"{launcher}: unknown keys {keys - known}"


def test_the_docs_checks_catch_mistakes(tmp_path):
    """The checks above find a broken anchor, an unknown key and an undocumented one."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## A `code` heading: W&B\n\n[ok](#a-code-heading-wb) [bad](#nope)\n"
        "`trainer.epochz=3` and `model.safetensors`\n```bash\npython launch/train.py data.rooot=x\n```\n"
    )
    assert anchors(page) == {"title", "a-code-heading-wb"}
    assert links(page) == ["#a-code-heading-wb", "#nope"]
    assert named_keys(page) == {"trainer.epochz", "data.rooot"}
    assert not named_keys(page) <= schema_keys()
    with pytest.raises(config.ConfigError):
        pipeline_cli.parse(["trainer.epochz=3"])


@pytest.mark.slow
def test_quickstart_and_own_data_run_as_written(tmp_path):
    """The README's first run (one epoch) and its own-data pair, from a scratch folder."""
    train = cli(["trainer.epochs=1", "tracking=none", "run_name=quick"], tmp_path)
    assert train.returncode == 0, train.stderr
    assert (tmp_path / "runs" / "digits" / "quick" / "model.safetensors").exists()
    table = TEST_DATA / "water-potability" / "water_potability.csv"
    own = cli(
        [
            "recipe=tabular",
            f"data.file={table}",
            "data.target=Potability",
            "trainer.epochs=1",
            "tracking=none",
            "run_name=first",
        ],
        tmp_path,
    )
    assert own.returncode == 0, own.stderr
    out = tmp_path / "work" / "predictions.csv"
    predicted = cli(["run=runs/tabular/first", f"input={table}", f"output={out}"], tmp_path, script="predict")
    assert predicted.returncode == 0, predicted.stderr
    assert len(out.read_text().splitlines()) == 3276  # a header and one row per input
