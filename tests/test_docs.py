"""The reference pages name every public entry point: a C function or Python name added without its docs fails here
(CPU tier; reads the sources, needs no build)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def read(relative: str) -> str:
    return (ROOT / relative).read_text()


def unnamed(names, page: str) -> list:
    """The names `page` does not hold as whole words (deepepDispatch is not named by deepepDispatchArgsInit)."""
    return [name for name in names if not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", page)]


def test_every_c_function_is_in_the_c_api_page():
    header = read("include/deepep/deepep.h")
    functions = re.findall(r"DEEPEP_API\s+[\w\s*]+?\b(deepep\w+)\s*\(", header)
    assert len(functions) > 30, "the header's declarations were not found"
    page = read("docs/c-api.md")
    missing = unnamed(functions, page)
    assert not missing, f"docs/c-api.md does not name {missing}"


def test_a_name_counts_as_named_only_as_a_whole_word():
    assert unnamed(["deepepDispatch", "close", "Handle"], "deepepDispatchArgsInit, closed, `HandleX`") == [
        "deepepDispatch",
        "close",
        "Handle",
    ]
    assert unnamed(["deepepDispatch", "close"], "`deepepDispatch(comm, ...)` and close().") == []


def test_every_public_python_name_is_in_the_python_api_page():
    init = read("pydeepep/__init__.py")
    exported = re.findall(r'"(\w+)"', init[init.index("__all__") :])
    stub = read("pydeepep/_core.pyi")
    communicator = re.search(r"\nclass Communicator:(.*?)(?=\nclass |\Z)", stub, re.S).group(1)
    members = [name for name in re.findall(r"\n    def (\w+)\(", communicator) if not name.startswith("_")]
    assert "dispatch" in members and "Communicator" in exported, "the stub or __all__ was not parsed"
    page = read("docs/python-api.md")
    missing = unnamed(exported + members, page)
    assert not missing, f"docs/python-api.md does not name {missing}"
