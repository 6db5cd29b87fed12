"""Function and class sizes of the package, for reviews: median, 90th percentile and the longest.

    python tools/code_sizes.py [streammerge]

Counts lines from `def`/`class` to the last line of the body (docstrings included); a class's
size includes its methods. Module sizes are printed with the first line of each docstring.
"""

from __future__ import annotations

import ast
import os
import statistics
import sys


def sizes(root: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[tuple[str, int, str]]]:
    funcs, classes, modules = [], [], []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path) as f:
                text = f.read()
            tree = ast.parse(text)
            doc = (ast.get_docstring(tree) or "").split("\n")[0]
            modules.append((os.path.relpath(path, os.path.dirname(root)), len(text.splitlines()), doc))
            for node in ast.walk(tree):
                n = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    funcs.append((n, f"{os.path.relpath(path, root)}:{node.name}"))
                elif isinstance(node, ast.ClassDef):
                    classes.append((n, f"{os.path.relpath(path, root)}:{node.name}"))
    return funcs, classes, modules


def summary(items: list[tuple[int, str]]) -> str:
    n = sorted(s for s, _ in items)
    p90 = n[int(0.9 * (len(n) - 1))]
    top = max(items)
    return f"{len(n)}, median {statistics.median(n):g}, p90 {p90}, longest {top[0]} ({top[1]})"


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else "streammerge"
    funcs, classes, modules = sizes(root)
    print(f"functions: {summary(funcs)}")
    print(f"classes:   {summary(classes)}")
    for path, lines, doc in sorted(modules):
        print(f"  {path:38s} {lines:5d}  {doc[:90]}")


if __name__ == "__main__":
    main()
