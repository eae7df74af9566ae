"""`--help` that teaches: options in sections, with worked examples after them."""

from __future__ import annotations

import click


class SectionedCommand(click.Command):
    """A command whose --help lists its options under section titles (`sections`: title →
    option names, in order; options in no section go last) and ends with examples."""

    def __init__(self, *args, sections: dict[str, tuple[str, ...]] = (), examples: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.sections = dict(sections)
        self.examples = examples

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx) if isinstance(p, click.Option)}
        placed: set[str] = set()
        for title, names in self.sections.items():
            rows = [records[n] for n in names if records.get(n)]
            placed.update(names)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        rest = [record for name, record in records.items() if record and name not in placed]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.examples:
            with formatter.section("Examples"):
                for example in self.examples:  # as typed, not wrapped: they are for copying
                    formatter.write(" " * formatter.current_indent + example + "\n")
