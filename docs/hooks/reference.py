"""MkDocs hook: the reference pages are generated from the code at every build, so they cannot drift.

A page holds a marker line `<!-- generated: NAME -->`; the build replaces it with GENERATORS[NAME]():
- `cli`: every `tvserve` command and flag, walked from the argparse parser (tvserve/cli.py);
- `config`: every config.properties key tvserve's own code reads (found in its source), and the
  two shipped configurations as they are;
- `record`: the archive record's dataclasses (handlers/record.py), their fields and docstrings.

It also publishes the benchmark results (benchmarks/*.md, benchmarks/drawn/*.jpg) as they are
committed, so the pages link the measured files rather than copies of them.
"""

import argparse
import ast
import dataclasses
import inspect
import io
import re
import tokenize
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- generated: (\w+) -->$", re.MULTILINE)
PUBLISHED = ("benchmarks/*.md", "benchmarks/*/*.md", "benchmarks/drawn/*.jpg")  # repository files the site serves


# --- hook entry points -------------------------------------------------------------------------

def on_files(files, config):
    """Adds the committed benchmark results to the site, at their repository paths."""
    for pattern in PUBLISHED:
        for path in sorted(REPO.glob(pattern)):
            uri = path.relative_to(REPO).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Replaces each `<!-- generated: NAME -->` line with that reference, generated now."""
    def generate(match):
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"{page.file.src_uri}: unknown generated section {name!r}; "
                           f"docs/hooks/reference.py knows {', '.join(GENERATORS)}.")
        return GENERATORS[name]()
    return MARKER.sub(generate, markdown)


# --- the CLI -------------------------------------------------------------------------------------

def cli_reference() -> str:
    from tvserve.cli import get_parser

    parser = get_parser(with_training=True)
    text = "\n".join(command_sections(parser, "tvserve", help_line=f"```text\n{parser.description.strip()}\n```"))
    return text.replace(f"{REPO}/", "")  # defaults that are paths in this checkout, as paths in any checkout


def command_sections(parser, path: str, help_line):
    """Markdown for `path` and, below it, each of its sub-commands in the parser's order."""
    yield f"## `{path}`\n"
    if help_line:
        yield f"{help_line}\n"
    yield f"```text\n{parser.format_usage().strip()}\n```\n"
    rows = [flag_row(action) for action in parser._actions
            if not isinstance(action, (argparse._SubParsersAction, argparse._HelpAction))]
    if rows:
        yield "| argument | default | what |\n| --- | --- | --- |"
        yield from rows
        yield ""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield from command_sections(sub, f"{path} {name}", helps.get(name))


