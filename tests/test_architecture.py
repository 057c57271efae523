"""The package's import graph (grimp, as import-linter builds it, ``TYPE_CHECKING`` imports
included): no two modules of qcal_export import each other, directly or through others, and the
analysis steps never import the orchestrator that calls them."""

from __future__ import annotations

import grimp


def import_cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """Each direct import ``a -> b`` with a chain back ``b -> ... -> a``, as that cycle."""
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append((importer, *back))
    return cycles


def test_the_cycle_finder_finds_a_cycle_through_a_third_module():
    graph = grimp.ImportGraph()
    for module in ("p.a", "p.b", "p.c", "p.d"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    graph.add_import(importer="p.d", imported="p.a")
    assert import_cycles(graph) == [
        ("p.a", "p.b", "p.c", "p.a"),
        ("p.b", "p.c", "p.a", "p.b"),
        ("p.c", "p.a", "p.b", "p.c"),
    ]


def test_no_import_cycle_between_modules_of_qcal_export():
    graph = grimp.build_graph("qcal_export")
    assert len(graph.modules) > 50
    assert import_cycles(graph) == []


def test_analysis_steps_never_import_the_orchestrator():
    graph = grimp.build_graph("qcal_export")
    assert not graph.chain_exists(
        importer="qcal_export.analysis", imported="qcal_export.pipeline", as_packages=True
    )
    assert graph.chain_exists(
        importer="qcal_export.pipeline", imported="qcal_export.analysis", as_packages=True
    )
