"""The source registry: which fact sources exist, and everything derived from them.

Decides:
    nothing about a client. It lists the source modules (SOURCES, one line
    each) and derives from their declarations (each module's `SOURCE`,
    core.facts.SourceSpec) the fact table every rule is checked against
    (FACT_TABLE, with FACTS, FACT_STAGE, ENUM_VALUES and SOURCE_FACTS as
    plain views), the config areas (config.py reads each source's table with
    its `read_settings`) and the stage loop's sources (services.py runs each
    stage's `gather_facts` concurrently within [dns] stage_budget).
    Adding a fact is one new module here plus one line in SOURCES
    (docs/adding-a-fact.md).
Inputs:
    the source modules: `SOURCE`, `async def gather_facts(ctx)` (unless the
    source is on demand), `read_settings(raw)` (when it has a config area)
    and `revise(ctx, result)` (when it declares revise_at).
Output:
    REGISTRY, a Registry; a Registry with more sources from
    `REGISTRY.with_modules(module)`, which a test or an embedding program
    passes to config.build (the registry file itself is not edited).
Failure modes:
    a module that lacks an entry point its declaration promises, or two
    declarations that contradict each other (a fact named twice), raise
    TypeError or ValueError when the registry is built: at import, a
    programming error that every test run finds, never an admin's.
Defaults and why:
    none.

Why the composition passes the table into the core, rather than sources
registering themselves into a core-side table at import: the core stays
without global mutable state, so what a rule may name depends on the
registry the caller chose and never on which modules happened to be
imported first; a test can parse rules against a registry with one more
source without touching the shipped one.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Awaitable, Callable

from smtpguard.core.facts import UNKNOWN, FactValue, Gathered, Kind, SourceSpec
from smtpguard.core.tables import STAGES, FactTable, fact_table
from smtpguard.sources import Context, dkim, dnsbl, fingerprint, geo, graylist, helo, rdns

# The shipped sources, one line each; the fact table lists their facts in
# this order, after the session's own (core.tables.CORE_FACTS).
SOURCES: tuple[ModuleType, ...] = (
    geo,
    fingerprint,
    rdns,
    helo,
    dnsbl,
    graylist,
    dkim,
)


@dataclass(frozen=True, slots=True)
class Source:
    """One source: its declaration and its module's entry points."""

    module: ModuleType
    spec: SourceSpec
    gather: Callable[[Context], Awaitable[Gathered | None]] | None
    read_settings: Callable[[Any], Any] | None
    revise: Callable[[Context, Any], Any] | None

    @classmethod
    def of(cls, module: ModuleType) -> Source:
        """The source a module declares; TypeError when an entry point is missing."""
        spec = getattr(module, "SOURCE", None)
        where = getattr(module, "__name__", repr(module))
        if not isinstance(spec, SourceSpec):
            raise TypeError(f"{where}: no SOURCE = SourceSpec(...) declaration")

        def entry(name: str, wanted: bool) -> Any:
            fn = getattr(module, name, None)
            if wanted and not callable(fn):
                raise TypeError(f"{where}: source {spec.name!r} declares what needs {name}(), "
                                "which the module does not define")
            return fn if wanted else None

        return cls(module=module, spec=spec, gather=entry("gather_facts", not spec.on_demand),
                   read_settings=entry("read_settings", bool(spec.area)),
                   revise=entry("revise", bool(spec.revise_at)))


@dataclass(frozen=True, slots=True)
class Registry:
    """The sources of one process and the fact table derived from them."""

    sources: tuple[Source, ...]
    table: FactTable
    # stage -> the sources the stage loop runs there, and those it revises
    # there (looked up at every stage of every session: built once)
    by_stage: dict[str, tuple[Source, ...]]
    revising: dict[str, tuple[Source, ...]]

    @classmethod
    def of(cls, *modules: ModuleType) -> Registry:
        sources = tuple(Source.of(m) for m in modules)
        areas = [s.spec.area for s in sources if s.spec.area]
        if len(areas) != len(set(areas)):
            raise ValueError(f"two sources share a config area: {sorted(areas)}")
        table = fact_table(s.spec for s in sources)
        return cls(sources=sources, table=table,
                   by_stage={st: tuple(s for s in sources if s.spec.stage == st and s.gather is not None)
                             for st in STAGES},
                   revising={st: tuple(s for s in sources if s.spec.revise_at == st) for st in STAGES})

    def with_modules(self, *modules: ModuleType) -> Registry:
        """This registry with more sources (a test's, an embedding program's)."""
        return Registry.of(*(s.module for s in self.sources), *modules)

    def at(self, stage: str) -> tuple[Source, ...]:
        """The sources the stage loop runs at `stage` (not those asked on demand)."""
        return self.by_stage.get(stage, ())

    def revised_at(self, stage: str) -> tuple[Source, ...]:
        """The sources whose earlier result `revise` updates at `stage`."""
        return self.revising.get(stage, ())

    def areas(self) -> tuple[Source, ...]:
        """The sources with a config table, each read by its read_settings."""
        return tuple(s for s in self.sources if s.spec.area)

    def wanted(self, facts: frozenset[str], also: frozenset[str] = frozenset()) -> dict[str, bool]:
        """Which sources run: those providing a fact in `facts`, those named in
        `also` (what the relay itself needs), and what those read (needs:
        always, or only when `facts` has one of the `needed_for` facts)."""
        run = {s.spec.name: bool(s.spec.fact_names() & facts) or s.spec.name in also for s in self.sources}
        changed = True
        while changed:   # needs are few and shallow (helo -> rdns); a fixed point
            changed = False
            for s in self.sources:
                if run[s.spec.name] and (not s.spec.needed_for or facts & set(s.spec.needed_for)):
                    for need in s.spec.needs:
                        if not run[need]:
                            run[need] = changed = True
        return run

    def unknown_facts(self, name: str) -> dict[str, FactValue]:
        """A source that did not finish in time: each of its facts is `unknown`."""
        return {f: UNKNOWN for f in sorted(self.table.sources[name])}


REGISTRY = Registry.of(*SOURCES)

# The derived tables, as names the rest of the code and the tests read.
FACT_TABLE: FactTable = REGISTRY.table
FACTS: dict[str, Kind] = dict(FACT_TABLE.kinds)
FACT_STAGE: dict[str, str] = dict(FACT_TABLE.stages)
ENUM_VALUES: dict[str, frozenset[str]] = dict(FACT_TABLE.values)
SOURCE_FACTS: dict[str, frozenset[str]] = dict(FACT_TABLE.sources)