def flag_row(action) -> str:
    name = ", ".join(f"`{option}`" for option in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.choices:
        name += f" ({' / '.join(map(str, action.choices))})"
    if action.required and action.option_strings:
        name += " (required)"
    default = action.default
    shown = "" if default in (None, False, argparse.SUPPRESS) or action.const is not None else f"`{default}`"
    return f"| {name} | {shown} | {cell(action.help or '')} |"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


# --- config.properties -------------------------------------------------------------------------

def config_reference() -> str:
    from tvserve.ops.properties import DEVELOPMENT_CONFIG, PRODUCTION_CONFIG, read_properties

    development, production = read_properties(DEVELOPMENT_CONFIG), read_properties(PRODUCTION_CONFIG)
    reads = keys_read_by_tvserve()
    lines = ["### Keys tvserve reads\n",
             "Found in tvserve's source (`tvserve/`, `handlers/`) where it reads a server's configuration; "
             "TorchServe reads these too, except the `tvserve_*` keys, which are tvserve's own.\n",
             "| key | development | production | read at |", "| --- | --- | --- | --- |"]
    for key in sorted(reads):
        where = ", ".join(f"`{place}`" for place in reads[key])
        lines.append(f"| `{key}` | {value_cell(development, key)} | {value_cell(production, key)} | {where} |")
    lines += ["", "### Environment variables the container maps to keys\n",
              "From `scripts/container/entrypoint.sh`: a variable that is set replaces its key's value in "
              "the production configuration.\n", "| variable | key |", "| --- | --- |"]
    lines += [f"| `{variable}` | `{key}` |" for key, variable in entrypoint_overrides()]
    lines += ["", "### Every key the shipped configurations set\n",
              "Both files, as shipped in the package (`tvserve/ops/`); their comments say why each value is set. "
              "Keys not read by tvserve above are TorchServe's own "
              "([TorchServe's configuration](https://pytorch.org/serve/configuration.html)).\n"]
    for title, path in (("Development (`config.properties`)", DEVELOPMENT_CONFIG),
                        ("Production (`config.production.properties`)", PRODUCTION_CONFIG)):
        lines += [f"#### {title}\n", f"```properties\n{path.read_text().strip()}\n```\n"]
    return "\n".join(lines)


def value_cell(properties: dict, key: str) -> str:
    value = properties.get(key)
    return "(not set)" if value is None else f"`{cell(value)}`"


def keys_read_by_tvserve() -> dict:
    """{key: ["path:line", ...]} for every `properties.get(KEY...)` / `properties[KEY]` in tvserve's
    source whose key is a string, or a module constant holding one."""
    sources = sorted([*REPO.glob("tvserve/**/*.py"), *REPO.glob("handlers/**/*.py")])
    trees = {path: ast.parse(path.read_text(), str(path)) for path in sources}
    constants = {target.id: node.value.value
                 for tree in trees.values() for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for target in node.targets if isinstance(target, ast.Name)}
    reads = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            key = property_read(node, constants)
            if key:
                reads.setdefault(key, {})[f"{path.relative_to(REPO).as_posix()}:{node.lineno}"] = None
    return {key: list(places) for key, places in reads.items()}


def property_read(node, constants: dict):
    """The key `node` reads from a `properties` dict, or None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
        owner, key = node.func.value, node.args[0]
    elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
        owner, key = node.value, node.slice
    else:
        return None
    owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
    if owner_name != "properties":
        return None
    if isinstance(key, ast.Constant) and isinstance(key.value, str):
        return key.value
    return constants.get(key.id) if isinstance(key, ast.Name) else None


def entrypoint_overrides() -> list:
    text = (REPO / "scripts/container/entrypoint.sh").read_text()
    return re.findall(r'^set_property (\w+) "\$\{(\w+):-\}"', text, re.MULTILINE)


# --- the archive's record ----------------------------------------------------------------------

def record_reference() -> str:
    import handlers.record as record

    classes = [cls for _, cls in inspect.getmembers(record, dataclasses.is_dataclass)
               if cls.__module__ == record.__name__]
    source = inspect.getsource(record)
    classes.sort(key=lambda cls: (cls is not record.Record, source.index(f"class {cls.__name__}")))
    comments = line_comments(source)
    lines = [f"`{record.METADATA_FILE}` in every archive; this tvserve writes format **{record.FORMAT}** "
             f"and reads formats 1 to {record.FORMAT}.\n",
             f"```text\n{inspect.cleandoc(record.__doc__)}\n```\n"]
    for cls in classes:
        lines += class_section(cls, comments)
    return "\n".join(lines)


def class_section(cls, comments: dict) -> list:
    node = ast.parse(inspect.getsource(cls)).body[0]
    first = inspect.getsourcelines(cls)[1]
    bases = [base.__name__ for base in cls.__bases__ if dataclasses.is_dataclass(base)]
    lines = [f"### `{cls.__name__}`\n", f"{inspect.cleandoc(cls.__doc__ or '')}\n"]
    if bases:
        lines.append(f"It has the fields of {', '.join(f'[`{base}`](#{base.lower()})' for base in bases)} too.\n")
    lines += ["| field | type | default | note |", "| --- | --- | --- | --- |"]
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            note = comments.get(first + item.lineno - 1, "")
            lines.append(f"| `{item.target.id}` | `{ast.unparse(item.annotation)}` | {default_cell(item.value)} "
                         f"| {cell(note)} |")
    return lines + [""]


def default_cell(value) -> str:
    if value is None:
        return "(required)"
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        factory = next(kw.value for kw in value.keywords if kw.arg == "default_factory")
        return f"`{ast.unparse(factory)}()`"
    return f"`{cell(ast.unparse(value))}`"


def line_comments(source: str) -> dict:
    """{line number: the comment text on that line} for a module's source."""
    return {token.start[0]: token.string.lstrip("# ").strip()
            for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}


GENERATORS = {"cli": cli_reference, "config": config_reference, "record": record_reference}
