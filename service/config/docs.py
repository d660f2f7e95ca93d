"""docs/configuration.md, generated from the settings' declarations."""

from __future__ import annotations

from service.config.declaring import BOOLEAN, Setting, shown
from service.config.settings import declared

PAGE = "docs/configuration.md"
REGENERATE = f"python -m service.config > {PAGE}"
INTRO = f"""\
# Configuration

Generated from the declarations in `service/config/settings.py`: after changing a setting,
regenerate this page with `{REGENERATE}`
(tests/test_config_docs.py fails until then).

Every setting is an environment variable; the commands named beside a flag take the flag
too, and it overrides the variable. `task-runner COMMAND --help` lists a command's flags with
their variables and defaults. A bad value stops the command at start-up with one line that
names the variable (or the flag, if that is how it was given) and exit status 2; numbers
must be finite. A `TASK_RUNNER_*` variable that is no setting is reported as a warning naming
the closest one, and passwords in `MONGODB_URL` are shown as `***` in every message.
"""
HEADER = "| variable | flag | type | default | what it does |\n| --- | --- | --- | --- | --- |"


def configuration_page() -> str:
    """The whole page: the introduction, then one table per section, in declaration order."""
    sections: dict[str, list[Setting]] = {}
    for spec in declared():
        sections.setdefault(spec.section.title, []).append(spec)
    parts = [INTRO]
    for specs in sections.values():
        section = specs[0].section
        rows = "\n".join(_row(spec) for spec in specs)
        parts.append(f"## {section.title}\n\n{section.intro}\n\n{HEADER}\n{rows}\n")
    return "\n".join(parts)


def _row(spec: Setting) -> str:
    flag = "(environment only)"
    if spec.commands:
        negative = f", `--no-{spec.flag[2:]}`" if spec.kind is BOOLEAN else ""
        flag = f"`{spec.flag}`{negative} ({', '.join(spec.commands)})"
    cells = (f"`{spec.env}`", flag, _kind(spec), _default(spec), spec.help)
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _kind(spec: Setting) -> str:
    if spec.choices:
        return "one of " + ", ".join(f"`{c}`" for c in spec.choices) + " (any letter case)"
    if spec.bound is not None:
        return f"{spec.kind.name}, {spec.bound.shown}"
    return spec.kind.name


def _default(spec: Setting) -> str:
    def code(value: object) -> str:
        text = shown(value)
        return text if text == "unset" else f"`{text}`"

    dev = spec.default_for("dev")
    return code(spec.default) + ("" if dev == spec.default else f" (dev: {code(dev)})")


def main() -> None:
    """Print the page (`python -m service.config`)."""
    print(configuration_page(), end="")
